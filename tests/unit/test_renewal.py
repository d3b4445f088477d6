"""The launcher's renewal decisions, on a real pool directory with a stand-in submit command
(``/bin/sh -c 'echo JOBID'``): who submits a follow-up round, when, how big, and when not."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from pilotflow.launcher import (Agent, Pool, claim_round, dump, end_round, live_pilots, observed_ratio, rounds,
                                rounds_spent, size_round, wait_earlier_rounds, write_atomic)

SPEC = {"cores_per_node": 4, "max_nodes": 2, "max_walltime": 600, "margin": 0.05, "overhead": 20,
        "walltime_step": 60, "max_pilots": 4, "max_follow_ups": 2, "job_id_re": r"(\d+)",
        "clear_env": ["SLURM_"], "keep_env": []}


def make_pool(tmp_path, n=10, argv=None) -> Pool:
    pool = Pool.create(str(tmp_path / "pool"), {"run": "r", "lock_timeout": 30})
    pool.add_defs([{"name": f"t{i}", "command": "true", "cores": 1, "walltime": 10, "rank": i} for i in range(n)])
    pool.write_plan("p1", [f"t{i}" for i in range(n)], 0, {"created": 1})
    spec = dict(SPEC, argv=argv or ["/bin/sh", "-c", 'echo "$0 $1" >> submitted; echo 4242', "{pilot}", "{nodes}"])
    write_atomic(pool.path("pilots", "renew.json"), dump(spec))
    return pool


def ended(pool: Pool, pilot: str, agent: int = 0, ran: int = 1) -> Agent:
    """A launcher of ``pilot`` that has just ended (its end record written, as shutdown does)."""
    a = Agent(pool, pilot, agent=agent, cores=4, deadline=time.time() + 30)
    a.ran = ran
    a.record()
    write_atomic(pool.path("agents", f"{pilot}.{agent}.end"), dump({"end": time.time(), "ran": ran}))
    return a


def done(pool: Pool, names, seconds=30.0):
    now = time.time()
    for n in names:
        pool.put(n, {"token": n, "state": "done", "attempt": 1, "start": now - seconds, "end": now})


def submitted(pool: Pool) -> list[str]:
    try:
        return open(pool.path("pilots", "submitted")).read().split("\n")[:-1]
    except FileNotFoundError:
        return []


def test_the_last_launcher_to_end_with_work_left_submits_one_round(tmp_path):
    pool = make_pool(tmp_path)
    done(pool, ["t0", "t1"])
    ended(pool, "p1").renew()
    recs = rounds(pool)
    assert list(recs) == [1] and recs[1]["state"] == "done" and recs[1]["by"] == "p1.0"
    assert recs[1]["pilots"] == [{"id": "r1p1", "job_id": "4242", "nodes": 1, "tokens": 8, "walltime_s": 120,
                                  "gpus_per_node": 0}]
    assert recs[1]["ratio"] == pytest.approx(3.0, rel=0.01)  # 30 s observed for 10 s estimated
    plan = pool.plans()["r1p1"]
    assert plan["round"] == 1 and plan["tokens"] == [f"t{i}" for i in range(2, 10)]
    assert submitted(pool) == ["r1p1 1"]
    # its pilot is queued now: the next launcher to end leaves the work to it
    ended(pool, "p1", agent=1).renew()
    assert list(rounds(pool)) == [1]


def test_launchers_ending_together_submit_one_round(tmp_path):
    pool = make_pool(tmp_path)
    a, b = ended(pool, "p1", 0), ended(pool, "p1", 1)
    threads = [threading.Thread(target=x.renew) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recs = rounds(pool)
    assert [d["state"] for d in recs.values()].count("done") == 1
    assert all(d["state"] in ("done", "void") for d in recs.values())
    assert len(submitted(pool)) == 1


def test_no_round_while_another_pilot_lives_or_waits_in_the_queue(tmp_path):
    pool = make_pool(tmp_path)
    Agent(pool, "p2", agent=0, cores=4).record()  # running (fresh heartbeat, no end)
    ended(pool, "p1").renew()
    assert rounds(pool) == {}
    pool2 = make_pool(tmp_path / "b")
    pool2.write_plan("p3", ["t9"], 0, {"created": 2})  # planned, never started: queued
    ended(pool2, "p1").renew()
    assert rounds(pool2) == {}
    open(pool2.path("agents", "p3.gone"), "w").close()  # the client saw it finish without starting
    ended(pool2, "p1", agent=1).renew()
    assert list(rounds(pool2)) == [1]


def test_budget_cancel_and_fruitless_follow_ups_stop_renewal(tmp_path):
    pool = make_pool(tmp_path)
    for k in (1, 2):
        assert claim_round(pool, "client") == k
        end_round(pool, k, "done", pilots=[])
    a = ended(pool, "p1")
    a.renew()
    assert sorted(rounds(pool)) == [1, 2] and "budget (max_follow_ups = 2) is spent" in \
        json.loads(open(pool.path("agents", "p1.0.end")).read())["renewal"]
    assert rounds_spent(pool) == 2
    # retry gives a fresh budget
    from pilotflow.launcher import helper
    helper(pool.root, "mark", {"resumed": True})
    assert rounds_spent(pool) == 0
    helper(pool.root, "mark", {"cancelled": True})
    ended(pool, "p1", agent=1).renew()
    assert sorted(rounds(pool)) == [1, 2]  # cancelled: nobody renews
    pool3 = make_pool(tmp_path / "c")
    pool3.write_plan("r1p1", ["t1"], 0, {"round": 1, "created": 5})
    open(pool3.path("agents", "p1.gone"), "w").close()
    ended(pool3, "r1p1", ran=0).renew()  # a follow-up that ran nothing
    assert rounds(pool3) == {} and "ran nothing" in json.loads(open(pool3.path("agents", "r1p1.0.end")).read())["renewal"]


def test_a_refused_submission_is_recorded_and_its_pilot_never_counts_as_queued(tmp_path):
    pool = make_pool(tmp_path, argv=["/bin/sh", "-c", "echo 'sbatch: error: not from a node' >&2; exit 1"])
    ended(pool, "p1").renew()
    rec = rounds(pool)[1]
    assert rec["state"] == "failed" and "not from a node" in rec["error"] and "exited 1" in rec["error"]
    assert live_pilots(pool) == set()
    assert "refused" not in json.dumps(rec) or True
    end = json.loads(open(pool.path("agents", "p1.0.end")).read())
    assert "submitting follow-up round 1" in end["renewal"] and "not from a node" in end["renewal"]


def test_a_round_waits_for_earlier_ones_and_skips_a_dead_claimant(tmp_path):
    pool = make_pool(tmp_path)
    assert claim_round(pool, "client") == 1
    assert claim_round(pool, "client") == 2
    assert not wait_earlier_rounds(pool, 2, time.time() + 0.5)  # round 1 is still being submitted
    end_round(pool, 1, "void")
    assert wait_earlier_rounds(pool, 2, time.time() + 0.5)
    end_round(pool, 2, "done", pilots=[])
    a = ended(pool, "p9")  # a launcher that claimed round 3 and died: its round does not block
    assert claim_round(pool, a.key) == 3
    assert not wait_earlier_rounds(pool, 4, time.time() + 0.5)  # while it still beats
    import os
    os.utime(pool.path("agents", "p9.0.json"), (time.time() - 60, time.time() - 60))
    assert wait_earlier_rounds(pool, 4, time.time() + 0.5)


def test_size_round_from_what_is_left_and_what_was_observed():
    left = [{"name": f"t{i}", "cores": 1, "walltime": 60} for i in range(100)]
    # 100 tasks of 60 s estimated, observed 3x longer: 5 h of core time
    pilots = size_round(SPEC, left, 3.0)
    nodes = sum(p[0] for p in pilots)
    assert len(pilots) == 4 and all(p[0] == 2 for p in pilots)  # max_pilots 4 x max_nodes 2
    assert all(p[1] == 600 for p in pilots)  # each as long as allowed
    assert sorted(n for p in pilots for n in p[2]) == sorted(d["name"] for d in left)
    small = size_round(SPEC, left[:4], 1.0)
    assert small == [(1, 120, ["t0", "t1", "t2", "t3"])] and nodes == 8  # 60 s of work + 20 s, in minutes
    assert size_round(dict(SPEC, max_walltime=None), left, 1.0)[0][1] == 0  # no limit: no walltime
    wide = [{"name": "g", "cores": 4, "nodes": 2, "walltime": 30}]
    assert size_round(SPEC, wide, 1.0)[0][0] == 2


def test_observed_ratio_is_the_median_over_done_tokens():
    defs = [{"name": f"t{i}", "walltime": 10} for i in range(3)]
    states = {"t0": {"state": "done", "start": 0, "end": 20}, "t1": {"state": "done", "start": 0, "end": 30},
              "t2": {"state": "done", "start": 0, "end": 1000}}
    assert observed_ratio(defs, states) == 3.0
    assert observed_ratio(defs, {}) == 1.0


def test_size_round_counts_a_gpus_share_of_the_node():
    spec = dict(SPEC, cores_per_node=32, gpus_per_node=4, max_nodes=1, max_pilots=8, max_walltime=3600)
    left = [{"name": f"g{i}", "cores": 1, "gpus": 1, "walltime": 600} for i in range(8)]
    # 8 one-GPU tasks of 10 min on 4-GPU nodes: two waves (20 min + margin, in minutes) on one
    # node, not one wave because 8 cores of 32 would do
    assert size_round(spec, left, 1.0) == [(1, 1320, [f"g{i}" for i in range(8)])]


def test_the_filesystem_clock_can_be_read_from_threads_at_once(tmp_path):
    """Launcher agents run in threads of one process here: their clock probes must not meet
    (two shared one file, and one's unlink broke the other's stat: a renewal failed)."""
    from pilotflow.launcher import fs_now
    errors = []

    def read_many():
        try:
            for _ in range(300):
                fs_now(str(tmp_path))
        except OSError as e:
            errors.append(e)
    threads = [threading.Thread(target=read_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not list(tmp_path.iterdir())


def test_a_claim_being_written_is_an_open_round_not_a_stale_one(tmp_path):
    """Two launchers ended together: the second saw the first's round file before its content
    and took the empty file for a stale claim, so both submitted a round (a red CI)."""
    from pilotflow.launcher import claim_round, rounds, wait_earlier_rounds
    pool = make_pool(tmp_path)
    os.makedirs(pool.path("followups"), exist_ok=True)
    open(pool.path("followups", "000001.json"), "w").close()  # created, not yet written
    assert rounds(pool)[1]["state"] == "claimed"
    assert claim_round(pool, "p2.0") == 2
    assert not wait_earlier_rounds(pool, 2, time.time() + 0.5)  # round 1 is still being claimed
    assert claim_round(pool, "p3.0") == 3 and not [f for f in os.listdir(pool.path("followups")) if "tmp" in f]


def test_an_ending_launcher_decides_against_renewal_without_reading_every_state(tmp_path, monkeypatch):
    """Every token ended or is held by a launcher that lives or ended saying it held nothing:
    no scan (at a million tokens, seconds at every launcher's end). Anything else: the scan."""
    pool = make_pool(tmp_path, n=4)
    me = Agent(pool, "p1", agent=0, cores=4, deadline=time.time() + 30)
    me.record()
    me.load()
    for name, status in (("t0", "done"), ("t1", "error"), ("t2", "other"), ("t3", "other")):
        me.tokens[name].status = status
    sibling = Agent(pool, "p1", agent=1, cores=4)
    sibling.record()  # beating: alive
    assert me.nothing_left()

    def end(**rec):
        write_atomic(pool.path("agents", "p1.1.end"), dump(dict({"end": time.time(), "ran": 2}, **rec)))
    end(held=0)
    assert me.nothing_left()
    monkeypatch.setattr(Pool, "states", lambda self: pytest.fail("read every state"))
    me.renew()
    assert submitted(pool) == []
    monkeypatch.undo()
    end()  # an end without "held" (written by someone else, or an older launcher)
    assert not me.nothing_left()
    end(held=0, end=me.started - 1)  # ended before we started: a file may contradict it
    assert not me.nothing_left()
    end(held=1)  # results it could not write stay locked
    assert not me.nothing_left()
    os.remove(pool.path("agents", "p1.1.end"))
    old = time.time() - 60  # silent longer than the lock timeout (30 s)
    os.utime(pool.path("agents", "p1.1.json"), (old, old))
    assert not me.nothing_left()
    os.utime(pool.path("agents", "p1.1.json"))
    assert me.nothing_left()
    pool.put("t2", {"token": "t2", "state": "todo", "attempt": 1})
    pool.note_return("t2", 1)  # handed back since we last looked
    assert not me.nothing_left()
