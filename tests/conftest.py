"""Shared fixtures: a scratch working directory per test, CLI runners, the real daemons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.daemons.fixtures import *  # noqa: F401,F403  (slurm_cluster, sge_cluster, ssh_server)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A fresh directory to submit from (runs are found from the directory)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_bundle(directory: Path, text: str, name: str = "jobs.toml") -> Path:
    p = directory / name
    p.write_text(textwrap.dedent(text))
    return p


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300,
        check: int | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m pilotflow`` as a user would; optionally assert its exit code."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "pilotflow", *args], cwd=cwd, env=e, capture_output=True,
                       text=True, timeout=timeout)
    if check is not None:
        assert p.returncode == check, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    return p


def status_json(cwd: Path, run: str | None = None, env: dict | None = None) -> dict:
    p = cli("status", *([run] if run else []), "--json", cwd=cwd, env=env)
    assert p.returncode in (0, 1), p.stderr
    return json.loads(p.stdout)


def peak_concurrency(tokens) -> int:
    """The most tokens running at once, from their recorded start and end (``status --json``)."""
    edges = sorted(e for t in tokens for e in ((t["start"], 1), (t["end"], -1)))
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


@pytest.fixture(autouse=True)
def _empty_batch_queues(request):
    """Each test starts on an empty queue of the shared Slurm / Grid Engine: a pilot a test
    left behind (held, or still winding down) would otherwise delay the next test's pilots."""
    yield
    names = request.fixturenames
    if "slurm_cluster" in names:
        _drain(request.getfixturevalue("slurm_cluster"), ["scancel", "--user", "root"],
               ["squeue", "--noheader", "--format=%i"])
    if "sge_cluster" in names:
        _drain(request.getfixturevalue("sge_cluster"), ["qdel", "-u", "*"], ["qstat", "-u", "*"])


def _drain(cluster, cancel: list[str], listing: list[str], within: float = 30.0) -> None:
    import time
    cluster.run(cancel)
    end = time.time() + within
    while time.time() < end and cluster.run(listing).stdout.strip():
        time.sleep(0.5)


_DAEMONS = {"slurm_cluster", "sge_cluster", "ssh_server"}


def pytest_addoption(parser) -> None:
    parser.addoption("--tier", choices=("all", "daemons", "rest"), default="all",
                     help="daemons: only the tests of the shared batch daemons (Slurm, Grid Engine, sshd); "
                          "rest: all others (tests/run.sh runs the two side by side)")


def uses_batch_daemons(item) -> bool:
    """A test of the shared Slurm / Grid Engine / sshd (one of each per machine)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool(set(getattr(item, "fixturenames", ())) & _DAEMONS
                or {params.get("cluster"), params.get("where")} & {"slurm", "sge"})


def pytest_collection_modifyitems(config, items) -> None:
    """``--tier``: tests/run.sh runs the daemon tests and the rest as two pytest processes at
    once. Most of the suite's time is tests waiting on walltimes, lock timeouts and Slurm's
    minute, not CPU; within each process tests run one after another as before (one Slurm, one
    Grid Engine cell, one sshd; each test's queue drain stays its own)."""
    tier = config.getoption("tier")
    if tier == "all":
        return
    keep, drop = [], []
    for item in items:
        (keep if uses_batch_daemons(item) == (tier == "daemons") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
