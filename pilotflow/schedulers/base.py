"""A scheduler backend: command builders and output parsers, nothing that runs commands.

A transport runs what a backend builds, so one backend works on this machine and over SSH,
and tests feed real captured output to the parsers.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass


# What may stand in a scheduler directive's value: no spaces, quotes or newlines.
DIRECTIVE_WORD_RE = re.compile(r"[A-Za-z0-9_.,:+@%=/-]+")

# Pilot states as pilotflow reports them, whatever the scheduler calls them.
QUEUED, RUNNING, ENDED, FAILED, CANCELLED, UNKNOWN = "queued", "running", "ended", "failed", "cancelled", "unknown"
FINISHED = (ENDED, FAILED, CANCELLED)


@dataclass(frozen=True)
class JobState:
    state: str  # one of the constants above
    raw: str = ""  # the scheduler's own word, for messages
    exit_code: int | None = None


class Scheduler(ABC):
    """Everything pilotflow knows about one kind of scheduler; a module of this package
    registers it as ``BACKEND``."""

    name = ""
    prefix = ""  # directive prefix, e.g. "#SBATCH"
    walltime_step = 1  # seconds of the walltime directive's granularity
    docs = ""  # where the state names come from
    template = ""  # the batch-script template in pilotflow/templates
    batch = True  # a batch system (queued jobs, nodes elsewhere); False: processes on this machine
    check_commands: tuple[str, ...] = ()  # what `pilotflow check` looks for on the login node

    @classmethod
    def for_resource(cls, resource) -> "Scheduler":
        """An instance configured for a resource (most backends need nothing from it)."""
        return cls()

    def output_name(self, pilot_id: str) -> str:
        """The file the scheduler writes the pilot's own stdout to (in POOL/pilots)."""
        return f"{pilot_id}.out"

    def mpi_style(self, resource) -> str:
        """How MPI ranks start inside a pilot: ``srun``, ``mpirun`` or ``mpiexec``."""
        return "mpiexec"

    def launcher_options(self, resource) -> list[str]:
        """What the launcher must be told about this scheduler, as its own options: the MPI
        style, and the environment variables that carry the node's index and name."""
        return ["--mpi", self.mpi_style(resource)]

    # How a pilot's launcher submits a follow-up from a node (see ``renewal_argv``).
    job_id_re = r"(\d+)"  # the job id in the last line of the submit command's output
    node_env_clear: tuple[str, ...] = ()  # prefixes of the job's own variables the submission must not inherit
    node_env_keep: tuple[str, ...] = ()  # ... except these

    def renewal_argv(self, resource, run: str, gpus: int = 0) -> list[str] | None:
        """The submit command a launcher runs for a follow-up pilot, with the placeholders
        {pilot} {nodes} {slots} {walltime_s} {walltime_hms} {script}; its options override
        the follow-up script's directives and set ``render.RENEW_VARS``. None: no renewal."""
        return None

    def node_submit_probe(self) -> list[str] | None:
        """A harmless dry-run submission a test pilot can try on a node (None: none exists)."""
        return None

    def flavour_argv(self) -> list[str] | None:
        """A command telling whether the commands found are really this scheduler's."""
        return None

    def flavour_problem(self, output: str) -> str | None:
        """None when ``flavour_argv``'s output says so, else what is wrong and the fix."""
        return None

    @abstractmethod
    def directives(self, *, job_name: str, nodes: int, cores_per_node: int, walltime_s: int, resource,
                   output: str, gpus: int = 0) -> list[str]:
        """The directive lines' arguments, already validated for directive context; ``gpus``:
        GPUs per node, asked for in the scheduler's own words."""

    @abstractmethod
    def submit_argv(self, script: str, *, after: list[str] = ()) -> list[str]:
        ...

    @abstractmethod
    def parse_submit(self, stdout: str) -> str:
        ...

    @abstractmethod
    def status_argv(self, job_ids: list[str]) -> list[str]:
        ...

    def status_in_process(self, job_ids: list[str]) -> str | None:
        """What ``status_argv`` would print, computed in this process when the resource is this
        machine and that needs no program of its own; None: run ``status_argv``."""
        return None

    def pids(self, job_ids: list[str]) -> list[int]:
        """The processes on this machine whose end is the jobs' end (``wait`` wakes when one
        ends); none where a scheduler runs them elsewhere."""
        return []

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


def renewal_job_name(run: str, limit: int = 64) -> str:
    """``job_name`` with the pilot left as the placeholder ``{pilot}``."""
    return job_name(run, "PFPILOTPF")[:limit].replace("PFPILOTPF", "{pilot}")


RENEW_ENV = "PILOTFLOW_RENEW_PILOT={pilot},PILOTFLOW_RENEW_WALLTIME={walltime_s},PILOTFLOW_RENEW_NODES={nodes}"


def hms(seconds: int) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h:02d}:{m:02d}:{s:02d}"


def format_hms(seconds: int) -> str:
    """``[D-]HH:MM:SS`` as sbatch/qsub accept it."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    clock = f"{h:02d}:{m:02d}:{s:02d}"
    return f"{days}-{clock}" if days else clock
