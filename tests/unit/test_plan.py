"""Planner: known optima, limits, JSON shape, and a property test on random bundles."""

import math
import random

import pytest
from hypothesis import given, settings, strategies as st

from pilotflow.bundle import Bundle, Resource, Task, bundle_from_dict
from pilotflow.errors import BundleError
from pilotflow.planning.grouping import build_groups
from pilotflow.planning.plan import make_plan
from pilotflow.planning.simulate import SimGroup, SimPilot, simulate


def slurm(**kw):
    base = dict(name="c", scheduler="slurm", cores_per_node=48, max_nodes=4, max_walltime_s=86400)
    base.update(kw)
    return Resource(**base)


def bundle(tasks, *resources):
    return Bundle(name="b", tasks=tasks, resources=list(resources))


def same(n, **kw):
    return [Task(name=f"t{i}", command="true", **kw) for i in range(n)]


def test_1000_one_hour_tasks_need_one_pilot_of_21_node_hours():
    plan = make_plan(bundle(same(1000, walltime_s=3600), slurm()), margin=0, overhead=0)
    (r,) = plan.resources
    assert len(r.pilots) == 1 and r.lower_bound_pilots == 1
    p = r.pilots[0]
    assert p.node_hours == 21  # 24 with the naive 4-node pilot
    assert (p.nodes, p.walltime_s) == (3, 7 * 3600)  # the shorter of the 21-node-hour options


def test_optimize_makespan_picks_the_node_count_that_ends_first():
    b = bundle(same(1000, walltime_s=3600), slurm())
    b.optimize = "makespan"
    (p,) = make_plan(b, margin=0, overhead=0).pilots
    assert (p.nodes, p.walltime_s) == (4, 6 * 3600)  # 24 node-hours, but done in 6 h instead of 7


def test_700_tasks_make_five_full_pilots_and_a_small_one():
    plan = make_plan(bundle(same(700, cores=2, walltime_s=1800),
                            slurm(cores_per_node=16, max_nodes=2, max_walltime_s=4 * 3600)), margin=0, overhead=0)
    (r,) = plan.resources
    assert len(r.pilots) == 6 == r.lower_bound_pilots
    assert r.node_hours == 44  # an even split gives 48
    assert sorted(len(p.tasks) for p in r.pilots) == [60, 128, 128, 128, 128, 128]


def test_margin_overhead_and_slurm_minute_granularity():
    plan = make_plan(bundle(same(4, walltime_s=100), slurm(cores_per_node=2, max_nodes=1)), margin=0.1)
    p = plan.pilots[0]
    # 200 s of work × 1.1 + 20 s for the launcher's start and hand-back guard = 240 s: 4 minutes
    assert p.makespan_s == 200 and p.walltime_s == 240
    plan = make_plan(bundle(same(4, walltime_s=100), slurm(cores_per_node=2, max_nodes=1)), margin=0.15)
    assert plan.pilots[0].walltime_s == 300  # 250 s rounds up to 5 minutes


def test_margin_is_reserved_and_never_exceeds_max_walltime():
    res = slurm(cores_per_node=1, max_nodes=1, max_walltime_s=7200)
    plan = make_plan(bundle(same(2, walltime_s=3600), res), margin=0.5, overhead=0)
    assert [p.walltime_s for p in plan.pilots] == [5400, 5400]  # 2 h of work would leave no margin
    plan = make_plan(bundle(same(1, walltime_s=7000), res), margin=0.5)
    assert [p.walltime_s for p in plan.pilots] == [7200]  # a task as long as the limit squeezes it


def test_local_resource_is_one_pilot_without_limit():
    r = Resource(name="local", scheduler="local", cores_per_node=2, max_walltime_s=None)
    plan = make_plan(bundle(same(5, walltime_s=10), r), margin=0, overhead=0)
    assert [(p.nodes, p.walltime_s, len(p.tasks)) for p in plan.pilots] == [(1, 30, 5)]


