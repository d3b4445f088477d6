"""The schedule the launcher will follow, computed ahead of time to check and size a plan.

The policy (mirrored exactly by ``launcher.py``): every node agent, whenever it has free cores,
claims the claimable token of best rank that fits its free cores, free memory and the
pilot's remaining walltime — first among its own pilot's planned tokens, and only once those
are all claimed, among other pilots' tokens of the same or an earlier stage, from the back of
the rank order (work stealing).
At one instant, owners claim their newly claimable work before idle pilots steal it. A token is claimable when all
its dependencies are done. Ranks put long critical paths first (bottom level), then wide,
then long tasks, which is LPT for independent tasks.

Tasks are simulated in *groups* of interchangeable tasks (same cores, walltime, memory,
dependencies and dependants): a node that can take k of them at once takes them in one
event. The simulation is exact for the policy and its cost grows with the number of
distinct groups and waves, not with the number of tasks, which is what lets the planner
check 100k-task plans in well under a second.
"""

from __future__ import annotations

import heapq
from bisect import insort
from dataclasses import dataclass, field

INF = float("inf")


@dataclass
class SimGroup:
    """Interchangeable tasks. ``count`` maps pilot index → planned number of them."""

    cores: int
    walltime: float
    memory: int = 0
    deps: tuple[int, ...] = ()  # group ids that must be fully done first
    rank: int = 0  # position in the global priority order (smaller first)
    count: dict[int, int] = field(default_factory=dict)
    stage: int = 0  # pilots steal only tokens of their own stage or earlier ones
    nodes: int = 1  # > 1: a gang of whole nodes (never stolen; started through a reservation)


@dataclass
class SimPilot:
    nodes: int
    cores_per_node: int
    memory_per_node: int | None = None
    walltime: float | None = None  # None: no limit
    start: float = 0.0
    stage: int = 0


@dataclass
class SimResult:
    makespan: list[float]  # per pilot: end of its last task (0 if it ran none), from its start
    busy: list[float]  # per pilot: core-seconds of the tasks it ran
    ran: list[dict[int, int]]  # per pilot: group id → number of its tasks run there
    unfinished: dict[int, int]  # group id → tasks never run (did not fit any walltime)
    left: list[dict[int, int]] = field(default_factory=list)  # per pilot: its own tasks never run
    end: float = 0.0  # absolute time the last task ended

    @property
    def complete(self) -> bool:
        return not self.unfinished


class _Node:
    __slots__ = ("pilot", "free", "mem", "hungry", "ends", "cores")

    def __init__(self, pilot: int, cores: int, mem: float):
        self.pilot, self.free, self.mem, self.hungry = pilot, cores, mem, True
        self.cores = cores
        self.ends: list[float] = []  # end times of what runs here (for reservations)


