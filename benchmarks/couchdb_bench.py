#!/usr/bin/env python3
"""Null tasks (`true`) per second through two launchers: the file pool vs the CouchDB pool.

    python benchmarks/couchdb_bench.py [--tasks 2000] [--repeat 3]

Side by side in one run, alternating, each repeated and the median kept (the machine is
shared and noisy: compare the ratio). Both runs use the same two planned pilots (half the
tokens each, then stealing), one launcher process each with one core, started together and
timed from their start to the last one's exit:
  files    the run directory's pool (one state file per token, output packed)
  couchdb  a CouchDB-API server on loopback (pouchdb-server 4.2.0 in persistent mode, the
           tests' pinned install): a PUT to claim, a PUT with the output attached to finish
The CouchDB figure is the server's: pouchdb-server is single-threaded JavaScript over
LevelDB sharing these two cores with the launchers; a CouchDB cluster is another machine.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pilotflow.launcher import CouchPool, Pool  # noqa: E402
from tests.daemons.couchdb import PouchServer, install  # noqa: E402

LAUNCHER = ROOT / "pilotflow" / "launcher.py"


def run_pool(root: Path, pool, n: int) -> float:
    names = [f"t{i:06d}" for i in range(n)]
    pool.add_defs([{"name": m, "command": "true", "rank": i, "walltime": 1} for i, m in enumerate(names)])
    for k in range(2):
        pool.write_plan(f"p{k + 1}", names[k::2])
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(LAUNCHER), "run", str(root), "--pilot", f"p{k + 1}",
                               "--cores", "1", "--poll", "0.2", "--steal-delay", "0.2"]) for k in range(2)]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit("a launcher failed")
    rate = n / (time.perf_counter() - t)
    states = pool.states()
    done = sum(1 for d in states.values() if d["state"] == "done")
    if done != n:
        raise SystemExit(f"only {done} of {n} tokens done")
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    prog = install()
    if isinstance(prog, str):
        raise SystemExit(prog)
    tmp = Path(tempfile.mkdtemp(prefix="pf-couch-bench-"))
    srv = PouchServer.start(prog, tmp / "server")
    rates: dict[str, list[float]] = {"files": [], "couchdb": []}
    try:
        for r in range(a.repeat):
            d = tmp / f"files{r}"
            rates["files"].append(run_pool(d, Pool.create(str(d), {"run": "bench", "lock_timeout": 300}), a.tasks))
            d = tmp / f"couch{r}"
            spec = {"url": srv.url, "database": "b" + uuid.uuid4().hex[:10]}
            rates["couchdb"].append(run_pool(d, CouchPool.create(str(d), {"run": "bench", "lock_timeout": 300,
                                                                         "couchdb": spec}), a.tasks))
            print(f"round {r + 1}: files {rates['files'][-1]:.0f}/s, couchdb {rates['couchdb'][-1]:.0f}/s",
                  flush=True)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    f, c = statistics.median(rates["files"]), statistics.median(rates["couchdb"])
    print(f"\n{a.tasks} null tasks, 2 launchers x 1 core, median of {a.repeat}:")
    print(f"  file pool     {f:8.0f} tasks/s")
    print(f"  CouchDB pool  {c:8.0f} tasks/s   ({c / f:.2f} of the file pool)")


if __name__ == "__main__":
    main()
