"""Run a command and move files on a resource: on this machine, or on a login node over SSH.

Scheduler commands and the launcher's helper commands go through a transport unchanged, so
every backend works locally and remotely. Failures become :class:`ExternalError` with the
command, its exit code and stderr; callers retry the transient ones (see ``run_checked``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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
    def read_file(self, path: str) -> bytes | None:
        """Bytes of ``path``, or None if it does not exist."""

    @abstractmethod
    def put(self, local: Path, remote: str) -> bool:
        """Copy a local file there if it differs (size or mtime); keeps the mode. True if copied."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> bool:
        """Copy a remote file here if it differs; atomically. False if it does not exist."""

    @abstractmethod
    def helper(self, command: str, *args: str, python: str = "python3", pool: str = "") -> dict:
        """Run a launcher helper command (``changes``, ``scrub``, ``info``) and parse its JSON."""

    def expand(self, path: str) -> str:
        return path

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    """This machine: subprocesses, plain file operations, and the launcher's helpers called
    in-process (the same code the remote side runs)."""

    def run(self, argv, *, input=None, cwd=None, timeout=120, idempotent=True):
        try:
            p = subprocess.run(argv, input=input, cwd=cwd, capture_output=True, timeout=timeout)
        except FileNotFoundError:
            return Result(argv, 127, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return Result(argv, 124, "", f"timed out after {timeout:.0f} s")
        return Result(argv, p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))

    def write_file(self, path, data, mode=0o644):
        from pilotflow.launcher import write_atomic
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        os.chmod(path, mode)

    def mkdirs(self, paths):
        for p in paths:
            os.makedirs(p, exist_ok=True)

    def read_file(self, path):
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, local, remote):
        dst = Path(remote)
        st = local.stat()
        try:
            dt = dst.stat()
            if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
                return False
        except FileNotFoundError:
            pass
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copy2(local, tmp)
        os.replace(tmp, dst)
        return True

    def get(self, remote, local):
        src = Path(remote)
        if not src.exists():
            return False
        return self.put(src, str(local))

    def helper(self, command, *args, python="python3", pool=""):
        from pilotflow import launcher
        if command == "changes":
            since = float(args[0]) if args else None
            return launcher._changes(launcher.Pool(pool), since)
        if command == "scrub":
            opts = dict(a.split("=", 1) for a in args)
            names = set(json.loads(opts["names"])) if "names" in opts else None
            pilots = set(json.loads(opts["pilots"])) if "pilots" in opts else None
            done = launcher.Pool(pool).scrub(failed=opts.get("failed") == "1", stale=opts.get("stale") == "1",
                                             names=names, timeout=float(opts["timeout"]) if "timeout" in opts
                                             else None, reason=opts.get("reason", ""), pilots=pilots)
            return {"scrubbed": done}
        if command == "move":
            opts = dict(a.split("=", 1) for a in args)
            return {"moved": launcher.Pool(pool).move_out(json.loads(opts["names"]), opts["to"])}
        if command == "info":
            return launcher._info()
        raise ValueError(command)

    def expand(self, path):
        return os.path.expanduser(path)


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


def connect(resource) -> Transport:
    """The transport for a resource: SSH when it has a host, else this machine."""
    if resource.host:
        from pilotflow.ssh import SshTransport
        return SshTransport.for_resource(resource)
    return LocalTransport()
