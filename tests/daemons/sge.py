"""A real Son of Grid Engine 8.1.9 cell (qmaster + one execd) on this host.

Why: pilotflow's SGE backend must be tested against real qsub/qstat/qdel.
Debian's gridengine packages configure the system cell ``default`` under
SGE_ROOT=/var/lib/gridengine with its spool in /var/spool/gridengine, so unlike
Slurm the cell is machine-wide: ``workdir`` only holds the config files we load
with qconf, the daemons' stdout and the probe output. The daemons are started
directly in the foreground (SGE_ND) as our children, not via the init script
(which would start a second qmaster), and tagged through their environment so a
later start can stop daemons left by a test process that died.
"""
from __future__ import annotations

import os
import socket
import subprocess
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from tests.daemons.slurm import (MARKER, log_tail, make_traversable, procs_named,
                                 stale, tagged_pids, terminate)

SGE_ROOT = Path("/var/lib/gridengine")
SGE_BIN = Path("/usr/lib/gridengine")
SPOOL = Path("/var/spool/gridengine")
TAG = "PILOTFLOW_TEST_SGE"  # environment tag: the workdir a daemon belongs to

PE_SMP = """pe_name smp
slots 9999
user_lists NONE
xuser_lists NONE
start_proc_args NONE
stop_proc_args NONE
allocation_rule $pe_slots
control_slaves FALSE
job_is_first_task TRUE
urgency_slots min
accounting_summary FALSE
qsort_args NONE
"""
QUEUE_LIMITS = "".join(f"{p}_{r} INFINITY\n" for r in (
    "rt", "cpu", "fsize", "data", "stack", "core", "rss", "vmem") for p in "sh")
_LIVE: dict[Path, "SgeCluster"] = {}  # cells started by this process, by workdir


def _stop_tagged(match: Callable[[Path], bool]) -> None:
    """Terminate processes whose tag ``match``es: jobs first, daemons last.
    The tag is inherited by sge_shepherd and by the jobs themselves."""
    daemons = {*procs_named("sge_qmaster"), *procs_named("sge_execd")}
    tagged = tagged_pids(TAG, match)
    terminate([p for p in tagged if p not in daemons], timeout=3)
    terminate([p for p in tagged if p in daemons], timeout=20)


