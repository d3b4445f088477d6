"""Bundle → Plan: the fewest pilots per resource, then the fewest node-hours, then the
shortest makespan, every plan checked by the simulator of the launcher's own policy.

Steps per resource: group interchangeable tasks; solve the aggregated MILP (``packing``) for
the number of full pilots and the work left to one remainder pilot; hand out the work; size
every pilot (nodes, walltime) by simulating it on each allowed node count and keeping the
cheapest; then simulate all pilots together, as the launchers will run them, and repair
(grow a pilot, or add one for what is left) until every task fits. Walltimes are the
simulated makespan plus ``walltime_margin`` plus a fixed overhead for the launcher's start and
hand-back guard, rounded up to the scheduler's granularity.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from pilotflow.planning.assign import assign_resources
from pilotflow.bundle import Bundle, Resource, Task, task_nodes
from pilotflow.errors import BundleError
from pilotflow.schedulers import backend_class
from pilotflow.planning.grouping import Group, build_groups
from pilotflow.planning.packing import Shape, TooFewPilots, solver_name, split, volume_bound
from pilotflow.planning.sizing import PILOT_OVERHEAD_S, Counts, Size, Stage, fill_full, hand_out, members, repair, size
from pilotflow.bundle.units import format_duration

@dataclass
class PilotPlan:
    id: str
    resource: str
    nodes: int
    cores_per_node: int
    walltime_s: int
    makespan_s: float  # simulated, before the margin
    tasks: list[int]  # task indices, in rank order
    busy_core_s: int
    stage: int = 0  # stage k starts after every pilot of stage k-1 ended (scheduler dependency)
    gpus_per_node: int = 0  # GPUs the pilot asks for on each node (0: its tasks need none)

    @property
    def cores(self) -> int:
        return self.nodes * self.cores_per_node

    @property
    def efficiency(self) -> float:
        charged = self.cores * self.walltime_s
        return self.busy_core_s / charged if charged else 0.0

    @property
    def node_hours(self) -> float:
        return self.nodes * self.walltime_s / 3600


@dataclass
class ResourcePlan:
    resource: Resource
    lower_bound_pilots: int
    pilots: list[PilotPlan]
    tasks: list[int]
    why: str = ""

    @property
    def node_hours(self) -> float:
        return sum(p.node_hours for p in self.pilots)


@dataclass
class Plan:
    bundle: Bundle
    resources: list[ResourcePlan]
    rank: dict[int, int]  # task index → priority (smaller first) within its resource's pool
    solver: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def pilots(self) -> list[PilotPlan]:
        return [p for r in self.resources for p in r.pilots]

    def pilot_of(self) -> dict[int, str]:
        return {t: p.id for p in self.pilots for t in p.tasks}

    def to_json(self) -> dict:
        """The ``plan --json`` document of SPEC §3, key for key."""
        names = self.bundle.tasks.names()
        return {
            "bundle": self.bundle.name,
            "tasks": len(self.bundle.tasks),
            "resources": [{
                "name": r.resource.name,
                "scheduler": r.resource.scheduler,
                "lower_bound_pilots": r.lower_bound_pilots,
                "pilots": [{
                    "id": p.id, "nodes": p.nodes, "cores": p.cores, "walltime_s": p.walltime_s,
                    "tasks": [names[i] for i in p.tasks], "busy_core_s": p.busy_core_s,
                    "efficiency": round(p.efficiency, 3), **({"gpus_per_node": p.gpus_per_node} if p.gpus_per_node else {}),
                } for p in r.pilots],
            } for r in self.resources],
        }


def make_plan(bundle: Bundle, *, margin: float | None = None, first_pilot: int = 1,
              only: list[int] | None = None, overhead: float | None = None) -> Plan:
    """Plan ``bundle`` (or just the tasks ``only``); ``margin`` overrides every resource's;
    ``overhead`` (default: sizing.PILOT_OVERHEAD_S) is the fixed time added to each pilot."""
    started = time.perf_counter()
    tasks = bundle.tasks
    indices = list(range(len(tasks))) if only is None else sorted(only)
    split_by_res, why = assign_resources(bundle, indices)
    plans: list[ResourcePlan] = []
    rank: dict[int, int] = {}
    next_id = first_pilot
    used_solver = ""
    for res in bundle.resources:
        mine = split_by_res.get(res.name, [])
        if not mine:
            continue
        m = res.walltime_margin if margin is None else margin
        rp, rank_key, used = _plan_resource(bundle, res, mine, m,
                                            PILOT_OVERHEAD_S if overhead is None else overhead)
        used_solver = used_solver or used
        rp.why = why.get(res.name, "")
        for p in rp.pilots:
            p.id = f"p{next_id}"
            next_id += 1
        order = sorted(mine, key=rank_key.__getitem__)
        rank.update({i: k for k, i in enumerate(order)})
        plans.append(rp)
    return Plan(bundle=bundle, resources=plans, rank=rank, solver=used_solver or solver_name(),
                seconds=time.perf_counter() - started)


def _plan_resource(bundle: Bundle, res: Resource, indices: list[int], margin: float, overhead: float):
    """Plan one resource, in stages when dependency chains are longer than a pilot may live.

    Stage k's pilots start after every pilot of stage k-1 has ended. Tasks a stage cannot
    finish because of when their dependencies end (not for lack of capacity) move on to the
    next stage, where those dependencies are done from the start.
    """
    tasks = bundle.tasks.protos()  # shapes and dependencies: a matrix's tasks are not made
    groups_all, gid_all = build_groups(tasks, indices, res.cores_per_node)
    wmax = res.max_walltime_s
    critical = max((g.bottom for g in groups_all), default=0)
    pilots: list[PilotPlan] = []
    rank_key: dict[int, tuple] = {}
    used_solver = ""
    lb = 1
    remaining = list(indices)
    stage = 0
    while remaining:
        part = remaining if wmax is None or critical <= wmax and stage == 0 else \
            _stages(tasks, remaining, wmax)[0]
        whole = stage == 0 and len(part) == len(indices)
        groups, gid_of = (groups_all, gid_all) if whole else build_groups(tasks, part, res.cores_per_node)
        stage_pilots, stage_lb, used, overflow = _plan_stage(bundle, res, groups, margin, overhead)
        used_solver = used_solver or used
        if whole:
            lb = stage_lb
        for p in stage_pilots:
            p.stage = stage
        pilots.extend(stage_pilots)
        moved = set(overflow)
        rank_key.update({i: (stage, groups[gid_of[i]].rank, i) for i in part if i not in moved})
        taken = set(part) - moved
        remaining = [i for i in remaining if i not in taken]
        stage += 1
    if stage > 1:
        shapes, _ = _shapes(groups_all, res)
        lb = max(volume_bound(shapes, res.cores_per_node, res.max_nodes, wmax), math.ceil(critical / wmax))
    if res.max_pilots is not None and len(pilots) > res.max_pilots:
        raise BundleError([f"{bundle.where(res.origin + ('max_pilots',))} resource '{res.name}': the tasks "
                           f"need {len(pilots)} pilots once simulated but max_pilots = {res.max_pilots}; "
                           "raise max_pilots, max_nodes or max_walltime"])
    return ResourcePlan(resource=res, lower_bound_pilots=max(lb, 1), pilots=pilots, tasks=indices), \
        rank_key, used_solver


def _stages(tasks: list[Task], indices: list[int], wmax: int) -> list[list[int]]:
    """Split tasks so that within each stage every dependency chain fits one walltime.

    A stage takes every remaining task whose chain of remaining predecessors ends within
    ``wmax``; that set is closed under predecessors, so a stage only waits for earlier ones.
    """
    by_name = {tasks[i].name: i for i in indices}
    remaining = set(indices)
    stages = []
    while remaining:
        finish: dict[int, int] = {}
        for i in _topological(tasks, sorted(remaining), by_name):
            start = max((finish[by_name[d]] for d in tasks[i].after
                         if d in by_name and by_name[d] in remaining), default=0)
            finish[i] = start + tasks[i].walltime_s
        stage = sorted(i for i in remaining if finish[i] <= wmax)
        stages.append(stage)
        remaining.difference_update(stage)
    return stages


def _topological(tasks: list[Task], indices: list[int], by_name: dict[str, int]) -> list[int]:
    inside = set(indices)
    indeg = {i: 0 for i in indices}
    out: dict[int, list[int]] = {i: [] for i in indices}
    for i in indices:
        for d in tasks[i].after:
            j = by_name.get(d)
            if j in inside:
                indeg[i] += 1
                out[j].append(i)
    order = [i for i in indices if indeg[i] == 0]
    for i in order:
        for s in out[i]:
            indeg[s] -= 1
            if indeg[s] == 0:
                order.append(s)
    return order


def _plan_stage(bundle: Bundle, res: Resource, groups: list[Group], margin: float, overhead: float):
    """Pilots for one stage: MILP split, full pilots checked alone, remainder sized, all
    verified together. Returns (pilots, lower bound, solver, tasks moved to the next stage)."""
    tasks = bundle.tasks.protos()
    st = Stage(groups, res, margin, backend_class(res.scheduler).walltime_step, overhead, bundle.optimize)
    shapes, shape_groups = _shapes(groups, res)
    used_solver = ""
    if st.cap is None:
        counts: list[Counts] = []
        rem: Counts = {g: len(gr.members) for g, gr in enumerate(groups)}
        sizes: list[Size] = []
        lb = 1
    else:
        cap = int(st.cap)
        lb = volume_bound(shapes, res.cores_per_node, res.max_nodes, res.max_walltime_s)
        try:
            sp = split(shapes, res.cores_per_node, res.max_nodes, cap, res.max_pilots)
        except TooFewPilots as e:
            n_tasks = sum(len(g.members) for g in groups)
            raise BundleError([f"{bundle.where(res.origin + ('max_pilots',))} resource '{res.name}': "
                               f"its {n_tasks} tasks need at least {e.needed} pilots of {res.max_nodes} "
                               f"node(s) × {format_duration(res.max_walltime_s)} but max_pilots = "
                               f"{res.max_pilots}; raise max_pilots, max_nodes or max_walltime, or move "
                               "tasks to another resource"]) from None
        used_solver = sp.solver
        counts, rem = hand_out(groups, shape_groups, sp.full, sp.x_full, sp.x_rem)
        sizes = fill_full(st, counts, rem)
    if rem:
        counts.append(rem)
        sizes.append(size(st, rem))
    counts, sizes, overflow = repair(st, counts, sizes)
    pilots = []
    per_pilot = members(groups, counts + [overflow])
    used: dict[tuple, int] = {}  # per task shape: a million tasks are a few shapes

    def cores_of(t: Task) -> int:
        key = (t.cores, t.nodes, t.mpi, t.gpus)
        c = used.get(key)
        if c is None:
            c = used[key] = _cores_used(t, res)
        return c
    for mine, s in zip(per_pilot, sizes):
        busy = sum(cores_of(tasks[i]) * tasks[i].walltime_s for i in mine)
        gpus = res.gpus_per_node if any(tasks[i].gpus for i in mine) else 0
        pilots.append(PilotPlan(id="", resource=res.name, nodes=s.nodes, cores_per_node=res.cores_per_node,
                                walltime_s=s.walltime, makespan_s=s.span, tasks=mine, busy_core_s=busy,
                                gpus_per_node=gpus))
    return pilots, lb, used_solver, per_pilot[-1]


def _cores_used(t: Task, res: Resource) -> int:
    """Cores a task holds (whole nodes for a multi-node task), counting the share of the node
    its GPUs take where those bind: efficiency then counts GPU-hours."""
    k = task_nodes(t, res.cores_per_node)
    if k > 1:
        return k * res.cores_per_node
    return min(res.cores_per_node, effective_cores(t.cores, 0, res, t.gpus))


def effective_cores(cores: int, memory: int, res: Resource, gpus: int = 0) -> int:
    """Cores a task takes from a node for packing: its memory or its GPUs may take more of
    the node than its cores (a 1-GPU task on a 4-GPU, 32-core node takes a quarter of it)."""
    out = cores
    if memory and res.memory_per_node_mb:
        out = max(out, math.ceil(memory * res.cores_per_node / res.memory_per_node_mb))
    if gpus and res.gpus_per_node:
        out = max(out, math.ceil(gpus * res.cores_per_node / res.gpus_per_node))
    return out


def _shapes(groups: list[Group], res: Resource) -> tuple[list[Shape], list[list[int]]]:
    index: dict[tuple[int, int], int] = {}
    shapes: list[Shape] = []
    members_of: list[list[int]] = []
    for gi, g in enumerate(groups):
        cores = res.cores_per_node if g.nodes > 1 else min(res.cores_per_node,
                                                             effective_cores(g.cores, g.memory, res, g.gpus))
        key = (cores, g.walltime, g.nodes)
        if key not in index:
            index[key] = len(shapes)
            shapes.append(Shape(key[0], key[1], 0, key[2]))
            members_of.append([])
        si = index[key]
        shapes[si] = Shape(key[0], key[1], shapes[si].count + len(g.members), key[2])
        members_of[si].append(gi)
    return shapes, members_of
