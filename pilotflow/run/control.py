"""What a user does to a run besides waiting: sync it, read a token's logs, retry, move work,
cancel. Each returns what happened; the CLI and the Python API say it in their own way.

Cancelling pilots has one definition (``run.pilots.cancel_pilots``) for the CLI, failover and
the Snakemake plugin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from pilotflow.errors import PilotflowError, UsageError
from pilotflow.run.records import RunRecord
from pilotflow.run.supervisor import notify_finished, run_state, submit_followup, sync_run
from pilotflow.run.pilots import cancel_pilots, refresh_pilots
from pilotflow.run.sync import Session, Snapshot, fetch_logs, fetch_outputs, sync_states
from pilotflow.schedulers.base import FINISHED


def _quiet(_msg: str) -> None:
    pass


def cancel(record: RunRecord, *, wait_s: float = 15.0) -> tuple[int, dict[str, int]]:
    """Cancel the run's live pilots; their launchers hand running tokens back on SIGTERM.
    Returns (pilots cancelled, counts after)."""
    with Session(record) as s:
        refresh_pilots(s)
        for name in record.active_resources():  # first: no pilot ending now renews the run
            try:
                s.transport(name).helper("mark", cancelled=True, python=record.resource(name).python,
                                         pool=record.pool(name))
            except PilotflowError:
                pass  # unreachable: its pilots are cancelled below all the same
        live = [p for p in record.pilots.values() if p.job_id and p.state not in FINISHED]
        cancel_pilots(s, live)
        record.cancelled = True
        record.save()
        # launchers hand their tokens back on SIGTERM; give them a moment, then make sure
        deadline = time.time() + wait_s
        while time.time() < deadline:
            refresh_pilots(s)
            if all(p.state in FINISHED for p in live):
                break
            time.sleep(0.5)
        for p in live:
            if p.state not in FINISHED:
                p.state, p.raw = "cancelled", "cancel requested"
        record.save()
        snap = sync_run(s)
    return len(live), snap.counts(record.tokens)


def sync_all(record: RunRecord) -> tuple[Snapshot, int]:
    """States, pilots and declared outputs; returns the snapshot and how many outputs came."""
    with Session(record) as s:
        snap = sync_run(s)
        return snap, fetch_outputs(s)


@dataclass
class Status:
    snap: Snapshot
    events: list
    state: str  # running | finished | stalled
    reason: str  # why it is stalled, and the command that carries it on


def status(record: RunRecord, note: Callable[[str], None] = _quiet) -> Status:
    """A sync for ``status``; a run found finished (unattended) fires its ``on_finish`` hook,
    once per run."""
    with Session(record) as s:
        snap = sync_run(s)
        state, reason = run_state(s, snap)
        record.state, record.reason = state, reason
        record.save()
        if state == "finished":
            notify_finished(record, snap.counts(record.tokens), note)
        return Status(snap, s.events, state, reason)


def status_json(record: RunRecord, snap: Snapshot, state: str = "", reason: str = "") -> dict:
    """The ``status --json`` document of SPEC §3."""
    counts = snap.counts(record.tokens)
    tokens = {}
    for name in record.owners():
        d = snap.states.get(name, {})
        tokens[name] = {"state": d.get("state", "todo"), "exit_code": d.get("exit_code"),
                          "attempts": int(d.get("attempt", 0)), "pilot": d.get("pilot"), "host": d.get("host"),
                          "start": d.get("start"), "end": d.get("end")}
    finished = counts["todo"] == 0 and counts["locked"] == 0
    idle = pilot_idle(snap.agents or {})
    doc = {"run": record.run, "finished": finished, "state": state or ("finished" if finished else "running")}
    if doc["state"] == "stalled":
        doc["reason"] = reason
    return {**doc, "counts": counts, "tokens": tokens,
            "pilots": {p.id: {"resource": p.resource, "job_id": p.job_id, "state": p.state,
                              "idle_s": idle.get(p.id)} for p in record.pilots.values()}}


def pilot_idle(agents: dict[str, dict]) -> dict[str, float | None]:
    """Seconds each pilot's launchers ran no task, from their end records (summed over its
    nodes); None while one of them runs (or for launchers older than the record)."""
    out: dict[str, float | None] = {}
    for a in agents.values():
        pid = a.get("pilot")
        end = a.get("end") if isinstance(a.get("end"), dict) else None
        idle = end.get("idle") if end else None
        if idle is None or (pid in out and out[pid] is None):
            out[pid] = None
        else:
            out[pid] = round(out.get(pid, 0.0) + float(idle), 1)
    return out


def token_logs(record: RunRecord, token: str) -> tuple[dict, dict[str, str]]:
    """The token's latest state document and its attempt's {"out": ..., "err": ...}."""
    task = next((t for t in record.tasks() if t.name == token), None)
    if task is None:
        raise UsageError(f"run {record.run} has no token '{token}'")
    with Session(record) as s:
        snap = sync_states(s)
        doc = snap.states.get(token)
        if not doc or not doc.get("attempt"):
            raise UsageError(f"token '{token}' has not run yet (state: {(doc or {}).get('state', 'todo')})")
        return doc, fetch_logs(s, token, int(doc["attempt"]), task.resource, doc)


@dataclass
class RetryResult:
    scrubbed: list[str]  # tokens put back to todo
    left: int  # todo tokens after the scrub
    live: int  # pilots still queued or running (they take the work too)
    submitted: int  # new pilots


def retry(record: RunRecord, *, failed: bool = False, stale: bool = False,
          log: Callable[[str], None] = _quiet) -> RetryResult:
    """Scrub error / stale tokens back to todo and submit pilots for what is left; every
    resource gets a fresh chance (failover and follow-up counts are forgotten)."""
    with Session(record) as s:
        sync_run(s)
        scrubbed: list[str] = []
        if failed or stale:
            for name in record.active_resources():
                r = s.transport(name).helper("scrub", failed=failed, stale=stale, python=record.resource(name).python,
                                             pool=record.pool(name))
                scrubbed += r["scrubbed"]
        snap = sync_states(s)
        record.cancelled = False
        for state in record.resources.values():
            state.fresh_chance()
        for name in record.active_resources():  # a fresh follow-up budget, and no longer cancelled
            s.transport(name).helper("mark", resumed=True, python=record.resource(name).python,
                                     pool=record.pool(name))
        live = sum(1 for p in record.pilots.values() if p.state not in FINISHED)
        left = sum(1 for t in record.tasks() if snap.states.state(t.name) == "todo")
        submitted = len(submit_followup(s, snap, "retry", log)) if left else 0
        record.save()
    return RetryResult(scrubbed=scrubbed, left=left, live=live, submitted=submitted)


def move_to(record: RunRecord, dst: str, *, log: Callable[[str], None] = _quiet) -> tuple[list[str], int]:
    """``retry --move-to``: the todo tokens of other resources go to ``dst``. Returns (moved,
    how many were asked for)."""
    from pilotflow.run.failover import move
    if dst not in record.resources:
        raise UsageError(f"run {record.run} has no resource '{dst}'; its resources: {', '.join(record.resources)}")
    with Session(record) as s:
        snap = sync_run(s)
        names = [n for n, r in s.owner.items() if r != dst and snap.states.state(n) == "todo"]
        if not names:
            return [], 0
        moved = move(s, names, dst, log=log)
        record.resources[dst].broken = None
        record.save()
    return moved, len(names)