def test_max_pilots_too_small_is_a_bundle_error_with_the_needed_count():
    # 4 h minus the 20 s pilot overhead leaves room for 7 half-hour waves, not 8: 7 pilots
    b = bundle_from_dict({"bundle": {"name": "b"}, "resource": [
        {"name": "c", "scheduler": "slurm", "cores_per_node": 16, "max_nodes": 2, "max_walltime": "4h",
         "max_pilots": 3, "walltime_margin": 0}], "task": [{"name": "t{i}", "command": "x", "matrix": {"i": "1..700"},
                                      "cores": 2, "walltime": "30m"}]})
    with pytest.raises(BundleError) as e:
        make_plan(b)
    assert e.value.problems == ["<bundle>: [resource.max_pilots] resource 'c': its 700 tasks need at least 7 pilots "
                                "of 2 node(s) × 4h but max_pilots = 3; raise max_pilots, max_nodes or "
                                "max_walltime, or move tasks to another resource"]


def test_dependencies_are_respected_by_the_sized_walltime():
    tasks = [Task(name="prep", command="x", walltime_s=300)]
    tasks += [Task(name=f"r{i}", command="x", walltime_s=600, after=("prep",)) for i in range(8)]
    tasks += [Task(name="gather", command="x", walltime_s=120, after=tuple(f"r{i}" for i in range(8)))]
    plan = make_plan(bundle(tasks, slurm(cores_per_node=4, max_nodes=2)), margin=0, overhead=0)
    (p,) = plan.pilots
    assert (p.nodes, p.makespan_s) == (1, 300 + 2 * 600 + 120)  # fewer node-hours than 2 nodes
    order = sorted(plan.rank, key=plan.rank.get)
    assert order[0] == 0 and order[-1] == 9  # prep first, gather last


def test_json_matches_spec_keys():
    plan = make_plan(bundle(same(3, walltime_s=60), slurm()), margin=0, overhead=0)
    doc = plan.to_json()
    assert set(doc) == {"bundle", "tasks", "resources"}
    (r,) = doc["resources"]
    assert set(r) == {"name", "scheduler", "lower_bound_pilots", "pilots"}
    (p,) = r["pilots"]
    assert set(p) == {"id", "nodes", "cores", "walltime_s", "tasks", "busy_core_s", "efficiency"}
    assert p["id"] == "p1" and p["tasks"] == ["t0", "t1", "t2"] and p["busy_core_s"] == 180
    assert p["efficiency"] == round(180 / (48 * 60), 3)


def test_several_resources_fewest_pilots_then_shortest_makespan():
    small = Resource(name="small", scheduler="slurm", cores_per_node=4, max_nodes=1, max_walltime_s=3600)
    big = Resource(name="big", scheduler="slurm", cores_per_node=64, max_nodes=2, max_walltime_s=3600)
    plan = make_plan(bundle(same(100, walltime_s=600), small, big), margin=0, overhead=0)
    assert [r.resource.name for r in plan.resources] == ["big"]
    assert len(plan.pilots) == 1


def test_pinned_tasks_and_dependency_components_stay_together():
    a = Resource(name="a", scheduler="slurm", cores_per_node=8, max_nodes=1, max_walltime_s=3600)
    b = Resource(name="b", scheduler="slurm", cores_per_node=8, max_nodes=1, max_walltime_s=3600)
    tasks = [Task(name="x", command="c", resource="b", walltime_s=60),
             Task(name="y", command="c", after=("x",), walltime_s=60),
             Task(name="z", command="c", walltime_s=60)]
    plan = make_plan(bundle(tasks, a, b), margin=0, overhead=0)
    where = {plan.bundle.tasks[t].name: r.resource.name for r in plan.resources for t in r.tasks}
    assert where["x"] == where["y"] == "b"


def test_pins_to_different_resources_in_one_chain_are_an_error():
    a = Resource(name="a", scheduler="local", cores_per_node=8)
    b = Resource(name="b", scheduler="local", cores_per_node=8)
    tasks = [Task(name="x", command="c", resource="a"), Task(name="y", command="c", resource="b", after=("x",))]
    with pytest.raises(BundleError, match="pinned to different resources"):
        make_plan(bundle(tasks, a, b))


# --- property test ------------------------------------------------------------------------

