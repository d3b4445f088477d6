"""The aggregated MILP: how many pilots a resource needs, and which work fills them.

Variables are per *shape* (cores, walltime), never per task, so a 100k-task bundle of a
few dozen shapes is a model of a few dozen integers. Each pilot's cores are modelled as
*lanes*: a lane of width c holds tasks of c cores one after another, lanes of a node sum to at
most its cores, and the tasks of one shape fit ``floor(W / t)`` to a lane. This is exact for a
single shape and close for mixes; the simulator then checks (and the planner repairs) the
result with the launcher's real policy.

Structure of the answer: ``full`` identical pilots of the maximum size, plus at most one
*remainder* pilot that the planner later shrinks. Minimising the number of pilots first and
the remainder's work second is what turns 700 half-hour tasks into 5 full pilots and a small
one (44 node-hours) instead of 6 even ones (48).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pilotflow.planning.solver import solve, solver_name, variable as var

@dataclass(frozen=True)
class Shape:
    cores: int  # effective cores (memory-bound tasks count as the cores their memory takes)
    walltime: int
    count: int
    nodes: int = 1  # > 1: each task takes that many whole nodes at once (cores = a node's)


@dataclass
class Split:
    full: int  # number of maximum-size pilots
    remainder: bool  # whether a remainder pilot is used
    x_full: list[int]  # per shape: tasks in the full pilots (all together)
    x_rem: list[int]  # per shape: tasks in the remainder pilot
    solver: str


class TooFewPilots(Exception):
    """``max_pilots`` cannot hold the work; ``needed`` is what the model needs."""

    def __init__(self, needed: int):
        self.needed = needed
        super().__init__(needed)


def volume_bound(shapes: list[Shape], cores_per_node: int, max_nodes: int, max_walltime: int) -> int:
    """A valid lower bound on pilots: work volume, and tasks longer than half a pilot.

    Each core of a pilot can run at most one task longer than half its walltime, so the
    cores of such tasks bound the pilots as well as the total volume does.
    """
    cap = cores_per_node * max_nodes
    volume = sum(s.cores * s.nodes * s.walltime * s.count for s in shapes)
    bound = math.ceil(volume / (cap * max_walltime)) if volume else 0
    long_cores = sum(s.cores * s.nodes * s.count for s in shapes if 2 * s.walltime > max_walltime)
    return max(bound, math.ceil(long_cores / cap))


def split(shapes: list[Shape], cores_per_node: int, max_nodes: int, max_walltime: int,
          max_pilots: int | None) -> Split:
    """Solve the model; raises TooFewPilots when ``max_pilots`` is too small.

    The objective is the number of pilots, then (weight < 1) the share of the work left to
    the remainder pilot: full pilots are filled as far as their lanes allow.
    """
    import pulp
    W, N, C = max_walltime, max_nodes, cores_per_node
    widths = sorted({s.cores for s in shapes})
    total = sum(s.cores * s.nodes * s.walltime * s.count for s in shapes) or 1
    ub = max(1, sum(math.ceil(s.count * s.nodes / max(1, (C // s.cores) * N * (W // s.walltime))) for s in shapes))
    prob = pulp.LpProblem("pilots", pulp.LpMinimize)
    z = var(prob, "full", 0, ub, "Integer")
    y = 1  # the remainder pilot always exists; it is shrunk (or dropped if empty) afterwards
    xf = [var(prob, f"xf{i}", 0, s.count, "Integer") for i, s in enumerate(shapes)]
    xr = [var(prob, f"xr{i}", 0, s.count, "Integer") for i, s in enumerate(shapes)]
    lf = {c: var(prob, f"lf{c}", 0, None, "Integer") for c in widths}
    lr = {c: var(prob, f"lr{c}", 0, None, "Integer") for c in widths}
    prob += (z + y) + 0.5 * pulp.lpSum((s.cores * s.nodes * s.walltime / total) * xr[i] for i, s in enumerate(shapes))
    for i, s in enumerate(shapes):
        # a task on k nodes takes k whole-node lanes at once
        prob += xf[i] + xr[i] == s.count
        prob += s.nodes * xf[i] <= (W // s.walltime) * lf[s.cores]
        prob += s.nodes * xr[i] <= (W // s.walltime) * lr[s.cores]
    for lanes, n in ((lf, z), (lr, y)):
        prob += pulp.lpSum(c * lanes[c] for c in widths) <= C * N * n
        for c in widths:
            prob += lanes[c] <= (C // c) * N * n
    for c in widths:
        members = [i for i, s in enumerate(shapes) if s.cores == c]
        prob += pulp.lpSum(shapes[i].nodes * shapes[i].walltime * xf[i] for i in members) <= W * lf[c]
        prob += pulp.lpSum(shapes[i].nodes * shapes[i].walltime * xr[i] for i in members) <= W * lr[c]
    if max_pilots is not None:
        prob += z + y <= max_pilots
    status = solve(prob)
    if status != "Optimal" or z.value() is None:
        if max_pilots is not None:
            needed = split(shapes, C, N, W, None)
            raise TooFewPilots(needed.full + int(needed.remainder))
        raise RuntimeError(f"the pilot model could not be solved ({status})")
    full = int(round(z.value()))
    x_full = [int(round(v.value())) for v in xf]
    x_rem = [s.count - x_full[i] for i, s in enumerate(shapes)]
    rem = any(x_rem)
    return Split(full=full, remainder=rem, x_full=x_full, x_rem=x_rem, solver=solver_name())
