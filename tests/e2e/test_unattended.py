"""Runs that finish with nobody watching (issue: unattended runs): pilots submit their own
follow-ups from the nodes, a refused submission fails over at once, a run nobody carries says
it is stalled and why. The tests watch only the pool and the scheduler's queue after `submit`
has returned: no pilotflow process runs until the run is over."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from pilotflow.launcher import Pool, rounds
from tests.conftest import cli, status_json, write_bundle
from tests.e2e.test_batch_schedulers import FAKE_PBS_BIN

# each attempt leaves a start record, and an end record if it completes (3 s of sleep; the
# bundle estimates 1 s, so every plan is 3x too short)
TASK = ('mkdir -p rec; echo "$(date +%s%N)" > rec/$PILOTFLOW_TOKEN.$PILOTFLOW_ATTEMPT.start; sleep 3; '
        'echo "$(date +%s%N)" > rec/$PILOTFLOW_TOKEN.$PILOTFLOW_ATTEMPT.end')


@pytest.fixture(params=["local", "slurm", "sge", "pbs"])
def where(request, tmp_path_factory):
    """(scheduler, env, resource lines, tasks, queue command) for each scheduler."""
    if request.param == "local":
        return "local", {}, 'cores_per_node = 2\nmax_walltime = "40s"', 30, None
    if request.param == "slurm":
        c = request.getfixturevalue("slurm_cluster")
        # one-node pilots of one minute (Slurm counts minutes): 160 tasks need two of them,
        # which end together, with work left
        return "slurm", dict(c.env), 'cores_per_node = 4\nmax_nodes = 1\nmax_walltime = "1m"\npartition = "debug"', \
            160, ["squeue", "--noheader", "--format=%i"]
    if request.param == "sge":
        c = request.getfixturevalue("sge_cluster")
        return "sge", dict(c.env), 'cores_per_node = 4\nmax_walltime = "45s"\npe = "smp"', 40, ["qstat", "-u", "*"]
    d = tmp_path_factory.mktemp("fake-pbs")
    return "pbs", {"PATH": f"{FAKE_PBS_BIN}:{os.environ['PATH']}", "FAKE_PBS_DIR": str(d)}, \
        'cores_per_node = 4\nmax_walltime = "45s"', 40, None


def bundle(work: Path, sched: str, res: str, n: int, extra: str = "") -> Path:
    return write_bundle(work, f"""
