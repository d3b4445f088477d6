"""The HTML report's model and page, on runs built by hand (no launcher, no cluster).

A run record, its tasks, a states journal and launcher records are written the way a sync
writes them; ``build`` and ``write_report`` are then checked: exact summary figures on a
small case, lanes that never overlap and the size and time budget on 10,000 tokens.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest

from pilotflow.bundle import Resource, Task
from pilotflow.errors import UsageError
from pilotflow.report import build, pack_lanes, resample, step_curve, write_report, Attempt
from pilotflow.run.records import PilotRecord, RunRecord, resource_to_dict
from pilotflow.run.sync import Snapshot

T0 = 1_790_000_000.0


def make_run(directory: Path, tasks: list[Task], pilots: list[PilotRecord], history: list[dict],
             agents: dict) -> tuple[RunRecord, Snapshot]:
    """A run record as ``submit`` leaves it and a snapshot as ``sync`` returns it; ``history``
    is the journal, in order (the last record of a token is its state)."""
    directory.mkdir(parents=True, exist_ok=True)
    res = Resource(name="cluster", scheduler="slurm", cores_per_node=max(p.cores_per_node for p in pilots),
                   max_nodes=8)
    rec = RunRecord(run="synthetic-20261122-000000-abcd", bundle="synthetic", bundle_path="jobs.toml",
                    base_dir=str(directory), created=T0 - 30, lock_timeout=300,
                    resources={"cluster": {"resource": resource_to_dict(res), "pool": str(directory / "pool")}},
                    tokens=len(tasks), directory=directory)
    for p in pilots:
        rec.add_pilot(p)
    rec.save()
    rec.save_tasks(tasks)
    with open(directory / "states.jsonl", "w") as f:
        for d in history:
            f.write(json.dumps(d, separators=(",", ":"), sort_keys=True) + "\n")
    rec.mirror.set_agents(agents)
    return rec, Snapshot(states=rec.mirror.states(), changed=[], agents=agents)  # as a sync leaves it


def doc(token, attempt, state, start, end, pilot="p1", agent=0, host="n1", exit_code=None, reason="", **kw):
    d = {"token": token, "attempt": attempt, "state": state, "start": start, "end": end, "pilot": pilot,
         "agent": agent, "host": host, "exit_code": exit_code, "reason": reason, "failures": 0, "lost": 0,
         "scrubs": 0}
    d.update(kw)
    return d


def agent(pilot, i, host, start, end, cores):
    rec = {"pilot": pilot, "agent": i, "host": host, "start": start, "beat": end, "cores": cores,
           "resource": "cluster"}
    if end is not None:
        rec["end"] = {"end": end, "reason": "no claimable work left", "ran": 1}
    return rec


def lanes_never_overlap(rep) -> None:
    for p in rep.pilots:
        for row in p.rows:
            by_lane: dict[int, list[Attempt]] = {}
            for a in row.attempts:
                by_lane.setdefault(a.lane, []).append(a)
            assert len(by_lane) == row.lanes
            for bars in by_lane.values():
                bars.sort(key=lambda a: a.start)
                for x, y in zip(bars, bars[1:]):
                    assert x.start + x.shown <= y.start + 1e-9, (x, y)


# --- exact figures on a small case -------------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    tasks = [Task("a", "true", cores=2, resource="cluster"), Task("b", "true", resource="cluster", retries=1),
             Task("c", "false", resource="cluster"), Task("d", "true", resource="cluster")]
    pilots = [PilotRecord("p1", "cluster", nodes=1, cores_per_node=4, walltime_s=600, stage=0, tasks=4,
                          job_id="4242", submitted=T0 - 20, state="ended", ended=T0 + 101)]
    history = [
        doc("a", 1, "locked", T0, None), doc("b", 1, "locked", T0 + 10, None),
        doc("b", 1, "todo", T0 + 10, T0 + 30, exit_code=1, failures=1, reason="attempt 1 failed (exit code 1); will retry"),
        doc("c", 1, "locked", T0 + 20, None),
        doc("b", 2, "locked", T0 + 30, None, failures=1),
        doc("a", 1, "done", T0, T0 + 50, exit_code=0),
        doc("b", 2, "done", T0 + 30, T0 + 60, exit_code=0, failures=1),
        doc("c", 1, "error", T0 + 20, T0 + 90, exit_code=2, failures=1, reason="exit code 2"),
    ]
    agents = {"p1.0": agent("p1", 0, "n1", T0, T0 + 100, 4)}
    rec, snap = make_run(tmp_path / "run", tasks, pilots, history, agents)
    (rec.directory / "logs").mkdir()
    (rec.directory / "logs" / "c.1.err").write_text("".join(f"line {i} <&>\n" for i in range(1, 16)))
    return rec, snap


def test_summary_figures_are_exact(small):
    rec, snap = small
    rep = build(rec, snap, now=T0 + 500)
    assert rep.counts == {"todo": 1, "locked": 0, "done": 2, "error": 1}
    assert rep.makespan == pytest.approx(90.0)  # first start T0 → last end T0 + 90
    # a: 2 cores × 50 s; b: 20 s (failed) + 30 s; c: 70 s
    assert rep.used_core_s == pytest.approx(2 * 50 + 20 + 30 + 70)
    assert rep.done_core_s == pytest.approx(2 * 50 + 30)
    assert rep.charged_core_s == pytest.approx(4 * 100)  # 1 node × 4 cores × the agent's 100 s
    assert rep.efficiency == pytest.approx(220 / 400)
    assert (rep.retried_tokens, rep.extra_attempts) == (1, 1)
    assert rep.peak_busy == 4
    assert [(a.token, a.attempt, a.outcome) for a in sorted(rep.attempts, key=lambda a: (a.token, a.attempt))] == [
        ("a", 1, "done"), ("b", 1, "retried"), ("b", 2, "done"), ("c", 1, "error")]
    assert [a.token for a in rep.slowest] == ["c", "a", "b"]
    assert rep.slowest[2].attempt == 2  # a task's latest attempt counts
    (f,) = rep.failures
    assert (f.token, f.attempt, f.exit_code, f.reason) == ("c", 1, 2, "exit code 2")
    assert f.stderr.splitlines() == [f"line {i} <&>" for i in range(6, 16)]  # the last 10 lines
    assert rep.outcome_counts == {"done": 2, "error": 1, "retried": 1, "lost": 0, "running": 0}
    lanes_never_overlap(rep)
    assert rep.pilots[0].rows[0].lanes == 3  # a, b and c run at once at T0 + 20


def test_the_page_shows_the_figures(small, tmp_path):
    rec, snap = small
    out = write_report(rec, snap, tmp_path / "r.html", now=T0 + 500)
    html = out.read_text()
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert 'id="makespan">1m 30s<' in html
    assert 'id="core-hours">220.00 / 400.00<' in html and "core-seconds used / charged" in html
    assert 'id="efficiency">55.0%<' in html and 'id="retries">1<' in html
    assert "line 15 &lt;&amp;&gt;" in html and "line 5 " not in html  # escaped, tail only
    assert html.count("<title>b · attempt") == 2
    assert "exit code 2" in html and "pilot p1" in html and "4242" in html


def test_a_missing_output_directory_is_a_usage_error(small, tmp_path):
    rec, snap = small
    with pytest.raises(UsageError, match="does not exist"):
        write_report(rec, snap, tmp_path / "nowhere" / "r.html")


def test_lost_running_and_unseen_attempts(tmp_path):
    tasks = [Task(n, "true", resource="cluster") for n in ("lost", "run", "quick")]
    pilots = [PilotRecord("p1", "cluster", 1, 2, 600, 0, 3, job_id="1", submitted=T0, state="failed", ended=T0 + 40),
              PilotRecord("p2", "cluster", 1, 2, 600, 0, 3, job_id="2", submitted=T0, state="running")]
    history = [
        doc("lost", 1, "locked", T0 + 1, None),
        # released by a stale-lock scrub long after p1 died: drawn up to the node's end only
        doc("lost", 1, "todo", T0 + 1, T0 + 300, lost=1, reason="pilot p1 stopped while running it"),
        doc("lost", 2, "done", T0 + 310, T0 + 320, pilot="p2", host="n2", exit_code=0, lost=1),
        doc("run", 1, "locked", T0 + 305, None, pilot="p2", host="n2"),
        # attempt 1 of "quick" failed and was retried between two syncs: no record of it
        doc("quick", 2, "done", T0 + 2, T0 + 3, exit_code=0, failures=1),
    ]
    agents = {"p1.0": agent("p1", 0, "n1", T0, None, 2), "p2.0": agent("p2", 0, "n2", T0 + 300, None, 2)}
    agents["p1.0"]["beat"] = T0 + 30
    rec, snap = make_run(tmp_path / "run", tasks, pilots, history, agents)
    rep = build(rec, snap, now=T0 + 400)
    got = {(a.token, a.attempt): a for a in rep.attempts}
    assert got[("lost", 1)].outcome == "lost" and got[("lost", 1)].end == pytest.approx(T0 + 30)
    assert got[("run", 1)].outcome == "running" and got[("run", 1)].end == pytest.approx(T0 + 400)
    assert ("quick", 1) not in got and rep.unseen_attempts == 1
    p1, p2 = rep.pilots
    assert (p1.start, p1.end) == (T0, T0 + 30)  # its launcher's last heartbeat
    assert (p2.start, p2.end) == (T0 + 300, T0 + 400)  # still running: up to now
    assert rep.charged_core_s == pytest.approx(2 * 30 + 2 * 100)
    lanes_never_overlap(rep)


def test_lane_packing_uses_the_fewest_lanes_and_absorbs_bookkeeping_lag():
    def at(name, s, e, cores=1):
        return Attempt(name, 1, "done", s, e, "p1", 0, "n", cores)
    xs = [at("a", 0, 10), at("b", 0, 5), at("c", 5, 8), at("d", 8.0, 12), at("e", 9.9, 11)]
    assert pack_lanes(xs) == 3  # b c d | a | e: e starts while a and d run
    assert sorted((x.token, x.lane) for x in xs) == [("a", 1), ("b", 0), ("c", 0), ("d", 0), ("e", 2)]
    assert all(x.shown == x.duration for x in xs)  # no capacity given: nothing is clipped
    # a 2-core node: b's end was recorded 50 ms after c started on the core b had freed
    a, b, c = at("a", 0, 10), at("b", 0, 5.05), at("c", 5.0, 8)
    assert pack_lanes([a, b, c], cores=2) == 2
    assert b.shown == pytest.approx(5.0) and b.duration == pytest.approx(5.05) and c.lane == b.lane
    # with a core to spare the same records are real concurrency: a third lane, no clipping
    a, b, c = at("a", 0, 10), at("b", 0, 5.05), at("c", 5.0, 8)
    assert pack_lanes([a, b, c], cores=3) == 3 and b.shown == pytest.approx(5.05)
    # a 2-core task needs both lanes' attempts to have ended
    a, b, c = at("a", 0, 5.02), at("b", 0, 5.03), at("c", 5.0, 8, cores=2)
    assert pack_lanes([a, b, c], cores=2) == 2 and a.shown == b.shown == pytest.approx(5.0)


def test_resampled_curves_keep_their_area():
    rng = random.Random(1)
    ev = []
    for _ in range(5000):
        s = rng.uniform(0, 1000)
        ev += [(s, 1), (s + rng.uniform(1, 50), -1)]
    times, values = step_curve(ev)
    exact = sum(v * (t2 - t1) for t1, t2, v in zip(times, times[1:], values))
    rt, rv = resample(times, values, times[0], times[-1], points=500)
    assert len(rt) == 501
    assert sum(v * (t2 - t1) for t1, t2, v in zip(rt, rt[1:], rv)) == pytest.approx(exact, rel=1e-9)


# --- 10,000 tokens -------------------------------------------------------------------------------

def synthetic(directory: Path, n: int = 10_000, seed: int = 7):
    """n tokens list-scheduled on 3 pilots (2×16, 4×8 and 1×32 cores) without overbooking any
    node; some fail, some are retried after a failure, some are lost and rerun, a few run."""
    rng = random.Random(seed)
    shapes = [("p1", 2, 16, 0.0), ("p2", 4, 8, 120.0), ("p3", 1, 32, 900.0)]
    pilots, nodes, agents = [], [], {}
    for pid, nn, cpn, delay in shapes:
        pilots.append(PilotRecord(pid, "cluster", nn, cpn, 4 * 3600, 0, n // 3, job_id=str(1000 + len(pilots)),
                                  submitted=T0 - 60, state="running"))
        for i in range(nn):
            nodes.append({"pilot": pid, "agent": i, "host": f"{pid}-node{i:02d}", "free": [T0 + delay] * cpn})
    tasks, history = [], []
    for k in range(n):
        name = f"task-{k:05d}"
        cores = rng.choice((1, 1, 1, 2, 4))
        tasks.append(Task(name, "true", cores=cores, resource="cluster", retries=1))
        node = nodes[k % len(nodes)]
        attempts = 2 if k % 97 == 0 else 1
        for a in range(1, attempts + 1):
            free = sorted(node["free"])
            start = free[cores - 1] + rng.uniform(0, 0.05)
            end = start + rng.uniform(5, 240)
            node["free"] = free[cores:] + [end] * cores
            base = dict(pilot=node["pilot"], agent=node["agent"], host=node["host"])
            if a < attempts:
                history.append(doc(name, a, "todo", start, end, exit_code=3, failures=1,
                                   reason="attempt 1 failed (exit code 3); will retry", **base))
            elif k % 331 == 0:
                history.append(doc(name, a, "error", start, end, exit_code=1, reason="exit code 1", **base))
            else:
                history.append(doc(name, a, "done", start, end, exit_code=0, **base))
    last = max(d["end"] for d in history)
    for node in nodes:
        delay, cpn = {s[0]: (s[3], s[2]) for s in shapes}[node["pilot"]]
        agents[f"{node['pilot']}.{node['agent']}"] = agent(node["pilot"], node["agent"], node["host"],
                                                           T0 + delay, None, cpn)
    return make_run(directory, tasks, pilots, history, agents), last


def test_ten_thousand_tokens_fast_small_and_never_overlapping(tmp_path):
    (rec, snap), last = synthetic(tmp_path / "run")
    t = time.perf_counter()
    out = write_report(rec, snap, tmp_path / "big.html", now=last + 10)
    elapsed = time.perf_counter() - t
    size = out.stat().st_size
    print(f"10,000 tokens: report written in {elapsed:.2f} s, {size / 1e6:.2f} MB")
    assert elapsed < 3.0 and size < 5_000_000
    html = out.read_text()
    assert len(re.findall(r"<rect x=[^>]*><title>task-", html)) == 10_000 + len(range(0, 10_000, 97))
    rep = build(rec, snap, now=last + 10)
    lanes_never_overlap(rep)
    cores = {p.id: p.cores_per_node for p in rep.pilots}
    for p in rep.pilots:
        for row in p.rows:
            assert 0 < row.lanes <= cores[p.id]  # the schedule never overbooked a node
    assert rep.retried_tokens == len(range(0, 10_000, 97))
    assert rep.counts["error"] == len([k for k in range(10_000) if k % 331 == 0])
    assert rep.peak_busy <= 96 and 0 < rep.efficiency <= 1


def test_past_max_bars_back_to_back_attempts_merge_into_fewer_bars(tmp_path, monkeypatch):
    from pilotflow.report import svg
    (rec, snap), last = synthetic(tmp_path / "run")
    full = write_report(rec, snap, tmp_path / "full.html", now=last + 10).read_text()
    monkeypatch.setattr(svg, "MAX_BARS", 1000)  # as if it were a million attempts
    merged = write_report(rec, snap, tmp_path / "merged.html", now=last + 10).read_text()
    bars = len(re.findall(r"<rect x=[^>]*><title>", merged))
    assert bars < len(re.findall(r"<rect x=[^>]*><title>task-", full)) / 3
    assert re.search(r"<title>\d+ attempts \(done\)", merged)
    assert len(merged) < len(full) / 3


def test_the_model_of_a_big_run_holds_little_per_token(tmp_path):
    """A million-token run's report must fit in memory: the model keeps a small record per
    attempt (not its decoded document, nor the run's tasks), reading the mirror one state at a
    time. Measured with tracemalloc on 10,000 tokens, the peak while building the model."""
    import tracemalloc
    (rec, snap), last = synthetic(tmp_path / "run")
    tracemalloc.start()
    try:
        build(rec, snap, now=last + 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    per_token = peak / 10_000
    print(f"report model: {per_token:.0f} bytes per token at peak")
    assert per_token < 1_500, f"{per_token:.0f} bytes per token"  # 4,000 when it decoded everything
