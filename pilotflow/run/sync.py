"""Bringing a run's truth home: token states, logs and outputs (pilots: ``run.pilots``).

One helper call per resource returns every state file changed since the last sync (the
launcher file is the remote helper); outputs come back in the background while ``wait`` runs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pilotflow.errors import ExternalError
from pilotflow.launcher import write_atomic
from pilotflow.run.events import token_events
from pilotflow.run.mirror import States
from pilotflow.run.records import RunRecord
from pilotflow.bundle import Resource
from pilotflow.transport import Transport, connect


@dataclass
class Snapshot:
    states: "States"  # token → state document (the mirror after this sync), stored compactly
    changed: list[str]
    agents: dict[str, dict]
    pilots_changed: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.states, States):  # a plain dict (tests, the Python API)
            store = States()
            for name, doc in self.states.items():
                store.put(name, doc)
            self.states = store

    def counts(self, total: int) -> dict[str, int]:
        c = {"todo": 0, "locked": 0, "done": 0, "error": 0}
        known = 0
        for st, n in self.states.counts().items():
            c[st] = c.get(st, 0) + n
            known += n
        c["todo"] += total - known
        return c


class Session:
    """The transports of one command invocation: one connection per resource, reused."""

    def __init__(self, record: RunRecord, connect: Callable[[Resource], Transport] = connect):
        self.record = record
        self.connect = connect  # how a resource is reached (tests give a fake)
        self._t: dict[str, Transport] = {}
        self.errors: dict[str, Exception] = {}  # resource → its last failure in this command
        self.events: list = []  # state-change events seen by this command, for callbacks and hooks
        self.rounds: dict[str, dict] = {}  # resource → its pool's follow-up rounds, as last synced
        self.spent: dict[str, int] = {}  # resource → rounds that count against its budget
        self.changed: list[str] = []  # tokens changed by every sync of this session, until taken
        self.known = record.mirror.states()
        self.reload_owners()

    def reload_owners(self) -> None:
        """Forget which resource each token belongs to (tokens move on failover); read again
        when first needed: a run on one resource never needs it to sync (a million names)."""
        self._owner: dict[str, str] | None = None

    @property
    def owner(self) -> dict[str, str]:
        """Token name → the resource whose pool holds it now."""
        if self._owner is None:
            self._owner = self.record.owners()
        return self._owner

    def take_changed(self) -> list[str]:
        """Tokens changed by any sync since the last call (a follow-up or failover decision
        syncs too: its changes count as well)."""
        out, self.changed = self.changed, []
        return out

    def transports(self) -> "LazyTransports":
        """The transports as a mapping, connected only for the resources actually used."""
        return LazyTransports(self)

    def transport(self, resource: str) -> Transport:
        if resource not in self._t:
            self._t[resource] = self.connect(self.record.resource(resource))
        return self._t[resource]

    def close(self) -> None:
        for t in self._t.values():
            t.close()
        self._t.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LazyTransports(dict):
    """A session's transports by resource name, each connected on first use."""

    def __init__(self, s: Session):
        super().__init__()
        self.s = s

    def __missing__(self, name: str):
        return self.s.transport(name)


def sync_states(s: Session) -> Snapshot:
    """Mirror every state changed since the last sync, resource by resource."""
    record = s.record
    mirror = record.mirror
    cursor = mirror.cursor()
    changed: list[str] = []
    agents: dict[str, dict] = {}
    for name in record.active_resources():
        res = record.resource(name)
        t = s.transport(name)
        since = cursor.get(name)
        try:
            doc = t.helper("changes", since=since, python=res.python, pool=record.pool(name))
        except ExternalError as e:
            s.errors[name] = e
            if len(record.resources) == 1:  # nowhere to fail over to: say so now
                raise
            continue  # another resource may still report; failover decides what to do
        s.errors.pop(name, None)
        # a pool reports only the tokens that belong to its resource now (a token moved away
        # leaves a "moved" record behind, which is not its state any more)
        mine = doc["states"] if len(record.resources) == 1 else \
            {n: d for n, d in doc["states"].items() if s.owner.get(n) == name}
        new_changes = []
        for n, before in mirror.update(mine, s.known):
            s.events += token_events(n, before, mine[n])
            new_changes.append(n)
        changed += new_changes
        s.changed += new_changes
        for k, v in doc["agents"].items():
            agents[k] = dict(v, resource=name)
        s.rounds[name] = doc.get("followups") or {}
        s.spent[name] = int(doc.get("spent") or 0)
        cursor[name] = doc["now"]
    mirror.set_agents(agents)
    mirror.set_cursor(cursor)  # after the states: an interrupted sync is simply redone
    mirror.compact(s.known)
    return Snapshot(states=s.known, changed=changed, agents=agents)


CUT = "\n[pilotflow: the output ends here: the attempt's launcher stopped while it ran]\n"


