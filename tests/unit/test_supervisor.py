"""The run supervisor's decisions (follow-ups, failover), driven without daemons: the pools are
real directories, Slurm is the FAKE of tests/fakes/fake_transport.py, time is a test clock."""

from __future__ import annotations

import time

import pytest

from pilotflow.bundle import bundle_from_dict
from pilotflow.errors import RunFailed, UsageError
from pilotflow.launcher import Pool, dump, write_atomic
from pilotflow.run.records import RunRecord
from pilotflow.run.start import new_run
from pilotflow.run.supervisor import Supervisor, idle_resources
from pilotflow.run.sync import Session
from tests.fakes.fake_transport import FakeSlurm, connector


class Clock:
    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def later(self, seconds: float) -> None:
        self.offset += seconds


def start(tmp_path, names=("A",), tasks: int = 6, **extra) -> tuple[RunRecord, dict[str, FakeSlurm]]:
    resources = [{"name": n, "scheduler": "slurm", "cores_per_node": 2, "max_walltime": "10m",
                  "root": str(tmp_path / n), **extra.get(n, {})} for n in names]
    bundle = bundle_from_dict({"bundle": {"name": "sup"}, "resource": resources,
                               "task": [{"name": "t-{i}", "command": "true", "walltime": "1m",
                                         "matrix": {"i": f"1..{tasks}"}, "resource": names[0]}]},
                              path=tmp_path / "jobs.toml")
    clusters = {n: FakeSlurm(n) for n in names}
    record, _ = new_run(bundle, cwd=tmp_path, connect=connector(clusters))
    return record, clusters


def supervisor(record, clusters, clock, **kw) -> Supervisor:
    return Supervisor(Session(record, connect=connector(clusters)), clock=clock, **kw)


def run_pilot(record: RunRecord, resource: str, pilot: str, done: list[str]) -> None:
    """What a pilot's launcher leaves behind: done tokens and its own end record."""
    pool = Pool(record.pool(resource))
    now = time.time()
    for n in done:
        pool.put(n, {"token": n, "state": "done", "attempt": 1, "pilot": pilot, "agent": 0, "host": "n1",
                     "exit_code": 0, "start": now - 1, "end": now})
    write_atomic(pool.path("agents", f"{pilot}.0.json"), dump({"pilot": pilot, "agent": 0, "start": now - 2}))
    write_atomic(pool.path("agents", f"{pilot}.0.end"), dump({"end": now, "reason": "walltime", "ran": len(done)}))


def assert_moved(record, clusters, src: str, dst: str, n: int = 6) -> None:
    """Every token left ``src`` exclusively and one pilot was planned and submitted on ``dst``."""
    owners = record.owners()
    assert set(owners.values()) == {dst} and len(owners) == n
    pool = Pool(record.pool(src))
    assert {pool.state(name)["state"] for name in owners} == {"moved"}
    assert len(Pool(record.pool(dst)).plans()) == 1 and len(clusters[dst].submitted()) == 1


def test_every_pilot_ended_with_work_left_submits_a_follow_up_then_gives_up(tmp_path):
    record, clusters = start(tmp_path)
    slurm, clock = clusters["A"], Clock()
    assert len(slurm.submitted()) == 1
    sup = supervisor(record, clusters, clock, max_followups=2)
    sup.step()
    assert len(slurm.submitted()) == 1  # the pilot is still queued: nothing to do
    run_pilot(record, "A", "p1", ["t-1", "t-2"])
    slurm.set_all("TIMEOUT")
    clock.later(61)
    st = sup.step()
    assert st.counts["done"] == 2 and st.sleep is not None
    assert len(slurm.submitted()) == 2 and record.resources["A"].followups == 1
    assert set(Pool(record.pool("A")).plans()) == {"p1", "p2"}  # planned for the 4 left
    assert len(Pool(record.pool("A")).plans()["p2"]["tokens"]) == 4
    slurm.set_all("TIMEOUT")
    clock.later(61)
    sup.step()
    assert len(slurm.submitted()) == 3 and record.resources["A"].followups == 2
    slurm.set_all("TIMEOUT")
    clock.later(61)
    with pytest.raises(RunFailed, match="ended with token.s. left after 2 follow-up round"):
        sup.step()
    assert len(slurm.submitted()) == 3


def test_a_follow_up_is_decided_on_a_round_that_asked_the_scheduler(tmp_path):
    record, clusters = start(tmp_path)
    slurm, clock = clusters["A"], Clock()
    sup = supervisor(record, clusters, clock)
    sup.step()  # asks the scheduler: p1 is queued
    record.pilots["p1"].state = "ended"  # as known from an earlier answer
    st = sup.step()  # a pool-only round: no decision on an old answer, ask again at once
    assert st.sleep == 0.0 and len(slurm.submitted()) == 1
    sup.step()
    assert len(slurm.submitted()) == 2 and record.resources["A"].followups == 1