def check_plan(plan, b):
    """Independent checks of any plan: coverage, limits, bound and a fresh simulation."""
    seen = [t for p in plan.pilots for t in p.tasks]
    assert sorted(seen) == list(range(len(b.tasks)))  # every task in exactly one pilot
    for r in plan.resources:
        res = r.resource
        volume = sum(b.tasks[t].cores * b.tasks[t].walltime_s for t in r.tasks)
        if res.max_walltime_s:
            assert r.lower_bound_pilots >= math.ceil(volume / (res.cores_per_node * res.max_nodes * res.max_walltime_s))
        assert len(r.pilots) >= r.lower_bound_pilots
        if res.max_pilots:
            assert len(r.pilots) <= res.max_pilots
        for p in r.pilots:
            assert 1 <= p.nodes <= res.max_nodes
            assert res.max_walltime_s is None or p.walltime_s <= res.max_walltime_s
        # fresh simulation of this resource's pilots: groups of interchangeable tasks, split
        # by stage, ranked as the launcher will see the tokens (the plan's ranks)
        groups, gid_of = build_groups(b.tasks, r.tasks)
        stage_of = {t: p.stage for p in r.pilots for t in p.tasks}
        pilot_of = {t: pi for pi, p in enumerate(r.pilots) for t in p.tasks}
        sub: dict = {}
        for t in r.tasks:
            sub.setdefault((gid_of[t], stage_of[t]), []).append(t)
        ids = {key: k for k, key in enumerate(sub)}
        by_gid: dict = {}
        for (g, st), k in ids.items():
            by_gid.setdefault(g, []).append(k)
        sim = []
        for (g, st), members in sub.items():
            count: dict = {}
            for t in members:
                count[pilot_of[t]] = count.get(pilot_of[t], 0) + 1
            deps = tuple(k for d in groups[g].deps for k in by_gid[d])
            sim.append(SimGroup(groups[g].cores, groups[g].walltime, groups[g].memory, deps,
                                min(plan.rank[t] for t in members), count, stage=st))
        # a stage starts when every pilot of the stage before it has ended (worst case)
        starts, t = {}, 0
        for stage in sorted({p.stage for p in r.pilots}):
            starts[stage] = t
            t += max(p.walltime_s for p in r.pilots if p.stage == stage)
        result = simulate(sim, [SimPilot(p.nodes, res.cores_per_node, res.memory_per_node_mb,
                                         p.walltime_s if res.max_walltime_s else None, starts[p.stage], p.stage)
                                for p in r.pilots])
        assert result.complete


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10 ** 9))
def test_every_plan_of_a_random_bundle_is_valid(seed):
    rnd = random.Random(seed)
    cpn = rnd.choice([4, 8, 16, 48])
    res = Resource(name="c", scheduler=rnd.choice(["slurm", "sge"]), cores_per_node=cpn,
                   max_nodes=rnd.randint(1, 4), max_walltime_s=rnd.choice([3600, 4 * 3600, 86400]),
                   memory_per_node_mb=rnd.choice([None, 64000]))
    n = rnd.randint(1, 400)
    shapes = [(rnd.choice([1, 1, 2, 3, min(cpn, 4), cpn]), rnd.choice([60, 300, 900, 1800, 3600]),
               rnd.choice([None, None, 8000])) for _ in range(rnd.randint(1, 6))]
    tasks = []
    for i in range(n):
        c, w, m = rnd.choice(shapes)
        deps = ()
        if i and rnd.random() < 0.1:
            deps = tuple(f"t{j}" for j in rnd.sample(range(i), k=min(i, rnd.randint(1, 3))))
        tasks.append(Task(name=f"t{i}", command="x", cores=c, walltime_s=w, memory_mb=m, after=deps))
    b = bundle(tasks, res)
    plan = make_plan(b, margin=rnd.choice([0, 0.05]))
    check_plan(plan, b)


# --- multi-node tasks ---------------------------------------------------------------------