def fetch_logs(s: Session, token: str, attempt: int, resource: str, doc: dict | None = None) -> dict[str, str]:
    """stdout and stderr of one attempt, copied into the mirror and returned. ``doc`` is the
    attempt's state record: with packed logs it says where in its launcher's lane files the
    output is (an attempt whose launcher died has no end offset: its output is marked cut)."""
    record = s.record
    t = s.transport(resource)
    log = (doc or {}).get("log") if int((doc or {}).get("attempt") or 0) == attempt else None
    out = {}
    res = record.resource(resource)
    if res.pool == "couchdb" and (doc or {}).get("state") != "locked":
        # an ended attempt's output is in its token's attachments (pilots may share no
        # filesystem with the submit host); a running one's only in its launcher's lane files
        got = t.helper("output", token=token, python=res.python, pool=record.pool(resource))
        for ext in ("out", "err"):
            out[ext] = got.get(ext, "")
            local = record.directory / "logs" / f"{token}.{attempt}.{ext}"
            local.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(str(local), out[ext].encode())
        return out
    for ext in ("out", "err"):
        local = record.directory / "logs" / f"{token}.{attempt}.{ext}"
        local.parent.mkdir(parents=True, exist_ok=True)
        if log:
            out[ext] = packed_output(t, record.pool(resource), log, ext, running=doc.get("state") == "locked")
            write_atomic(str(local), out[ext].encode())
        elif t.get(f"{record.pool(resource)}/logs/{token}.{attempt}.{ext}", local):
            out[ext] = local.read_text(errors="replace")
        else:
            out[ext] = local.read_text(errors="replace") if local.exists() else ""
    return out


def packed_output(t: Transport, pool: str, log: list, stream: str, running: bool) -> str:
    """One attempt's part of its launcher's lane file: ``log`` is ``[lane, out start, err
    start, out end, err end]``, without the ends while it runs or when its launcher died
    before it ended (then all the lane holds after its start, marked as cut)."""
    k = 0 if stream == "out" else 1
    start = int(log[1 + k])
    end = int(log[3 + k]) if len(log) >= 5 else None
    data = t.read_file(f"{pool}/logs/{log[0]}.{stream}", start, end) or b""
    text = data.decode("utf-8", "replace")
    return text + (CUT if end is None and not running else "")


def fetch_outputs(s: Session, names: list[str] | None = None) -> int:
    """Declared outputs of done tokens, copied beside the bundle (same relative paths)."""
    record = s.record
    base = Path(record.base_dir)
    n = 0
    for task in record.tasks():
        if not task.outputs or (names is not None and task.name not in names):
            continue
        if s.known.state(task.name) != "done":
            continue
        t = s.transport(task.resource)
        for rel in task.outputs:
            if _inside(base, base / rel):
                n += bool(t.get(f"{record.pool(task.resource)}/work/{rel}", base / rel))
    return n


def _inside(base: Path, path: Path) -> bool:
    """Whether ``path`` resolves (symbolic links followed) to a place inside ``base``."""
    try:
        return path.resolve().is_relative_to(base.resolve())
    except OSError:
        return False


class OutputFetcher:
    """Brings declared outputs home in the background while ``wait`` runs, several at once,
    as their tokens finish (BigJobAsync-style asynchronous staging): the last output lands
    seconds after the last task, not after a serial copy at the end."""

    def __init__(self, s: Session, workers: int = 4):
        from concurrent.futures import ThreadPoolExecutor
        self.s = s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pf-out")
        self.futures = []
        self.done: set[str] = set()
        self.tasks = {t.name: t for t in s.record.tasks() if t.outputs}
        self.local = threading.local()
        self.errors: list[str] = []

    def submit(self, names) -> None:
        for n in names:
            t = self.tasks.get(n)
            if t is None or n in self.done or self.s.known.state(n) != "done":
                continue
            self.done.add(n)
            self.futures.append(self.pool.submit(self._fetch, t))

    def _fetch(self, task) -> int:
        record = self.s.record
        t = self.s.transport(task.resource)
        sftp = None
        if getattr(t, "open_extra_sftp", None):
            chans = getattr(self.local, "sftp", None) or {}
            sftp = chans.get(task.resource)
            if sftp is None:
                sftp = chans[task.resource] = t.open_extra_sftp()
                self.local.sftp = chans
        n = 0
        for rel in task.outputs:
            remote = f"{record.pool(task.resource)}/work/{rel}"
            if not _inside(Path(record.base_dir), Path(record.base_dir) / rel):
                self.errors.append(f"{task.name}: {rel}: not written, it would land outside {record.base_dir} "
                                   "(through a symbolic link)")
                continue
            try:
                n += bool(t.get(remote, Path(record.base_dir) / rel, sftp=sftp) if sftp else
                          t.get(remote, Path(record.base_dir) / rel))
            except OSError as e:
                self.errors.append(f"{task.name}: {rel}: {e}")
        return n

    def finish(self) -> int:
        total = sum(f.result() for f in self.futures)
        self.pool.shutdown()
        return total