def test_an_unreachable_scheduler_fails_over_after_a_minute(tmp_path):
    record, clusters = start(tmp_path, ("A", "B"))
    clock = Clock()
    sup = supervisor(record, clusters, clock)
    clusters["A"].down = True
    sup.step()
    assert not record.broken("A") and not clusters["B"].submitted()
    clock.later(30)
    sup.step()
    assert not record.broken("A")
    clock.later(31)
    sup.step()
    assert "has not answered for" in record.broken("A")
    assert_moved(record, clusters, "A", "B")


def test_a_pilot_queued_past_max_queue_wait_fails_over(tmp_path):
    record, clusters = start(tmp_path, ("A", "B"), A={"max_queue_wait": "2m"})
    clock = Clock()
    sup = supervisor(record, clusters, clock)
    sup.step()
    clock.later(100)
    sup.step()
    assert not record.broken("A")
    clock.later(30)
    sup.step()
    assert "queued for more than 120 s" in record.broken("A")
    assert clusters["A"].jobs["1000"] == "CANCELLED"  # its queued pilot is withdrawn
    assert_moved(record, clusters, "A", "B")


def test_pilots_that_ran_nothing_make_a_resource_broken(tmp_path):
    record, clusters = start(tmp_path, ("A", "B"))
    clock = Clock()
    sup = supervisor(record, clusters, clock)
    run_pilot(record, "A", "p1", [])
    clusters["A"].set_all("COMPLETED")
    clock.later(61)
    sup.step()
    assert record.broken("A") == "its pilots ended without running a single task"
    assert len(clusters["A"].submitted()) == 1  # no follow-up on a broken resource
    assert len(clusters["B"].submitted()) == 1


def test_a_single_resource_is_never_failed_over(tmp_path):
    record, clusters = start(tmp_path)
    clock = Clock()
    sup = supervisor(record, clusters, clock)
    run_pilot(record, "A", "p1", [])
    clusters["A"].set_all("COMPLETED")
    clock.later(61)
    sup.step()
    assert not record.broken("A") and len(clusters["A"].submitted()) == 2  # a follow-up instead


def test_a_cancelled_run_with_no_live_pilot_says_how_to_go_on(tmp_path):
    record, clusters = start(tmp_path)
    record.cancelled = True
    clusters["A"].set_all("CANCELLED")
    sup = supervisor(record, clusters, Clock())
    with pytest.raises(UsageError, match="was cancelled with 6 token.s. left; `pilotflow retry"):
        sup.step()


def test_idle_resources_are_those_with_todo_work_and_no_live_pilot(tmp_path):
    record, clusters = start(tmp_path, ("A", "B"))
    s = Session(record, connect=connector(clusters))
    states = s.known
    assert idle_resources(record, s.owner, states) == []  # p1 is queued
    record.pilots["p1"].state = "ended"
    assert idle_resources(record, s.owner, states) == ["A"]
    record.resources["A"].broken = "gone"
    assert idle_resources(record, s.owner, states) == []


def test_the_finished_run_runs_its_hook_once_and_reports_errors(tmp_path):
    record, clusters = start(tmp_path, tasks=2)
    record.on_finish = "cat > finished.json"
    pool = Pool(record.pool("A"))
    pool.put("t-1", {"token": "t-1", "state": "done", "attempt": 1, "pilot": "p1"})
    pool.put("t-2", {"token": "t-2", "state": "error", "attempt": 1, "pilot": "p1", "reason": "exit code 3"})
    sup = supervisor(record, clusters, Clock())
    st = sup.step()
    assert st.sleep is None and st.counts == {"todo": 0, "locked": 0, "done": 1, "error": 1}
    with pytest.raises(RunFailed, match="finished with 1 token.s. in error"):
        sup.finished(st.counts)
    assert (tmp_path / "finished.json").exists() and record.finished_notified
    (tmp_path / "finished.json").unlink()
    with pytest.raises(RunFailed):
        sup.finished(st.counts)
    assert not (tmp_path / "finished.json").exists()  # once per run


