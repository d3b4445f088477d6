"""The keys a bundle may hold, their validators, and the collector of problems.

Shared by the bundle reader and by every other reader of bundle-like TOML (the Snakemake
plugin's ``--pilotflow-resources`` file), so all of them report problems the same way.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pilotflow.bundle import fields as F
from pilotflow.bundle.model import location
from pilotflow.bundle.toml_lines import LineMap
from pilotflow.errors import BundleError


def _scheduler(v: Any) -> str:
    """A scheduler backend's name (the backends are the modules of ``pilotflow.schedulers``)."""
    from pilotflow.schedulers import names
    return F.choice(*names())(v)


TOP_KEYS = ("bundle", "defaults", "resource", "task", "tasks_from")
BUNDLE_KEYS = {"name": F.name, "lock_timeout": F.positive_duration,
               "on_change": F.nonempty_text, "on_finish": F.nonempty_text,
               "optimize": F.choice("node-hours", "makespan")}
TASK_FIELDS = {
    "cores": F.integer(1), "walltime": F.positive_duration, "memory": F.size_mb,
    "retries": F.integer(0, 1000), "env": F.env_table, "after": F.str_list(F.nonempty_text),
    "inputs": F.str_list(F.relative_path), "outputs": F.str_list(F.relative_path),
    "resource": F.nonempty_text, "nodes": F.integer(1), "mpi": F.boolean,
    "ranks_per_node": F.integer(1), "gpus": F.integer(0, 64),
}
TASK_KEYS = {"name": F.nonempty_text, "command": F.nonempty_text, "matrix": None, **TASK_FIELDS}
TASKS_FROM_KEYS = {"file": F.nonempty_text, "picas_view": F.name, "name": F.nonempty_text, **TASK_FIELDS}
RESOURCE_KEYS = {
    "name": F.name, "scheduler": _scheduler, "cores_per_node": F.integer(1),
    "memory_per_node": F.size_mb, "max_nodes": F.integer(1), "max_walltime": F.positive_duration,
    "max_pilots": F.integer(1), "host": F.host, "port": F.integer(1, 65535),
    "identity_file": F.one_line, "root": F.one_line, "partition": F.directive_word,
    "queue": F.directive_word, "account": F.directive_word, "project": F.directive_word,
    "qos": F.directive_word, "pe": F.directive_word, "directives": F.str_list(F.directive),
    "setup": F.str_list(F.text), "python": F.command_name, "walltime_margin": F.fraction(0, 1),
    "max_queue_wait": F.positive_duration, "mpi_launcher": F.choice("srun", "mpirun"),
    "max_follow_ups": F.integer(0, 100), "gpus_per_node": F.integer(0, 64), "launchers_per_node": F.integer(1, 64),
    "gpu_resource": F.directive_word, "mpi_plugin": F.directive_word, "logs": F.choice("packed", "per-token"),
    "pool": F.choice("files", "couchdb"), "couchdb_url": F.couchdb_url, "couchdb_database": F.couchdb_name,
    "couchdb_credentials": F.one_line,
}
# Scheduler words that mean the same thing (SPEC: "partition/queue, account/project").
ALIASES = {"queue": "partition", "project": "account"}


class Problems:
    """Every problem of one file, collected so that all are reported at once, in line order."""

    def __init__(self, path: Path | None, lines: LineMap | None):
        self.path, self.lines, self.items = path, lines, []

    def add(self, origin: tuple, message: str) -> None:
        line = self.lines.line(origin) if self.lines else None
        self.items.append((line or 0, len(self.items), location(self.path, self.lines, origin) + " " + message))

    def value(self, origin: tuple, key: str, value: Any, message: str) -> None:
        self.add(origin + (key,), f"{key} = {F.show(value)}: {message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise BundleError([m for _, _, m in sorted(self.items)])


def check_keys(table: Any, allowed: dict | tuple, origin: tuple, label: str, pb: Problems) -> dict:
    if not isinstance(table, dict):
        pb.add(origin, f"[{label}] must be a table")
        return {}
    for key in table:
        if key not in allowed:
            near = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.4)
            hint = f"; did you mean '{near[0]}'?" if near else "; valid keys: " + ", ".join(sorted(allowed))
            pb.add(origin + (key,), f"unknown key '{key}' in [{label}]{hint}")
    return table


def validated(table: dict, schema: dict, origin: tuple, pb: Problems) -> dict:
    out = {}
    for key, check in schema.items():
        if key in table and check is not None:
            try:
                out[ALIASES.get(key, key)] = check(table[key])
            except ValueError as e:
                pb.value(origin, key, table[key], str(e))
    return out
