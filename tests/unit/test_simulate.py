"""The aggregated simulator against a naive per-task oracle, and known schedules."""

import random

from hypothesis import example, given, settings, strategies as st

from pilotflow.bundle import Task
from pilotflow.planning.grouping import build_groups
from pilotflow.planning.simulate import SimGroup, SimPilot, simulate
from tests.unit.reference_sim import reference


def test_identical_tasks_run_in_waves():
    g = [SimGroup(cores=1, walltime=3600, count={0: 1000})]
    got = [simulate(g, [SimPilot(n, 48)]).makespan[0] / 3600 for n in (1, 2, 3, 4)]
    assert got == [21, 11, 7, 6]


def test_walltime_limit_leaves_unfinished_work():
    g = [SimGroup(cores=1, walltime=100, count={0: 10})]
    r = simulate(g, [SimPilot(1, 2, walltime=250)])
    assert r.unfinished == {0: 6} and r.left == [{0: 6}]


def test_dependencies_wait_and_stealing_happens_only_after_own_work():
    # group 0 (pilot 0) must finish before group 1 (pilot 1) may start
    g = [SimGroup(cores=1, walltime=10, count={0: 2}), SimGroup(cores=1, walltime=5, deps=(0,), rank=1, count={1: 2})]
    r = simulate(g, [SimPilot(1, 2), SimPilot(1, 2)])
    assert r.makespan == [10, 15] and r.complete


def test_memory_limits_concurrency():
    g = [SimGroup(cores=1, walltime=10, memory=3000, count={0: 4})]
    r = simulate(g, [SimPilot(1, 8, memory_per_node=6000)])
    assert r.makespan == [20]


def random_case(rnd):
    n_p = rnd.randint(1, 3)
    gpus = rnd.choice([0, 0, 2, 4])
    pilots = [dict(nodes=rnd.randint(1, 2), cpn=rnd.choice([2, 4, 8]), mem=rnd.choice([None, 8000]),
                   walltime=rnd.choice([None, 200, 400]), gpus=gpus) for _ in range(n_p)]
    n = rnd.randint(1, 25)
    tasks = []
    for i in range(n):
        deps = sorted(rnd.sample(range(i), k=min(i, rnd.choice([0, 0, 1, 2]))))
        tasks.append(Task(name=f"t{i}", command="x", cores=rnd.choice([1, 1, 2]), walltime_s=rnd.choice([10, 20, 35]),
                          memory_mb=rnd.choice([None, None, 3000]), after=tuple(f"t{d}" for d in deps),
                          gpus=rnd.choice([0, 0, 1, 2]) if gpus else 0))
    assign = [rnd.randrange(n_p) for _ in range(n)]
    return pilots, tasks, assign


# the two seeds random exploration found (about 1 in 5,000): a pilot whose last own task was
# stolen after its nodes' turn in a stealing pass never stole itself until a node freed; the
# oracle (and a launcher, on its next poll) tries at the next instant
@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10 ** 9))
@example(19848150)
@example(883000000)
def test_aggregated_simulator_matches_the_naive_oracle(seed):
    rnd = random.Random(seed)
    pilots, tasks, assign = random_case(rnd)
    groups, gid_of = build_groups(tasks, list(range(len(tasks))))
    # the oracle runs tokens in the same rank order the launcher uses (group rank, index)
    order = sorted(range(len(tasks)), key=lambda i: (groups[gid_of[i]].rank, i))
    rank = {i: k for k, i in enumerate(order)}
    by_name = {t.name: i for i, t in enumerate(tasks)}
    # tasks of one group must share a pilot for the aggregated and per-task views to agree
    # on which pilot owns what; give each group the pilot of its first member
    assign = [assign[groups[gid_of[i]].members[0]] for i in range(len(tasks))]
    ref_tasks = [dict(cores=t.cores, walltime=t.walltime_s, memory=t.memory_mb or 0, rank=rank[i], gpus=t.gpus,
                      deps=[by_name[d] for d in t.after], pilot=assign[i]) for i, t in enumerate(tasks)]
    ref_span, ref_left = reference(ref_tasks, pilots)
    sim_groups = [SimGroup(cores=g.cores, walltime=g.walltime, memory=g.memory, deps=g.deps, rank=g.rank,
                           count={assign[g.members[0]]: len(g.members)}, gpus=g.gpus) for g in groups]
    r = simulate(sim_groups, [SimPilot(p["nodes"], p["cpn"], p["mem"], p["walltime"], gpus_per_node=p["gpus"])
                              for p in pilots])
    assert r.makespan == ref_span
    assert sum(r.unfinished.values()) == len(ref_left)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 60), cores=st.sampled_from([1, 2, 3]), walltime=st.sampled_from([1, 7, 0.1, 35.5]),
       memory=st.sampled_from([0, 3000]), gpus=st.sampled_from([0, 1, 2]), nodes=st.integers(1, 3),
       cpn=st.sampled_from([1, 2, 4, 8]), mem=st.sampled_from([None, 8000]), limit=st.sampled_from([None, 3.5, 50, 0.3]),
       start=st.sampled_from([0.0, 12.25]))
def test_the_wave_shortcut_equals_the_event_simulation(n, cores, walltime, memory, gpus, nodes, cpn, mem, limit, start):
    """One group of identical tasks on one pilot takes a shortcut; it must agree exactly."""
    g = [SimGroup(cores=cores, walltime=walltime, memory=memory, gpus=gpus, count={0: n} if n else {})]
    p = [SimPilot(nodes, cpn, mem, limit, start=start, gpus_per_node=4 if gpus else 0)]
    assert simulate(g, p) == simulate(g, p, fast=False)
