"""Job bundles: TOML in, a validated and fully expanded :class:`Bundle` out.

Every problem in a file is collected and reported at once as ``FILE:LINE: message`` (exit 2),
including the ones only visible after expansion: duplicate names, dependency cycles, ``after``
patterns that match nothing, and tasks that no resource can hold.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from pilotflow.bundle import fields as F
from pilotflow.bundle.expand import (AfterResolver, Substituter, check_matrix_size, find_cycle, is_glob,
                                     matrix_values, token_lines)
from pilotflow.bundle.fit import unfit
from pilotflow.bundle.model import (DEFAULT_BATCH_MAX_WALLTIME_S, DEFAULT_LOCK_TIMEOUT_S, DEFAULT_WALLTIME_S,
                                    Bundle, Resource, Task, local_resource, this_python)
from pilotflow.bundle.picas import picas_tasks
from pilotflow.bundle.tasks import TaskBlock, Tasks
from pilotflow.bundle.schema import (BUNDLE_KEYS, RESOURCE_KEYS, TASK_FIELDS, TASK_KEYS, TASKS_FROM_KEYS, TOP_KEYS,
                                     Problems, check_keys, validated)
from pilotflow.bundle.toml_lines import LineMap
from pilotflow.errors import BundleError
from pilotflow.schedulers import backend_class


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
    pb = Problems(path, lines)
    check_keys(data, TOP_KEYS, (), "top level", pb)
    head = check_keys(data.get("bundle", {}), BUNDLE_KEYS, ("bundle",), "bundle", pb)
    meta = validated(head, BUNDLE_KEYS, ("bundle",), pb)
    if "name" not in head:
        pb.add(("bundle",), '[bundle] needs a name, for example name = "fractals"')
    resources = load_resources(data, pb)
    defaults = check_keys(data.get("defaults", {}), TASK_FIELDS, ("defaults",), "defaults", pb)
    defaults = validated(defaults, TASK_FIELDS, ("defaults",), pb)
    base = path.parent if path else Path.cwd()
    tasks = _expand_tasks(data, defaults, base, pb, resources)
    if not tasks and "task" not in data and "tasks_from" not in data:
        pb.add((), "the bundle has no tasks: add a [[task]] or [[tasks_from]] table")
    tasks = _resolve_after(tasks, pb)
    _check_fit(tasks, resources, pb)
    pb.raise_if_any()
    return Bundle(name=meta.get("name", "bundle"), tasks=tasks, resources=resources,
                  lock_timeout_s=meta.get("lock_timeout", DEFAULT_LOCK_TIMEOUT_S), path=path,
                  on_change=meta.get("on_change"), on_finish=meta.get("on_finish"),
                  optimize=meta.get("optimize", "node-hours"), lines=lines)


def load_resources(data: dict, pb: Problems) -> list[Resource]:
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
        table = check_keys(table, RESOURCE_KEYS, origin, "resource", pb)
        vals = validated(table, RESOURCE_KEYS, origin, pb)
        for a, b in (("queue", "partition"), ("project", "account")):
            if a in table and b in table:
                pb.add(origin + (a,), f"give either {a} or {b}, not both (they mean the same)")
        if "name" not in table:
            pb.add(origin, '[[resource]] needs a name, for example name = "snellius"')
        if "scheduler" not in table:
            pb.add(origin, '[[resource]] needs a scheduler: "local", "slurm", "pbs" or "sge"')
        sched = vals.get("scheduler", "local")
        if backend_class(sched).batch:  # a batch system: its nodes are not this machine
            if "cores_per_node" not in table:
                pb.add(origin, f"[[resource]] with scheduler = \"{sched}\" needs cores_per_node "
                               "(the cores of one node, for example cores_per_node = 128)")
            vals.setdefault("max_walltime", DEFAULT_BATCH_MAX_WALLTIME_S)
        else:
            vals.setdefault("cores_per_node", os.cpu_count() or 1)
            if "host" not in vals:  # this machine: the interpreter we run on
                vals.setdefault("python", this_python())
        if "max_walltime" in vals:
            vals["max_walltime_s"] = vals.pop("max_walltime")
        if "memory_per_node" in vals:
            vals["memory_per_node_mb"] = vals.pop("memory_per_node")
        if "max_queue_wait" in vals:
            vals["max_queue_wait_s"] = vals.pop("max_queue_wait")
        _check_pool(table, vals, origin, pb)
        _check_launchers(vals, origin, pb)
        name = vals.get("name", f"resource{i + 1}")
        if name in seen:
            pb.add(origin + ("name",), f"duplicate resource name '{name}' (also resource #{seen[name] + 1})")
        seen[name] = i
        vals["name"] = name
        out.append(Resource(origin=origin, **vals))
    return out or [local_resource()]


def _check_pool(table: dict, vals: dict, origin: tuple, pb: Problems) -> None:
    """A CouchDB pool needs its server and database; the other keys belong to it only."""
    couch_keys = [k for k in ("couchdb_url", "couchdb_database", "couchdb_credentials") if k in table]
    if vals.get("pool") == "couchdb":
        for k, example in (("couchdb_url", '"https://picas.surfsara.nl:6984"'), ("couchdb_database", '"alice"')):
            if k not in table:
                pb.add(origin, f'[[resource]] with pool = "couchdb" needs {k}, for example {k} = {example}')
        if "max_queue_wait" in table:
            pb.add(origin + ("max_queue_wait",), 'max_queue_wait: tokens of a pool = "couchdb" resource are '
                                                 "not moved to other resources; remove it")
    elif couch_keys:
        pb.add(origin + (couch_keys[0],), f'{couch_keys[0]} applies to pool = "couchdb" only: add that line '
                                          "or remove this one")


def _check_launchers(vals: dict, origin: tuple, pb: Problems) -> None:
    k = vals.get("launchers_per_node", 1)
    if k > 1 and vals.get("gpus_per_node"):
        pb.add(origin + ("launchers_per_node",), f"launchers_per_node = {k} applies to nodes without GPUs (one "
                                                  "launcher hands out a node's GPUs); remove one of the two lines")
    elif k > vals.get("cores_per_node", 1):
        pb.add(origin + ("launchers_per_node",), f"launchers_per_node = {k} is more than the node's "
                                                  f"{vals.get('cores_per_node', 1)} cores: each launcher needs one")


def _expand_tasks(data: dict, defaults: dict, base: Path, pb: Problems,
                  resources: list[Resource]) -> Tasks:
    tasks: list[TaskBlock | list[Task]] = []
    raw = data.get("task", [])
    if not isinstance(raw, list):
        pb.add(("task",), "tasks are written as [[task]] tables")
        raw = []
    for i, table in enumerate(raw):
        origin = ("task", i)
        table = check_keys(table, TASK_KEYS, origin, "task", pb)
        vals = {**defaults, **validated(table, TASK_KEYS, origin, pb)}
        for key in ("name", "command"):
            if key not in table:
                pb.add(origin, f"[[task]] needs a {key}")
        if "name" not in vals or "command" not in vals:
            continue
        matrix = _matrix(table.get("matrix"), origin, pb)
        if matrix is None:
            continue
        tasks.append(_instantiate(vals, list(matrix), list(matrix.values()), False, origin, pb))
    raw = data.get("tasks_from", [])
    if not isinstance(raw, list):
        pb.add(("tasks_from",), "token lists are written as [[tasks_from]] tables")
        raw = []
    for i, table in enumerate(raw):
        origin = ("tasks_from", i)
        table = check_keys(table, TASKS_FROM_KEYS, origin, "tasks_from", pb)
        vals = {**defaults, **validated(table, TASKS_FROM_KEYS, origin, pb)}
        if "picas_view" in vals and "file" not in vals:
            tasks.append(picas_tasks(vals, resources, origin, pb))
            continue
        if "file" not in vals or "picas_view" in vals:
            pb.add(origin, '[[tasks_from]] needs either a file, for example file = "tokens.txt", or the '
                           'PiCaS view whose tokens to run, for example picas_view = "todo"')
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
        tasks.append(_instantiate(vals | {"command": "{__line}"}, ["n", "__line"],
                                  [[str(n) for n, _ in entries], [cmd for _, cmd in entries]], True, origin, pb))
    return Tasks(tasks)


def _matrix(raw: Any, origin: tuple, pb: Problems) -> dict[str, list[str]] | None:
    """The matrix's variables and their values (in the order written), or None after a problem."""
    if raw is None:
        return {}
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
        check_matrix_size(variables)
        return variables
    except ValueError as e:
        pb.add(origin + ("matrix",), f"matrix: {e}")
        return None