def simulate(groups: list[SimGroup], pilots: list[SimPilot], *, steal: bool = True) -> SimResult:
    """Run the launcher policy over ``pilots`` (all start at their ``start``)."""
    n_p = len(pilots)
    total = [0] * len(groups)  # tasks of each group not yet done, all pilots
    left = [dict(g.count) for g in groups]  # unclaimed per pilot
    for gi, g in enumerate(groups):
        total[gi] = sum(g.count.values())
    own_unclaimed = [0] * n_p
    for g in groups:
        for p, k in g.count.items():
            own_unclaimed[p] += k
    waiting = [len(set(g.deps)) for g in groups]
    dependants: list[list[int]] = [[] for _ in groups]
    for gi, g in enumerate(groups):
        for d in set(g.deps):
            dependants[d].append(gi)
    # ready lists hold (rank, gid) of groups whose deps are done and that have unclaimed tasks
    ready_own: list[list[tuple[int, int]]] = [[] for _ in range(n_p)]
    ready_all: list[tuple[int, int]] = []

    def release(gi: int) -> None:
        g = groups[gi]
        key = (g.rank, gi)
        insort(ready_all, key)
        for p, k in left[gi].items():
            if k:
                insort(ready_own[p], key)

    for gi in range(len(groups)):  # groups with no tasks here count as done (run elsewhere)
        if total[gi] == 0:
            for d in dependants[gi]:
                waiting[d] -= 1
    for gi in range(len(groups)):
        if waiting[gi] == 0 and total[gi]:
            release(gi)

    nodes: list[_Node] = []
    for pi, p in enumerate(pilots):
        mem = INF if p.memory_per_node is None else p.memory_per_node
        nodes.extend(_Node(pi, p.cores_per_node, mem) for _ in range(p.nodes))
    limit = [INF if p.walltime is None else p.start + p.walltime for p in pilots]
    events: list[tuple[float, int, int, int, int]] = []  # (end, seq, node, gid, k)
    seq = 0
    makespan = [0.0] * n_p
    busy = [0.0] * n_p
    ran: list[dict[int, int]] = [{} for _ in range(n_p)]

    # per pilot: its gangs (the launcher's leader keeps the same): running ones hold their
    # nodes; at most one draining reservation waits for its nodes to become free
    resv: list[list[dict]] = [[] for _ in range(n_p)]
    gang = [any(g.nodes > 1 and g.count.get(p) for g in groups) for p in range(n_p)]

    def claimed(gi: int, src: int, k: int) -> None:
        """k tasks of group gi, planned for pilot src, were claimed."""
        left[gi][src] -= k
        own_unclaimed[src] -= k
        if own_unclaimed[src] == 0 and src not in exhausted_set:
            just_exhausted.add(src)
        if left[gi][src] == 0:
            _drop(ready_own[src], (groups[gi].rank, gi))
            if not any(left[gi].values()):
                _drop(ready_all, (groups[gi].rank, gi))

    def take(node_i: int, now: float, stealing: bool) -> None:
        nonlocal seq
        node = nodes[node_i]
        p = node.pilot
        room = limit[p] - now
        for r in resv[p]:
            if node_i in r["nodes"]:
                if r["running"]:
                    return
                room = min(room, r["start"] - now)  # backfill only what ends before the gang starts
        while node.free > 0:
            if stealing:
                if own_unclaimed[p]:
                    break
                gi, src = _pick(groups, ready_all, node, room, left, -1, pilots[p].stage)
            else:
                gi, src = _pick(groups, ready_own[p], node, room, left, p)
            if gi < 0:
                break
            g = groups[gi]
            k = min(left[gi][src], node.free // g.cores)
            if g.memory and node.mem != INF:
                k = min(k, int(node.mem // g.memory))
            claimed(gi, src, k)
            node.free -= k * g.cores
            node.mem -= k * g.memory
            node.ends.append(now + g.walltime)
            seq += 1
            heapq.heappush(events, (now + g.walltime, seq, node_i, gi, k))
            busy[p] += k * g.cores * g.walltime
            ran[p][gi] = ran[p].get(gi, 0) + k
        node.hungry = node.free > 0

    exhausted_set: set[int] = set()  # pilots whose own tokens are all claimed (may steal)
    just_exhausted: set[int] = {p for p in range(n_p) if own_unclaimed[p] == 0}
    pilot_nodes: list[list[int]] = [[] for _ in range(n_p)]
    for i, node in enumerate(nodes):
        pilot_nodes[node.pilot].append(i)

    def gangs(now: float) -> None:
        """Each pilot's leader reserves the nodes that free up first for its best-ranked ready
        gang, and starts it when they are all free (the launcher does the same)."""
        nonlocal seq
        for p in range(n_p):
            if not gang[p] or pilots[p].start > now:
                continue
            while True:
                draining = next((r for r in resv[p] if not r["running"]), None)
                if draining is None:
                    held = {i for r in resv[p] for i in r["nodes"]}
                    free_nodes = [i for i in pilot_nodes[p] if i not in held]
                    for _, gi in ready_own[p]:
                        g = groups[gi]
                        if g.nodes <= 1 or g.nodes > len(free_nodes) or not left[gi].get(p):
                            continue
                        order = sorted(free_nodes, key=lambda i: (max(nodes[i].ends, default=now), i))[:g.nodes]
                        start = max([now] + [max(nodes[i].ends, default=now) for i in order])
                        if start + g.walltime <= limit[p]:
                            draining = {"gid": gi, "nodes": order, "start": start, "running": False}
                            resv[p].append(draining)
                        break
                if draining is None:
                    break
                if not all(nodes[i].free == nodes[i].cores and not nodes[i].ends for i in draining["nodes"]):
                    break
                gi = draining["gid"]
                g = groups[gi]
                for i in draining["nodes"]:
                    nodes[i].free = 0
                    nodes[i].hungry = False
                    nodes[i].ends.append(now + g.walltime)
                claimed(gi, p, 1)
                draining["running"] = True
                draining["end"] = now + g.walltime
                seq += 1
                heapq.heappush(events, (now + g.walltime, seq, -1 - p, gi, 1))
                busy[p] += g.cores * g.nodes * g.walltime
                ran[p][gi] = ran[p].get(gi, 0) + 1

    def fill(candidates, now: float, released: bool) -> None:
        # At one instant, owners first claim their own work, then idle pilots steal. A node
        # that could not steal before can only succeed now if it freed cores, if work was
        # released, or if its pilot just ran out of its own work.
        gangs(now)
        for i in candidates:
            take(i, now, False)
        for p in range(n_p):
            if own_unclaimed[p] == 0 and p not in just_exhausted and p not in exhausted_set:
                just_exhausted.add(p)
        if not steal or not ready_all:
            just_exhausted.clear()
            return
        thieves = set(i for i in candidates if not own_unclaimed[nodes[i].pilot])
        for p in just_exhausted:
            thieves.update(pilot_nodes[p])
            exhausted_set.add(p)
        just_exhausted.clear()
        if released:
            for p in exhausted_set:
                thieves.update(pilot_nodes[p])
        # one pass in node order; a theft can exhaust another pilot, whose later nodes then
        # steal in this same pass (as they would at this instant)
        queue = sorted(thieves)
        heapq.heapify(queue)
        seen = set(queue)
        while queue:
            i = heapq.heappop(queue)
            node = nodes[i]
            if node.hungry and pilots[node.pilot].start <= now:
                take(i, now, True)
            for p in list(just_exhausted):
                exhausted_set.add(p)
                for j in pilot_nodes[p]:
                    if j > i and j not in seen:
                        seen.add(j)
                        heapq.heappush(queue, j)
            just_exhausted.clear()

    now = min((p.start for p in pilots), default=0.0)
    pending_starts = sorted({p.start for p in pilots if p.start > now})
    fill([i for i, node in enumerate(nodes) if pilots[node.pilot].start <= now], now, True)
    while events or pending_starts:
        if pending_starts and (not events or pending_starts[0] < events[0][0]):  # ends first
            now = pending_starts.pop(0)
            fill([i for i, node in enumerate(nodes) if pilots[node.pilot].start == now], now, True)
            continue
        now = events[0][0]
        freed: set[int] = set()
        released = False
        while events and events[0][0] == now:
            _, _, ni, gi, k = heapq.heappop(events)
            g = groups[gi]
            if ni < 0:  # a gang ended: its nodes are free again
                p = -1 - ni
                r = next(r for r in resv[p] if r["running"] and r["gid"] == gi and r["end"] == now)
                resv[p].remove(r)
                for i in r["nodes"]:
                    nodes[i].free = nodes[i].cores
                    nodes[i].ends.remove(now)
                    nodes[i].hungry = True
                    freed.add(i)
            else:
                node = nodes[ni]
                node.free += k * g.cores
                node.mem += k * g.memory
                node.ends.remove(now)
                node.hungry = True
                p = node.pilot
                freed.add(ni)
            span = now - pilots[p].start
            if span > makespan[p]:
                makespan[p] = span
            total[gi] -= k
            if total[gi] == 0:
                for d in dependants[gi]:
                    waiting[d] -= 1
                    if waiting[d] == 0 and total[d]:
                        release(d)
                        released = True
        if released:
            freed.update(i for i, node in enumerate(nodes) if node.hungry and pilots[node.pilot].start <= now)
        fill(sorted(freed), now, released)
    unfinished = {gi: total[gi] for gi in range(len(groups)) if total[gi]}
    left_by_pilot: list[dict[int, int]] = [{} for _ in range(n_p)]
    for gi in unfinished:
        for p, k in left[gi].items():
            if k:
                left_by_pilot[p][gi] = k
    return SimResult(makespan=makespan, busy=busy, ran=ran, unfinished=unfinished, end=now,
                     left=left_by_pilot)


def _pick(groups: list[SimGroup], ready: list[tuple[int, int]], node: _Node, room: float,
          left: list[dict[int, int]], pilot: int, stage: int = 0) -> tuple[int, int]:
    """First group in rank order that fits the node (last, when stealing: thieves take from
    the back); returns (gid, source pilot) or (-1, -1)."""
    free, mem = node.free, node.mem
    for _, gi in (ready if pilot >= 0 else reversed(ready)):
        g = groups[gi]
        if (g.nodes == 1 and g.cores <= free and g.memory <= mem and g.walltime <= room
                and (pilot >= 0 or g.stage <= stage)):
            if pilot >= 0:
                return gi, pilot
            # stealing: take from the pilot holding the most unclaimed tasks of the group
            src = max((k, -p, p) for p, k in left[gi].items() if k)[2]
            return gi, src
    return -1, -1


def _drop(ready: list[tuple[int, int]], key: tuple[int, int]) -> None:
    from bisect import bisect_left
    i = bisect_left(ready, key)
    if i < len(ready) and ready[i] == key:
        del ready[i]
