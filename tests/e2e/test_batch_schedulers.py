"""Pilots on real batch schedulers: the local multi-node Slurm, the local Grid Engine, and a
FAKE PBS (no PBS server exists on this machine; see tests/fakes/fake_pbs.py)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import cli, peak_concurrency, status_json, write_bundle

FAKE_PBS_BIN = Path(__file__).resolve().parents[1] / "fakes" / "pbs_bin"
RECORD = 'mkdir -p rec; r=$(date +%s%N); {work} echo "$PILOTFLOW_TOKEN $PILOTFLOW_ATTEMPT $r $(date +%s%N)" > rec/$PILOTFLOW_TOKEN.$PILOTFLOW_ATTEMPT.$$'


@pytest.fixture(params=["slurm", "sge", "pbs"])
def cluster(request, tmp_path_factory):
    """(scheduler, env, resource TOML, node count) for each batch scheduler."""
    if request.param == "slurm":
        c = request.getfixturevalue("slurm_cluster")
        return "slurm", dict(c.env), 'cores_per_node = 4\nmax_nodes = 3\npartition = "debug"', 3
    if request.param == "sge":
        c = request.getfixturevalue("sge_cluster")
        return "sge", dict(c.env), 'cores_per_node = 4\nmax_nodes = 1\npe = "smp"', 1
    d = tmp_path_factory.mktemp("fake-pbs")
    return "pbs", {"PATH": f"{FAKE_PBS_BIN}:{os.environ['PATH']}", "FAKE_PBS_DIR": str(d)}, \
        "cores_per_node = 4\nmax_nodes = 3", 3


def bundle(work: Path, sched: str, res: str, body: str, name: str, max_walltime: str = "2m",
           lock_timeout: str = "20s") -> Path:
    (work / "rec").mkdir(exist_ok=True)
    return write_bundle(work, f"""