_SUBST_FIELDS = ("name", "command", "resource")
_SUBST_LISTS = ("after", "inputs", "outputs")


def _instantiate(vals: dict, variables: list[str], columns: list[list[str]], rows: bool, origin: tuple,
                 pb: Problems) -> TaskBlock | list[Task]:
    """One table's tasks: a block (its template and values; see :mod:`pilotflow.bundle.tasks`)
    unless they have ``after`` or a varying resource, which the planner reads per task."""
    sub = Substituter(variables)
    env = vals.get("env", ())
    base = {k: vals[k] for k in TASK_FIELDS if k in vals and k not in ("walltime", "memory", "env")}
    base["walltime_s"] = vals.get("walltime", DEFAULT_WALLTIME_S)
    base["memory_mb"] = vals.get("memory")
    base["env"] = tuple(env)
    base.update((k, tuple(vals[k])) for k in _SUBST_LISTS if k in vals)
    base.update(name=vals["name"], command=vals["command"])
    fields: list = [(k, f) for k in ("command", "resource") if k in vals
                    for f in [sub.template(vals[k])] if f is not None]
    lists = [k for k in _SUBST_LISTS if k in vals and any(sub.template(x) for x in vals[k])]
    fields += [(k, lambda v, xs=vals[k]: tuple(sub(x, v) for x in xs)) for k in lists]
    if any(sub.template(v) for _, v in env):
        fields.append(("env", lambda v: tuple((k, sub(x, v)) for k, x in env)))
    bad = next(((k, x) for k in ("inputs", "outputs") if k in base and k not in lists for x in base[k]
                if _escapes(x)), None)
    if bad is None and any(k in lists for k in ("inputs", "outputs")):  # paths are checked per task where they vary
        bad = _varying_escape(sub, vals, variables, columns, rows)
    if bad is not None:
        pb.value(origin, bad[0], vals[bad[0]], f"expands to {F.show(bad[1])}: paths must stay inside the "
                 "bundle's directory (no leading / or ~, no ..)")
        return []
    name = sub.template(vals["name"], variables)
    combos = zip(*columns) if rows else itertools.product(*columns)
    names = [name(*c) for c in combos] if name else [vals["name"]] * (len(columns[0]) if rows else
                                                                      math.prod(map(len, columns)))
    bad_name = next((n for n in names if not _NAME.match(n)), None)
    if bad_name is not None:
        pb.value(origin, "name", vals["name"], f"expands to {F.show(bad_name)}: task names become file "
                 "names and must be 1-200 of A-Z a-z 0-9 _ . + = -")
        return []
    block = TaskBlock(Task(origin=origin, **base), variables, columns, rows, fields, names)
    return list(block) if "after" in vals or any(k == "resource" for k, _ in fields) else block


