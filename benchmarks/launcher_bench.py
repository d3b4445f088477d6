#!/usr/bin/env python3
"""Null tasks (`true`) per second: pilotflow's launcher vs the fork/exec ceiling vs HyperQueue.

    python benchmarks/launcher_bench.py [--tasks 3000] [--repeat 3]

Side by side in one run, on the same machine, each configuration repeated and the median
kept (this machine is shared and noisy: compare the ratios, not the absolute rates):
  xargs       seq N | xargs -P CORES -n1 sh -c true     (the fork/exec ceiling)
  pilotflow   `pilotflow submit bundle.toml --wait` of N `true` tasks on the local resource,
              timed end to end through the CLI (planning, pool, pilot start, sync included),
              with one state file per token (the pool's only per-token file; output packed)
  launcher    the same pilot's launcher alone, timed from its start to its exit
  pilotflow-2, launcher-2
              the same with launchers_per_node = 2 (two launchers of one core each: one
              loop waits in posix_spawn while each task's exec loads)
  hyperqueue  HyperQueue's Python API: LocalCluster + one worker (all cores), one Job of N
              `sh -c true` programs (stdout/stderr to a file per task, its default), timed
              from submit to wait_for_jobs' return
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def bench_xargs(n: int, cores: int) -> float:
    t = time.perf_counter()
    subprocess.run(f"seq {n} | xargs -P {cores} -n1 sh -c true", shell=True, check=True)
    return n / (time.perf_counter() - t)


def bench_pilotflow(n: int, cores: int, launchers: int = 1) -> tuple[float, float, tuple[int, int]]:
    d = Path(tempfile.mkdtemp(prefix="pf-bench-"))
    try:
        (d / "b.toml").write_text(f'[bundle]\nname = "null"\n[[resource]]\nname = "local"\nscheduler = "local"\n'
                                  f'cores_per_node = {cores}\nlaunchers_per_node = {launchers}\n[[task]]\n'
                                  f'name = "t{{i}}"\ncommand = "true"\nmatrix = {{ i = "1..{n}" }}\nwalltime = "1s"\n')
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pilotflow", "submit", "b.toml", "--wait"], cwd=d, check=True,
                       capture_output=True)
        e2e = n / (time.perf_counter() - t)
        pool = next((d / ".pilotflow").glob("null-*"))
        start = min(json.loads((pool / "agents" / f"p1.{k}.json").read_text())["start"] for k in range(launchers))
        end = max(json.loads((pool / "agents" / f"p1.{k}.end").read_text())["end"] for k in range(launchers))
        states = sum(len(os.listdir(shard)) for shard in (pool / "state").iterdir())
        assert states == n, f"{states} state files for {n} tokens"
        # files (`find POOL -type f`: a token's state is a name of its launcher's journal) and
        # the inodes behind them (what inode quotas count)
        found = [f for f in pool.rglob("*") if f.is_file()]
        return e2e, n / (end - start), (len(found), len({f.stat().st_ino for f in found}))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def bench_hyperqueue(n: int) -> float | None:
    try:
        from hyperqueue import Job, LocalCluster
    except ImportError:
        return None
    d = Path(tempfile.mkdtemp(prefix="hq-bench-"))
    try:
        with LocalCluster(server_dir=str(d)) as cluster:
            cluster.start_worker()
            client = cluster.client()
            job = Job()
            for _ in range(n):  # stdout/stderr to a file per task, as pilotflow's logs
                job.program(["sh", "-c", "true"], cwd=str(d))
            t = time.perf_counter()
            submitted = client.submit(job)
            client.wait_for_jobs([submitted])
            return n / (time.perf_counter() - t)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    names = ("xargs", "pilotflow", "launcher", "pilotflow-2", "launcher-2", "hyperqueue")
    rates: dict[str, list[float]] = {k: [] for k in names}
    files = (0, 0)
    # byte-compiled first, as `pip install` leaves an installed package (this machine sets
    # PYTHONDONTWRITEBYTECODE: every CLI start would compile ~140 modules, 0.15 s)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1] / "pilotflow")],
                   check=True)
    for _ in range(a.repeat):  # interleaved, so that drift hits every tool alike
        rates["xargs"].append(bench_xargs(a.tasks, cores))
        e2e, alone, files = bench_pilotflow(a.tasks, cores)
        rates["pilotflow"].append(e2e)
        rates["launcher"].append(alone)
        e2e, alone, _ = bench_pilotflow(a.tasks, cores, launchers=2)
        rates["pilotflow-2"].append(e2e)
        rates["launcher-2"].append(alone)
        hq = bench_hyperqueue(a.tasks)
        if hq is not None:
            rates["hyperqueue"].append(hq)
    med = {k: statistics.median(v) for k, v in rates.items() if v}
    print(f"{a.tasks} null tasks, {cores} cores, median of {a.repeat} interleaved runs (tasks/s):")
    for k in names:
        if k in med:
            print(f"  {k:<11} {med[k]:8.0f}   runs: {', '.join(f'{r:.0f}' for r in rates[k])}")
    print(f"files in the pool after a run: {files[0]} for {a.tasks} tokens ({files[0] - a.tasks} besides the states), "
          f"{files[1]} inodes")
    print("ratios:")
    for k in ("pilotflow", "launcher", "pilotflow-2", "launcher-2"):
        line = f"  {k:<11} {med[k] / med['xargs']:.2f} of the xargs ceiling"
        if "hyperqueue" in med:
            line += f", {med[k] / med['hyperqueue']:.2f}× HyperQueue"
        print(line)


if __name__ == "__main__":
    main()
