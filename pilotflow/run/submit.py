"""The parts of creating a run: pools on the resources, staged inputs, rendered scripts,
submitted pilots (``run.start`` puts them together).

The same functions submit follow-up pilots for ``retry`` and for ``wait`` when every pilot of
a resource ended with work left, and for failover.
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from pilotflow.bundle import Bundle, Resource, Task, task_nodes
from pilotflow.bundle.model import this_python
from pilotflow.bundle.tasks import TaskBlock, Tasks
from pilotflow.errors import BundleError, ExternalError, UsageError
from pilotflow.launcher import Pool, dump, shard_width, write_atomic
from pilotflow.launcher_text import launcher_bytecode, launcher_hash
from pilotflow.planning.plan import Plan, make_plan
from pilotflow.planning.sizing import PILOT_OVERHEAD_S
from pilotflow.render import default_root, render_pilot, render_renewal
from pilotflow.run.records import PilotRecord, RunRecord
from pilotflow.schedulers import backend
from pilotflow.schedulers.base import job_name
from pilotflow.transport import RETRY_DELAYS, Transport


def token_def(t: Task, rank: int, res: Resource | None = None) -> dict:
    d = {"name": t.name, "command": t.command, "cores": t.cores, "walltime": t.walltime_s,
         "memory": t.memory_mb or 0, "env": [list(kv) for kv in t.env], "after": list(t.after),
         "retries": t.retries, "rank": rank}
    if t.gpus:
        d["gpus"] = t.gpus
    if t.shell:
        d["shell"] = t.shell
    if t.picas:
        d["picas"] = True
    if t.nodes > 1 or t.mpi:
        k = task_nodes(t, res.cores_per_node if res else None)
        d["nodes"] = k
        d["mpi"] = t.mpi
        if t.mpi:
            if t.nodes > 1:  # whole nodes: ranks_per_node ranks on each (default: the task's cores)
                per_node = t.ranks_per_node or t.cores
                d.update(ranks_per_node=per_node, ranks=k * per_node)
            elif k > 1:  # cores beyond one node: one rank per core, nodes filled in turn
                d.update(ranks_per_node=res.cores_per_node, ranks=t.cores)
            else:
                d.update(ranks=t.ranks_per_node or t.cores)
    return d


# Task fields whose token-definition entry is the value itself, or made from it alone
_DEF_OF = {"name": "name", "command": "command", "walltime_s": "walltime", "retries": "retries", "cores": "cores"}
_NOT_IN_DEFS = frozenset({"inputs", "outputs", "resource", "origin"})


def token_defs(tasks: Tasks, order: Iterable[int], rank: dict[int, int], res: Resource | None = None) -> list[dict]:
    """``token_def`` of the tasks at ``order``. A block's are made from its template's and each
    task's varying fields, without making its tasks (at a million tokens: seconds of submit)."""
    out = []
    templates: dict[int, dict | None] = {}
    for i in order:
        part, j = tasks.locate(i)
        if not isinstance(part, TaskBlock):
            out.append(token_def(part[j], rank[i], res))
            continue
        key = id(part)
        if key not in templates:
            templates[key] = _def_template(part, res)
        template = templates[key]
        if template is None:
            out.append(token_def(part[j], rank[i], res))
            continue
        d = dict(template, rank=rank[i])
        for f, v in part.varied(j).items():
            if f in _DEF_OF:
                d[_DEF_OF[f]] = v
            elif f == "env":
                d["env"] = [list(kv) for kv in v]
            elif f == "memory_mb":
                d["memory"] = v or 0
            elif f in ("gpus", "shell"):
                if v:
                    d[f] = v
                else:
                    d.pop(f, None)
        out.append(d)
    return out


def _def_template(block: TaskBlock, res: Resource | None) -> dict | None:
    """The definition its tasks share, or None when a varying field changes its shape."""
    p = block.proto
    simple = set(_DEF_OF) | {"env", "memory_mb", "gpus", "shell"} | _NOT_IN_DEFS
    varying = set(block.varying())
    if not varying <= simple or ("cores" in varying and (p.mpi or p.nodes > 1)):
        return None
    return token_def(p, 0, res)


def resolve_root(res: Resource, t: Transport, base_dir: Path) -> str:
    root = default_root(res, base_dir)
    if res.remote:
        root = t.expand(root)
    return root


