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
    gpus: int = 0  # per task, on its node


@dataclass
class SimPilot:
    nodes: int
    cores_per_node: int
    memory_per_node: int | None = None
    walltime: float | None = None  # None: no limit
    start: float = 0.0
    stage: int = 0
    gpus_per_node: int = 0


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
    __slots__ = ("pilot", "free", "mem", "hungry", "ends", "cores", "gpus")

    def __init__(self, pilot: int, cores: int, mem: float, gpus: int = 0):
        self.pilot, self.free, self.mem, self.hungry = pilot, cores, mem, True
        self.cores = cores
        self.gpus = gpus  # free GPUs
        self.ends: list[float] = []  # end times of what runs here (for reservations)


def simulate(groups: list[SimGroup], pilots: list[SimPilot], *, steal: bool = True, fast: bool = True) -> SimResult:
    """Run the launcher policy over ``pilots`` (all start at their ``start``). ``fast``: one
    group on one pilot (a matrix of identical tasks) is computed wave by wave, without events."""
    if fast and len(groups) == 1 and len(pilots) == 1 and groups[0].nodes == 1 and not groups[0].deps:
        return _waves(groups[0], pilots[0])
    return _Simulation(groups, pilots, steal).run()


def _waves(g: SimGroup, p: SimPilot) -> SimResult:
    """What ``_Simulation`` computes for identical independent tasks on one pilot: every node
    takes as many as fit, they all end together, and the nodes take the next wave in node
    order -- with the same float arithmetic (times added wave by wave), so the results are
    equal to the last bit (a test compares). A million tasks on one node are half a million
    waves: a loop, not a million heap events."""
    per = p.cores_per_node // g.cores
    if g.memory and p.memory_per_node is not None:
        per = min(per, int(p.memory_per_node // g.memory))
    if g.gpus:
        per = min(per, p.gpus_per_node // g.gpus)
    limit = INF if p.walltime is None else p.start + p.walltime
    left = g.count.get(0, 0)
    now, busy, ran, makespan, end = p.start, 0.0, 0, 0.0, p.start
    while left and per > 0 and g.walltime <= limit - now:
        for _ in range(p.nodes):
            k = min(left, per)
            if not k:
                break
            busy += k * g.cores * g.nodes * g.walltime
            ran += k
            left -= k
        end = now = now + g.walltime
        makespan = max(makespan, now - p.start)
    return SimResult(makespan=[makespan], busy=[busy], ran=[{0: ran} if ran else {}],
                     unfinished={0: left} if left else {}, end=end, left=[{0: left} if left else {}])


class _Simulation:
    """The state of one simulation and its steps, named as the launcher's: ``claim`` (a node
    takes work of its own pilot), ``steal`` (an idle pilot takes others' work), ``reserve``
    (a pilot's leader holds nodes for a multi-node gang, backfilling them meanwhile), and
    ``advance`` (time moves to the next task end, releasing dependants)."""

    def __init__(self, groups: list[SimGroup], pilots: list[SimPilot], steal: bool):
        self.groups, self.pilots, self.steal_on = groups, pilots, steal
        n_p = self.n_p = len(pilots)
        self.total = [sum(g.count.values()) for g in groups]  # tasks of each group not yet done, all pilots
        self.left = [dict(g.count) for g in groups]  # unclaimed per pilot
        self.own_unclaimed = [0] * n_p
        for g in groups:
            for p, k in g.count.items():
                self.own_unclaimed[p] += k
        self.waiting = [len(set(g.deps)) for g in groups]
        self.dependants: list[list[int]] = [[] for _ in groups]
        for gi, g in enumerate(groups):
            for d in set(g.deps):
                self.dependants[d].append(gi)
        # ready lists hold (rank, gid) of groups whose deps are done and that have unclaimed tasks
        self.ready_own: list[list[tuple[int, int]]] = [[] for _ in range(n_p)]
        self.ready_all: list[tuple[int, int]] = []
        for gi in range(len(groups)):  # groups with no tasks here count as done (run elsewhere)
            if self.total[gi] == 0:
                for d in self.dependants[gi]:
                    self.waiting[d] -= 1
        for gi in range(len(groups)):
            if self.waiting[gi] == 0 and self.total[gi]:
                self.release(gi)
        self.nodes: list[_Node] = []
        for pi, p in enumerate(pilots):
            mem = INF if p.memory_per_node is None else p.memory_per_node
            self.nodes.extend(_Node(pi, p.cores_per_node, mem, p.gpus_per_node) for _ in range(p.nodes))
        self.pilot_nodes: list[list[int]] = [[] for _ in range(n_p)]
        for i, node in enumerate(self.nodes):
            self.pilot_nodes[node.pilot].append(i)
        self.limit = [INF if p.walltime is None else p.start + p.walltime for p in pilots]
        self.events: list[tuple[float, int, int, int, int]] = []  # (end, seq, node, gid, k)
        self.seq = 0
        self.makespan = [0.0] * n_p
        self.busy = [0.0] * n_p
        self.ran: list[dict[int, int]] = [{} for _ in range(n_p)]
        # per pilot: its gangs (the launcher's leader keeps the same): running ones hold their
        # nodes; at most one draining reservation waits for its nodes to become free
        self.resv: list[list[dict]] = [[] for _ in range(n_p)]
        self.gang = [any(g.nodes > 1 and g.count.get(p) for g in groups) for p in range(n_p)]
        self.exhausted: set[int] = set()  # pilots whose own tokens are all claimed (may steal)
        self.just_exhausted: set[int] = {p for p in range(n_p) if self.own_unclaimed[p] == 0}
        # nodes of a pilot that a theft exhausted after their turn in a stealing pass: they try
        # at the next instant (a launcher looks again on its next poll)
        self.late_thieves: set[int] = set()

    # bookkeeping ---------------------------------------------------------------------------
    def release(self, gi: int) -> None:
        """Group gi's dependencies are done: its tasks become claimable."""
        key = (self.groups[gi].rank, gi)
        insort(self.ready_all, key)
        for p, k in self.left[gi].items():
            if k:
                insort(self.ready_own[p], key)

    def claimed(self, gi: int, src: int, k: int) -> None:
        """k tasks of group gi, planned for pilot src, were claimed."""
        self.left[gi][src] -= k
        self.own_unclaimed[src] -= k
        if self.own_unclaimed[src] == 0 and src not in self.exhausted:
            self.just_exhausted.add(src)
        if self.left[gi][src] == 0:
            _drop(self.ready_own[src], (self.groups[gi].rank, gi))
            if not any(self.left[gi].values()):
                _drop(self.ready_all, (self.groups[gi].rank, gi))

    def start(self, node_i: int, p: int, gi: int, k: int, now: float) -> None:
        """k tasks of group gi start on a node (node_i < 0: a gang of pilot p's nodes)."""
        g = self.groups[gi]
        self.seq += 1
        heapq.heappush(self.events, (now + g.walltime, self.seq, node_i, gi, k))
        self.busy[p] += k * g.cores * g.nodes * g.walltime
        self.ran[p][gi] = self.ran[p].get(gi, 0) + k

    # the policy's steps ----------------------------------------------------------------------
    def claim(self, node_i: int, now: float, stealing: bool) -> None:
        """The node takes what fits its free cores and memory and the room left before its
        pilot's end (or before a reservation on it starts), best rank first; a thief takes
        from the back of the rank order, and only once its own pilot has nothing left."""
        node = self.nodes[node_i]
        p = node.pilot
        room = self.limit[p] - now
        for r in self.resv[p]:
            if node_i in r["nodes"]:
                if r["running"]:
                    return
                room = min(room, r["start"] - now)  # backfill only what ends before the gang starts
        while node.free > 0:
            if stealing:
                if self.own_unclaimed[p]:
                    break
                gi, src = _pick(self.groups, self.ready_all, node, room, self.left, -1, self.pilots[p].stage)
            else:
                gi, src = _pick(self.groups, self.ready_own[p], node, room, self.left, p)
            if gi < 0:
                break
            g = self.groups[gi]
            k = min(self.left[gi][src], node.free // g.cores)
            if g.memory and node.mem != INF:
                k = min(k, int(node.mem // g.memory))
            if g.gpus:
                k = min(k, node.gpus // g.gpus)
            self.claimed(gi, src, k)
            node.free -= k * g.cores
            node.mem -= k * g.memory
            node.gpus -= k * g.gpus
            node.ends.append(now + g.walltime)
            self.start(node_i, p, gi, k, now)
        node.hungry = node.free > 0

    def reserve(self, now: float) -> None:
        """Each pilot's leader reserves the nodes that free up first for its best-ranked ready
        gang, and starts it when they are all free (the launcher does the same)."""
        for p in range(self.n_p):
            if self.gang[p] and self.pilots[p].start <= now:
                while self._reserve_one(p, now):
                    pass

    def _reserve_one(self, p: int, now: float) -> bool:
        """Advance pilot p's reservation by one gang; whether another may follow at once."""
        nodes = self.nodes
        draining = next((r for r in self.resv[p] if not r["running"]), None)
        if draining is None:
            held = {i for r in self.resv[p] for i in r["nodes"]}
            free_nodes = [i for i in self.pilot_nodes[p] if i not in held]
            for _, gi in self.ready_own[p]:
                g = self.groups[gi]
                if g.nodes <= 1 or g.nodes > len(free_nodes) or not self.left[gi].get(p):
                    continue
                order = sorted(free_nodes, key=lambda i: (max(nodes[i].ends, default=now), i))[:g.nodes]
                start = max([now] + [max(nodes[i].ends, default=now) for i in order])
                if start + g.walltime <= self.limit[p]:
                    draining = {"gid": gi, "nodes": order, "start": start, "running": False}
                    self.resv[p].append(draining)
                break
        if draining is None:
            return False
        if not all(nodes[i].free == nodes[i].cores and not nodes[i].ends for i in draining["nodes"]):
            return False
        gi = draining["gid"]
        g = self.groups[gi]
        for i in draining["nodes"]:
            nodes[i].free = 0
            nodes[i].hungry = False
            nodes[i].ends.append(now + g.walltime)
        self.claimed(gi, p, 1)
        draining["running"] = True
        draining["end"] = now + g.walltime
        self.start(-1 - p, p, gi, 1, now)
        return True

    def fill(self, candidates, now: float, released: bool) -> None:
        """At one instant: reservations, then owners claim their own work, then idle pilots
        steal. A node that could not steal before can only succeed now if it freed cores, if
        work was released, or if its pilot just ran out of its own work."""
        self.reserve(now)
        for i in candidates:
            self.claim(i, now, False)
        for p in range(self.n_p):
            if self.own_unclaimed[p] == 0 and p not in self.just_exhausted and p not in self.exhausted:
                self.just_exhausted.add(p)
        if not self.steal_on or not self.ready_all:
            self.just_exhausted.clear()
            return
        thieves = set(i for i in candidates if not self.own_unclaimed[self.nodes[i].pilot])
        thieves |= self.late_thieves
        self.late_thieves = set()
        for p in self.just_exhausted:
            thieves.update(self.pilot_nodes[p])
            self.exhausted.add(p)
        self.just_exhausted.clear()
        if released:
            for p in self.exhausted:
                thieves.update(self.pilot_nodes[p])
        self.steal(thieves, now)

    def steal(self, thieves: set[int], now: float) -> None:
        """One pass in node order; a theft can exhaust another pilot, whose later nodes then
        steal in this same pass (as they would at this instant) and whose earlier nodes try at
        the next instant."""
        queue = sorted(thieves)
        heapq.heapify(queue)
        seen = set(queue)
        while queue:
            i = heapq.heappop(queue)
            node = self.nodes[i]
            if node.hungry and self.pilots[node.pilot].start <= now:
                self.claim(i, now, True)
            for p in list(self.just_exhausted):
                self.exhausted.add(p)
                for j in self.pilot_nodes[p]:
                    if j > i and j not in seen:
                        seen.add(j)
                        heapq.heappush(queue, j)
                    elif j < i:
                        self.late_thieves.add(j)  # its turn in this pass is over
            self.just_exhausted.clear()

    def advance(self) -> tuple[float, set[int], bool]:
        """Time moves to the next task end: what ends there frees its node (a gang its nodes)
        and may release dependants. Returns (now, freed nodes, whether work was released)."""
        now = self.events[0][0]
        freed: set[int] = set()
        released = False
        while self.events and self.events[0][0] == now:
            _, _, ni, gi, k = heapq.heappop(self.events)
            g = self.groups[gi]
            if ni < 0:  # a gang ended: its nodes are free again
                p = -1 - ni
                r = next(r for r in self.resv[p] if r["running"] and r["gid"] == gi and r["end"] == now)
                self.resv[p].remove(r)
                for i in r["nodes"]:
                    self.nodes[i].free = self.nodes[i].cores
                    self.nodes[i].ends.remove(now)
                    self.nodes[i].hungry = True
                    freed.add(i)
            else:
                node = self.nodes[ni]
                node.free += k * g.cores
                node.mem += k * g.memory
                node.gpus += k * g.gpus
                node.ends.remove(now)
                node.hungry = True
                p = node.pilot
                freed.add(ni)
            self.makespan[p] = max(self.makespan[p], now - self.pilots[p].start)
            self.total[gi] -= k
            if self.total[gi] == 0:
                for d in self.dependants[gi]:
                    self.waiting[d] -= 1
                    if self.waiting[d] == 0 and self.total[d]:
                        self.release(d)
                        released = True
        if released:
            freed.update(i for i, node in enumerate(self.nodes)
                         if node.hungry and self.pilots[node.pilot].start <= now)
        return now, freed, released

    def run(self) -> SimResult:
        nodes, pilots = self.nodes, self.pilots
        now = min((p.start for p in pilots), default=0.0)
        pending_starts = sorted({p.start for p in pilots if p.start > now})
        self.fill([i for i, node in enumerate(nodes) if pilots[node.pilot].start <= now], now, True)
        while self.events or pending_starts:
            if pending_starts and (not self.events or pending_starts[0] < self.events[0][0]):  # ends first
                now = pending_starts.pop(0)
                self.fill([i for i, node in enumerate(nodes) if pilots[node.pilot].start == now], now, True)
                continue
            now, freed, released = self.advance()
            self.fill(sorted(freed), now, released)
        return self.result(now)

    def result(self, end: float) -> SimResult:
        unfinished = {gi: self.total[gi] for gi in range(len(self.groups)) if self.total[gi]}
        left_by_pilot: list[dict[int, int]] = [{} for _ in range(self.n_p)]
        for gi in unfinished:
            for p, k in self.left[gi].items():
                if k:
                    left_by_pilot[p][gi] = k
        return SimResult(makespan=self.makespan, busy=self.busy, ran=self.ran, unfinished=unfinished, end=end,
                         left=left_by_pilot)


def _pick(groups: list[SimGroup], ready: list[tuple[int, int]], node: _Node, room: float,
          left: list[dict[int, int]], pilot: int, stage: int = 0) -> tuple[int, int]:
    """First group in rank order that fits the node (last, when stealing: thieves take from
    the back); returns (gid, source pilot) or (-1, -1)."""
    free, mem, gpus = node.free, node.mem, node.gpus
    for _, gi in (ready if pilot >= 0 else reversed(ready)):
        g = groups[gi]
        if (g.nodes == 1 and g.cores <= free and g.memory <= mem and g.gpus <= gpus and g.walltime <= room
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
