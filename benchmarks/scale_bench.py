#!/usr/bin/env python3
"""How pilotflow scales with the number of tokens, up to a million, on this machine.

    python benchmarks/scale_bench.py [--tokens 1000000] [--drain 100000]

Each step through the CLI, as a user runs it, timed, with the peak memory of its process:
  plan       `pilotflow plan --json` of one [[task]] whose matrix has N values
  submit     `pilotflow submit` of the same bundle (pool written; the pilot is made to exit
             at once: its setup line ends the script, so nothing drains the pool here)
  status     after every token of the pool got a (done) state: a full sync, then an
             incremental one after 1,000 changes (twice: the first re-reads the 2 s of
             writes before the full sync, which touched every directory; the second
             follows a sync of a quiet pool), rewrites as `retry` makes them; then after
             1,000 new attempts claimed and finished as a launcher does (journal records)
  report     the HTML page of that run (its size)
  drain      one launcher (all cores) through a separate pool of --drain null tasks
plus the files the pool holds per token, and the inodes behind them.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pilotflow.launcher import Pool, dump, shard_width  # noqa: E402

# runs the CLI in a child that reports its own peak memory on its last stderr line
CLI = ("import resource, sys\nfrom pilotflow.cli import main\nrc = main(sys.argv[1:])\n"
       "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\nsys.exit(rc)")


def cli(cwd: Path, *args: str) -> tuple[float, float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CLI, *args], cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t
    if p.returncode not in (0, 1):
        raise SystemExit(f"pilotflow {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    rss = int(p.stderr.strip().splitlines()[-1].split()[1]) / 1024
    return took, rss, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--drain", type=int, default=100_000)
    a = ap.parse_args()
    n = a.tokens
    d = Path(tempfile.mkdtemp(prefix="pf-scale-"))
    rows = Rows()
    # byte-compiled first, as `pip install` leaves it (this machine sets PYTHONDONTWRITEBYTECODE)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "pilotflow")], check=True)
    try:
        (d / "b.toml").write_text(f'[bundle]\nname = "scale"\n[[resource]]\nname = "here"\nscheduler = "local"\n'
                                  f'cores_per_node = 2\nsetup = ["exit 0"]\n[[task]]\nname = "t{{i}}"\n'
                                  f'command = "true"\nmatrix = {{ i = "1..{n}" }}\nwalltime = "1s"\n')
        took, rss, p = cli(d, "plan", "b.toml", "--json")
        rows.append(("plan --json", took, rss, f"{len(p.stdout) / 1e6:.0f} MB of JSON"))
        took, rss, p = cli(d, "submit", "b.toml")
        run = p.stdout.strip()
        pool_dir = d / ".pilotflow" / run
        rows.append(("submit", took, rss, "pool written"))
        pool = Pool(str(pool_dir))
        t = time.perf_counter()
        now = time.time()
        for i in range(1, n + 1):  # every token done, as a finished run leaves them
            name = f"t{i}"
            handle = pool.claim(name, 1, dump({"token": name, "state": "locked", "attempt": 1, "pilot": "p1",
                                               "agent": 0}), keep=True)  # as a launcher does: the claim,
            pool.append(handle, name, {"token": name, "state": "done", "attempt": 1, "exit_code": 0, "pilot": "p1",
                                   "agent": 0, "host": "node", "start": now, "end": now + 1,
                                   "log": ["p1.0.0", 0, 0, 0, 0]})  # then its result (journal lines)
        fill = time.perf_counter() - t
        files = sum(len(os.listdir(s)) for s in (pool_dir / "state").iterdir())
        took, rss, _ = cli(d, "status", run)
        rows.append(("status (full sync)", took, rss, f"{n:,} states; pool filled in {fill:.0f} s"))
        time.sleep(2.5)  # past the 2 s of slack a sync re-reads (filesystem clock granularity)
        for i in range(1, 1001):
            name = f"t{i * (n // 1000)}"
            pool.put(name, {"token": name, "state": "done", "attempt": 1, "exit_code": 0, "changed": True})
        took, rss, _ = cli(d, "status", run)
        rows.append(("status (1,000 changed)", took, rss, "after a sync within 2 s of writes to every directory"))
        # a sync re-reads what changed in the 2 s before the last one (filesystem clock
        # granularity): right after the fill that was every directory. The usual case: the
        # last sync saw a quiet pool, then 1,000 tokens changed
        time.sleep(2.5)
        for i in range(1, 1001):
            name = f"t{i * (n // 1000) - 1}"
            pool.put(name, {"token": name, "state": "done", "attempt": 1, "exit_code": 0, "changed": True})
        took, rss, _ = cli(d, "status", run)
        rows.append(("status (1,000 changed)", took, rss, "incremental sync after a quiet one"))
        time.sleep(2.5)
        again = Pool(str(pool_dir))  # another launcher: second attempts, their results
        for i in range(1, 1001):
            name = f"t{i * (n // 1000) - 2}"
            handle = again.claim(name, 2, dump({"token": name, "state": "locked", "attempt": 2, "pilot": "p2"}),
                                 keep=True)
            again.append(handle, name, {"token": name, "state": "done", "attempt": 2, "exit_code": 0, "pilot": "p2"})
        took, rss, _ = cli(d, "status", run)
        rows.append(("status (1,000 attempts)", took, rss, "incremental sync after 1,000 claims and results"))
        took, rss, _ = cli(d, "report", run, "-o", "r.html")
        rows.append(("report", took, rss, f"{(d / 'r.html').stat().st_size / 1e3:.0f} kB page"))
        all_files = sum(len(fs) for _, _, fs in os.walk(pool_dir))
        inodes = len({os.lstat(os.path.join(r, f)).st_ino for r, _, fs in os.walk(pool_dir) for f in fs})
        drain = drain_bench(d / "drain", a.drain)
        rows.append(("launcher drain", drain[0], drain[1], f"{a.drain:,} null tasks: {a.drain / drain[0]:.0f}/s"))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"{n:,} tokens, {len(os.sched_getaffinity(0))} cores:")
    print(f"  {'step':<24} {'time':>9} {'peak RSS':>10}")
    for what, took, rss, note in rows:
        print(f"  {what:<24} {took:8.1f}s {rss:8.0f} MB   {note}")
    print(f"  pool files: {files:,} state files and {all_files - files:,} others for {n:,} tokens "
          f"({all_files / n:.3f} per token); {inodes:,} inodes")


class Rows(list):
    """The table's rows, each also printed as it comes (a million-token run takes minutes)."""

    def append(self, row) -> None:
        super().append(row)
        what, took, rss, note = row
        print(f"  ... {what}: {took:.1f} s, {rss:.0f} MB, {note}", file=sys.stderr, flush=True)


def drain_bench(root: Path, n: int) -> tuple[float, float]:
    pool = Pool.create(str(root), {"run": "drain", "lock_timeout": 300, "shard_width": shard_width(n)})
    pool.add_defs([{"name": f"t{i}", "command": "true", "walltime": 1, "rank": i} for i in range(n)])
    pool.write_plan("p1", [f"t{i}" for i in range(n)])
    t = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "pilotflow" / "launcher.py"), "run", str(root), "--pilot", "p1",
                    "--cores", str(len(os.sched_getaffinity(0)))], check=True, capture_output=True)
    took = time.perf_counter() - t
    return took, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


if __name__ == "__main__":
    main()