def test_two_node_tasks_pack_two_at_a_time_into_four_node_pilots():
    tasks = [Task(name=f"m{i}", command="x", nodes=2, mpi=True, walltime_s=6 * 3600) for i in range(10)]
    plan = make_plan(bundle(tasks, slurm(cores_per_node=16)), margin=0, overhead=0)
    (r,) = plan.resources
    assert sorted((p.nodes, p.walltime_s // 3600, len(p.tasks)) for p in r.pilots) == [(4, 6, 2), (4, 24, 8)]
    assert r.node_hours == 120  # = the work volume: optimal


def test_three_node_gangs_leave_a_node_for_single_node_work():
    tasks = [Task(name=f"g{i}", command="x", nodes=3, walltime_s=3600) for i in range(4)]
    tasks += [Task(name=f"s{i}", command="x", cores=16, walltime_s=3600) for i in range(4)]
    plan = make_plan(bundle(tasks, slurm(cores_per_node=16)), margin=0, overhead=0)
    assert [(p.nodes, p.walltime_s // 3600, len(p.tasks)) for p in plan.pilots] == [(4, 4, 8)]
    assert plan.pilots[0].node_hours == 16  # 4 × 3 + 4 × 1 node-hours of work


def test_mpi_cores_beyond_a_node_take_whole_nodes_and_small_tasks_fill_around():
    tasks = [Task(name=f"m{i}", command="x", mpi=True, cores=40, walltime_s=3600) for i in range(3)]
    tasks += [Task(name=f"s{i}", command="x", walltime_s=600) for i in range(96)]
    plan = make_plan(bundle(tasks, slurm(cores_per_node=16)), margin=0, overhead=0)
    (p,) = plan.pilots
    assert p.nodes == 3 and p.node_hours == 10  # 3 gangs × 3 nodes × 1 h + 96 × 10 min / 16 cores
    assert p.busy_core_s == 3 * 3 * 16 * 3600 + 96 * 600


def test_gangs_never_share_a_node_in_the_simulated_schedule():
    # a pilot of 3 nodes, gangs of 2 and of 3 nodes: the simulation must serialise them
    from pilotflow.planning.simulate import SimGroup, SimPilot, simulate
    g = [SimGroup(cores=4, walltime=10, nodes=2, rank=0, count={0: 2}),
         SimGroup(cores=4, walltime=10, nodes=3, rank=1, count={0: 1}),
         SimGroup(cores=1, walltime=5, rank=2, count={0: 4})]
    r = simulate(g, [SimPilot(3, 4)])
    assert r.complete and r.makespan == [30.0]  # 2-node, 2-node (one at a time: 3 nodes), then the 3-node


@pytest.mark.parametrize("gpus, n, expected", [(1, 200, 3), (2, 100, 3), (4, 36, 2), (1, 72, 1)])
def test_gpu_tasks_need_exactly_the_gpu_volume_bound(gpus, n, expected):
    # 4 GPUs and 32 cores per node, at most 2 nodes x 9 h per pilot: 72 GPU-hours a pilot;
    # 1-core tasks would fit 576 core-hours, so the GPUs are what binds
    res = slurm(cores_per_node=32, gpus_per_node=4, max_nodes=2, max_walltime_s=9 * 3600)
    plan = make_plan(bundle(same(n, walltime_s=3600, gpus=gpus), res), margin=0, overhead=0)
    (r,) = plan.resources
    assert len(r.pilots) == r.lower_bound_pilots == expected == math.ceil(n * gpus / 72)
    assert all(p.gpus_per_node == 4 for p in r.pilots)
    busy_gpu_h = sum(p.busy_core_s for p in r.pilots) / 3600 / 8  # 8 cores are a GPU's share
    assert busy_gpu_h == n * gpus  # efficiency counts GPU-hours
    # what the simulator (the launcher's policy) says: no node ever holds more than 4 GPUs of work
    for p in r.pilots:
        assert p.efficiency <= 1.0


def test_cpu_tasks_on_a_gpu_resource_ask_for_no_gpus():
    res = slurm(cores_per_node=32, gpus_per_node=4)
    plan = make_plan(bundle(same(10, walltime_s=600), res))
    assert all(p.gpus_per_node == 0 for p in plan.pilots)
    assert "gpus_per_node" not in plan.to_json()["resources"][0]["pilots"][0]


def test_a_task_needing_more_gpus_than_any_node_is_a_bundle_error():
    with pytest.raises(BundleError, match=r"needs 8 GPU\(s\) on one node but the most a node has is 4"):
        bundle_from_dict({"bundle": {"name": "b"},
                          "resource": [{"name": "g", "scheduler": "slurm", "cores_per_node": 8, "gpus_per_node": 4}],
                          "task": [{"name": "t", "command": "x", "gpus": 8}]})
