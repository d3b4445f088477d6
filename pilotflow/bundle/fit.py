"""Whether a task can run on a resource at all: the one definition every part uses.

The bundle reader turns a task that fits nowhere into a bundle error; failover only moves
tokens where they fit; the Snakemake plugin refuses a job no resource can run. All three ask
:func:`unfit` so they cannot disagree (multi-node and MPI tasks included).
"""

from __future__ import annotations

import difflib
from dataclasses import replace

from pilotflow.bundle.model import Resource, Task
from pilotflow.bundle.units import format_duration


def task_nodes(t: Task, cores_per_node: int | None) -> int:
    """Nodes a task needs: ``nodes``, or enough for ``cores`` ranks when MPI spreads them."""
    if t.mpi and t.nodes == 1 and cores_per_node and t.cores > cores_per_node:
        return -(-t.cores // cores_per_node)
    return t.nodes


def unfit(t: Task, resources: list[Resource]) -> tuple[str, str] | None:
    """Why no resource among ``resources`` can run the task, as (offending key, message), or
    None when one can. A task pinned to a resource is only tried there."""
    names = {r.name for r in resources}
    if t.resource is not None and t.resource not in names:
        near = difflib.get_close_matches(t.resource, sorted(names), n=1)
        hint = f"did you mean '{near[0]}'?" if near else "known: " + ", ".join(sorted(names))
        return "resource", f"resource = \"{t.resource}\" is not a [[resource]] of this bundle; {hint}"
    pool = [r for r in resources if t.resource in (None, r.name)]
    if t.nodes > 1 or t.mpi:
        fits = [r for r in pool if task_nodes(t, r.cores_per_node) <= r.max_nodes]
        if not fits:
            best = max(pool, key=lambda r: r.max_nodes * r.cores_per_node)
            return "nodes", (f"needs {task_nodes(t, best.cores_per_node)} nodes but the most a pilot may have is "
                             f"{best.max_nodes} ({best.name}); lower nodes/cores or raise max_nodes")
    else:
        fits = [r for r in pool if r.cores_per_node >= t.cores]
        if not fits:
            best = max(pool, key=lambda r: r.cores_per_node)
            return "cores", (f"needs {t.cores} cores on one node but the largest node has "
                             f"{best.cores_per_node} ({best.name}); lower cores, or use mpi = true "
                             "to spread ranks over nodes")
    split = [r for r in fits if r.launchers_per_node > 1]
    fits = [r for r in fits if r.launchers_per_node == 1 or task_nodes(t, r.cores_per_node) == 1
            and t.cores <= r.launcher_cores and (t.memory_mb or 0) <= (r.launcher_memory_mb or t.memory_mb or 0)]
    if not fits:
        r = split[0]
        key = "nodes" if task_nodes(t, r.cores_per_node) > 1 else "cores" if t.cores > r.launcher_cores else "memory"
        need = f"{task_nodes(t, r.cores_per_node)} nodes" if key == "nodes" else f"{t.cores} core(s)" + (
            f" and {t.memory_mb}M" if t.memory_mb else "")
        share = f"{r.launcher_cores} core(s)" + (f" and {r.launcher_memory_mb}M" if r.memory_per_node_mb else "")
        return key, (f"needs {need} but {r.name}'s launchers_per_node = {r.launchers_per_node} gives each "
                     f"launcher {share} of a node; lower launchers_per_node")
    if t.gpus:  # on one node; a task on several holds them whole, GPUs included
        gpu = [r for r in fits if task_nodes(t, r.cores_per_node) > 1 or r.gpus_per_node >= t.gpus]
        if not gpu:
            best = max(fits, key=lambda r: r.gpus_per_node)
            return "gpus", (f"needs {t.gpus} GPU(s) on one node but the most a node has is {best.gpus_per_node} "
                            f"({best.name}); set gpus_per_node on the resource or lower gpus")
        fits = gpu
    if t.memory_mb is not None:
        mem = [r for r in fits if r.memory_per_node_mb is None or r.memory_per_node_mb >= t.memory_mb]
        if not mem:
            return "memory", (f"needs {t.memory_mb}M of memory but no node has that much "
                              f"({', '.join(f'{r.name}: {r.memory_per_node_mb}M' for r in fits)})")
        fits = mem
    wall = [r for r in fits if r.max_walltime_s is None or r.max_walltime_s >= t.walltime_s]
    if not wall:
        limits = ", ".join(f"{r.name}: {format_duration(r.max_walltime_s)}" for r in fits)
        return "walltime", (f"walltime {format_duration(t.walltime_s)} is longer than any resource's "
                            f"max_walltime ({limits}); lower the estimate or raise max_walltime")
    return None


def task_fits(t: Task, r: Resource) -> bool:
    """Whether one resource can run the task at all, wherever it is pinned now."""
    return unfit(replace(t, resource=None), [r]) is None