[bundle]
name = "alone"
lock_timeout = "20s"
[[resource]]
name = "cluster"
scheduler = "{sched}"
{res}
{extra}
[[task]]
name = "t{{i}}"
command = '{TASK}'
matrix = {{ i = "1..{n}" }}
walltime = "1s"
""")


def pool_of(work: Path) -> Path:
    return next(p for p in (work / ".pilotflow").iterdir() if (p / "run.json").exists())


def wait_in_pool(pool_dir: Path, n: int, timeout: float) -> dict:
    """Until every token is done, reading nothing but the pool (no pilotflow command)."""
    pool = Pool(str(pool_dir))
    end = time.time() + timeout
    while time.time() < end:
        states = pool.states()
        if sum(1 for d in states.values() if d.get("state") == "done") == n:
            return states
        time.sleep(2)
    states = pool.states()
    raise AssertionError(f"not done after {timeout:.0f} s: "
                         f"{sum(1 for d in states.values() if d.get('state') == 'done')} of {n} done; rounds: "
                         f"{rounds(pool)}")


def assert_once_and_never_overlapping(rec: Path, n: int) -> None:
    starts: dict[str, dict[int, int]] = {}
    ends: dict[str, dict[int, int]] = {}
    for f in rec.iterdir():
        token, attempt, kind = f.name.rsplit(".", 2)
        (starts if kind == "start" else ends).setdefault(token, {})[int(attempt)] = int(f.read_text())
    assert len(ends) == n and all(len(v) == 1 for v in ends.values()), "a token completed twice or never"
    for token, attempts in starts.items():
        done_at = ends[token]
        (k, end), = done_at.items()
        for j, start in attempts.items():
            if j != k:  # an attempt cut off at its pilot's end: wholly before or after the one that ran
                assert start < attempts[k] or start > end, f"{token}: attempts {j} and {k} overlapped"
        order = [attempts[j] for j in sorted(attempts)]
        assert order == sorted(order), f"{token}: attempts out of order"


def test_a_run_whose_estimates_are_3x_too_short_finishes_with_nobody_watching(work, where):
    sched, env, res, n, queue = where
    bundle(work, sched, res, n)
    p = cli("submit", "jobs.toml", cwd=work, env=env, check=0)
    assert len(p.stdout.split()) == 1
    pool = pool_of(work)
    wait_in_pool(pool, n, timeout=420)
    assert_once_and_never_overlapping(pool / "work" / "rec", n)
    recs = rounds(Pool(str(pool)))
    done = [d for d in recs.values() if d["state"] == "done"]
    assert 1 <= len(done) <= 3, recs  # renewed, within max_follow_ups (3)
    assert all(d["by"] != "client" for d in done)  # by the pilots themselves
    if sched == "slurm":  # two pilots ended together: one round between them
        assert len(json.loads((pool / "plans" / "p2.json").read_text())["tokens"]) > 0
        assert len(done) == 1 and sorted(d["round"] for d in recs.values()) == list(range(1, len(recs) + 1))
    if queue:
        end = time.time() + 60
        while time.time() < end and subprocess.run(queue, env={**os.environ, **env}, capture_output=True,
                                                   text=True).stdout.strip():
            time.sleep(1)
    # the client, coming back, sees every pilot and a finished run
    st = status_json(work, env=env)
    assert st["state"] == "finished" and st["counts"]["done"] == n
    assert {f"r{d['round']}p1" for d in done} <= set(st["pilots"])


@pytest.mark.sge
def test_a_node_that_cannot_submit_makes_the_run_stalled_and_wait_finishes_it(work, sge_cluster, tmp_path):
    wrap = tmp_path / "nosubmit"
    wrap.mkdir()
    (wrap / "qsub").write_text('#!/bin/sh\necho "qsub: submission from execution hosts is not allowed" >&2\nexit 1\n')
    (wrap / "qsub").chmod(0o755)
    env = dict(sge_cluster.env)
    bundle(work, "sge", 'cores_per_node = 4\nmax_walltime = "45s"\npe = "smp"', 40,
           extra=f'setup = ["PATH={wrap}:$PATH"]')
    run = cli("submit", "jobs.toml", cwd=work, env=env, check=0).stdout.strip()
    pool = Pool(str(pool_of(work)))
    end = time.time() + 150
    while time.time() < end and not any(d.get("state") == "failed" for d in rounds(pool).values()):
        time.sleep(2)
    time.sleep(3)
    p = cli("status", cwd=work, env={**env, "COLUMNS": "300"}, check=0)
    st = status_json(work, env=env)
    assert st["state"] == "stalled" and st["counts"]["todo"] > 0, st["state"]
    assert "submission from execution hosts is not allowed" in st["reason"]
    assert f"pilotflow wait {run}" in st["reason"] and "stalled" in p.stdout
    runs = cli("runs", cwd=work, env={**env, "COLUMNS": "300"}, check=0).stdout
    assert "stalled" in runs
    cli("wait", cwd=work, env=env, check=0, timeout=240)
    st = status_json(work, env=env)
    assert st["state"] == "finished" and st["counts"]["done"] == 40
    assert_once_and_never_overlapping(pool_of(work) / "work" / "rec", 40)


def refused_bundle(work: Path, extra: str = "", tasks: int = 12) -> None:
    """A Slurm resource on a partition that does not exist (sbatch refuses its pilots)."""
    write_bundle(work, f"""