def create_pool(t: Transport, pool: str, meta: dict, defs: list[dict], expected: int | None = None,
                python: str = "python3") -> None:
    """The pool directory, its metadata and the first batch of definitions. ``expected``: how
    many tokens it will hold (default: the definitions'), which sizes its state directories."""
    meta = dict(meta, format=Pool.FORMAT, shard_width=shard_width(len(defs) if expected is None else expected))
    if not t.remote:  # this machine: the launcher's own pool code, in-process
        if meta.get("couchdb"):
            _local_dirs(pool, meta)
            t.helper("push", create=True, defs=defs, pool=pool)
            return
        Pool.create(pool, meta).add_defs(defs)
        code = launcher_bytecode() if python == this_python() else None
        if code is not None:  # its pilots run this interpreter: the launcher compiled already
            write_atomic(f"{pool}/.launcher-{launcher_hash()}.pyc", code)
        return
    t.mkdirs([f"{pool}/{d}" for d in Pool.SUBDIRS])
    t.write_file(f"{pool}/run.json", dump(meta))
    if meta.get("couchdb"):  # the login node reaches the database: the tokens go from there
        t.helper("push", create=True, defs=defs, pool=pool, python=python)
        return
    t.write_file(f"{pool}/defs/000000.json", dump(defs))


def _local_dirs(pool: str, meta: dict) -> None:
    """A pool directory on this machine with its run.json (a CouchDB pool's tokens then go to
    the database through the same helper call as over SSH: one path, one error mapping)."""
    for d in Pool.SUBDIRS:
        os.makedirs(f"{pool}/{d}", exist_ok=True)
    write_atomic(f"{pool}/run.json", dump(meta))


def couchdb_spec(res: Resource) -> dict | None:
    """Where a resource's CouchDB pool is, for the pool's run.json (no secrets: the
    credentials file is named, and read where the pool is used)."""
    if res.pool != "couchdb":
        return None
    return {"url": res.couchdb_url, "database": res.couchdb_database, "credentials": res.couchdb_credentials}


def write_renewal(t: Transport, res: Resource, run: str, pool: str, gpus: int = 0) -> bool:
    """What a pilot needs to submit its own follow-up on this resource (``pilots/renew.json``
    and the follow-up script ``pilots/renew.sh``), written once per pool. False when the
    resource's scheduler has no way to do it."""
    sched = backend(res)
    argv = sched.renewal_argv(res, run, gpus)
    if argv is None:
        return False
    t.write_file(f"{pool}/pilots/renew.sh", render_renewal(res, run, pool, gpus).encode(), mode=0o755)
    spec = {"argv": argv, "job_id_re": sched.job_id_re, "clear_env": list(sched.node_env_clear),
            "keep_env": list(sched.node_env_keep), "walltime_step": sched.walltime_step,
            "cores_per_node": res.cores_per_node, "max_nodes": res.max_nodes, "max_walltime": res.max_walltime_s,
            "margin": res.walltime_margin, "overhead": PILOT_OVERHEAD_S, "max_pilots": res.max_pilots,
            "max_follow_ups": res.max_follow_ups, "resource": res.name, "gpus_per_node": gpus}
    t.write_file(f"{pool}/pilots/renew.json", dump(spec))
    return True


def staged_inputs(bundle: Bundle) -> dict[int, list[str]]:
    """Task index → input files (relative to the bundle), globs expanded; errors if missing."""
    base = bundle.base_dir
    out: dict[int, list[str]] = {}
    problems = []
    for i, shape in enumerate(bundle.tasks.protos()):
        if not shape.inputs:  # a matrix's tasks are made only where they have inputs
            continue
        t = bundle.tasks[i]
        files: list[str] = []
        for pattern in t.inputs:
            rel = PurePosixPath(pattern)
            if rel.is_absolute() or ".." in rel.parts:
                problems.append(f"{bundle.where(t.origin + ('inputs',))} task '{t.name}': input \"{pattern}\" "
                                "must be a path inside the bundle's directory (no absolute paths, no ..)")
                continue
            hits = sorted(glob.glob(str(base / pattern), recursive=True))
            if not hits:
                problems.append(f"{bundle.where(t.origin + ('inputs',))} task '{t.name}': input \"{pattern}\" "
                                f"matches no file in {base}")
            for h in hits:
                p = Path(h)
                files.extend(str(f.relative_to(base)) for f in ([p] if p.is_file() else sorted(p.rglob("*")))
                             if f.is_file())
        if files:
            out[i] = files
    if problems:
        raise BundleError(sorted(set(problems)))
    return out


def stage(t: Transport, base: Path, files: list[str], pool: str) -> int:
    """Copy inputs to POOL/work keeping their relative paths; unchanged files are skipped."""
    return sum(t.put(base / f, f"{pool}/work/{f}") for f in dict.fromkeys(files))


