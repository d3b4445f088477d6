"""Run records and the local mirror under ./.pilotflow/runs/RUN/.

``run.json`` says where a run's pools are and which pilots it submitted; ``tasks.json`` keeps
the tasks as submitted (for retries and reports); ``states/TOKEN.json`` mirror the pool's
state files, each replaced atomically, and ``sync.json`` (the per-resource sync cursor) is
written last, so a sync killed at any point leaves a consistent mirror the next sync completes.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pilotflow.bundle import Resource, Task
from pilotflow.errors import RunNotFound
from pilotflow.launcher import dump, read_json, write_atomic

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


@dataclass
class RunRecord:
    run: str
    bundle: str
    bundle_path: str
    base_dir: str
    created: float
    lock_timeout: int
    resources: dict[str, dict]  # name → {"resource": Resource fields, "pool": path on the resource}
    pilots: dict[str, PilotRecord] = field(default_factory=dict)
    next_pilot: int = 1
    tokens: int = 0
    cancelled: bool = False
    followups: int = 0
    on_change: str | None = None
    on_finish: str | None = None
    finished_notified: bool = False
    directory: Path = field(default=Path("."), repr=False)

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
        return resource_from_dict(self.resources[name]["resource"])

    def pool(self, name: str) -> str:
        return self.resources[name]["pool"]

    def tasks(self) -> list[Task]:
        return [task_from_dict(d) for d in read_json(str(self.directory / "tasks.json")) or []]

    def save_tasks(self, tasks: list[Task]) -> None:
        write_atomic(str(self.directory / "tasks.json"), dump([task_to_dict(t) for t in tasks]))

    def add_pilot(self, rec: PilotRecord) -> None:
        self.pilots[rec.id] = rec

    def new_pilot_id(self) -> str:
        pid = f"p{self.next_pilot}"
        self.next_pilot += 1
        return pid

    @property
    def mirror(self) -> "Mirror":
        return Mirror(self.directory)


def resource_to_dict(r: Resource) -> dict:
    return asdict(r)


def resource_from_dict(d: dict) -> Resource:
    d = dict(d)
    for k in ("directives", "setup", "origin"):
        d[k] = tuple(d.get(k) or ())
    return Resource(**d)


def task_to_dict(t: Task) -> dict:
    d = asdict(t)
    d["origin"] = list(d["origin"])
    return d


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


class Mirror:
    """The local copy of a run's token states."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.states_dir = directory / "states"

    def states(self) -> dict[str, dict]:
        out = {}
        if self.states_dir.is_dir():
            with os.scandir(self.states_dir) as it:
                for e in it:
                    if e.name.endswith(".json"):
                        doc = read_json(e.path)
                        if doc is not None:
                            out[e.name[:-5]] = doc
        return out

    def update(self, docs: dict[str, dict], known: dict[str, dict]) -> list[str]:
        """Write the states that differ from ``known`` (which is updated); returns their names."""
        self.states_dir.mkdir(parents=True, exist_ok=True)
        changed = []
        for name, doc in docs.items():
            if known.get(name) == doc:
                continue
            write_atomic(str(self.states_dir / f"{name}.json"), dump(doc))
            known[name] = doc
            changed.append(name)
        return changed

    def cursor(self) -> dict:
        return read_json(str(self.dir / "sync.json")) or {}

    def set_cursor(self, cursor: dict) -> None:
        write_atomic(str(self.dir / "sync.json"), dump(cursor))

    def agents(self) -> dict:
        return read_json(str(self.dir / "agents.json")) or {}

    def set_agents(self, agents: dict) -> None:
        write_atomic(str(self.dir / "agents.json"), dump(agents))
