"""Job bundles: TOML in, a validated and fully expanded :class:`Bundle` out.

Every problem in a file is collected and reported at once as ``FILE:LINE: message`` (exit 2),
including the ones only visible after expansion: duplicate names, dependency cycles, ``after``
patterns that match nothing, and tasks that no resource can hold.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pilotflow import fields as F
from pilotflow.errors import BundleError
from pilotflow.expand import (AfterResolver, Substituter, find_cycle, is_glob, matrix_product,
                              matrix_values, token_lines)
from pilotflow.toml_lines import LineMap
from pilotflow.units import format_duration

SCHEDULERS = ("local", "slurm", "pbs", "sge")
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
    mpi_launcher: str = "srun"  # Slurm: srun --mpi=pmix, or Open MPI's mpirun (daemons through srun)
    origin: tuple = ()

    @property
    def remote(self) -> bool:
        return self.host is not None


@dataclass
class Bundle:
    name: str
    tasks: list[Task]
    resources: list[Resource]
    lock_timeout_s: int = DEFAULT_LOCK_TIMEOUT_S
    path: Path | None = None
    on_change: str | None = None
    on_finish: str | None = None
    optimize: str = "node-hours"  # after the fewest pilots: "node-hours" (SPEC) or "makespan"
    lines: LineMap | None = field(default=None, repr=False)

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
        return _where(self.path, self.lines, origin)


def local_resource(**overrides: Any) -> Resource:
    """The implicit resource: this machine, all its cores, one node, no walltime limit."""
    base = Resource(name="local", scheduler="local", cores_per_node=os.cpu_count() or 1,
                    max_nodes=1, max_walltime_s=None)
    return replace(base, **overrides)


# --- schema -------------------------------------------------------------------------------

TOP_KEYS = ("bundle", "defaults", "resource", "task", "tasks_from")
BUNDLE_KEYS = {"name": F.name, "lock_timeout": F.positive_duration,
               "on_change": F.nonempty_text, "on_finish": F.nonempty_text,
               "optimize": F.choice("node-hours", "makespan")}
TASK_FIELDS = {
    "cores": F.integer(1), "walltime": F.positive_duration, "memory": F.size_mb,
    "retries": F.integer(0, 1000), "env": F.env_table, "after": F.str_list(F.nonempty_text),
    "inputs": F.str_list(F.relative_path), "outputs": F.str_list(F.relative_path),
    "resource": F.nonempty_text, "nodes": F.integer(1), "mpi": F.boolean,
    "ranks_per_node": F.integer(1),
}
TASK_KEYS = {"name": F.nonempty_text, "command": F.nonempty_text, "matrix": None, **TASK_FIELDS}
TASKS_FROM_KEYS = {"file": F.nonempty_text, "name": F.nonempty_text, **TASK_FIELDS}
RESOURCE_KEYS = {
    "name": F.name, "scheduler": F.choice(*SCHEDULERS), "cores_per_node": F.integer(1),
    "memory_per_node": F.size_mb, "max_nodes": F.integer(1), "max_walltime": F.positive_duration,
    "max_pilots": F.integer(1), "host": F.host, "port": F.integer(1, 65535),
    "identity_file": F.one_line, "root": F.one_line, "partition": F.directive_word,
    "queue": F.directive_word, "account": F.directive_word, "project": F.directive_word,
    "qos": F.directive_word, "pe": F.directive_word, "directives": F.str_list(F.directive),
    "setup": F.str_list(F.text), "python": F.command_name, "walltime_margin": F.fraction(0, 1),
    "max_queue_wait": F.positive_duration, "mpi_launcher": F.choice("srun", "mpirun"),
}
# Scheduler words that mean the same thing (SPEC: "partition/queue, account/project").
ALIASES = {"queue": "partition", "project": "account"}


class _Problems:
    def __init__(self, path: Path | None, lines: LineMap | None):
        self.path, self.lines, self.items = path, lines, []

    def add(self, origin: tuple, message: str) -> None:
        line = self.lines.line(origin) if self.lines else None
        self.items.append((line or 0, len(self.items), _where(self.path, self.lines, origin) + " " + message))

    def value(self, origin: tuple, key: str, value: Any, message: str) -> None:
        self.add(origin + (key,), f"{key} = {F.show(value)}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise BundleError([m for _, _, m in sorted(self.items)])


def _where(path: Path | None, lines: LineMap | None, origin: tuple) -> str:
    fname = str(path) if path else "<bundle>"
    line = lines.line(origin) if lines and origin else None
    if line:
        return f"{fname}:{line}:"
    table = ".".join(str(p) for p in origin if not isinstance(p, int))
    return f"{fname}: [{table}]" if table else f"{fname}:"


def _check_keys(table: Any, allowed: dict | tuple, origin: tuple, label: str, pb: _Problems) -> dict:
    if not isinstance(table, dict):
        pb.add(origin, f"[{label}] must be a table")
        return {}
    for key in table:
        if key not in allowed:
            near = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.4)
            hint = f"; did you mean '{near[0]}'?" if near else "; valid keys: " + ", ".join(sorted(allowed))
            pb.add(origin + (key,), f"unknown key '{key}' in [{label}]{hint}")
    return table


def _validated(table: dict, schema: dict, origin: tuple, pb: _Problems) -> dict:
    out = {}
    for key, check in schema.items():
        if key in table and check is not None:
            try:
                out[ALIASES.get(key, key)] = check(table[key])
            except ValueError as e:
                pb.value(origin, key, table[key], str(e))
    return out


# --- loading ------------------------------------------------------------------------------

def load_bundle(path: str | os.PathLike) -> Bundle:
    """Read, validate and expand a bundle file; raises BundleError listing every problem."""
    path = Path(path)
    data, lines = read_toml(path)
    return bundle_from_dict(data, path=path, lines=lines)


def read_toml(path: Path) -> tuple[dict, LineMap]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BundleError([f"{path}: no such file; give the path of a job bundle (.toml)"]) from None
    except OSError as e:
        raise BundleError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        source = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BundleError([f"{path}:{line}: the file is not valid UTF-8"]) from None
    try:
        data = tomllib.loads(source)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        line = getattr(e, "lineno", None)
        if line is None and "(at line " in msg:
            line = int(msg.rsplit("(at line ", 1)[1].split(",")[0])
            msg = msg.rsplit(" (at line ", 1)[0]
        raise BundleError([f"{path}:{line or 1}: invalid TOML: {msg}"]) from None
    return data, LineMap(source)


def bundle_from_dict(data: dict, *, path: Path | None = None, lines: LineMap | None = None) -> Bundle:
    """Validate a bundle given as the dict TOML would produce (also the Python API's entry)."""
    pb = _Problems(path, lines)
    _check_keys(data, TOP_KEYS, (), "top level", pb)
    head = _check_keys(data.get("bundle", {}), BUNDLE_KEYS, ("bundle",), "bundle", pb)
    meta = _validated(head, BUNDLE_KEYS, ("bundle",), pb)
    if "name" not in head:
        pb.add(("bundle",), '[bundle] needs a name, for example name = "fractals"')
    resources = load_resources(data, pb)
    defaults = _check_keys(data.get("defaults", {}), TASK_FIELDS, ("defaults",), "defaults", pb)
    defaults = _validated(defaults, TASK_FIELDS, ("defaults",), pb)
    base = path.parent if path else Path.cwd()
    tasks = _expand_tasks(data, defaults, base, pb)
    if not tasks and "task" not in data and "tasks_from" not in data:
        pb.add((), "the bundle has no tasks: add a [[task]] or [[tasks_from]] table")
    tasks = _resolve_after(tasks, pb)
    _check_feasible(tasks, resources, pb)
    pb.raise_if_any()
    return Bundle(name=meta.get("name", "bundle"), tasks=tasks, resources=resources,
                  lock_timeout_s=meta.get("lock_timeout", DEFAULT_LOCK_TIMEOUT_S), path=path,
                  on_change=meta.get("on_change"), on_finish=meta.get("on_finish"),
                  optimize=meta.get("optimize", "node-hours"), lines=lines)


def load_resources(data: dict, pb: _Problems) -> list[Resource]:
    """The [[resource]] tables, or the implicit local one when there are none."""
    raw = data.get("resource")
    if raw is None:
        return [local_resource()]
    if not isinstance(raw, list):
        pb.add(("resource",), "resources are written as [[resource]] tables")
        return [local_resource()]
    out: list[Resource] = []
    seen: dict[str, int] = {}
    for i, table in enumerate(raw):
        origin = ("resource", i)
        table = _check_keys(table, RESOURCE_KEYS, origin, "resource", pb)
        vals = _validated(table, RESOURCE_KEYS, origin, pb)
        for a, b in (("queue", "partition"), ("project", "account")):
            if a in table and b in table:
                pb.add(origin + (a,), f"give either {a} or {b}, not both (they mean the same)")
        if "name" not in table:
            pb.add(origin, '[[resource]] needs a name, for example name = "snellius"')
        if "scheduler" not in table:
            pb.add(origin, '[[resource]] needs a scheduler: "local", "slurm", "pbs" or "sge"')
        sched = vals.get("scheduler", "local")
        if sched != "local" and "cores_per_node" not in table:
            pb.add(origin, f"[[resource]] with scheduler = \"{sched}\" needs cores_per_node "
                           "(the cores of one node, for example cores_per_node = 128)")
        if sched == "local":
            vals.setdefault("cores_per_node", os.cpu_count() or 1)
        else:
            vals.setdefault("max_walltime", DEFAULT_BATCH_MAX_WALLTIME_S)
        if "max_walltime" in vals:
            vals["max_walltime_s"] = vals.pop("max_walltime")
        if "memory_per_node" in vals:
            vals["memory_per_node_mb"] = vals.pop("memory_per_node")
        if "max_queue_wait" in vals:
            vals["max_queue_wait_s"] = vals.pop("max_queue_wait")
        name = vals.get("name", f"resource{i + 1}")
        if name in seen:
            pb.add(origin + ("name",), f"duplicate resource name '{name}' (also resource #{seen[name] + 1})")
        seen[name] = i
        vals["name"] = name
        out.append(Resource(origin=origin, **vals))
    return out or [local_resource()]


def _expand_tasks(data: dict, defaults: dict, base: Path, pb: _Problems) -> list[Task]:
    tasks: list[Task] = []
    raw = data.get("task", [])
    if not isinstance(raw, list):
        pb.add(("task",), "tasks are written as [[task]] tables")
        raw = []
    for i, table in enumerate(raw):
        origin = ("task", i)
        table = _check_keys(table, TASK_KEYS, origin, "task", pb)
        vals = {**defaults, **_validated(table, TASK_KEYS, origin, pb)}
        for key in ("name", "command"):
            if key not in table:
                pb.add(origin, f"[[task]] needs a {key}")
        if "name" not in vals or "command" not in vals:
            continue
        combos = _matrix(table.get("matrix"), origin, pb)
        if combos is None:
            continue
        variables = list(combos[0]) if combos and combos[0] else []
        tasks.extend(_instantiate(vals, combos, variables, origin, pb))
    raw = data.get("tasks_from", [])
    if not isinstance(raw, list):
        pb.add(("tasks_from",), "token lists are written as [[tasks_from]] tables")
        raw = []
    for i, table in enumerate(raw):
        origin = ("tasks_from", i)
        table = _check_keys(table, TASKS_FROM_KEYS, origin, "tasks_from", pb)
        vals = {**defaults, **_validated(table, TASKS_FROM_KEYS, origin, pb)}
        if "file" not in vals:
            pb.add(origin, '[[tasks_from]] needs a file, for example file = "tokens.txt"')
            continue
        fpath = base / vals.pop("file")
        try:
            text = fpath.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not valid UTF-8"
            pb.add(origin + ("file",), f"file = \"{table['file']}\": cannot read {fpath}: {reason}")
            continue
        vals.setdefault("name", fpath.stem + "-{n}")
        if "{n}" not in vals["name"]:
            pb.value(origin, "name", vals["name"], "must contain {n} (the line number) to be unique")
            continue
        entries = token_lines(text)
        combos = [{"n": str(n)} for n, _ in entries]
        made = _instantiate(vals | {"command": "{__line}"}, [c | {"__line": cmd} for c, (_, cmd)
                            in zip(combos, entries)], ["n", "__line"], origin, pb)
        tasks.extend(made)
    return tasks


def _matrix(raw: Any, origin: tuple, pb: _Problems) -> list[dict[str, str]] | None:
    if raw is None:
        return [{}]
    if not isinstance(raw, dict) or not raw:
        pb.value(origin, "matrix", raw, 'expected a table such as { i = "1..10", depth = [256, 512] }')
        return None
    variables: dict[str, list[str]] = {}
    ok = True
    for var, value in raw.items():
        if not F.ENV_NAME_RE.fullmatch(var):
            pb.add(origin + ("matrix", var), f"matrix variable '{var}' must be a simple name (letters, digits, _)")
            ok = False
            continue
        try:
            variables[var] = matrix_values(value)
        except ValueError as e:
            pb.add(origin + ("matrix", var), f"matrix.{var} = {F.show(value)}: {e}")
            ok = False
    if not ok:
        return None
    try:
        return matrix_product(variables)
    except ValueError as e:
        pb.add(origin + ("matrix",), f"matrix: {e}")
        return None


_SUBST_FIELDS = ("name", "command", "resource")
_SUBST_LISTS = ("after", "inputs", "outputs")


def _instantiate(vals: dict, combos: list[dict[str, str]], variables: list[str], origin: tuple,
                 pb: _Problems) -> list[Task]:
    sub = Substituter(variables)
    env = vals.get("env", ())
    base = {k: vals[k] for k in TASK_FIELDS if k in vals and k not in ("walltime", "memory", "env")}
    base["walltime_s"] = vals.get("walltime", DEFAULT_WALLTIME_S)
    base["memory_mb"] = vals.get("memory")
    out = []
    bad_name = None
    for values in combos:
        kw = dict(base)
        for k in _SUBST_FIELDS:
            if k in vals:
                kw[k] = sub(vals[k], values)
        for k in _SUBST_LISTS:
            if k in vals:
                kw[k] = tuple(sub(x, values) for x in vals[k])
        kw["env"] = tuple((k, sub(v, values)) for k, v in env)
        if not F.TASK_NAME_RE.fullmatch(kw["name"]) or set(kw["name"]) == {"."}:
            bad_name = bad_name or kw["name"]
            continue
        bad = next(((k, x) for k in ("inputs", "outputs") for x in kw.get(k, ()) if _escapes(x)), None)
        if bad is not None:
            pb.value(origin, bad[0], vals[bad[0]], f"expands to {F.show(bad[1])}: paths must stay inside the "
                     "bundle's directory (no leading / or ~, no ..)")
            return out
        out.append(Task(origin=origin, **kw))
    if bad_name is not None:
        pb.value(origin, "name", vals["name"], f"expands to {F.show(bad_name)}: task names become file "
                 "names and must be 1-200 of A-Z a-z 0-9 _ . + = -")
    return out


def _escapes(path: str) -> bool:
    try:
        F.relative_path(path)
        return False
    except ValueError:
        return True


def _resolve_after(tasks: list[Task], pb: _Problems) -> list[Task]:
    seen: dict[str, Task] = {}
    for t in tasks:
        if t.name in seen:
            first = seen[t.name]
            line = pb.lines.line(first.origin + ("name",)) if pb.lines else None
            also = f" (also at line {line})" if line else ""
            pb.add(t.origin + ("name",), f"duplicate task name '{t.name}' after expansion{also}")
        else:
            seen[t.name] = t
    resolver = AfterResolver(list(seen))
    out = []
    reported: set[tuple] = set()
    for t in tasks:
        if not t.after:
            out.append(t)
            continue
        deps: list[str] = []
        for pattern in t.after:
            hit = resolver.resolve(pattern)
            hit = [h for h in hit if h != t.name]
            if not hit and (t.origin, pattern) not in reported:
                reported.add((t.origin, pattern))
                near = None if is_glob(pattern) else resolver.closest(pattern)
                hint = f"; did you mean '{near}'?" if near else ""
                pb.add(t.origin + ("after",), f"task '{t.name}': after = \"{pattern}\" matches no task{hint}")
            deps.extend(hit)
        out.append(replace(t, after=tuple(dict.fromkeys(deps))))
    if not pb.items:
        cycle = find_cycle({t.name: t.after for t in out})
        if cycle:
            first = next(t for t in out if t.name == cycle[0])
            pb.add(first.origin + ("after",), "dependency cycle: " + " -> ".join(cycle))
    return out


def _check_feasible(tasks: list[Task], resources: list[Resource], pb: _Problems) -> None:
    """Tasks no resource can hold are bundle errors, reported once per task template."""
    names = {r.name for r in resources}
    reported: set[tuple] = set()
    for t in tasks:
        if t.origin in reported:
            continue
        why = _infeasible(t, resources, names)
        if why:
            reported.add(t.origin)
            key, msg = why
            pb.add(t.origin + (key,), f"task '{t.name}': {msg}")


def _infeasible(t: Task, resources: list[Resource], names: set[str]) -> tuple[str, str] | None:
    if t.resource is not None and t.resource not in names:
        near = difflib.get_close_matches(t.resource, sorted(names), n=1)
        hint = f"did you mean '{near[0]}'?" if near else "known: " + ", ".join(sorted(names))
        return "resource", f"resource = \"{t.resource}\" is not a [[resource]] of this bundle; {hint}"
    pool = [r for r in resources if t.resource in (None, r.name)]
    if t.nodes > 1 or t.mpi:
        fits = [r for r in pool if _nodes_needed(t, r) <= r.max_nodes]
        if not fits:
            best = max(pool, key=lambda r: r.max_nodes * r.cores_per_node)
            return "nodes", (f"needs {_nodes_needed(t, best)} nodes but the most a pilot may have is "
                             f"{best.max_nodes} ({best.name}); lower nodes/cores or raise max_nodes")
    else:
        fits = [r for r in pool if r.cores_per_node >= t.cores]
        if not fits:
            best = max(pool, key=lambda r: r.cores_per_node)
            return "cores", (f"needs {t.cores} cores on one node but the largest node has "
                             f"{best.cores_per_node} ({best.name}); lower cores, or use mpi = true "
                             "to spread ranks over nodes")
    if t.memory_mb is not None:
        mem = [r for r in fits if r.memory_per_node_mb is None or r.memory_per_node_mb >= t.memory_mb]
        if not mem:
            return "memory", (f"needs {t.memory_mb}M of memory but no node has that much "
                              f"({', '.join(f'{r.name}: {r.memory_per_node_mb}M' for r in fits)})")
        fits = mem
    wall = [r for r in fits if r.max_walltime_s is None or r.max_walltime_s >= t.walltime_s]
    if not wall:
        limits = ", ".join(f"{r.name}: {format_duration(r.max_walltime_s)}" for r in fits)
        return "walltime", (f"walltime {format_duration(t.walltime_s)} is longer than any resource's "
                            f"max_walltime ({limits}); lower the estimate or raise max_walltime")
    return None


def task_fits(t: Task, r: Resource) -> bool:
    """Whether one resource can run the task at all (used to split work between resources)."""
    return _infeasible(replace(t, resource=None), [r], {r.name}) is None


def _nodes_needed(t: Task, r: Resource) -> int:
    if t.mpi and t.nodes == 1 and t.cores > r.cores_per_node:
        return -(-t.cores // r.cores_per_node)
    return t.nodes