def submit_pilots(record: RunRecord, plan: Plan, transports: dict[str, Transport], *,
                  launcher_args: list[str] = (), log: Callable[[str], None] = lambda _msg: None) -> list[PilotRecord]:
    """Write plans and scripts into the pools and submit, stage after stage (a later stage
    waits for the earlier one through the scheduler's own job dependencies)."""
    names = plan.bundle.tasks.names()
    done = []
    for rp in plan.resources:
        res = rp.resource
        t = transports[res.name]
        pool = record.pool(res.name)
        sched = backend(res)
        previous: list[str] = []
        for stage_no in sorted({p.stage for p in rp.pilots}):
            current = []
            for p in (p for p in rp.pilots if p.stage == stage_no):
                p.id = record.new_pilot_id()
                t.write_file(f"{pool}/plans/{p.id}.json",
                             dump({"pilot": p.id, "tokens": [names[i] for i in p.tasks], "stage": p.stage}))
                script = render_pilot(p, res, record.run, pool, launcher_args=list(launcher_args))
                path = f"{pool}/pilots/{p.id}.sh"
                t.write_file(path, script.encode(), mode=0o755)
                rec = PilotRecord(id=p.id, resource=res.name, nodes=p.nodes, cores_per_node=p.cores_per_node,
                                  walltime_s=p.walltime_s, stage=p.stage, tasks=len(p.tasks),
                                  gpus_per_node=p.gpus_per_node)
                record.add_pilot(rec)
                try:
                    rec.job_id = submit_once(t, sched, path, previous, job_name(record.run, p.id),
                                             f"submitting pilot {p.id} to {res.name}", f"{pool}/pilots")
                except ExternalError:
                    rec.state, rec.raw, rec.ended = "failed", "refused by the scheduler", time.time()
                    record.save()
                    raise
                rec.submitted = time.time()
                rec.state = "queued"
                record.save()
                current.append(rec.job_id)
                done.append(rec)
                log(f"submitted pilot {p.id} to {res.name} ({res.scheduler} job {rec.job_id}): "
                    f"{p.nodes} node(s), {len(p.tasks)} task(s), walltime {p.walltime_s} s"
                    + (f", after stage {stage_no - 1}" if previous else ""))
            previous = current
    return done


def submit_once(t: Transport, sched, script: str, after: list[str], name: str, what: str, cwd: str) -> str:
    """Submit a pilot exactly once. A submission is not idempotent: if the connection breaks
    while it runs, we do not know whether the job exists, so we look for it by its unique
    name before trying again, and adopt it if it is there."""
    argv = sched.submit_argv(script, after=after)
    for delay in RETRY_DELAYS + (None,):
        try:
            r = t.run(argv, cwd=cwd, idempotent=False)
        except ExternalError as e:
            if not e.transient or delay is None:
                raise
            found = _find(t, sched, name)
            if found:
                return found
            time.sleep(delay)
            continue
        if r.returncode == 0:
            try:
                return sched.parse_submit(r.stdout)
            except ValueError as e:
                raise ExternalError(str(e), argv=argv, returncode=r.returncode, stdout=r.stdout,
                                    stderr=r.stderr) from None
        if delay is None or not sched.transient(r.returncode, r.stderr):
            raise ExternalError(f"{what} failed on {t.label}", argv=argv, returncode=r.returncode,
                                stdout=r.stdout, stderr=r.stderr)
        found = _find(t, sched, name)  # a controller that timed out may still have queued it
        if found:
            return found
        time.sleep(delay)
    raise AssertionError("unreachable")


def _find(t: Transport, sched, name: str) -> str | None:
    argv = sched.find_argv(name)
    if not argv:
        return None
    for _ in range(3):
        try:
            r = t.run(argv)
        except ExternalError:
            time.sleep(1.0)
            continue
        ids = [x.strip() for x in r.stdout.split() if x.strip()] if r.returncode == 0 else []
        return ids[0] if ids else None
    return None


def plan_remaining(record: RunRecord, names: set[str]) -> Plan:
    """A plan for the tasks ``names`` of a run, on the resources holding their pools."""
    tasks = record.tasks()  # pinned to their resource when the run was created
    resources = [record.resource(n) for n in record.resources]
    bundle = Bundle(name=record.bundle, tasks=tasks, resources=resources, lock_timeout_s=record.lock_timeout,
                    path=Path(record.bundle_path) if record.bundle_path else None)
    idx = [i for i, t in enumerate(tasks) if t.name in names]
    if not idx:
        raise UsageError("nothing left to run")
    return make_plan(bundle, only=idx)
