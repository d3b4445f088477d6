"""One stage of one resource: from the MILP's split to sized, simulation-checked pilots.

A pilot's walltime is its planned work × (1 + margin) + a fixed ``overhead`` (the launcher's
start-up and the guard before the deadline at which it hands running tokens back). Both are
reserved, not squeezed: a full pilot plans ``(max_walltime - overhead) / (1 + margin)`` of
work and still asks for at most ``max_walltime``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pilotflow.bundle import Resource
from pilotflow.planning.grouping import Group
from pilotflow.planning.simulate import SimGroup, SimPilot, simulate

Counts = dict[int, int]  # group id → number of its tasks in a pilot
PILOT_OVERHEAD_S = 20  # seconds per pilot for the launcher's start and its hand-back guard


@dataclass
class Size:
    nodes: int
    walltime: int  # requested, margin and scheduler granularity included
    span: float  # simulated makespan of the pilot's own work


@dataclass
class Stage:
    groups: list[Group]
    res: Resource
    margin: float
    step: int  # walltime granularity of the scheduler
    overhead: float = PILOT_OVERHEAD_S
    optimize: str = "node-hours"  # or "makespan": the node count that ends soonest

    @property
    def cap(self) -> float | None:
        """Longest planned work per pilot (None: no limit). Tasks almost as long as
        ``max_walltime`` squeeze the margin rather than becoming impossible."""
        w = self.res.max_walltime_s
        if w is None:
            return None
        return max((w - self.overhead) / (1 + self.margin), max((g.walltime for g in self.groups), default=0))

    def walltime(self, span: float) -> int:
        w = max(math.ceil((span * (1 + self.margin) + self.overhead) / self.step - 1e-9) * self.step, self.step)
        wmax = self.res.max_walltime_s
        return w if wmax is None else min(w, wmax)

    def usable(self, walltime: int) -> float | None:
        if self.res.max_walltime_s is None:
            return None
        return max((walltime - self.overhead) / (1 + self.margin), min(walltime, self.cap))

    def sim_groups(self, counts: list[Counts]) -> list[SimGroup]:
        return [SimGroup(cores=g.cores, walltime=g.walltime, memory=g.memory, deps=g.deps, rank=g.rank,
                         count={p: c[gi] for p, c in enumerate(counts) if c.get(gi)}, nodes=g.nodes, gpus=g.gpus)
                for gi, g in enumerate(self.groups)]

    def sim_pilot(self, nodes: int, limit: float | None, start: float = 0.0, stage: int = 0) -> SimPilot:
        r = self.res
        return SimPilot(nodes, r.cores_per_node, r.memory_per_node_mb, limit, start=start, stage=stage,
                        gpus_per_node=r.gpus_per_node)

    def alone(self, count: Counts, nodes: int, limit: float | None):
        """Simulate one pilot on its own (dependencies on other pilots count as met)."""
        return simulate(self.sim_groups([count]), [self.sim_pilot(nodes, limit)], steal=False)


CHUNK = 2  # tasks of one group a full pilot gets at least: keeps simulation batched


def hand_out(groups: list[Group], shape_groups: list[list[int]], full: int, x_full: list[int],
             x_rem: list[int]) -> tuple[list[Counts], Counts]:
    """Full pilots share their work evenly, in chunks of a group, rotating who gets the odd
    chunk; the remainder takes the lowest-priority tasks of each shape."""
    counts: list[Counts] = [{} for _ in range(full)]
    rem: Counts = {}
    turn = 0
    for si, gids in enumerate(shape_groups):
        want_rem = x_rem[si]
        for gi in sorted(gids, key=lambda g: groups[g].rank, reverse=True):
            k = len(groups[gi].members)
            r = min(k, want_rem)
            if r:
                rem[gi] = r
                want_rem -= r
            k -= r
            if k and full:
                chunks = min(full, max(1, k // CHUNK))
                base, extra = divmod(k, chunks)
                for j in range(chunks):
                    counts[(turn + j) % full][gi] = base + (1 if j < extra else 0)
                turn = (turn + chunks) % full
            elif k:
                rem[gi] = rem.get(gi, 0) + k
    return counts, rem


def fill_full(st: Stage, counts: list[Counts], rem: Counts) -> list[Size]:
    """Size full pilots at full size; work one cannot fit spills to the remainder, and a
    remainder too big for one pilot becomes full pilots until what is left fits one."""
    sizes = []
    n = st.res.max_nodes
    i = 0
    while True:
        while i < len(counts):
            c = counts[i]
            r = st.alone(c, n, st.cap)
            for gi, k in r.left[0].items():
                c[gi] -= k
                if not c[gi]:
                    del c[gi]
                rem[gi] = rem.get(gi, 0) + k
            sizes.append(Size(n, st.walltime(r.makespan[0]), r.makespan[0]))
            i += 1
        if not rem or st.cap is None or st.alone(rem, n, None).makespan[0] <= st.cap:
            return sizes
        counts.append(dict(rem))
        rem.clear()


def _node_options(n_max: int, min_nodes: int) -> list[int]:
    if n_max <= 16:
        return list(range(min_nodes, n_max + 1))
    opts = {n for n in (1, 2, 3, 4, 6, 8, 12, 16) if n <= n_max} | {n_max}
    k = 24
    while k < n_max:
        opts.add(k)
        k = k * 3 // 2
    return sorted(o for o in opts if o >= min_nodes)


def size(st: Stage, count: Counts) -> Size:
    """The cheapest node count (node-hours, then walltime) whose pilot fits the work."""
    res, cap = st.res, st.cap
    volume = sum(st.groups[g].cores * st.groups[g].nodes * st.groups[g].walltime * k for g, k in count.items())
    min_nodes = max((st.groups[g].nodes for g in count), default=1)
    best = None
    for n in _node_options(res.max_nodes, min_nodes):
        if cap is not None and volume / (n * res.cores_per_node) > cap:
            continue
        span = st.alone(count, n, None).makespan[0]
        if cap is not None and span > cap:
            continue
        wall = st.walltime(span)
        key = (n * wall, wall, n) if st.optimize == "node-hours" else (span, n * wall, n)
        if best is None or key < best[0]:
            best = (key, Size(n, wall, span))
    if best is None:  # too much for one pilot: the repair splits it
        n = res.max_nodes
        span = st.alone(count, n, None).makespan[0]
        return Size(n, st.walltime(span), span)
    return best[1]


STEAL_ROUNDS = 12  # joint checks with work stealing before falling back to owners-only checks


def repair(st: Stage, counts: list[Counts], sizes: list[Size]) -> tuple[list[Counts], list[Size], Counts]:
    """Simulate all pilots together, as their launchers will run, and fix what does not fit.

    Returns (counts, sizes, overflow): overflow is work this stage cannot finish because its
    dependencies end too late; the caller moves it to the next stage.

    Termination: stealing can make a schedule slightly worse (list-scheduling anomalies), so
    after STEAL_ROUNDS the check runs owners-only. Then every pilot runs exactly its own work,
    each pilot's own work fits it alone, and what is left can only be waiting for
    dependencies: it moves to the next stage.
    """
    res = st.res
    overflow: Counts = {}
    rounds = 0
    while True:
        rounds += 1
        keep = [p for p, c in enumerate(counts) if c]
        counts, sizes = [counts[p] for p in keep], [sizes[p] for p in keep]
        if not counts:
            return counts, sizes, overflow
        pilots = [st.sim_pilot(s.nodes, st.usable(s.walltime)) for s in sizes]
        r = simulate(st.sim_groups(counts), pilots, steal=rounds <= STEAL_ROUNDS)
        if r.complete:
            return counts, sizes, overflow
        grown = False
        for p, left in enumerate(r.left):
            if left and (sizes[p].nodes, sizes[p].walltime) != (res.max_nodes, res.max_walltime_s):
                sizes[p] = Size(res.max_nodes, res.max_walltime_s, sizes[p].span)
                grown = True
        if grown:
            continue
        extra: Counts = {}
        for p, left in enumerate(r.left):
            for gi, k in left.items():
                counts[p][gi] -= k
                if not counts[p][gi]:
                    del counts[p][gi]
                extra[gi] = extra.get(gi, 0) + k
        if any(st.groups[gi].deps for gi in extra) or rounds > STEAL_ROUNDS:
            for gi, k in extra.items():
                overflow[gi] = overflow.get(gi, 0) + k
            continue
        # a capacity shortfall: the pilot with the most slack takes the work if it still
        # fits one pilot, otherwise new pilots do, each filled only with what fits it
        target = min(range(len(counts)), key=lambda p: sizes[p].walltime)
        merged = dict(counts[target])
        for gi, k in extra.items():
            merged[gi] = merged.get(gi, 0) + k
        s = size(st, merged)
        if st.cap is None or s.span <= st.cap:
            counts[target], sizes[target] = merged, s
            continue
        new: list[Counts] = []
        while extra:
            r1 = st.alone(extra, res.max_nodes, st.cap)
            fits = {gi: k - r1.left[0].get(gi, 0) for gi, k in extra.items() if k - r1.left[0].get(gi, 0)}
            if not fits:  # nothing fits even alone: only dependencies can explain it
                for gi, k in extra.items():
                    overflow[gi] = overflow.get(gi, 0) + k
                break
            new.append(fits)
            extra = dict(r1.left[0])
        for c in new:
            counts.append(c)
            sizes.append(size(st, c))


def members(groups: list[Group], counts: list[Counts]) -> list[list[int]]:
    """Concrete task indices per pilot: consecutive slices of each group's members."""
    cursor: dict[int, int] = {}
    out = []
    for count in counts:
        mine: list[int] = []
        for gi in sorted(count, key=lambda g: groups[g].rank):
            start = cursor.get(gi, 0)
            mine.extend(groups[gi].members[start:start + count[gi]])
            cursor[gi] = start + count[gi]
        out.append(mine)
    return out
