#!/usr/bin/env python3
"""The example Snakemake workflow on the local Slurm: `--executor pilotflow` vs `--executor slurm`.

    python benchmarks/snakemake_bench.py [--sims 200] [--params fast|default|both]
                                          (root; starts its own 3-node Slurm)

workflows/snakemake (SIMS "simulate" jobs -> SIMS/4 "aggregate" -> 1 "report", each a
0.2 s shell command) is run twice per Slurm configuration, from a fresh copy:
  pilotflow  snakemake --executor pilotflow --pilotflow-resources slurm.toml -j 500
  slurm      snakemake --executor slurm -j 500 (snakemake-executor-plugin-slurm: one sbatch per
             job) with --slurm-status-command squeue (no slurmdbd here), --slurm-no-account,
             --seconds-between-status-checks 1 and --slurm-init-seconds-before-status-checks 1
             (its fastest polling; its default waits 40 s before the first check)
Reported: makespan (snakemake start to exit), Slurm jobs (sbatch calls, counted by a wrapper
in front of the Slurm commands, as benchmarks/e2e_slurm.py does) and all Slurm commands (note:
snakemake-executor-plugin-slurm runs `scontrol show config` when Snakemake loads it, which
every Snakemake process does, each job's own included, whatever the executor).
"default" uses Slurm's default scheduling parameters (as production clusters run), "fast" the
test settings (batch_sched_delay=0, sched_min_interval=0, bf_interval=1).

Only one Slurm may run on this machine (a second start stops the first): if a slurmctld runs,
this waits for it to go (every 30 s, up to 20 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.daemons.slurm import SlurmCluster, procs_named  # noqa: E402

COMMANDS = ("sbatch", "squeue", "sacct", "scancel", "scontrol", "sinfo", "srun")
EXECUTORS = {
    "pilotflow": ["--executor", "pilotflow", "--pilotflow-resources", "slurm.toml"],
    "slurm": ["--executor", "slurm", "--slurm-status-command", "squeue", "--slurm-no-account",
              "--seconds-between-status-checks", "1", "--slurm-init-seconds-before-status-checks", "1"],
}


def wait_for_free_slurm(limit_s: float = 1200, every_s: float = 30) -> float:
    """Wait while another Slurm runs here; returns the seconds waited."""
    t = time.time()
    while procs_named("slurmctld"):
        if time.time() - t > limit_s:
            sys.exit(f"a slurmctld still runs after {limit_s / 60:.0f} minutes (pids {sorted(procs_named('slurmctld'))}); "
                     "run this benchmark when it is gone")
        print(f"waiting for the running slurmctld to end ({time.time() - t:.0f} s so far)", flush=True)
        time.sleep(every_s)
    return time.time() - t


def wrappers(d: Path, log: Path, conf: str) -> str:
    """A bin directory whose Slurm commands log their name, then run the real ones.

    They also set SLURM_CONF when it is missing: the test Slurm's config is found through that
    variable (real clusters have /etc/slurm/slurm.conf), and snakemake-executor-plugin-slurm's
    job step drops every SLURM_* variable before its inner `srun`."""
    d.mkdir(parents=True, exist_ok=True)
    for c in COMMANDS:
        real = shutil.which(c)
        if real:
            (d / c).write_text(f'#!/bin/sh\necho {c} >> "{log}"\nexport SLURM_CONF="${{SLURM_CONF:-{conf}}}"\n'
                               f'exec {real} "$@"\n')
            (d / c).chmod(0o755)
    return str(d)


class Failed(Exception):
    """A run that did not complete: its directory is kept for a look."""


def run_one(executor: str, sims: int, work: Path, env: dict) -> dict:
    shutil.copytree(ROOT / "workflows" / "snakemake", work,
                    ignore=shutil.ignore_patterns(".snakemake", ".pilotflow", "results"))
    log = work / "slurm-commands.log"
    env = {**env, "PATH": wrappers(work / "bin", log, env["SLURM_CONF"]) + ":" + os.environ["PATH"]}
    argv = [sys.executable, "-m", "snakemake", *EXECUTORS[executor], "-j", "500", "--config", f"sims={sims}"]
    t = time.time()
    r = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    makespan = time.time() - t
    (work / "snakemake.out").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        raise Failed(f"{executor}: snakemake exited {r.returncode}; see {work / 'snakemake.out'}:\n{r.stderr[-3000:]}")
    expected = str(sum(i * i for i in range(sims)))
    assert (work / "results" / "report.txt").read_text().strip() == expected
    cmds = log.read_text().split() if log.exists() else []
    m = re.search(r"pilotflow: (\d+) of (\d+) job\(s\) ran their shell command directly", r.stderr)
    return {"executor": executor, "makespan_s": round(makespan, 1), "slurm_jobs": cmds.count("sbatch"),
            "direct": f"{m.group(1)} of {m.group(2)}" if m else "-",
            "slurm_commands": len(cmds), "by_command": {c: cmds.count(c) for c in COMMANDS if c in cmds},
            "jobs": sims + sims // 4 + 1}


def own(row: dict) -> int:
    """Slurm commands but `scontrol`, which the installed slurm plugin runs in every Snakemake process."""
    return row["slurm_commands"] - row["by_command"].get("scontrol", 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sims", type=int, default=200, help="simulate jobs (a multiple of 4)")
    ap.add_argument("--params", choices=("fast", "default", "both"), default="both",
                    help="Slurm scheduling parameters to run with")
    ap.add_argument("--json", type=Path, help="also write the rows to this file")
    ap.add_argument("--only", choices=tuple(EXECUTORS), help="run one executor (no comparison)")
    a = ap.parse_args()
    if a.only != "pilotflow":
        import importlib.util
        if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
            sys.exit("the peer is not installed: pip install snakemake-executor-plugin-slurm==2.8.0 "
                     "(or run with --only pilotflow)")
    waited = wait_for_free_slurm()
    if waited >= 1:
        print(f"waited {waited:.0f} s for another Slurm to end", flush=True)
    base = Path(tempfile.mkdtemp(prefix="pf-snakemake-bench-"))
    params = ["default", "fast"] if a.params == "both" else [a.params]
    cluster = SlurmCluster.start(base / "slurm", nodes=3, cpus_per_node=4, fast=params[0] == "fast")
    rows = []
    try:
        for p in params:
            if cluster.fast != (p == "fast"):
                cluster.restart(fast=p == "fast")
            for executor in [a.only] if a.only else EXECUTORS:
                row = dict(run_one(executor, a.sims, base / f"{executor}-{p}", {**os.environ, **cluster.env}),
                           params=p)
                rows.append(row)
                print(f"{p:<8} {executor:<10} makespan {row['makespan_s']:7.1f} s  Slurm jobs {row['slurm_jobs']:4d}  "
                      f"Slurm commands {row['slurm_commands']:5d} {row['by_command']}  jobs run directly {row['direct']}",
                      flush=True)
    except Failed as e:
        sys.exit(f"{e}\n(kept {base})")
    finally:
        cluster.stop()
    shutil.rmtree(base, ignore_errors=True)
    if a.only:
        return
    jobs = rows[0]["jobs"]
    print(f"\n{jobs} Snakemake jobs ({a.sims} simulate, {a.sims // 4} aggregate, 1 report) on 3 nodes x 4 CPUs:")
    for p in params:
        pf = next(r for r in rows if r["params"] == p and r["executor"] == "pilotflow")
        sl = next(r for r in rows if r["params"] == p and r["executor"] == "slurm")
        print(f"  {p:<8} Slurm parameters: makespan {pf['makespan_s']:.1f} s vs {sl['makespan_s']:.1f} s "
              f"({sl['makespan_s'] / pf['makespan_s']:.1f}x shorter), Slurm jobs {pf['slurm_jobs']} vs "
              f"{sl['slurm_jobs']} ({sl['slurm_jobs'] / max(pf['slurm_jobs'], 1):.0f}x fewer), Slurm commands "
              f"{pf['slurm_commands']} vs {sl['slurm_commands']} (without the scontrol of every Snakemake process "
              f"loading the slurm plugin: {own(pf)} vs {own(sl)}); pilotflow ran {pf['direct']} jobs' shell "
              f"commands directly")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
