"""What a job bundle is, once read: tasks, resources, and the bundle holding them.

Everything here is already validated and expanded (``pilotflow.bundle.load`` makes these from
TOML); the planner, the renderer and the run machinery only ever see these types.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pilotflow.bundle.tasks import Tasks
from pilotflow.bundle.toml_lines import LineMap

DEFAULT_WALLTIME_S = 600
DEFAULT_LOCK_TIMEOUT_S = 300
DEFAULT_BATCH_MAX_WALLTIME_S = 24 * 3600


@dataclass(frozen=True, slots=True)
class Task:
    """One concrete task (a token). ``origin`` is its key path in the bundle, for messages."""

    name: str
    command: str
    cores: int = 1
    walltime_s: int = DEFAULT_WALLTIME_S
    memory_mb: int | None = None
    retries: int = 0
    env: tuple[tuple[str, str], ...] = ()
    after: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    resource: str | None = None
    nodes: int = 1
    mpi: bool = False
    ranks_per_node: int | None = None
    gpus: int = 0  # GPUs of the task, on its node, for its whole run (a multi-node task holds its nodes whole)
    shell: str | None = None  # runs as ``SHELL -c COMMAND`` instead of /bin/sh (Snakemake jobs run directly)
    picas: bool = False  # a token PiCaS's tools pushed (its document is adopted, not created)
    origin: tuple = ()


@dataclass(frozen=True)
class Resource:
    """A place pilots run: a scheduler, its node shape and the limits the planner respects."""

    name: str = "local"
    scheduler: str = "local"
    cores_per_node: int = 1
    memory_per_node_mb: int | None = None
    max_nodes: int = 1
    max_walltime_s: int | None = None
    max_pilots: int | None = None
    host: str | None = None
    port: int | None = None
    identity_file: str | None = None
    root: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    pe: str = "smp"
    directives: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    python: str = "python3"
    walltime_margin: float = 0.05
    max_queue_wait_s: int | None = None
    max_follow_ups: int = 3  # rounds of follow-up pilots (submitted by pilots or by `wait`)
    gpus_per_node: int = 0  # GPUs per node the planner and launcher hand out
    launchers_per_node: int = 1  # each with an equal share of the node: tasks start faster (see the README)
    gpu_resource: str = "gpu"  # the scheduler's name for GPUs (Slurm GRES, Grid Engine complex)
    mpi_plugin: str | None = None  # Slurm: srun --mpi=...; None: the site's MpiDefault
    logs: str = "packed"  # task output: per-launcher lane files (offsets in states) | "per-token" files
    mpi_launcher: str = "srun"  # Slurm: srun (with mpi_plugin, if any), or Open MPI's mpirun (daemons through srun)
    pool: str = "files"  # where token states live: files in the run directory | a CouchDB database (PiCaS)
    couchdb_url: str | None = None
    couchdb_database: str | None = None
    couchdb_credentials: str | None = None  # a file holding user:password (mode 600), read where the pool is used
    origin: tuple = ()

    @property
    def remote(self) -> bool:
        return self.host is not None

    @property
    def launcher_cores(self) -> int:
        """The cores a task may have here: one launcher's share of a node."""
        return self.cores_per_node // self.launchers_per_node

    @property
    def launcher_memory_mb(self) -> int | None:
        return None if self.memory_per_node_mb is None else self.memory_per_node_mb // self.launchers_per_node


@dataclass
class Bundle:
    name: str
    tasks: Tasks  # a list of tasks given here is made into one
    resources: list[Resource]
    lock_timeout_s: int = DEFAULT_LOCK_TIMEOUT_S
    path: Path | None = None
    on_change: str | None = None
    on_finish: str | None = None
    optimize: str = "node-hours"  # after the fewest pilots: "node-hours" (SPEC) or "makespan"
    lines: LineMap | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.tasks = Tasks.of(self.tasks)

    @property
    def base_dir(self) -> Path:
        """Where relative inputs, outputs and the default local root are resolved."""
        return self.path.parent.resolve() if self.path else Path.cwd()

    def resource(self, name: str) -> Resource:
        for r in self.resources:
            if r.name == name:
                return r
        raise KeyError(name)

    def where(self, origin: tuple) -> str:
        """``FILE:LINE`` (or ``FILE: [table.key]``) for a key path, for messages."""
        return location(self.path, self.lines, origin)


def local_resource(**overrides: Any) -> Resource:
    """The implicit resource: this machine, all its cores, one node, no walltime limit."""
    base = Resource(name="local", scheduler="local", cores_per_node=os.cpu_count() or 1,
                    max_nodes=1, max_walltime_s=None, python=this_python())
    return replace(base, **overrides)


def this_python() -> str:
    """The interpreter pilotflow runs on, as shell words: what a pilot on this machine runs
    its launcher with unless the resource names one. A ``python3`` found on PATH may be a shim
    that costs every pilot start ~0.1 s (pyenv's, measured here), or another version."""
    return shlex.quote(sys.executable) if sys.executable else "python3"


def location(path: Path | None, lines: LineMap | None, origin: tuple) -> str:
    """``FILE:LINE:`` (or ``FILE: [table.key]``) for a key path, for messages."""
    fname = str(path) if path else "<bundle>"
    line = lines.line(origin) if lines and origin else None
    if line:
        return f"{fname}:{line}:"
    table = ".".join(str(p) for p in origin if not isinstance(p, int))
    return f"{fname}: [{table}]" if table else f"{fname}:"
