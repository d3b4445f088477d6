#!/usr/bin/env python3
"""500 half-second tasks on the local Slurm: pilotflow vs one sbatch per task.

    python benchmarks/e2e_slurm.py [--tasks 500]        (root; starts its own Slurm)

Side by side in one run, once with Slurm's default scheduling parameters (as production
clusters run) and once with the fast test settings, on a 3-node simulated cluster:
  pilotflow   `pilotflow submit bundle.toml --wait`: the planned pilots pull the tasks
  per-task    one `sbatch --wrap` per task (what per-job tools such as Snakemake's Slurm
              plugin do), then `squeue` every second until every job finished
Reported: makespan (first command to last task done), scheduler jobs, and scheduler
commands issued (counted by wrappers in front of sbatch/squeue/sacct/scancel/scontrol).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.daemons.slurm import SlurmCluster  # noqa: E402

COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol")


def wrappers(d: Path, log: Path) -> str:
    """A bin directory whose Slurm commands log themselves, then run the real ones."""
    d.mkdir(parents=True, exist_ok=True)
    for c in COMMANDS:
        real = shutil.which(c)
        (d / c).write_text(f'#!/bin/sh\necho {c} >> "{log}"\nexec {real} "$@"\n')
        (d / c).chmod(0o755)
    return str(d)


def run_pilotflow(n: int, env: dict, work: Path) -> tuple[float, int]:
    (work / "b.toml").write_text(f'''[bundle]
name = "bench"
optimize = "makespan"
[[resource]]
name = "slurm"
scheduler = "slurm"
cores_per_node = 4
max_nodes = 3
max_walltime = "1h"
partition = "debug"
[[task]]
name = "t{{i}}"
command = "sleep 0.5"
matrix = {{ i = "1..{n}" }}
walltime = "1s"
''')
    t = time.time()
    subprocess.run([sys.executable, "-m", "pilotflow", "submit", "b.toml", "--wait"], cwd=work, env=env,
                   check=True, capture_output=True)
    elapsed = time.time() - t
    out = subprocess.run([sys.executable, "-m", "pilotflow", "status", "--json"], cwd=work, env=env,
                         check=True, capture_output=True, text=True).stdout
    import json
    st = json.loads(out)
    assert st["counts"]["done"] == n, st["counts"]
    return elapsed, len(st["pilots"])


def run_per_task(n: int, env: dict, work: Path) -> tuple[float, int]:
    t = time.time()
    ids = []
    for i in range(n):
        r = subprocess.run(["sbatch", "--parsable", "-N1", "-n1", "-p", "debug", "-o", str(work / "out-%j"),
                            "--wrap", "sleep 0.5"], env=env, check=True, capture_output=True, text=True)
        ids.append(r.stdout.strip().split(";")[0])
    pending = set(ids)
    while pending:
        time.sleep(1)
        r = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i|%T"], env=env,
                           capture_output=True, text=True)
        for line in r.stdout.splitlines():
            job, state = line.split("|")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and job in pending:
                pending.discard(job)
    return time.time() - t, len(ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=500)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pf-slurm-bench-"))
    cluster = SlurmCluster.start(base / "slurm", nodes=3, cpus_per_node=4, fast=False)
    rows = []
    try:
        for fast in (False, True):
            cluster.restart(fast=fast)
            for label, fn in (("pilotflow", run_pilotflow), ("per-task sbatch", run_per_task)):
                work = base / f"{label.replace(' ', '-')}-{fast}"
                work.mkdir()
                log = work / "commands.log"
                env = {**os.environ, **cluster.env, "PATH": wrappers(work / "bin", log) + ":" + os.environ["PATH"]}
                makespan, jobs = fn(a.tasks, env, work)
                cmds = len(log.read_text().splitlines()) if log.exists() else 0
                rows.append(("fast" if fast else "default", label, makespan, jobs, cmds))
                print(f"{rows[-1][0]:<8} {label:<16} makespan {makespan:7.1f} s  jobs {jobs:4d}  commands {cmds:5d}",
                      flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{a.tasks} × `sleep 0.5` on 3 nodes × 4 CPUs (ideal makespan {a.tasks * 0.5 / 12:.1f} s):")
    for params in ("default", "fast"):
        pf = next(r for r in rows if r[0] == params and r[1] == "pilotflow")
        pt = next(r for r in rows if r[0] == params and r[1] == "per-task sbatch")
        print(f"  {params:<8} Slurm parameters: makespan {pf[2]:.1f} s vs {pt[2]:.1f} s ({pt[2] / pf[2]:.1f}× shorter), "
              f"jobs {pf[3]} vs {pt[3]} ({pt[3] / pf[3]:.0f}× fewer), commands {pf[4]} vs {pt[4]} "
              f"({pt[4] / max(pf[4], 1):.0f}× fewer)")


if __name__ == "__main__":
    main()