[bundle]
name = "{name}"
lock_timeout = "{lock_timeout}"
[[resource]]
name = "cluster"
scheduler = "{sched}"
max_walltime = "{max_walltime}"
{res}
{body}
""")


def records(run_dir: Path) -> dict[str, list[tuple[int, int, int]]]:
    out: dict[str, list] = {}
    for f in run_dir.glob("rec/*"):
        parts = f.read_text().split()
        if len(parts) == 4:
            out.setdefault(parts[0], []).append((int(parts[1]), int(parts[2]), int(parts[3])))
    return out


def pool_work(work: Path) -> Path:
    return next(p for p in (work / ".pilotflow").glob("*/work"))


def assert_once_and_never_overlapping(recs: dict, names: set[str]) -> None:
    assert set(recs) == names, f"missing: {sorted(names - set(recs))[:5]}"
    for token, runs in recs.items():
        spans = sorted((s, e) for _, s, e in runs)
        for (s1, e1), (s2, e2) in zip(spans, spans[1:]):
            assert s2 >= e1, f"{token} ran twice at the same time"


def test_a_big_bundle_runs_in_multi_node_pilots(work, cluster):
    sched, env, res, nodes = cluster
    # 300 tasks estimated at 2 s on 4-core nodes, at most 2 minutes per pilot: one node would
    # need 150 s, so the planner spreads them over several nodes
    bundle(work, sched, res, f'''[[task]]
name = "t{{i}}"
command = '{RECORD.format(work="sleep 0.2;")}'
matrix = {{ i = "1..300" }}
walltime = "2s"''', "big")
    plan = json.loads(cli("plan", "jobs.toml", "--json", cwd=work, env=env, check=0).stdout)
    pilots = plan["resources"][0]["pilots"]
    if nodes > 1:
        assert max(p["nodes"] for p in pilots) > 1
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=240)
    st = status_json(work, env=env)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": 300, "error": 0}
    hosts = Counter(t["host"] for t in st["tokens"].values())
    if nodes > 1:
        assert len(hosts) >= 2, hosts  # the recorded hosts prove the work was spread
    assert_once_and_never_overlapping(records(pool_work(work)), {f"t{i}" for i in range(1, 301)})
    # with no work left the pilots end by themselves, and the scheduler says so
    deadline = time.time() + 90
    while time.time() < deadline and any(p["state"] != "ended" for p in st["pilots"].values()):
        time.sleep(1)
        st = status_json(work, env=env)
    assert all(p["job_id"] and p["state"] == "ended" for p in st["pilots"].values()), st["pilots"]


def test_slurm_nodes_with_two_launchers_each_share_their_cores(work, slurm_cluster):
    env = dict(slurm_cluster.env)
    bundle(work, "slurm", 'cores_per_node = 4\nmax_nodes = 3\npartition = "debug"\nlaunchers_per_node = 2', f'''[[task]]
name = "t{{i}}"
command = '{RECORD.format(work="sleep 0.3;")}'
matrix = {{ i = "1..240" }}
walltime = "2s"''', "split")
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=240)
    st = status_json(work, env=env)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": 240, "error": 0}
    assert_once_and_never_overlapping(records(pool_work(work)), {f"t{i}" for i in range(1, 241)})
    pool = pool_work(work).parent
    agents = [json.loads(p.read_text()) for p in (pool / "agents").glob("p*.*.json") if p.name.count(".") == 2]
    by_pilot_host = Counter((a["pilot"], a["host"]) for a in agents)
    # each node of a pilot ran two launchers of two cores, as agents NODE*2 and NODE*2+1
    assert set(by_pilot_host.values()) == {2} and {a["cores"] for a in agents} == {2}
    assert len({a["host"] for a in agents}) >= 2
    for (pilot, host) in by_pilot_host:
        mine = sorted(a["agent"] for a in agents if (a["pilot"], a["host"]) == (pilot, host))
        assert mine[1] == mine[0] + 1 and mine[0] % 2 == 0, mine
    # never more tasks at once on a node than its 4 cores
    for host in {a["host"] for a in agents}:
        peak = peak_concurrency(t for t in st["tokens"].values() if t["host"] == host)
        assert peak <= 4, (host, peak)


def test_scheduler_cancel_mid_run_then_retry_loses_nothing(work, cluster):
    sched, env, res, nodes = cluster
    bundle(work, sched, res, f'''[[task]]
name = "t{{i}}"
command = '{RECORD.format(work="sleep 2;")}'
matrix = {{ i = "1..16" }}
walltime = "3s"''', "cancelme", max_walltime="5m")
    run = cli("submit", "jobs.toml", cwd=work, env=env, check=0).stdout.strip()
    deadline = time.time() + 120
    while time.time() < deadline and status_json(work, env=env)["counts"]["done"] < 2:
        time.sleep(0.5)
    job = status_json(work, env=env)["pilots"]["p1"]["job_id"]
    cancel = {"slurm": ["scancel"], "sge": ["qdel"], "pbs": ["qdel"]}[sched]
    import subprocess
    subprocess.run(cancel + [job], env={**os.environ, **env}, check=True, capture_output=True)
    deadline = time.time() + 60
    while time.time() < deadline and status_json(work, env=env)["pilots"]["p1"]["state"] not in ("ended", "cancelled", "failed"):
        time.sleep(0.5)
    st = status_json(work, env=env)
    assert st["counts"]["locked"] == 0 and st["counts"]["todo"] > 0  # handed back, not lost
    cli("retry", cwd=work, env=env, check=0)
    cli("wait", cwd=work, env=env, check=0, timeout=300)
    st = status_json(work, env=env)
    assert st["counts"]["done"] == 16
    assert_once_and_never_overlapping(records(pool_work(work)), {f"t{i}" for i in range(1, 17)})


# One scheduler: tests/e2e/test_unattended.py covers hand-back and follow-ups on every scheduler
# (Slurm's one-minute pilots there); Grid Engine counts seconds, so this one takes half a minute
@pytest.mark.parametrize("cluster", ["sge"], indirect=True)
def test_a_pilot_at_its_walltime_hands_back_and_a_follow_up_finishes(work, cluster):
    sched, env, res, nodes = cluster
    # estimates say 10 s; a first attempt really takes 150 s, so the pilot (30 s at most)
    # reaches its walltime; the launcher hands the tokens back and `wait`
    # submits a follow-up pilot, where the retry is quick
    work_cmd = 'if [ "$PILOTFLOW_ATTEMPT" = 1 ]; then sleep 150; else sleep 1; fi;'
    bundle(work, sched, res, f'''[[task]]
name = "t{{i}}"
command = '{RECORD.format(work=work_cmd)}'
matrix = {{ i = "1..4" }}
walltime = "10s"''', "overrun", max_walltime="30s")
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=240)
    st = status_json(work, env=env)
    assert st["counts"]["done"] == 4
    assert len(st["pilots"]) >= 2  # the first one ran out of time
    assert all(t["attempts"] >= 2 for t in st["tokens"].values())
    assert_once_and_never_overlapping(records(pool_work(work)), {f"t{i}" for i in range(1, 5)})
