"""One run across several resources: noticing a broken one, and moving its work elsewhere.

A resource is broken when its scheduler cannot be reached for ``UNREACHABLE_S``, when a pilot
stays queued past the resource's ``max_queue_wait``, or when its pilots ended without taking a
single token while work was left. Its ``todo`` tokens are then moved, as in the AIMES execution
manager, to the other resources that can run them: each token is taken out of the old pool
exclusively (``launcher.Pool.move_out`` claims its next attempt with a ``moved`` record) before
it is added to the new one, so it is never claimable in two pools at once; inputs are staged
there and pilots planned for it. ``pilotflow retry --move-to RESOURCE`` does the same by hand.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

from pilotflow.bundle import Bundle, task_fits
from pilotflow.errors import ExternalError, PilotflowError, UsageError
from pilotflow.launcher import dump
from pilotflow.planning.assign import assign_resources
from pilotflow.render import pool_path
from pilotflow.run.pilots import cancel_pilots
from pilotflow.run.submit import (create_pool, plan_remaining, resolve_root, stage, staged_inputs, submit_pilots,
                                  token_def, write_renewal)
from pilotflow.run.sync import Session, sync_states
from pilotflow.schedulers.base import FINISHED, QUEUED

# how long a scheduler or host may stay unreachable before its work moves elsewhere
UNREACHABLE_S = float(os.environ.get("PILOTFLOW_UNREACHABLE_S", "60"))


def broken(s: Session, snap, now: float | None = None) -> dict[str, str]:
    """Resource name → why it is considered broken (only resources still holding todo work)."""
    record = s.record
    now = time.time() if now is None else now
    agents = record.mirror.agents()
    todo_by_res: dict[str, int] = {}
    left_by_res: dict[str, int] = {}  # todo or locked
    for name, res in s.owner.items():
        state = snap.states.state(name)
        if state == "todo":
            todo_by_res[res] = todo_by_res.get(res, 0) + 1
        if state in ("todo", "locked"):
            left_by_res[res] = left_by_res.get(res, 0) + 1
    out = {}
    for name in record.active_resources():
        info = record.resources[name]
        if info.broken:
            # still listed while it holds work: the locks of its dead pilots go stale later,
            # and those tokens must move too
            if left_by_res.get(name):
                out[name] = info.broken
            continue
        if not todo_by_res.get(name):
            info.unreachable_since = None
            continue
        err = s.errors.get(name)
        if err is not None:
            if info.unreachable_since is None:
                info.unreachable_since = now
            since = info.unreachable_since
            if now - since >= UNREACHABLE_S:
                out[name] = f"its scheduler or host has not answered for {now - since:.0f} s ({str(err).splitlines()[0]})"
                continue
        else:
            info.unreachable_since = None
        res = record.resource(name)
        pilots = [p for p in record.pilots.values() if p.resource == name]
        if res.max_queue_wait_s:
            late = [p for p in pilots if p.state == QUEUED and p.submitted and now - p.submitted > res.max_queue_wait_s]
            if late and not any(p.state == "running" for p in pilots):
                out[name] = (f"pilot {late[0].id} has been queued for more than {res.max_queue_wait_s} s "
                             "(max_queue_wait)")
                continue
        if pilots and all(p.state in FINISHED for p in pilots):
            ran = sum(a.get("end", {}).get("ran", 0) for a in agents.values() if a.get("resource") == name)
            if ran == 0:
                out[name] = "its pilots ended without running a single task"
    return out


def fail_over(s: Session, name: str, why: str, log) -> int:
    """Move the broken resource's todo tokens to the others; returns how many moved.

    Called again on each scheduler round while the resource still holds work: tokens locked by
    its dead pilots become todo once their heartbeats are stale, and then move as well."""
    record = s.record
    again = bool(record.broken(name))
    if not again:
        record.resources[name].broken = why
        record.save()
        log(f"resource {name} looks broken: {why}")
        _cancel_queued(s, name)
    try:  # locks of its dead launchers go back to todo, so they can move too
        res = record.resource(name)
        s.transport(name).helper("scrub", stale=True, python=res.python, pool=record.pool(name))
    except PilotflowError:
        pass
    snap = sync_states(s)
    names = [n for n, r in s.owner.items() if r == name and snap.states.state(n) == "todo"]
    others = [r for r in record.resources if r != name and not record.broken(r)]
    if not names or not others:
        if names and not again:
            log(f"no other resource to move {len(names)} token(s) of {name} to; they wait there")
        return 0
    split = split_between(record, names, others)
    moved = 0
    for dst, part in split.items():
        moved += len(move(s, part, dst, log))
    left = len(names) - moved
    if left and not again:
        log(f"{left} token(s) of {name} fit no other resource; they wait there")
    return moved


def split_between(record, names: list[str], others: list[str]) -> dict[str, list[str]]:
    """Send tokens where the planner would put them (fewest pilots), among resources they fit."""
    tasks = [replace(t, resource=None) for t in record.tasks() if t.name in set(names)]
    resources = [record.resource(r) for r in others]
    fitting = [t for t in tasks if any(task_fits(t, r) for r in resources)]
    if not fitting:
        return {}
    bundle = Bundle(name=record.bundle, tasks=fitting, resources=resources, lock_timeout_s=record.lock_timeout)
    out, _ = assign_resources(bundle, list(range(len(fitting))))
    return {r: [fitting[i].name for i in idx] for r, idx in out.items()}


def move(s: Session, names: list[str], dst: str, log) -> list[str]:
    """Take ``names`` out of their pools and run them on ``dst`` (pool, inputs, pilots)."""
    record = s.record
    dst_res = record.resource(dst)
    tasks = {t.name: t for t in record.tasks()}
    fits = [n for n in names if task_fits(replace(tasks[n], resource=None), dst_res)]
    if not fits:
        raise UsageError(f"none of these tokens fits resource {dst}")
    moved: list[str] = []
    by_src: dict[str, list[str]] = {}
    for n in fits:
        by_src.setdefault(tasks[n].resource, []).append(n)
    for src, part in by_src.items():
        if src == dst:
            continue
        res = record.resource(src)
        r = s.transport(src).helper("move", names=part, to=dst, python=res.python,
                                    pool=record.pool(src))
        moved += r["moved"]
    if not moved:
        return []
    # the new owner first in the run record: from now on only dst's pool speaks for them
    all_tasks = [replace(t, resource=dst) if t.name in set(moved) else t for t in record.tasks()]
    record.save_tasks(all_tasks)
    s.reload_owners()
    t = s.transport(dst)
    if not record.pool(dst):
        base = Path(record.base_dir)
        record.resources[dst].pool = pool_path(dst_res, resolve_root(dst_res, t, base), record.run,
                                                  record.pools_taken())
        record.save()
        _create_empty_pool(t, record.pool(dst), record, dst_res)
    pool = record.pool(dst)
    order = {n: i for i, n in enumerate(moved)}
    defs = [token_def(tt, order[tt.name], dst_res) for tt in all_tasks if tt.name in order]
    t.write_file(f"{pool}/defs/{int(time.time() * 1000):013d}.json", dump(defs))
    # inputs are found relative to the bundle's directory, as at submit
    path = Path(record.base_dir) / Path(record.bundle_path or "bundle.toml").name
    inputs = staged_inputs(Bundle(name=record.bundle, tasks=all_tasks, resources=[record.resource(dst)], path=path))
    files = [f for i, tt in enumerate(all_tasks) if tt.name in order for f in inputs.get(i, [])]
    if files:
        stage(t, Path(record.base_dir), files, pool)
    plan = plan_remaining(record, set(moved))
    submit_pilots(record, plan, s.transports(), log=log)
    record.save()
    log(f"moved {len(moved)} token(s) to {dst}")
    # a source left without work needs no queued pilot any more (running ones exit by themselves)
    snap = sync_states(s)
    for src in by_src:
        if src != dst and not any(r == src and snap.states.state(n) in ("todo", "locked") for n, r in s.owner.items()):
            ids = _cancel_queued(s, src, only_queued=True, why="cancelled: its tokens moved elsewhere")
            if ids:
                log(f"cancelled queued pilot(s) {', '.join(ids)} on {src}: no work left there")
    return moved


def fail_over_refused(s: Session, refused: dict[str, ExternalError], log) -> None:
    """Resources whose scheduler refused pilots are broken: their todo tokens move to the
    others (whose own refusals are handled in turn). Raises the refusal when no resource is
    left to take the work."""
    record = s.record
    pending = dict(refused)
    while pending:
        name, err = pending.popitem()
        why = f"its scheduler refused the pilots: {_said(err)}"
        record.resources[name].broken = why
        record.save()
        log(f"resource {name} looks broken: {why}")
        _cancel_queued(s, name)
        snap = sync_states(s)
        names = [n for n, r in s.owner.items() if r == name and snap.states.state(n) == "todo"]
        others = [r for r in record.resources if not record.broken(r)]
        if not names:
            continue
        if not others:
            raise err
        for dst, part in split_between(record, names, others).items():
            try:
                move(s, part, dst, log)
            except ExternalError as e:
                pending[dst] = e


def _said(err: ExternalError) -> str:
    """The scheduler's own words, in one line."""
    text = (err.stderr or err.stdout or str(err)).strip().splitlines()
    return text[-1][:300] if text else str(err).splitlines()[0]


def _create_empty_pool(t, pool: str, record, res) -> None:
    meta = {"run": record.run, "lock_timeout": record.lock_timeout, "created": record.created, "resource": res.name,
            "logs": res.logs}
    create_pool(t, pool, meta, [], expected=len(record.owners()), python=res.python)
    write_renewal(t, res, record.run, pool, res.gpus_per_node)


def _cancel_queued(s: Session, name: str, only_queued: bool = False,
                   why: str = "cancelled: resource failed over") -> list[str]:
    """Cancel the resource's unfinished pilots (or only those still queued); their ids."""
    record = s.record
    queued = [p for p in record.pilots.values() if p.resource == name and p.job_id and p.state not in FINISHED
              and (p.state == QUEUED or not only_queued)]
    if not queued:
        return []
    try:
        cancel_pilots(s, queued, check=False)  # unreachable: the pilots find their tokens moved and exit
    except PilotflowError:
        pass
    for p in queued:
        if p.state == QUEUED:
            p.state, p.raw = "cancelled", why
    record.save()
    return [p.id for p in queued]
