"""A scheduler backend: command builders and output parsers, nothing that runs commands.

A transport runs what a backend builds, so one backend works on this machine and over SSH,
and tests feed real captured output to the parsers.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

from pilotflow.fields import DIRECTIVE_WORD_RE

# Pilot states as pilotflow reports them, whatever the scheduler calls them.
QUEUED, RUNNING, ENDED, FAILED, CANCELLED, UNKNOWN = "queued", "running", "ended", "failed", "cancelled", "unknown"
FINISHED = (ENDED, FAILED, CANCELLED)


@dataclass(frozen=True)
class JobState:
    state: str  # one of the constants above
    raw: str = ""  # the scheduler's own word, for messages
    exit_code: int | None = None


class Scheduler(ABC):
    name = ""
    prefix = ""  # directive prefix, e.g. "#SBATCH"
    walltime_step = 1  # seconds of the walltime directive's granularity
    docs = ""  # where the state names come from
    template = ""

    @abstractmethod
    def directives(self, *, job_name: str, nodes: int, cores_per_node: int, walltime_s: int, resource,
                   output: str) -> list[str]:
        """The directive lines' arguments, already validated for directive context."""

    @abstractmethod
    def submit_argv(self, script: str, *, after: list[str] = ()) -> list[str]:
        ...

    @abstractmethod
    def parse_submit(self, stdout: str) -> str:
        ...

    @abstractmethod
    def status_argv(self, job_ids: list[str]) -> list[str]:
        ...

    @abstractmethod
    def parse_status(self, stdout: str, job_ids: list[str]) -> dict[str, JobState]:
        """States of the jobs found; a job missing from the answer is not in the dict."""

    @abstractmethod
    def cancel_argv(self, job_ids: list[str]) -> list[str]:
        ...

    def find_argv(self, name: str) -> list[str] | None:
        """A command listing the ids of jobs with this (unique) name, one per line: how a
        submission cut off by a broken connection is found instead of submitted twice."""
        return None

    def fallback_status_argv(self, job_ids: list[str]) -> list[str] | None:
        """A second way to ask, for jobs the first did not know (e.g. no accounting)."""
        return None

    def parse_fallback_status(self, stdout: str, job_ids: list[str]) -> dict[str, JobState]:
        return {}

    def transient(self, returncode: int, stderr: str) -> bool:
        """Whether a failed command is worth retrying (a busy controller, a timeout)."""
        return bool(re.search(r"timed? ?out|try again|temporarily|busy|connection refused|"
                              r"unable to contact|socket|not responding", stderr, re.I))


def directive_word(value: str, what: str) -> str:
    """Refuse anything that could break out of a directive line (spaces, quotes, newlines)."""
    if not DIRECTIVE_WORD_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} cannot go into a scheduler directive "
                         "(letters, digits and _.,:+@%=/- only)")
    return value


def check_directive(value: str) -> str:
    """A user's extra directive: one line, no NUL, starting with '-'."""
    if not value.startswith("-") or any(c in value for c in "\n\r\x00"):
        raise ValueError(f"directive {value!r} must be one line starting with '-'")
    return value


def job_name(run: str, pilot: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"pf-{pilot}-{run}")[:64]


def hms(seconds: int) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"
