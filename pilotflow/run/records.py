"""Run records under ./.pilotflow/runs/RUN/.

``run.json`` says where a run's pools are, what is known of each resource and which pilots it
submitted; ``tasks.json`` keeps the tasks as submitted (for retries and reports) and
``owners.json`` which resource's pool holds each token. The token states themselves are in
the mirror (``pilotflow.run.mirror``).
"""

from __future__ import annotations

import json
import secrets
import time
from operator import attrgetter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pilotflow.bundle import Resource, Task
from pilotflow.bundle.tasks import Tasks
from pilotflow.errors import RunNotFound
from pilotflow.launcher import dump, read_json, write_atomic
from pilotflow.run.mirror import Mirror

RUNS = Path(".pilotflow") / "runs"


@dataclass
class PilotRecord:
    id: str
    resource: str
    nodes: int
    cores_per_node: int
    walltime_s: int
    stage: int
    tasks: int
    job_id: str | None = None
    submitted: float | None = None
    state: str = "planned"  # planned | queued | running | ended | failed | cancelled | unknown
    raw: str = ""
    ended: float | None = None
    gpus_per_node: int = 0


@dataclass
class ResourceState:
    """What a run knows of one of its resources, kept in run.json."""

    resource: dict  # the Resource's fields, as submitted
    pool: str | None = None  # the run's directory there; None: nothing was sent there yet
    broken: str | None = None  # why failover gave up on it (None: it is fine)
    followups: int = 0  # rounds of follow-up pilots submitted for it
    unreachable_since: float | None = None  # when its scheduler or host stopped answering
    renewal: str | None = None  # why the last follow-up round a pilot tried failed

    @classmethod
    def of(cls, res: Resource, pool: str | None = None) -> "ResourceState":
        return cls(resource=resource_to_dict(res), pool=pool)

    def fresh_chance(self) -> None:
        """Forget failures (``retry`` gives every resource a fresh chance)."""
        self.broken, self.followups, self.unreachable_since, self.renewal = None, 0, None, None


@dataclass
class RunRecord:
    run: str
    bundle: str
    bundle_path: str
    base_dir: str
    created: float
    lock_timeout: int
    resources: dict[str, "ResourceState"]  # every resource of the run, by name
    pilots: dict[str, PilotRecord] = field(default_factory=dict)
    next_pilot: int = 1
    tokens: int = 0
    cancelled: bool = False
    followups: int = 0
    on_change: str | None = None
    on_finish: str | None = None
    finished_notified: bool = False
    state: str = "running"  # as the last status or wait saw it: running | finished | stalled
    reason: str = ""  # why it was stalled
    directory: Path = field(default=Path("."), repr=False)

    def __post_init__(self):
        # run.json (and older callers) give plain dicts
        self.resources = {n: r if isinstance(r, ResourceState) else ResourceState(**r)
                          for n, r in self.resources.items()}

    # persistence -------------------------------------------------------------------------
    def save(self) -> None:
        doc = asdict(self)
        doc.pop("directory")
        write_atomic(str(self.directory / "run.json"), json.dumps(doc, indent=1).encode())

    @classmethod
    def load(cls, directory: Path) -> "RunRecord":
        doc = read_json(str(directory / "run.json"))
        if doc is None:
            raise RunNotFound(f"{directory}: not a pilotflow run (run.json missing or unreadable)")
        doc["pilots"] = {k: PilotRecord(**v) for k, v in doc.get("pilots", {}).items()}
        return cls(directory=directory, **doc)

    # helpers ------------------------------------------------------------------------------
    def resource(self, name: str) -> Resource:
        return resource_from_dict(self.resources[name].resource)

    def pool(self, name: str) -> str | None:
        """The run's directory on that resource (None: nothing was sent there yet)."""
        return self.resources[name].pool

    def broken(self, name: str) -> str | None:
        """Why the resource was given up on, or None (also for a resource not in the run)."""
        state = self.resources.get(name)
        return state.broken if state is not None else None

    def pools_taken(self) -> set[tuple]:
        """(host, pool path) of every resource that holds a pool: a new pool must differ."""
        return {(self.resource(n).host, r.pool) for n, r in self.resources.items() if r.pool}

    def active_resources(self) -> list[str]:
        """Resources that hold a pool of this run."""
        return [n for n, r in self.resources.items() if r.pool]

    def tasks(self) -> list[Task]:
        return [task_from_dict(d) for d in read_json(str(self.directory / "tasks.json")) or []]

    def save_tasks(self, tasks: list[Task], resources: list[str] | None = None) -> None:
        """``resources``: each task's resource, when it differs from ``task.resource`` (a new
        run pins tasks to where the plan put them without copying a million of them)."""
        rows = (list(tasks.field_dicts(task_to_dict)) if isinstance(tasks, Tasks)  # a matrix's without making them
                else [task_to_dict(t) for t in tasks])
        if resources is not None:
            for d, r in zip(rows, resources):
                d["resource"] = r
        self.save_task_rows(rows)
        self.save_owners(dict(zip((d["name"] for d in rows), (d["resource"] for d in rows))))

    def save_task_rows(self, rows: list[dict]) -> None:
        """tasks.json, and beside it the cores of the tasks of more than one core."""
        write_atomic(str(self.directory / "tasks.json"), dump(rows))
        write_atomic(str(self.directory / "cores.json"),
                     dump({d["name"]: d["cores"] for d in rows if d.get("cores", 1) != 1}))

    def task_cores(self) -> dict[str, int]:
        """Token → cores, for the tasks of more than one core (the report's bars): a small
        file of its own, so a million-token report need not decode every task."""
        doc = read_json(str(self.directory / "cores.json"))
        if doc is None:  # a run made before cores.json existed
            return {t.name: t.cores for t in self.tasks() if t.cores != 1}
        return doc

    def owners(self) -> dict[str, str]:
        """Token name → the resource whose pool holds it, in task order. Read from a small
        file of its own: status and wait of a 100,000-token run need not decode every task."""
        doc = read_json(str(self.directory / "owners.json"))
        if doc is None:  # a run made before owners.json existed
            return {t.name: t.resource for t in self.tasks()}
        return dict(zip(doc["names"], (doc["resources"][i] for i in doc["index"])))

    def save_owners(self, owner: dict[str, str]) -> None:
        resources = sorted(set(owner.values()), key=str)
        pos = {r: i for i, r in enumerate(resources)}
        write_atomic(str(self.directory / "owners.json"),
                     dump({"names": list(owner), "resources": resources, "index": [pos[r] for r in owner.values()]}))

    def add_pilot(self, rec: PilotRecord) -> None:
        self.pilots[rec.id] = rec

    def new_pilot_id(self) -> str:
        pid = f"p{self.next_pilot}"
        self.next_pilot += 1
        return pid

    @property
    def mirror(self) -> Mirror:
        return Mirror(self.directory)