class SgeCluster:
    """Handle on the running qmaster/execd; create it with ``SgeCluster.start``."""

    def __init__(self, workdir: Path, slots: int) -> None:
        self.workdir = Path(workdir).resolve()
        self.slots = slots
        self.host = socket.gethostname()
        self.env: dict[str, str] = {
            "SGE_ROOT": str(SGE_ROOT), "SGE_CELL": "default",
            "PATH": f"/usr/bin:{SGE_BIN}:{os.environ.get('PATH', '/bin')}"}
        self._qmaster: subprocess.Popen | None = None
        self._execd: subprocess.Popen | None = None

    @classmethod
    def start(cls, workdir: Path, slots: int = 4, timeout: float = 60.0) -> "SgeCluster":
        """Configure the cell, start qmaster and execd, and wait for a probe job.

        Daemons of this workdir or of a dead test process are stopped first; a
        qmaster we did not start makes this refuse (the cell is machine-wide)."""
        cluster = cls(workdir, slots)
        if cluster.workdir in _LIVE:
            _LIVE.pop(cluster.workdir).stop()
        cluster.cleanup_leftovers(cluster.workdir)
        foreign = {pid: argv for name in ("sge_qmaster", "sge_execd")
                   for pid, argv in procs_named(name).items()}
        if foreign:
            raise RuntimeError(f"Grid Engine daemons not started by tests/daemons are "
                               f"running: {foreign}; stop them first (one cell per machine)")
        cluster.workdir.mkdir(parents=True, exist_ok=True)
        make_traversable(cluster.workdir)
        (cluster.workdir / MARKER).write_text(f"{os.getpid()}\n")
        common = SGE_ROOT / "default" / "common"
        # qmaster sees clients on 127.0.0.1 as "localhost": alias it to the host
        (common / "host_aliases").write_text(f"{cluster.host} localhost\n")
        (common / "act_qmaster").write_text(f"{cluster.host}\n")
        _LIVE[cluster.workdir] = cluster
        try:
            cluster.start_qmaster(timeout)
            cluster._configure()
            cluster._start_execd()
            cluster._wait_probe(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @staticmethod
    def cleanup_leftovers(workdir: Path | None = None) -> None:
        """Stop daemons, shepherds and jobs of ``workdir`` or of a dead owner."""
        _stop_tagged(lambda tag: stale(tag, workdir))

    def stop(self) -> None:
        """Stop execd, the jobs it runs and qmaster; the cell's spool stays."""
        if self._execd is not None:
            terminate([self._execd.pid], timeout=10)
            self._execd.wait()
            self._execd = None
        self.stop_qmaster()
        _stop_tagged(lambda tag: tag == self.workdir)
        _LIVE.pop(self.workdir, None)

    def stop_qmaster(self, kill: bool = False) -> None:
        """Stop sge_qmaster only, for fault tests (clients then fail to connect).

        A clean SIGTERM shutdown takes ~8 s in SGE 8.1.9; ``kill=True`` sends
        SIGKILL (a crash; the BerkeleyDB spool recovered fine in our tests)."""
        if self._qmaster is not None:
            terminate([self._qmaster.pid], timeout=0 if kill else 20)
            self._qmaster.wait()
            self._qmaster = None

    def start_qmaster(self, timeout: float = 60.0, restart_execd: bool = True) -> None:
        """Start sge_qmaster and wait until ``qconf`` answers.

        A running execd re-registers with a restarted qmaster only after
        ~25-35 s (new jobs wait that long) and once, after an immediate
        restart, gave up for good; so by default execd is restarted too,
        keeping its spool: running jobs are re-adopted and finish, but their
        end reached qstat only ~60 s after the restart in our tests."""
        self._qmaster = self._spawn("sge_qmaster")
        deadline = time.monotonic() + timeout
        while self.run(["qconf", "-sh"], timeout=10).returncode != 0:
            if self._qmaster.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sge_qmaster not answering (exit {self._qmaster.poll()})"
                                   f" after {timeout:.0f} s\n" + self._tails())
            time.sleep(0.3)
        if restart_execd and self._execd is not None:
            terminate([self._execd.pid])
            self._execd.wait()
            self._start_execd(fresh=False)

    def run(self, argv: list[str], timeout: float = 60.0, **kw: Any) -> subprocess.CompletedProcess:
        """Run a Grid Engine command against this cell (text output, no check)."""
        env = {**os.environ, **self.env, **kw.pop("env", {})}
        return subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    # ------------------------------------------------------------------ internals
    def _spawn(self, daemon: str) -> subprocess.Popen:
        """Run a daemon in the foreground (SGE_ND) as our child, in its own session."""
        with open(self.workdir / f"{daemon}.out", "ab") as out:
            return subprocess.Popen(
                [str(SGE_BIN / daemon)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, cwd="/",
                env={**os.environ, **self.env, "SGE_ND": "true", TAG: str(self.workdir)})

    def _qconf(self, *args: str, ok_if: str = "") -> None:
        res = self.run(["qconf", *args], timeout=30)
        out = res.stdout + res.stderr
        if res.returncode != 0 and not (ok_if and ok_if in out):
            raise RuntimeError(f"qconf {' '.join(args)} failed: {out}\n{self._tails()}")

    def _write(self, name: str, text: str) -> str:
        path = self.workdir / name
        path.write_text(text)
        return str(path)

    def _configure(self) -> None:
        """Idempotent: the cell's BerkeleyDB spool keeps config across runs."""
        h = self.host
        for flag in ("-ah", "-as"):
            self._qconf(flag, h, ok_if="already exists")
        # root's jobs go to Eqw unless min_uid/min_gid are 0; the file must be
        # named "global"; fast flushes so qacct sees jobs within a second.
        conf = self.run(["qconf", "-sconf"]).stdout
        conf = "\n".join(_set(line, {"min_uid": "0", "min_gid": "0",
                                      "load_report_time": "00:00:40"})
                         for line in conf.splitlines() if not line.startswith("#"))
        conf = conf.replace("flush_time=00:00:15", "flush_time=00:00:01")
        self._qconf("-Mconf", self._write("global", conf + "\n"))
        sched = self.run(["qconf", "-ssconf"]).stdout.splitlines()
        fast = {"schedule_interval": "0:0:1", "flush_submit_sec": "1",
                "flush_finish_sec": "1"}
        self._qconf("-Msconf", self._write("sched.conf",
                                           "\n".join(_set(ln, fast) for ln in sched) + "\n"))
        self._qconf("-Ae", self._write("exechost", f"hostname {h}\nload_scaling NONE\n"
                    "complex_values NONE\nuser_lists NONE\nxuser_lists NONE\n"
                    "projects NONE\nxprojects NONE\nusage_scaling NONE\n"
                    "report_variables NONE\n"), ok_if="already exists")
        have = self.run(["qconf", "-spl"]).stdout.split()
        self._qconf("-Mp" if "smp" in have else "-Ap", self._write("smp.pe", PE_SMP))
        queue = (f"qname all.q\nhostlist {h}\nseq_no 0\nload_thresholds NONE\n"
                 "suspend_thresholds NONE\nnsuspend 1\nsuspend_interval 00:05:00\n"
                 "priority 0\nmin_cpu_interval 00:05:00\nprocessors UNDEFINED\n"
                 "qtype BATCH INTERACTIVE\nckpt_list NONE\npe_list smp\nrerun FALSE\n"
                 f"slots {self.slots}\ntmpdir /tmp\nshell /bin/sh\nprolog NONE\n"
                 "epilog NONE\nshell_start_mode posix_compliant\nstarter_method NONE\n"
                 "suspend_method NONE\nresume_method NONE\nterminate_method NONE\n"
                 "notify 00:00:60\nowner_list NONE\nuser_lists NONE\nxuser_lists NONE\n"
                 "subordinate_list NONE\ncomplex_values NONE\nprojects NONE\n"
                 "xprojects NONE\ncalendar NONE\ninitial_state default\n"
                 + QUEUE_LIMITS)
        have = self.run(["qconf", "-sql"]).stdout.split()
        self._qconf("-Mq" if "all.q" in have else "-Aq", self._write("all.q", queue))

    def _start_execd(self, fresh: bool = True) -> None:
        """Start sge_execd; ``fresh`` forgets jobs of earlier runs first (else
        jobs cut off by a crash stay in state t/dt forever, holding slots)."""
        if fresh:
            self.run(["qdel", "-f", "-u", "*"], timeout=30)
            shutil.rmtree(SPOOL / "execd", ignore_errors=True)
        (SPOOL / "execd").mkdir(parents=True, exist_ok=True)
        shutil.chown(SPOOL / "execd", "sgeadmin", "sgeadmin")
        self._execd = self._spawn("sge_execd")

    def _wait_probe(self, timeout: float) -> None:
        """A real job must run: proves execd registered and root may run jobs."""
        deadline = time.monotonic() + timeout
        res = None
        while time.monotonic() < deadline:
            if self._execd is not None and self._execd.poll() is not None:
                raise RuntimeError(f"sge_execd exited with {self._execd.returncode}\n"
                                   + self._tails())
            left = max(5.0, deadline - time.monotonic())
            res = self.run(["qsub", "-b", "y", "-N", "probe", "-sync", "y", "-o", "/dev/null",
                            "-e", "/dev/null", "true"], timeout=left)
            if res.returncode == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"SGE probe job did not run in {timeout:.0f} s: "
                           f"{res.stdout if res else ''}{res.stderr if res else ''}\n"
                           + self.run(["qstat", "-f"]).stdout + self._tails())

    def _tails(self) -> str:
        logs = [SPOOL / "qmaster" / "messages", *SPOOL.glob("execd/*/messages"),
                self.workdir / "sge_qmaster.out", self.workdir / "sge_execd.out"]
        return "\n".join(log_tail(p, 15) for p in logs if p.exists())


def _set(line: str, values: dict[str, str]) -> str:
    """Replace the value of a ``key value`` config line whose key is in ``values``."""
    key = line.split(None, 1)[0] if line.strip() else ""
    return f"{key} {values[key]}" if key in values else line
