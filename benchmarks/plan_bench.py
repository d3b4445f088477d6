#!/usr/bin/env python3
"""Planner quality and speed: 1k / 10k / 100k tasks, one shape and random mixes.

    python benchmarks/plan_bench.py [--sizes 1000,10000,100000]

For each case: planning wall time, pilots vs the lower bound, node-hours vs the work volume
(node-hours can never be below it), efficiency (busy / charged core-seconds), and, side by
side, what a hand-written plan of full-size pilots would charge. Margin 0 as the targets
say, and the default margin (5 %) once more for the mixes. The two cases of the planner
issue with a known optimum come first.
"""

from __future__ import annotations

import argparse
import math
import random
import time

from pilotflow.bundle import Bundle, Resource, Task
from pilotflow.planning.plan import make_plan

SLURM = dict(name="c", scheduler="slurm", cores_per_node=48, max_nodes=4, max_walltime_s=86400)


def tasks_one(n):
    return [Task(name=f"t{i}", command="true", cores=1, walltime_s=600) for i in range(n)]


def tasks_few(n, seed=1):
    rnd = random.Random(seed)
    return [Task(name=f"t{i}", command="true", cores=rnd.choice([1, 1, 1, 2, 2, 4, 8, 16]),
                 walltime_s=rnd.choice([60, 120, 300, 600, 900, 1800, 2700, 3600, 5400, 7200])) for i in range(n)]


def tasks_many(n, seed=1):
    rnd = random.Random(seed)
    return [Task(name=f"t{i}", command="true", cores=rnd.choice([1, 1, 1, 2, 2, 4, 8, 16]),
                 walltime_s=60 * rnd.randint(1, 120)) for i in range(n)]


def row(label, tasks, res, margin, optimum=None):
    b = Bundle(name="bench", tasks=tasks, resources=[res])
    t = time.perf_counter()
    plan = make_plan(b, margin=margin, overhead=0 if margin == 0 else None)
    dt = time.perf_counter() - t
    (rp,) = plan.resources
    busy = sum(p.busy_core_s for p in rp.pilots)
    charged = sum(p.cores * p.walltime_s for p in rp.pilots)
    floor_nh = busy / res.cores_per_node / 3600
    naive_pilots = math.ceil(busy / (res.cores_per_node * res.max_nodes * res.max_walltime_s))
    naive_nh = naive_pilots * res.max_nodes * res.max_walltime_s / 3600
    opt = f"{optimum:7.1f}" if optimum else "      -"
    print(f"{label:<26} {len(tasks):>7} {margin:>4.2f} {dt:7.2f} {len(rp.pilots):>6} {rp.lower_bound_pilots:>4} "
          f"{rp.node_hours:9.1f} {opt} {floor_nh:9.1f} {busy / charged:6.3f} {naive_nh:9.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1000,10000,100000")
    a = ap.parse_args()
    print(f"{'case':<26} {'tasks':>7} {'mrg':>4} {'time s':>7} {'pilots':>6} {'LB':>4} {'node-h':>9} "
          f"{'optimum':>7} {'volume':>9} {'eff':>6} {'hand-nh':>9}")
    row("issue: 1000 × 1h, 48c/4n/24h", [Task(name=f"t{i}", command="x", walltime_s=3600) for i in range(1000)],
        Resource(**SLURM), 0, optimum=21)
    row("issue: 700 × 2c 30m, 16c/2n/4h",
        [Task(name=f"t{i}", command="x", cores=2, walltime_s=1800) for i in range(700)],
        Resource(**dict(SLURM, cores_per_node=16, max_nodes=2, max_walltime_s=4 * 3600)), 0, optimum=44)
    for n in (int(x) for x in a.sizes.split(",")):
        for label, make in (("one shape (1c, 10m)", tasks_one), ("random mix, 80 shapes", tasks_few),
                            ("random mix, 960 shapes", tasks_many)):
            row(label, make(n), Resource(**SLURM), 0)
        row("random mix, 960 shapes", tasks_many(n), Resource(**SLURM), 0.05)
    print("\nnode-h: charged (nodes × walltime); volume: busy core-hours / cores per node (a floor);"
          "\nhand-nh: full-size 4-node 24 h pilots for the same work (what one writes by hand).")


if __name__ == "__main__":
    main()
