"""Run a command and move files on a resource: on this machine, or on a login node over SSH.

Scheduler commands and the launcher's helper commands go through a transport unchanged, so
every backend works locally and remotely. Failures become :class:`ExternalError` with the
command, its exit code and stderr; callers retry the transient ones (see ``run_checked``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from pilotflow.errors import ExternalError

RETRY_DELAYS = (0.5, 1.5, 4.0)


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


class Transport(ABC):
    """What pilotflow needs from a resource's machine."""

    remote = False
    label = "this machine"

    @abstractmethod
    def run(self, argv: list[str], *, input: bytes | None = None, cwd: str | None = None,
            timeout: float = 120, idempotent: bool = True) -> Result:
        """Run argv (no shell unless argv asks for one); never raises on a non-zero exit.
        A non-idempotent command is not retried when the connection breaks under it."""

    @abstractmethod
    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Create or replace ``path`` atomically (parents are created)."""

    @abstractmethod
    def mkdirs(self, paths: list[str]) -> None:
        """Create directories (and parents); existing ones are fine."""

    @abstractmethod
    def read_file(self, path: str, start: int = 0, end: int | None = None) -> bytes | None:
        """Bytes ``start:end`` of ``path`` (all of it by default), or None if it does not exist."""

    @abstractmethod
    def put(self, local: Path, remote: str) -> bool:
        """Copy a local file there if it differs (size or mtime); keeps the mode. True if copied."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> bool:
        """Copy a remote file here if it differs; atomically. False if it does not exist."""

    @abstractmethod
    def helper(self, command: str, *, python: str = "python3", pool: str = "", **args) -> dict:
        """A launcher helper call (``launcher.helper``: changes, scrub, move, round, mark,
        info) on the resource, in one round trip; returns its JSON answer."""

    def expand(self, path: str) -> str:
        return path

    def close(self) -> None:
        pass


def unchanged(a, b) -> bool:
    """Whether two files' stat results say the copy is up to date (size and whole-second mtime,
    which every filesystem and SFTP keep)."""
    return a.st_size == b.st_size and int(a.st_mtime) == int(b.st_mtime)


def run_checked(t: Transport, argv: list[str], what: str, *, transient=None, input: bytes | None = None,
                cwd: str | None = None, timeout: float = 120) -> Result:
    """Run, retrying with back-off while ``transient(result)`` says it may help; exit 3 after."""
    for delay in RETRY_DELAYS + (None,):
        r = t.run(argv, input=input, cwd=cwd, timeout=timeout)
        if r.returncode == 0:
            return r
        retry = transient(r) if transient else False
        if delay is None or not retry:
            raise ExternalError(f"{what} failed on {t.label}", argv=argv, returncode=r.returncode,
                                stdout=r.stdout, stderr=r.stderr, transient=retry)
        time.sleep(delay)
    raise AssertionError("unreachable")