_NAME = re.compile(r"(?!\.+\Z)(?:" + F.TASK_NAME_RE.pattern + r")\Z")


def _varying_escape(sub: Substituter, vals: dict, variables: list[str], columns: list[list[str]],
                    rows: bool) -> tuple[str, str] | None:
    """The first (key, path) of inputs/outputs that leaves the bundle's directory once expanded."""
    for combo in (zip(*columns) if rows else itertools.product(*columns)):
        values = dict(zip(variables, combo))
        for k in ("inputs", "outputs"):
            for x in vals.get(k, ()):
                if "{" in x and _escapes(sub(x, values)):
                    return k, sub(x, values)
    return None


def _escapes(path: str) -> bool:
    try:
        F.relative_path(path)
        return False
    except ValueError:
        return True


def _resolve_after(tasks: Tasks, pb: Problems) -> Tasks:
    names = tasks.names()
    if len(set(names)) != len(names):
        origins = [t.origin for t in tasks.protos()]
        first_at: dict[str, int] = {}
        for i, n in enumerate(names):
            if n in first_at:
                line = pb.lines.line(origins[first_at[n]] + ("name",)) if pb.lines else None
                also = f" (also at line {line})" if line else ""
                pb.add(origins[i] + ("name",), f"duplicate task name '{n}' after expansion{also}")
            else:
                first_at[n] = i
    if not tasks.linked():
        return tasks
    resolver = AfterResolver(list(dict.fromkeys(names)))
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
    if not pb.items and any(t.after for t in out):
        cycle = find_cycle({t.name: t.after for t in out})
        if cycle:
            first = next(t for t in out if t.name == cycle[0])
            pb.add(first.origin + ("after",), "dependency cycle: " + " -> ".join(cycle))
    return Tasks.of(out)


def _check_fit(tasks: Tasks, resources: list[Resource], pb: Problems) -> None:
    """Tasks no resource can hold are bundle errors, reported once per task template."""
    reported: set[tuple] = set()
    fits: set[tuple] = set()  # shapes known to fit: a million tasks of one template are a few shapes
    for part in tasks.parts:
        for t, name in ([(part.proto, part.names[0])] if isinstance(part, TaskBlock) else ((t, t.name) for t in part)):
            if t.origin in reported:
                continue
            shape = (t.resource, t.cores, t.nodes, t.memory_mb, t.gpus, t.walltime_s, t.mpi, t.ranks_per_node)
            if shape in fits:
                continue
            why = unfit(t, resources)
            if not why:
                fits.add(shape)
            if why:
                reported.add(t.origin)
                key, msg = why
                pb.add(t.origin + (key,), f"task '{name}': {msg}")


def load_resources_file(path: str | os.PathLike) -> list[Resource]:
    """The [[resource]] tables of a TOML file (a job bundle's other tables are ignored), as
    the Snakemake plugin's ``--pilotflow-resources`` takes them; every problem is reported at
    once as FILE:LINE: message."""
    path = Path(path)
    if not path.is_file():
        raise BundleError([f"{path}: no such file; --pilotflow-resources takes a TOML file of [[resource]] tables"])
    data, lines = read_toml(path)
    pb = Problems(path, lines)
    check_keys(data, TOP_KEYS, (), "top level", pb)
    if "resource" not in data and not pb.items:
        pb.add((), 'no [[resource]] table: add one, for example\n  [[resource]]\n  name = "cluster"\n'
                    '  scheduler = "slurm"\n  cores_per_node = 32')
    resources = load_resources(data, pb)
    pb.raise_if_any()
    if not resources:
        raise BundleError([f"{path}: no [[resource]] table"])
    return resources
