"""Run records and the local mirror under ./.pilotflow/runs/RUN/.

``run.json`` says where a run's pools are and which pilots it submitted; ``tasks.json`` keeps
the tasks as submitted (for retries and reports). The token states are mirrored in
``states.jsonl``, a journal: each sync appends the states that changed in one write (the
last record of a token wins; a torn last line from a killed sync is ignored) and
``sync.json``, the per-resource sync cursor, is written after it, so a sync killed at any
point leaves a consistent mirror that the next sync completes. The journal is compacted
(atomically rewritten) when it holds twice as many records as tokens.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Mapping
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

    def pool(self, name: str) -> str | None:
        """The run's directory on that resource (None: nothing was sent there yet)."""
        return self.resources[name].get("pool")

    def pools_taken(self) -> set[tuple]:
        """(host, pool path) of every resource that holds a pool: a new pool must differ."""
        return {(self.resource(n).host, r["pool"]) for n, r in self.resources.items() if r.get("pool")}

    def active_resources(self) -> list[str]:
        """Resources that hold a pool of this run."""
        return [n for n, r in self.resources.items() if r.get("pool")]

    def tasks(self) -> list[Task]:
        return [task_from_dict(d) for d in read_json(str(self.directory / "tasks.json")) or []]

    def save_tasks(self, tasks: list[Task]) -> None:
        write_atomic(str(self.directory / "tasks.json"), dump([task_to_dict(t) for t in tasks]))
        self.save_owners({t.name: t.resource for t in tasks})

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


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class States(Mapping):
    """Token name → state document, stored compactly: the canonical JSON bytes of each
    document (decoded only when asked for) and its state word. A client holding a 100k-token
    run keeps a few hundred bytes per token instead of a Python dict per token."""

    __slots__ = ("_raw", "_state")

    def __init__(self):
        self._raw: dict[str, bytes] = {}
        self._state: dict[str, str] = {}

    def __getitem__(self, name: str) -> dict:
        return json.loads(self._raw[name])

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, name) -> bool:
        return name in self._raw

    def put(self, name: str, doc: dict | bytes) -> bool:
        """Store; returns whether it differs from what was there."""
        raw = doc if isinstance(doc, bytes) else _canonical(doc)
        if self._raw.get(name) == raw:
            return False
        self._raw[name] = raw
        st = json.loads(raw).get("state", "todo") if isinstance(doc, bytes) else doc.get("state", "todo")
        self._state[name] = sys.intern(str(st))
        return True

    def state(self, name: str) -> str:
        return self._state.get(name, "todo")

    def states(self):
        """(name, state word) pairs, without decoding documents."""
        return self._state.items()

    def raw(self, name: str) -> bytes:
        return self._raw[name]


class Mirror:
    """The local copy of a run's token states (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.journal = directory / "states.jsonl"

    def states(self) -> States:
        out = States()
        try:
            f = open(self.journal, "rb")
        except FileNotFoundError:
            return out
        with f:
            for line in f:
                try:
                    doc = json.loads(line)
                    name = doc.pop("token")
                except (ValueError, KeyError, AttributeError):
                    continue  # a record torn by an interrupted sync: the next sync re-sends it
                out.put(name, doc)
        return out

    def update(self, docs: dict[str, dict], known: States) -> list[str]:
        """Append the states that differ from ``known`` (which is updated); returns their names."""
        changed = []
        records = []
        for n, d in docs.items():
            d = {k: v for k, v in d.items() if k != "token"}
            if known.put(n, d):
                changed.append(n)
                records.append(_canonical(dict(d, token=n)).decode())
        if not changed:
            return []
        data = ("\n".join(records) + "\n").encode()
        fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return changed

    def compact(self, known: States) -> None:
        """Rewrite the journal with one record per token if it grew past twice that."""
        try:
            with open(self.journal, "rb") as f:
                lines = sum(1 for _ in f)
        except FileNotFoundError:
            return
        if lines <= 2 * max(len(known), 1000):
            return
        data = b"".join(known.raw(n)[:-1] + b',"token":' + json.dumps(n).encode() + b"}\n" if known.raw(n) != b"{}"
                        else _canonical({"token": n}) + b"\n" for n in known)
        write_atomic(str(self.journal), data)

    def cursor(self) -> dict:
        return read_json(str(self.dir / "sync.json")) or {}

    def set_cursor(self, cursor: dict) -> None:
        write_atomic(str(self.dir / "sync.json"), dump(cursor))

    def agents(self) -> dict:
        return read_json(str(self.dir / "agents.json")) or {}

    def set_agents(self, agents: dict) -> None:
        write_atomic(str(self.dir / "agents.json"), dump(agents))