def resource_to_dict(r: Resource) -> dict:
    return asdict(r)


def resource_from_dict(d: dict) -> Resource:
    d = dict(d)
    for k in ("directives", "setup", "origin"):
        d[k] = tuple(d.get(k) or ())
    return Resource(**d)


_TASK_FIELDS = tuple(f.name for f in fields(Task))
_task_values = attrgetter(*_TASK_FIELDS)


def task_to_dict(t: Task) -> dict:
    """A task as JSON-ready data (its tuples are written as JSON arrays), fields read in one
    C call: ``dataclasses.asdict`` deep-copies, which was most of ``submit``'s time for large
    runs, and a field-by-field loop was still a second per million tasks."""
    return dict(zip(_TASK_FIELDS, _task_values(t)))


def task_from_dict(d: dict) -> Task:
    d = dict(d)
    d["env"] = tuple(tuple(x) for x in d.get("env") or ())
    for k in ("after", "inputs", "outputs", "origin"):
        d[k] = tuple(d.get(k) or ())
    return Task(**d)


def new_run_id(bundle: str) -> str:
    return f"{bundle}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def runs_dir(cwd: Path | None = None) -> Path:
    return (cwd or Path.cwd()) / RUNS


def find_run(run: str | None, cwd: Path | None = None) -> RunRecord:
    """The run named ``run``, or the newest one started from this directory."""
    base = runs_dir(cwd)
    if run:
        d = base / run
        if not (d / "run.json").exists():
            known = [r.run for r in list_runs(cwd)[:5]]
            hint = ("; known runs: " + ", ".join(known)) if known else "; no runs were started from this directory"
            raise RunNotFound(f"no run '{run}' in {base}{hint}")
        return RunRecord.load(d)
    runs = list_runs(cwd)
    if not runs:
        raise RunNotFound(f"no runs in {base}: start one with `pilotflow submit BUNDLE` "
                          "(runs are found from the directory they were submitted from)")
    return runs[0]


def list_runs(cwd: Path | None = None) -> list[RunRecord]:
    base = runs_dir(cwd)
    out = []
    if base.is_dir():
        for d in base.iterdir():
            if (d / "run.json").exists():
                try:
                    out.append(RunRecord.load(d))
                except RunNotFound:
                    continue
    return sorted(out, key=lambda r: r.created, reverse=True)