def test_a_run_nobody_carries_is_stalled_with_the_reason_and_the_command(tmp_path):
    from pilotflow.launcher import claim_round, end_round
    from pilotflow.run.supervisor import run_state, sync_run
    record, clusters = start(tmp_path)
    s = Session(record, connect=connector(clusters))
    assert run_state(s, sync_run(s))[0] == "running"  # p1 is queued
    run_pilot(record, "A", "p1", ["t-1"])
    clusters["A"].set_all("COMPLETED")
    pool = Pool(record.pool("A"))
    k = claim_round(pool, "p1.0")
    end_round(pool, k, "failed", error="sbatch exited 1: sbatch: error: not from compute nodes", host="n1")
    state, reason = run_state(s, sync_run(s))
    assert state == "stalled"
    assert "the follow-up submitted from n1 was refused: sbatch exited 1" in reason
    assert reason.endswith(f"`pilotflow wait {record.run}` carries it on from here")
    for k in range(3):  # the budget spent by pilots' rounds
        end_round(pool, claim_round(pool, "p1.0"), "done", pilots=[])
    state, reason = run_state(s, sync_run(s))
    assert "budget of A is spent (3 of max_follow_ups = 3 rounds)" in reason
    assert f"`pilotflow retry {record.run}` gives it a fresh budget" in reason
    assert run_state(s, sync_run(s))[0] == "stalled"


def test_pilots_that_renewed_themselves_join_the_run_record(tmp_path):
    from pilotflow.launcher import claim_round, end_round
    from pilotflow.run.supervisor import sync_run
    record, clusters = start(tmp_path)
    pool = Pool(record.pool("A"))
    k = claim_round(pool, "p1.0")
    end_round(pool, k, "done", pilots=[{"id": "r1p1", "job_id": "77", "nodes": 1, "walltime_s": 120, "tokens": 5}])
    clusters["A"].jobs["77"] = "RUNNING"
    s = Session(record, connect=connector(clusters))
    sync_run(s)
    p = record.pilots["r1p1"]
    assert (p.job_id, p.state, p.resource, p.tasks) == ("77", "running", "A", 5)
    assert record.resources["A"].followups == 1
    assert any(e.kind == "pilot" and e.name == "r1p1" for e in s.events)


def test_wait_looks_less_often_while_much_work_is_left_and_often_near_the_end():
    """A sync costs CPU the tasks of a local resource would use: once a second while more than
    3 s of work is left at the pace seen, every 0.25 s nearer the end, 0.1 s in its last second."""
    sup = Supervisor.__new__(Supervisor)  # (pace reads only what it keeps itself)
    sup.seen = (100.0, -1)

    def counts(done: int) -> dict[str, int]:
        return {"todo": 998 - done, "locked": 2, "done": done, "error": 0}  # 1,000 tokens
    assert sup.pace(100.0, counts(0)) == 0.25  # no pace seen yet
    assert sup.pace(101.0, counts(100)) == 1.0  # 100/s, 900 left: 9 s
    assert sup.pace(102.0, counts(400)) == 0.25  # 300/s, 600 left: 2 s
    assert sup.pace(103.0, counts(800)) == 0.1  # 400/s, 200 left: the last second
    assert sup.pace(104.0, counts(800)) == 0.25  # nothing finished since: no pace to go by


def test_the_wind_down_waits_for_live_pilots_but_not_for_a_crashed_nodes_nor_long_ended_ones(tmp_path):
    import os
    from pilotflow.run.supervisor import sync_run
    record, clusters = start(tmp_path)
    (p,) = record.pilots.values()
    clusters["A"].jobs[p.job_id] = "RUNNING"  # the scheduler still says so
    pool = Pool(record.pool("A"))
    beat = pool.path("agents", f"{p.id}.0.json")
    write_atomic(beat, dump({"pilot": p.id, "agent": 0, "start": time.time() - 10}))
    sup = supervisor(record, clusters, Clock())
    sync_run(sup.s)
    t = time.time()
    sup.wind_down(timeout=1.0)  # a launcher that beats: its pilot is waited for
    assert time.time() - t >= 0.9
    silent = time.time() - record.lock_timeout - 5
    os.utime(beat, (silent, silent))  # no beat for longer than lock_timeout: a crashed node
    sync_run(sup.s)
    t = time.time()
    sup.wind_down(timeout=10.0)
    assert time.time() - t < 1.0 and record.pilots[p.id].state == "running"
    # every launcher ended: a few seconds for the scheduler to see the job end, not the timeout
    os.utime(beat)
    end = pool.path("agents", f"{p.id}.0.end")
    write_atomic(end, dump({"end": time.time() - 1, "ran": 3, "held": 0}))
    sync_run(sup.s)
    t = time.time()
    sup.wind_down(timeout=2.0)  # ended 1 s ago: still waited for
    assert time.time() - t >= 1.9
    write_atomic(end, dump({"end": time.time() - 10, "ran": 3, "held": 0}))
    sync_run(sup.s)
    t = time.time()
    sup.wind_down(timeout=10.0)  # ended 10 s ago (a node gone after its launcher ended)
    assert time.time() - t < 1.0 and record.pilots[p.id].state == "running"
