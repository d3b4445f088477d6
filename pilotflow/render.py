"""Plan + templates → batch scripts, as a pure function (no cluster, no side effects).

Two escapers for two contexts: values placed in the shell part of a script are quoted with
``shlex.quote`` (``|sh``); values placed in scheduler directives are *validated* by the
scheduler backend (no spaces, quotes or newlines) because directive lines are not parsed by
a shell. The launcher is carried in a quoted here-document whose terminator is checked not
to occur in it.
"""

from __future__ import annotations

import shlex
from functools import lru_cache
from pathlib import Path

import jinja2

from pilotflow.version import __version__
from pilotflow.bundle import Resource
from pilotflow.errors import UsageError
from pilotflow.launcher_text import launcher_hash, launcher_source
from pilotflow.planning.plan import Plan, PilotPlan
from pilotflow.schedulers import backend
from pilotflow.schedulers.base import job_name


def shpath(path: str) -> str:
    """A path for the shell: quoted, with a leading ``~/`` left to the remote ``$HOME``."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("pilotflow", "templates"),
                             undefined=jinja2.StrictUndefined, autoescape=False,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["sh"] = lambda v: shlex.quote(str(v))
    env.filters["shpath"] = shpath
    return env


def python_words(resource: Resource) -> str:
    """The interpreter as shell words: ``python = "/usr/bin/env python3"`` is two words."""
    try:
        words = shlex.split(resource.python)
    except ValueError as e:
        raise UsageError(f"resource '{resource.name}': python = {resource.python!r} is not a command: {e}") from None
    return " ".join(shlex.quote(w) for w in words)


def render_pilot(pilot: PilotPlan, resource: Resource, run: str, pool: str, *,
                 launcher_args: list[str] = ()) -> str:
    """The complete batch script for one pilot; ``pool`` is the run directory on the resource."""
    return _render(pilot, resource, run, pool, launcher_args,
                   {"pilot_label": pilot.id, "pilot_id": shlex.quote(pilot.id), "walltime": pilot.walltime_s,
                    "walltime_text": pilot.walltime_s, "nodes": pilot.nodes})


def renewal_gpus(resource: Resource, tasks) -> int:
    """GPUs per node follow-up pilots ask for: all of a node's when any of the tasks needs one."""
    return resource.gpus_per_node if any(t.gpus for t in tasks) else 0


RENEW_VARS = ("PILOTFLOW_RENEW_PILOT", "PILOTFLOW_RENEW_WALLTIME", "PILOTFLOW_RENEW_NODES")


def render_renewal(resource: Resource, run: str, pool: str, gpus: int = 0) -> str:
    """The batch script of follow-up pilots that pilots submit themselves: the same script,
    its pilot id, walltime and node count taken from the environment the submission sets
    (``RENEW_VARS``; the submit command's options override its directives)."""
    cap = resource.max_walltime_s or 0
    shape = PilotPlan(id="renew", resource=resource.name, nodes=1, cores_per_node=resource.cores_per_node,
                      walltime_s=cap or 60, makespan_s=0, tasks=[], busy_core_s=0, gpus_per_node=gpus)
    pilot_var, walltime_var, nodes_var = (f'"${v}"' for v in RENEW_VARS)
    walltime_var = f"${{{RENEW_VARS[1]}}}"  # a number, unquoted: it goes into $(( ))
    return _render(shape, resource, run, pool, [],
                   {"pilot_label": "(a follow-up: its id is in $PILOTFLOW_RENEW_PILOT)", "pilot_id": pilot_var,
                    "walltime": walltime_var, "walltime_text": "$PILOTFLOW_RENEW_WALLTIME", "nodes": nodes_var})


def _render(pilot: PilotPlan, resource: Resource, run: str, pool: str, launcher_args, shape: dict) -> str:
    sched = backend(resource)
    src, digest = launcher_source(), launcher_hash()
    heredoc = f"PILOTFLOW_LAUNCHER_{digest}"
    if heredoc in src:
        raise AssertionError("launcher source contains its here-document terminator")
    try:
        directives = sched.directives(job_name=job_name(run, pilot.id), nodes=pilot.nodes,
                                      cores_per_node=resource.cores_per_node, walltime_s=pilot.walltime_s,
                                      resource=resource, output=sched.output_name(pilot.id), gpus=pilot.gpus_per_node)
    except ValueError as e:
        raise UsageError(f"resource '{resource.name}': {e}") from None
    if pilot.gpus_per_node:  # the launcher hands out this many per node
        launcher_args = list(launcher_args) + ["--gpus", str(pilot.gpus_per_node)]
    if resource.launchers_per_node > 1:
        launcher_args = list(launcher_args) + ["--launchers", str(resource.launchers_per_node)]
    args = "".join(" " + shlex.quote(a) for a in launcher_args)
    return _env().get_template(sched.template).render(
        pilot=pilot, resource=resource, run=run, pool=pool, directives=directives, python=python_words(resource),
        cores=pilot.cores, launcher_source=src if src.endswith("\n") else src + "\n", launcher_hash=digest,
        heredoc=heredoc, launcher_args=args, version=__version__,
        backend_args=" ".join(shlex.quote(a) for a in sched.launcher_options(resource)), gpus=pilot.gpus_per_node,
        **shape)


def pool_path(resource: Resource, root: str, run: str, taken: set[tuple] = frozenset()) -> str:
    """``ROOT/RUN``; a second resource of the run whose root is the same directory on the same
    machine (two schedulers over one filesystem) gets ``ROOT/RUN-RESOURCE`` instead, because
    each resource needs a pool of its own for failover to move tokens between them."""
    path = root.rstrip("/") + "/" + run
    if (resource.host, path) in taken:
        path += "-" + resource.name
    return path


def default_root(resource: Resource, bundle_dir: Path) -> str:
    """Where runs live on a resource: ``root``, else ~/.pilotflow remotely or ./.pilotflow
    beside the bundle locally (SPEC §4)."""
    if resource.root:
        root = resource.root
        if not resource.remote and not root.startswith(("/", "~")):
            return str((bundle_dir / root).resolve())
        return str(Path(root).expanduser()) if not resource.remote else root
    return "~/.pilotflow" if resource.remote else str((bundle_dir / ".pilotflow").resolve())


def write_scripts(plan: Plan, directory: Path, run: str | None = None) -> list[Path]:
    """``plan --scripts DIR``: the scripts ``submit`` would submit (run id: BUNDLE-plan)."""
    run = run or f"{plan.bundle.name}-plan"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {directory}: {e.strerror}") from None
    out = []
    taken: set[tuple] = set()
    for rp in plan.resources:
        res = rp.resource
        pool = pool_path(res, default_root(res, plan.bundle.base_dir), run, taken)
        taken.add((res.host, pool))
        for p in rp.pilots:
            path = directory / f"{res.name}-{p.id}.{res.scheduler}.sh"
            path.write_text(render_pilot(p, res, run, pool))
            path.chmod(0o755)
            out.append(path)
    return out
