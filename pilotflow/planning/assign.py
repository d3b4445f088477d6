"""Which resource runs which task, when a bundle has several.

Pinned tasks stay where they are pinned; a dependency component (tasks linked by ``after``)
always goes to one resource, because a pool lives on one resource's filesystem. Everything
else is split by a small MILP over aggregated units: fewest pilots in total first, then the
shortest makespan (work balanced against each resource's pilot capacity).
"""

from __future__ import annotations

from collections import Counter

from pilotflow.bundle import Bundle, Resource, Task, task_fits
from pilotflow.errors import BundleError


def assign_resources(bundle: Bundle, indices: list[int]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Resource name → task indices, and resource name → a one-line reason for the split."""
    resources = bundle.resources
    tasks = bundle.tasks.protos()  # shapes, pins and dependencies; names only where they link tasks
    if len(resources) == 1:
        only = resources[0].name
        return {only: list(indices)}, {only: "the only resource"}
    comps = _components(tasks, indices)
    fixed: dict[str, list[int]] = {r.name: [] for r in resources}
    why_pinned: Counter = Counter()
    why_single: Counter = Counter()
    units: dict[tuple, list[list[int]]] = {}
    for comp in comps:
        pins = {tasks[i].resource for i in comp if tasks[i].resource}
        if len(pins) > 1:
            a = next(i for i in comp if tasks[i].resource)
            raise BundleError([f"{bundle.where(tasks[a].origin + ('resource',))} tasks linked by 'after' "
                               f"are pinned to different resources ({', '.join(sorted(pins))}); a dependency "
                               "chain must run on one resource, whose filesystem holds its pool"])
        if pins:
            name = pins.pop()
            fixed[name].extend(comp)
            why_pinned[name] += len(comp)
            continue
        ok = tuple(r.name for r in resources if all(task_fits(tasks[i], r) for i in comp))
        if not ok:
            t = bundle.tasks[comp[0]]
            raise BundleError([f"{bundle.where(t.origin)} task '{t.name}' and the tasks linked to it by "
                               "'after' fit no single resource; pin them or relax their needs"])
        if len(ok) == 1:
            fixed[ok[0]].extend(comp)
            why_single[ok[0]] += len(comp)
            continue
        sig = (ok, tuple(sorted(Counter((tasks[i].cores, tasks[i].walltime_s, tasks[i].memory_mb or 0,
                                         tasks[i].nodes) for i in comp).items())))
        units.setdefault(sig, []).append(comp)
    chosen = _solve(resources, tasks, fixed, units) if units else {}
    out: dict[str, list[int]] = {}
    why: dict[str, str] = {}
    for r in resources:
        idx = sorted(fixed[r.name] + chosen.get(r.name, []))
        if not idx:
            continue
        out[r.name] = idx
        parts = []
        if why_pinned[r.name]:
            parts.append(f"{why_pinned[r.name]} pinned")
        if why_single[r.name]:
            parts.append(f"{why_single[r.name]} fit only here")
        n_chosen = len(chosen.get(r.name, []))
        if n_chosen:
            parts.append(f"{n_chosen} placed here for the fewest pilots, then the shortest makespan")
        why[r.name] = "; ".join(parts)
    return out, why


def _components(tasks: list[Task], indices: list[int]) -> list[list[int]]:
    parent = {i: i for i in indices}
    by_name = {tasks[i].name: i for i in indices}

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in indices:
        for d in tasks[i].after:
            j = by_name.get(d)
            if j is not None:
                a, b = find(i), find(j)
                if a != b:
                    parent[a] = b
    comps: dict[int, list[int]] = {}
    for i in indices:
        comps.setdefault(find(i), []).append(i)
    return list(comps.values())


def _capacity_terms(res: Resource):
    cap = res.cores_per_node * res.max_nodes
    return cap, res.max_walltime_s


def _solve(resources: list[Resource], tasks: list[Task], fixed: dict[str, list[int]],
           units: dict[tuple, list[list[int]]]) -> dict[str, list[int]]:
    """Two solves: fewest pilots in total, then (pilots fixed) the shortest fluid makespan."""
    import pulp
    from pilotflow.planning.solver import solve, variable as var
    keys = list(units)
    rnames = [r.name for r in resources]
    fixed_shapes = {r.name: Counter((tasks[i].cores, tasks[i].walltime_s) for i in fixed[r.name])
                    for r in resources}

    def build(phase: int, z_fixed: dict[str, int] | None):
        prob = pulp.LpProblem(f"assign{phase}", pulp.LpMinimize)
        x = {(u, r): var(prob, f"x{u}_{r}", 0, len(units[k]), "Integer")
             for u, k in enumerate(keys) for r, name in enumerate(rnames) if name in k[0]}
        z = {}
        T = var(prob, "T", 0)
        for u, k in enumerate(keys):
            prob += pulp.lpSum(x[u, r] for r in range(len(rnames)) if (u, r) in x) == len(units[k])
        for r, res in enumerate(resources):
            shapes: dict[tuple[int, int], object] = {}
            for (c, t), n in fixed_shapes[res.name].items():
                shapes[(c, t)] = shapes.get((c, t), 0) + n
            for u, k in enumerate(keys):
                if (u, r) in x:
                    for (c, t, _m, _n), n in k[1]:
                        shapes[(c, t)] = shapes.get((c, t), 0) + n * x[u, r]
            cap, wmax = _capacity_terms(res)
            upper = res.max_pilots or 10_000
            if z_fixed is None:
                z[r] = var(prob, f"z{r}", 0, upper if wmax else 1, "Integer")
            else:
                z[r] = z_fixed[res.name]
            volume = pulp.lpSum(c * t * n for (c, t), n in shapes.items())
            if wmax is None:
                total = sum(len(units[k]) * sum(n for _, n in k[1]) for k in keys) + len(fixed[res.name])
                prob += pulp.lpSum(n for n in shapes.values()) <= total * z[r]
                prob += volume <= T * cap * (1 if z_fixed is None else max(z[r], 1))
                continue
            widths = sorted({c for c, _ in shapes})
            lanes = {c: var(prob, f"l{r}_{c}", 0, None, "Integer") for c in widths}
            prob += pulp.lpSum(c * lanes[c] for c in widths) <= cap * z[r]
            for c in widths:
                prob += lanes[c] <= (res.cores_per_node // c) * res.max_nodes * z[r]
                prob += pulp.lpSum(t * n for (cc, t), n in shapes.items() if cc == c) <= wmax * lanes[c]
                for (cc, t), n in shapes.items():
                    if cc == c:
                        prob += n <= (wmax // t) * lanes[c]
            if z_fixed is not None:
                prob += volume <= T * cap * max(z[r], 1)
        if phase == 1:
            prob += pulp.lpSum(z.values())
        else:
            prob += T
        return prob, x, z

    prob, x, z = build(1, None)
    if solve(prob) != "Optimal":
        raise BundleError(["the tasks cannot be split between the resources within their limits "
                           "(max_pilots, max_walltime); raise a limit or pin tasks"])
    z1 = {rnames[r]: int(round(v.value())) for r, v in z.items()}
    prob, x, _ = build(2, z1)
    if solve(prob) != "Optimal":
        prob, x, _ = build(1, None)
        solve(prob)
    out: dict[str, list[int]] = {}
    for u, k in enumerate(keys):
        comps = list(units[k])
        for r, name in enumerate(rnames):
            if (u, r) in x:
                n = int(round(x[u, r].value() or 0))
                for comp in comps[:n]:
                    out.setdefault(name, []).extend(comp)
                comps = comps[n:]
        for comp in comps:  # rounding leftovers: the first resource that can take them
            out.setdefault(k[0][0], []).extend(comp)
    return out
