"""Starting a run: plan, create the pools, stage inputs, submit the pilots.

A resource whose scheduler refuses the pilots (a partition, account or QOS that does not
exist or does not admit them) is marked broken at once and its tokens move to the other
resources that can run them, exactly as failover moves them later. With nowhere to move them,
the run is undone — pilots already submitted cancelled, pools and the run record removed — and
the scheduler's message is reported (exit 3): nothing half-created is left behind.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from pilotflow.bundle import Bundle, Resource
from pilotflow.errors import ExternalError, PilotflowError
from pilotflow.planning.plan import Plan, make_plan
from pilotflow.render import pool_path, renewal_gpus
from pilotflow.run.failover import fail_over_refused
from pilotflow.run.pilots import cancel_pilots
from pilotflow.run.records import ResourceState, RunRecord, new_run_id, runs_dir
from pilotflow.run.submit import (couchdb_spec, create_pool, resolve_root, stage, staged_inputs, submit_pilots,
                                  token_defs, write_renewal)
from pilotflow.run.sync import Session
from pilotflow.transport import Transport, connect


def _quiet(_msg: str) -> None:
    pass


def new_run(bundle: Bundle, *, cwd: Path | None = None, dry_run: bool = False,
            launcher_args: list[str] = (), log: Callable[[str], None] = _quiet,
            connect: Callable[[Resource], Transport] = connect) -> tuple[RunRecord, Plan]:
    """Plan, create the run's pools, stage inputs and submit its pilots. ``connect`` says how
    a resource is reached (tests give a fake)."""
    plan = make_plan(bundle)
    inputs = staged_inputs(bundle)
    run = new_run_id(bundle.name)
    record = RunRecord(run=run, bundle=bundle.name, bundle_path=str(bundle.path or ""),
                       base_dir=str(bundle.base_dir), created=time.time(), lock_timeout=bundle.lock_timeout_s,
                       resources={}, tokens=len(bundle.tasks), on_change=bundle.on_change,
                       on_finish=bundle.on_finish, directory=runs_dir(cwd) / run)
    if dry_run:
        return record, plan
    record.directory.mkdir(parents=True, exist_ok=True)
    # tasks are saved pinned to the resource that got them: their pool lives there
    where = {i: rp.resource.name for rp in plan.resources for i in rp.tasks}
    record.save_tasks(bundle.tasks, [where[i] for i in range(len(bundle.tasks))])
    for res in bundle.resources:  # all of them: a failover may send work where none went yet
        record.resources[res.name] = ResourceState.of(res)
    refused: dict[str, ExternalError] = {}
    transports: dict[str, Transport] = {}
    try:
        for rp in plan.resources:
            _create(record, bundle, plan, rp, inputs, transports, connect, log)
        for rp in plan.resources:
            one = Plan(bundle=bundle, resources=[rp], rank=plan.rank, solver=plan.solver)
            try:
                submit_pilots(record, one, transports, launcher_args=launcher_args, log=log)
            except ExternalError as e:
                refused[rp.resource.name] = e
    except BaseException:
        record.save()
        _close(transports)
        raise
    record.save()
    _close(transports)
    if refused:
        _refused(record, refused, connect, log)
    return record, plan


def _create(record: RunRecord, bundle: Bundle, plan: Plan, rp, inputs, transports, connect, log) -> None:
    """One resource's pool: token definitions, what pilots need to renew themselves, inputs."""
    res = rp.resource
    t = transports[res.name] = connect(res)
    pool = pool_path(res, resolve_root(res, t, bundle.base_dir), record.run, record.pools_taken())
    record.resources[res.name] = ResourceState.of(res, pool)
    record.save()
    defs = token_defs(bundle.tasks, sorted(rp.tasks, key=plan.rank.get), plan.rank, res)
    meta = {"run": record.run, "lock_timeout": bundle.lock_timeout_s, "resource": res.name,
            "created": record.created, "logs": res.logs}
    if res.pool == "couchdb":
        meta["couchdb"] = couchdb_spec(res)
    create_pool(t, pool, meta, defs, python=res.python)
    protos = bundle.tasks.protos()  # GPUs are a shape: a matrix's tasks are not made for them
    write_renewal(t, res, record.run, pool, renewal_gpus(res, [protos[i] for i in rp.tasks]))
    n = stage(t, bundle.base_dir, [p for i in rp.tasks for p in inputs.get(i, [])], pool)
    if n:
        log(f"staged {n} input file(s) to {res.name}:{pool}/work")


def _close(transports: dict[str, Transport]) -> None:
    for t in transports.values():
        t.close()


def _refused(record: RunRecord, refused: dict[str, ExternalError], connect, log) -> None:
    """Move the refused resources' tokens elsewhere; with nowhere to go, undo the run."""
    with Session(record, connect=connect) as s:
        try:
            fail_over_refused(s, refused, log)
        except ExternalError:
            _undo(s, log)
            raise


def _undo(s: Session, log: Callable[[str], None]) -> None:
    """Cancel what was submitted, remove the pools and the run record (best effort)."""
    record = s.record
    try:
        cancel_pilots(s, [p for p in record.pilots.values() if p.job_id], check=False)
    except PilotflowError:
        pass
    for name in record.active_resources():
        pool = record.pool(name) or ""
        if record.run not in pool.rsplit("/", 1)[-1]:
            continue  # never remove anything but this run's own pool
        try:
            s.transport(name).run(["rm", "-rf", "--", pool])
        except PilotflowError:
            log(f"could not remove {name}:{pool}; remove it by hand")
    shutil.rmtree(record.directory, ignore_errors=True)