[bundle]
name = "refused"
[[resource]]
name = "cluster"
scheduler = "slurm"
cores_per_node = 4
partition = "nope"
{extra}
[[task]]
name = "t{{i}}"
command = "echo $PILOTFLOW_TOKEN > $PILOTFLOW_TOKEN.txt"
matrix = {{ i = "1..{tasks}" }}
walltime = "1s"
resource = "cluster"
""")


@pytest.mark.slurm
def test_a_refused_partition_fails_over_at_submit(work, slurm_cluster):
    env = dict(slurm_cluster.env)
    refused_bundle(work, '[[resource]]\nname = "here"\nscheduler = "local"\ncores_per_node = 2')
    p = cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=200)
    assert "resource cluster looks broken: its scheduler refused the pilots" in p.stderr
    assert "invalid partition" in p.stderr.lower()
    st = status_json(work, env=env)
    assert st["finished"] and st["counts"]["done"] == 12
    refused = {k: v for k, v in st["pilots"].items() if v["resource"] == "cluster"}
    assert refused and all(v["state"] == "failed" and v["job_id"] is None for v in refused.values())
    assert {v["state"] for v in st["pilots"].values() if v["resource"] == "here"} == {"ended"}
    # the same without --wait: the refusal is handled by submit itself
    run = cli("submit", "jobs.toml", cwd=work, env=env, check=0).stdout.strip()
    cli("wait", run, cwd=work, env=env, check=0, timeout=200)
    assert status_json(work, run, env=env)["counts"]["done"] == 12


@pytest.mark.slurm
def test_a_refused_partition_with_nowhere_to_go_leaves_nothing_behind(work, slurm_cluster):
    env = dict(slurm_cluster.env)
    refused_bundle(work, 'root = "pools"', tasks=3)
    p = cli("submit", "jobs.toml", cwd=work, env=env, check=3)
    assert "sbatch" in p.stderr and "exit code" in p.stderr and "invalid partition" in p.stderr.lower()
    assert not p.stdout
    assert not list((work / "pools").iterdir()) and not list((work / ".pilotflow" / "runs").iterdir())


def test_on_finish_fires_once_for_a_run_that_finished_unattended(work):
    write_bundle(work, """
[bundle]
name = "hooked"
on_finish = "cat >> finished.jsonl; echo >> finished.jsonl"
[[task]]
name = "t{i}"
command = "true"
matrix = { i = "1..5" }
""")
    cli("submit", "jobs.toml", cwd=work, check=0)
    wait_in_pool(pool_of(work), 5, timeout=60)
    assert not (work / "finished.jsonl").exists()  # nobody was watching
    assert status_json(work)["state"] == "finished"
    cli("status", cwd=work, check=0)
    cli("wait", cwd=work, check=0)
    lines = [ln for ln in (work / "finished.jsonl").read_text().splitlines() if ln.strip()]
    assert len(lines) == 1 and json.loads(lines[0])["counts"]["done"] == 5


@pytest.mark.sge
def test_a_pilot_killed_while_it_submits_its_successor_loses_nothing_and_submits_nothing_twice(work, sge_cluster,
                                                                                              tmp_path):
    env = dict(sge_cluster.env)
    slow = tmp_path / "slowsubmit"
    slow.mkdir()
    marker = tmp_path / "submitting"
    real = subprocess.run(["sh", "-c", "command -v qsub"], env={**os.environ, **env}, capture_output=True,
                          text=True).stdout.strip()
    (slow / "qsub").write_text(f'#!/bin/sh\ntouch {marker}\nsleep 8\nexec {real} "$@"\n')
    (slow / "qsub").chmod(0o755)
    bundle(work, "sge", 'cores_per_node = 4\nmax_walltime = "45s"\npe = "smp"', 40,
           extra=f'setup = ["PATH={slow}:$PATH"]')
    run = cli("submit", "jobs.toml", cwd=work, env=env, check=0).stdout.strip()
    end = time.time() + 120
    while time.time() < end and not marker.exists():
        time.sleep(0.5)
    assert marker.exists(), "the pilot never tried to submit its follow-up"
    job = status_json(work, run, env=env)["pilots"]["p1"]["job_id"]
    subprocess.run(["qdel", job], env={**os.environ, **env}, check=True, capture_output=True)
    cli("wait", run, cwd=work, env=env, check=0, timeout=280)
    st = status_json(work, run, env=env)
    assert st["state"] == "finished" and st["counts"]["done"] == 40
    assert_once_and_never_overlapping(pool_of(work) / "work" / "rec", 40)
    recs = rounds(Pool(str(pool_of(work))))
    assert recs[1]["state"] == "claimed" and not recs[1].get("pilots")  # its claimant died mid-submission
    done = [d for d in recs.values() if d["state"] == "done"]
    assert len(done) == 1 and done[0]["by"] == "client"
    assert "r1p1" not in st["pilots"]  # the killed submission never reached the scheduler
