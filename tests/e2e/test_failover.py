"""One run across two real resources (the local Slurm and this machine), one of them broken."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.conftest import cli, status_json, write_bundle

pytestmark = pytest.mark.slurm

REC = 'mkdir -p rec; s=$(date +%s%N); sleep 1; echo "$s $(date +%s%N) $(hostname)" > rec/$PILOTFLOW_TOKEN.$PILOTFLOW_ATTEMPT.$$'


def two_resources(work, slurm_extra: str = "", n: int = 40):
    write_bundle(work, f"""
[bundle]
name = "two"
lock_timeout = "5s"
[[resource]]
name = "cluster"
scheduler = "slurm"
cores_per_node = 4
max_nodes = 3
max_walltime = "10m"
partition = "debug"
{slurm_extra}
[[resource]]
name = "here"
scheduler = "local"
cores_per_node = 2
[[task]]
name = "t{{i}}"
command = '{REC}'
matrix = {{ i = "1..{n}" }}
walltime = "2s"
""")


def records(work):
    out = {}
    for pool in (work / ".pilotflow").rglob("rec"):
        for f in pool.iterdir():
            s, e, host = f.read_text().split()
            out.setdefault(f.name.split(".")[0], []).append((int(s), int(e)))
    return out


def check_once_no_overlap(work, n):
    recs = records(work)
    assert sorted(recs) == sorted(f"t{i}" for i in range(1, n + 1))
    for spans in recs.values():
        spans.sort()
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s2 >= e1


def test_plan_explains_the_split(work, slurm_cluster):
    two_resources(work)
    out = cli("plan", "jobs.toml", cwd=work, env=slurm_cluster.env, check=0).stdout
    assert "why here" in out and "placed here for the fewest pilots" in out
    assert "not used: here" in out


def test_a_resource_broken_mid_run_fails_over_and_loses_nothing(work, slurm_cluster):
    two_resources(work, n=24)
    env = {**slurm_cluster.env, "PILOTFLOW_UNREACHABLE_S": "10"}
    run = cli("submit", "jobs.toml", cwd=work, env=env, check=0).stdout.strip()
    st = status_json(work, run, env=env)
    assert {p["resource"] for p in st["pilots"].values()} == {"cluster"}  # all planned on Slurm
    deadline = time.time() + 120
    while time.time() < deadline and status_json(work, run, env=env)["counts"]["done"] < 4:
        time.sleep(0.5)
    slurm_cluster.stop()  # the cluster goes down: daemons and jobs
    try:
        p = cli("wait", run, cwd=work, env=env, check=0, timeout=240)
        assert "looks broken" in p.stderr and "moved" in p.stderr
        st = status_json(work, run, env=env)
        assert st["counts"] == {"todo": 0, "locked": 0, "done": 24, "error": 0}
        assert any(pl["resource"] == "here" for pl in st["pilots"].values())
        check_once_no_overlap(work, 24)
        out = cli("status", run, cwd=work, env=env, check=0).stdout  # progress per resource
        here = next(l for l in out.splitlines() if l.strip().startswith("here:"))
        cluster = next(l for l in out.splitlines() if l.strip().startswith("cluster:"))
        assert "broken:" in cluster and "todo 0" in here and "broken" not in here
        done_here = int(here.split("done ")[1].split()[0])
        done_cluster = int(cluster.split("done ")[1].split()[0])
        assert done_here + done_cluster == 24 and done_here >= 1 and done_cluster >= 4
    finally:
        slurm_cluster.restart()


def test_a_pilot_that_never_starts_fails_over_after_max_queue_wait(work, slurm_cluster):
    two_resources(work, 'max_queue_wait = "15s"\ndirectives = ["--hold"]', n=12)
    env = slurm_cluster.env
    t = time.time()
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=240)
    st = status_json(work, env=env)
    assert st["counts"]["done"] == 12
    where = Counter(pl["resource"] for pl in st["pilots"].values())
    assert where["here"] >= 1
    assert time.time() - t > 15  # it waited for max_queue_wait first
    check_once_no_overlap(work, 12)
    # the held pilot was cancelled, not left in the queue
    import subprocess, os
    q = subprocess.run(["squeue", "--noheader", "--format=%i %T"], env={**os.environ, **env}, capture_output=True,
                       text=True).stdout
    assert "PENDING" not in q


def test_retry_move_to_by_hand(work, slurm_cluster):
    two_resources(work, 'directives = ["--hold"]', n=6)
    env = slurm_cluster.env
    run = cli("submit", "jobs.toml", cwd=work, env=env, check=0).stdout.strip()
    p = cli("retry", run, "--move-to", "here", cwd=work, env=env, check=0)
    assert "moved 6 token(s) to here" in p.stdout
    # the held pilot on cluster has nothing left to do: it leaves the queue
    assert "cancelled queued pilot(s) p1 on cluster: no work left there" in p.stderr
    assert slurm_cluster.run(["squeue", "--noheader", "--format=%i %T"]).stdout.strip() == ""
    cli("wait", run, cwd=work, env=env, check=0, timeout=200)
    st = status_json(work, run, env=env)
    assert st["counts"]["done"] == 6
    check_once_no_overlap(work, 6)
