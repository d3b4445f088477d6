"""FAKE transport and FAKE Slurm controller, for unit tests of the run supervisor's decisions.

The real parts are real: pools are directories written by the launcher's own pool code, the
sync reads them with the launcher's helpers, submissions render real batch scripts. Only the
scheduler commands (``sbatch``, ``squeue``, ``scancel``, ``sacct``) are answered by
:class:`FakeSlurm`, an in-memory job table whose output follows Slurm 22.05's for the
options pilotflow uses, and which a test can take down (every command then fails as a dead
slurmctld does) or whose jobs it can end by hand. Nothing runs the pilots: tests write token
states with ``launcher.Pool`` as a launcher would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pilotflow.transport.base import Result
from pilotflow.transport.local import LocalTransport

DOWN = "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"


@dataclass
class FakeSlurm:
    name: str = "fake"
    jobs: dict[str, str] = field(default_factory=dict)  # job id → Slurm state word
    scripts: dict[str, str] = field(default_factory=dict)  # job id → submitted script path
    next_id: int = 1000
    down: bool = False
    calls: list[list[str]] = field(default_factory=list)

    def handle(self, argv: list[str]) -> Result:
        self.calls.append(list(argv))
        if self.down:
            return Result(argv, 1, "", DOWN)
        cmd = argv[0]
        if cmd == "sbatch":
            job = str(self.next_id)
            self.next_id += 1
            self.jobs[job] = "PENDING"
            self.scripts[job] = argv[-1]
            return Result(argv, 0, f"{job}\n", "")
        if cmd == "squeue":
            wanted = next((a.split("=", 1)[1].split(",") for a in argv if a.startswith("--jobs=")), list(self.jobs))
            if not any(j in self.jobs for j in wanted):
                return Result(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
            lines = [f"{j}|{self.jobs[j]}|None" for j in wanted if j in self.jobs]
            return Result(argv, 0, "\n".join(lines) + "\n", "")
        if cmd == "scancel":
            for j in argv[1:]:
                if j in self.jobs and self.jobs[j] in ("PENDING", "RUNNING"):
                    self.jobs[j] = "CANCELLED"
            return Result(argv, 0, "", "")
        if cmd == "sacct":
            return Result(argv, 1, "", "Slurm accounting storage is disabled")
        raise AssertionError(f"the fake Slurm does not know {argv}")

    def submitted(self) -> list[str]:
        return [c for c in self.calls if c[0] == "sbatch"]

    def set_all(self, state: str) -> None:
        for j in self.jobs:
            self.jobs[j] = state


class FakeTransport(LocalTransport):
    """This machine's files and the launcher's helpers; Slurm's commands go to a FakeSlurm."""

    label = "the fake cluster"

    def __init__(self, slurm: FakeSlurm):
        self.slurm = slurm

    def run(self, argv, *, input=None, cwd=None, timeout=120, idempotent=True):
        if argv and argv[0] in ("sbatch", "squeue", "scancel", "sacct"):
            return self.slurm.handle(list(argv))
        return super().run(argv, input=input, cwd=cwd, timeout=timeout, idempotent=idempotent)


def connector(clusters: dict[str, FakeSlurm]):
    """A ``connect(resource)`` that reaches each named resource's fake cluster."""
    def connect(resource):
        return FakeTransport(clusters[resource.name])
    return connect
