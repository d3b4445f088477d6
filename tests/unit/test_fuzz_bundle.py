"""Hypothesis fuzzing of the bundle reader: never a traceback, only a bundle or BundleError."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w
from hypothesis import HealthCheck, given, settings, strategies as st

from pilotflow.bundle import load_bundle
from pilotflow.errors import BundleError

KEYS = ["name", "command", "cores", "walltime", "memory", "retries", "env", "after", "inputs", "outputs",
        "resource", "matrix", "nodes", "mpi", "scheduler", "cores_per_node", "max_nodes", "max_walltime",
        "max_pilots", "host", "port", "root", "partition", "directives", "setup", "python", "file",
        "lock_timeout", "walltime_margin", "wallclock", "x"]
scalar = st.one_of(st.text(max_size=20), st.integers(-5, 10 ** 6), st.booleans(), st.floats(allow_nan=False),
                   st.sampled_from(["1..3", "3..1", "5m", "1-12:00:00", "2G", "{i}", "a-{i}", "../x", "slurm",
                                    "local", "*", "t{n}", "$(id)"]))
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.sampled_from(KEYS + ["i", "j"]), inner,
                                                                     max_size=4)), max_leaves=12)
table = st.dictionaries(st.sampled_from(KEYS), value, max_size=8)
document = st.fixed_dictionaries({}, optional={
    "bundle": table, "defaults": table, "resource": st.lists(table, max_size=3), "task": st.lists(table, max_size=4),
    "tasks_from": st.lists(table, max_size=2), "extra": value})


def load_or_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "b.toml"
        p.write_text(text)
        (Path(d) / "list.txt").write_text("echo a\n# c\n\necho b\n")
        try:
            load_bundle(p)
        except BundleError as e:
            assert e.problems and all(isinstance(m, str) and m for m in e.problems)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document)
def test_structured_bundles_never_crash_the_reader(doc):
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return  # not representable in TOML
    load_or_error(text)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes_the_reader(text):
    load_or_error(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(['[bundle]', 'name = "b"', '[[task]]', 'name = "t{i}"', 'command = "x"',
                                 'matrix = { i = "1..3" }', 'after = ["t*"]', '[[resource]]', 'scheduler = "slurm"',
                                 'cores_per_node = 4', 'max_walltime = "1h"', 'walltime = "2h"', 'cores = 8',
                                 '[defaults]', 'retries = 2', '[[tasks_from]]', 'file = "list.txt"', 'x = 1',
                                 'after = ["nope"]', 'name = "t1"', 'memory = "1T"', 'nodes = 3', 'mpi = true']),
                max_size=25))
def test_plausible_line_soups_never_crash_the_reader(lines):
    load_or_error("\n".join(lines) + "\n")


@settings(max_examples=15, deadline=None)
@given(document)
def test_the_cli_exits_0_or_2_without_a_traceback(doc):
    try:
        text = tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "b.toml").write_text(text)
        p = subprocess.run([sys.executable, "-m", "pilotflow", "plan", "b.toml"], cwd=d, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode in (0, 2), p.stderr
        assert "Traceback" not in p.stderr
