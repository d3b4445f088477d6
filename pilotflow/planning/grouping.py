"""Interchangeable tasks and the priority order shared by planner, simulator and launcher.

Two tasks are interchangeable when they have the same shape (cores, walltime, memory, GPUs) and
the same dependencies *and* dependants. The planner's model, the simulator and the plan all
work on such groups, so their size depends on the number of distinct shapes and dependency
roles, not on the number of tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pilotflow.bundle import Task, task_nodes


@dataclass
class Group:
    cores: int
    walltime: int
    memory: int
    nodes: int
    deps: tuple[int, ...]
    members: list[int] = field(default_factory=list)  # task indices, ascending
    bottom: int = 0  # longest path (seconds) from the start of this group to the end of all work
    rank: int = 0
    gpus: int = 0  # per task, on its node (a multi-node task holds its nodes whole)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.cores, self.walltime, self.memory, self.nodes, self.gpus)


def build_groups(tasks: list[Task], indices: list[int],
                 cores_per_node: int | None = None) -> tuple[list[Group], dict[int, int]]:
    """Groups of the tasks ``indices`` (a dependency-closed subset), ranked for scheduling.
    A task on several nodes takes them whole (its cores are a node's, ``cores_per_node``).

    Returns the groups (in rank order, rank = list position) and task index → group id.
    """
    # names and successors only where there are dependencies: a million independent tasks
    # of one matrix need neither a name index nor a list each
    linked = any(tasks[i].after for i in indices)
    by_name = {tasks[i].name: i for i in indices} if linked else {}
    succ: dict[int, list[int]] = {}
    for i in indices if linked else ():
        for d in tasks[i].after:
            j = by_name.get(d)
            if j is not None:
                succ.setdefault(j, []).append(i)
    key_of: dict[tuple, int] = {}
    groups: list[Group] = []
    gid_of: dict[int, int] = {}
    none: frozenset = frozenset()
    shapes: dict[tuple, tuple] = {}  # a task's own fields -> its group's (cores, nodes, gpus)
    for i in indices:
        t = tasks[i]
        own = (t.cores, t.nodes, t.gpus, t.mpi, t.ranks_per_node)
        got = shapes.get(own)
        if got is None:
            k = task_nodes(t, cores_per_node)
            got = shapes[own] = (cores_per_node if k > 1 and cores_per_node else t.cores, k, 0 if k > 1 else t.gpus)
        cores, k, gpus = got
        deps = frozenset(by_name[d] for d in t.after if d in by_name) if t.after else none
        after = succ.get(i)
        key = (cores, t.walltime_s, t.memory_mb or 0, k, gpus, deps, frozenset(after) if after else none)
        g = key_of.get(key)
        if g is None:
            g = key_of[key] = len(groups)
            groups.append(Group(cores, t.walltime_s, t.memory_mb or 0, k, (), gpus=gpus))
        groups[g].members.append(i)
        gid_of[i] = g
    for g in groups:
        first = g.members[0]
        g.deps = tuple(sorted({gid_of[by_name[d]] for d in tasks[first].after if d in by_name}))
    _bottom_levels(groups)
    order = sorted(range(len(groups)), key=lambda g: (-groups[g].bottom, -groups[g].cores * groups[g].nodes,
                                                      -groups[g].gpus, -groups[g].walltime, groups[g].members[0]))
    remap = {old: new for new, old in enumerate(order)}
    ranked = [groups[old] for old in order]
    for new, g in enumerate(ranked):
        g.rank = new
        g.deps = tuple(sorted(remap[d] for d in g.deps))
    gid_of = {i: remap[g] for i, g in gid_of.items()}
    return ranked, gid_of


def _bottom_levels(groups: list[Group]) -> None:
    """Longest remaining path per group, iteratively (no recursion limit on long chains)."""
    dependants: list[list[int]] = [[] for _ in groups]
    indeg = [0] * len(groups)
    for gi, g in enumerate(groups):
        for d in g.deps:
            dependants[d].append(gi)
            indeg[gi] += 1
    order: list[int] = [g for g in range(len(groups)) if indeg[g] == 0]
    for g in order:  # topological order (grows while iterating)
        for s in dependants[g]:
            indeg[s] -= 1
            if indeg[s] == 0:
                order.append(s)
    for g in reversed(order):
        below = max((groups[s].bottom for s in dependants[g]), default=0)
        groups[g].bottom = groups[g].walltime + below
