"""A real Slurm 22.05 cluster of several slurmd "nodes" on this one host.

Why: pilotflow's Slurm backend must be tested against real sbatch/squeue/
scontrol output, not mocks. Debian's build supports several slurmd on one host
(MULTIPLE_SLURMD), so ``NodeName=n[1-N]`` with one ``slurmd -N nX`` each gives
multi-node jobs, ``SLURM_JOB_NODELIST`` and ``srun`` fan-out as on a cluster.

Everything (config, state, spool, logs, pid files) lives in ``workdir``; the
config is found through the ``SLURM_CONF`` environment variable (see ``.env``),
which sbatch, squeue, scontrol, scancel, sinfo and srun (also inside jobs, as
sbatch exports the environment) all honour, so /etc/slurm is never written.
munged is shared system-wide: it is started (as user munge) when not running and
stopped again by ``stop()`` only if this instance started it and no other
cluster of ours is running.

Every daemon runs in the foreground as our child, tagged with its workdir in
its environment, so a later start can tell leftovers of a crashed test process
from a foreign Slurm. The process helpers at the top (also used by sge.py and
sshd.py) read /proc directly: no psutil in the test dependencies.
"""
from __future__ import annotations

import os
import shutil
import stat
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

MARKER = ".pilotflow-test-daemon"  # marks a workdir whose daemons we may kill
GPUS_PER_NODE = 4  # count-only GPU GRES on every simulated node


def log_tail(path: Path, lines: int = 25) -> str:
    """Last ``lines`` of a log, for error messages that explain a failed start."""
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"--- {path}: unreadable ({exc})"
    return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text)


def make_traversable(path: Path) -> None:
    """Let other users reach ``path``: pytest's basetemp is mode 0700, but the
    non-root test user must read slurm.conf / write job output below it.
    Adds o+x (not o+r) to ancestors we own, up to the first one we do not."""
    for p in [Path(path), *Path(path).parents]:
        try:
            st = p.stat()
        except OSError:
            return
        if st.st_uid != os.getuid() or p == Path("/") or p == Path.home():
            return
        if not st.st_mode & 0o001:
            p.chmod(st.st_mode | 0o001)


def procs_named(name: str) -> dict[int, list[str]]:
    """{pid: argv} of live processes whose argv[0] basename is ``name``."""
    found: dict[int, list[str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # daemons retitle themselves ("slurmstepd: [1.batch]"): compare the first word
        first = argv[0].decode(errors="replace").split(" ", 1)[0] if argv and argv[0] else ""
        if first and os.path.basename(first).rstrip(":") == name:
            found[int(entry.name)] = [a.decode(errors="replace") for a in argv if a]
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def terminate(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM, wait up to ``timeout`` s for exit, then SIGKILL the rest."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        pids = [p for p in pids if pid_alive(p)]
        if not pids:
            return


def free_ports(count: int, start: int = 16817) -> list[int]:
    """``count`` consecutive free TCP ports (Slurm's Port=[a-b] needs a range)."""
    def free(port: int) -> bool:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            return sock.connect_ex(("127.0.0.1", port)) != 0 and not sock.bind(
                ("127.0.0.1", port))
    for base in range(start, 60000, count + 1):
        try:
            if all(free(p) for p in range(base, base + count)):
                return list(range(base, base + count))
        except OSError:
            continue
    raise RuntimeError("no free port range found")


def stale(tag: Path, workdir: Path | None, tagged: bool = True) -> bool:
    """May daemons of directory ``tag`` be stopped by a start in ``workdir``?
    Yes for the same workdir, or when the test process owning it is gone. A
    missing marker means "ours, its dir deleted" only for ``tagged`` processes."""
    try:
        owner = int((tag / MARKER).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return tagged
    return tag == workdir or not pid_alive(owner)


def tagged_pids(var: str, match: Callable[[Path], bool] = lambda tag: True) -> list[int]:
    """Pids whose environment has ``var=DIR`` with ``match(DIR)``: we start each
    daemon with such a tag naming its workdir (jobs usually inherit it)."""
    found, prefix = [], f"{var}=".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        tags = [e[len(prefix):].decode() for e in env if e.startswith(prefix)]
        if tags and int(entry.name) != os.getpid() and match(Path(tags[0])):
            found.append(int(entry.name))
    return found


_LIVE: dict[Path, "SlurmCluster"] = {}  # clusters started by this process
TAG = "PILOTFLOW_TEST_SLURM"  # environment tag: the workdir a daemon belongs to


class SlurmCluster:
    """Handle on the running daemons; create it with ``SlurmCluster.start``."""

    def __init__(self, workdir: Path, nodes: int, cpus_per_node: int, fast: bool) -> None:
        self.workdir = Path(workdir).resolve()
        self.nodes: list[str] = [f"n{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.fast = fast
        self.conf_path = self.workdir / "slurm.conf"
        self.env: dict[str, str] = {"SLURM_CONF": str(self.conf_path)}
        self._ports = free_ports(nodes + 1)
        self._ctld: subprocess.Popen | None = None
        self._slurmd: dict[str, subprocess.Popen] = {}
        self._munged: subprocess.Popen | None = None

    # ----------------------------------------------------------------- life cycle
    @classmethod
    def start(cls, workdir: Path, nodes: int = 3, cpus_per_node: int = 4,
              fast: bool = True) -> "SlurmCluster":
        """Write the config, start munged/slurmctld/slurmd and wait for idle nodes.

        A previous cluster in the same workdir, and daemons left by a test
        process that died, are stopped first, so a crashed pytest session does
        not block the next; a slurmctld we did not start makes this refuse."""
        workdir = Path(workdir).resolve()
        if workdir in _LIVE:
            _LIVE.pop(workdir).stop()
        cls.cleanup_leftovers(workdir)
        foreign = set(procs_named("slurmctld")) - set(tagged_pids(TAG))
        if foreign:
            raise RuntimeError(
                f"a slurmctld not started by tests/daemons is running (pids {foreign}); "
                "stop it first (it would fight over nodes and ports)")
        cluster = _LIVE[workdir] = cls(workdir, nodes, cpus_per_node, fast)
        try:
            cluster._prepare_dirs()
            cluster._write_conf()
            cluster._ensure_munged()
            cluster._start_daemons(clear_state=True)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @staticmethod
    def cleanup_leftovers(workdir: Path | None = None) -> None:
        """Stop daemons and job steps of ``workdir`` or of a dead test process."""
        kill_job_steps(lambda path: Path(path).name.startswith("slurmd-")
                       and stale(Path(path).parent.parent, workdir, tagged=False))
        terminate(tagged_pids(TAG, lambda tag: stale(tag, workdir)))

    def restart(self, fast: bool | None = None) -> None:
        """Rewrite the config (optionally switching ``fast``) and restart all
        daemons, keeping job state; waits until the nodes respond again."""
        if fast is not None:
            self.fast = fast
        self._stop_daemons()
        self._write_conf()
        self._ensure_munged()
        self._start_daemons(clear_state=False)

    def stop(self) -> None:
        """Stop daemons and any job processes (slurmstepd trees) they left."""
        self._stop_daemons()
        self._kill_job_steps(None)
        _LIVE.pop(self.workdir, None)
        if self._munged is not None and not procs_named("slurmctld"):
            terminate([self._munged.pid])
            self._munged.wait()
            self._munged = None

    def stop_node(self, name: str, kill_jobs: bool = True) -> None:
        """Kill one slurmd (SIGKILL, like a crashed node) and, by default, the
        job steps on it; slurmctld notices after SlurmdTimeout (20 s)."""
        proc = self._slurmd.pop(name)
        proc.kill()
        proc.wait()
        if kill_jobs:
            self._kill_job_steps(name)

    def start_node(self, name: str, timeout: float = 60.0) -> None:
        """Start one slurmd again and wait until slurmctld sees it responding. The node is
        first set DOWN, as an admin does with a crashed node: slurmctld otherwise keeps it
        "completing" the dead job until SlurmdTimeout runs out, and only then (ReturnToService=2)
        takes a registration back — some 30 s of nothing per test."""
        self.run(["scontrol", "update", f"NodeName={name}", "State=DOWN", "Reason=restarted by the tests"])
        self._start_slurmd(name)
        self._wait_nodes([name], timeout)

    def run(self, argv: list[str], timeout: float = 60.0, **kw: Any) -> subprocess.CompletedProcess:
        """Run a Slurm command against this cluster (text output, no check)."""
        env = {**os.environ, **self.env, **kw.pop("env", {})}
        return subprocess.run(argv, env=env, capture_output=True, text=True,
                              timeout=timeout, **kw)

    # ------------------------------------------------------------------ internals
    def _prepare_dirs(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        make_traversable(self.workdir)
        (self.workdir / MARKER).write_text(f"{os.getpid()}\n")
        shutil.rmtree(self.workdir / "state", ignore_errors=True)
        for sub in ("state", "spool", "log", "run"):
            (self.workdir / sub).mkdir(exist_ok=True)
            (self.workdir / sub).chmod(0o755)

    def _write_conf(self) -> None:
        w, n, ports = self.workdir, len(self.nodes), self._ports
        sched = ("SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1\n"
                 if self.fast else "")
        node_line = (f"NodeName=n[1-{n}] NodeHostname=localhost NodeAddr=127.0.0.1 "
                     f"Port=[{ports[1]}-{ports[n]}] CPUs={self.cpus_per_node} "
                     f"RealMemory=4000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN")
        # GPUs that are not there: Slurm 22.05 drops GPUs without device files, so each is a
        # character device node of our own (never opened; no cgroups here) — enough for Slurm
        # to schedule them and set CUDA_VISIBLE_DEVICES in jobs, as on a GPU cluster
        dev = w / "dev"
        dev.mkdir(exist_ok=True)
        for i in range(GPUS_PER_NODE):
            node = dev / f"nvidia{i}"
            if not node.exists():
                os.mknod(node, stat.S_IFCHR | 0o644, os.makedev(195, i))
        (w / "gres.conf").write_text(f"Name=gpu File={dev}/nvidia[0-{GPUS_PER_NODE - 1}]\n")
        (w / "gres.conf").chmod(0o644)
        conf = f"""# written by tests/daemons/slurm.py
ClusterName=pilotflow
SlurmctldHost=localhost
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool/%n
SlurmctldPidFile={w}/run/slurmctld.pid
SlurmdPidFile={w}/run/slurmd-%n.pid
SlurmctldLogFile={w}/log/slurmctld.log
SlurmdLogFile={w}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=20
KillWait=5
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={w}/log/jobcomp.txt
{sched}{node_line}
PartitionName=debug Nodes=n[1-{n}] Default=YES MaxTime=INFINITE State=UP
"""
        self.conf_path.write_text(conf)
        self.conf_path.chmod(0o644)

    def _ensure_munged(self) -> None:
        """munged must run as user munge with /run/munge present; run it in the
        foreground as our child so stop() can reap it (no <defunct> left)."""
        if self._munged is not None and self._munged.poll() is None or procs_named("munged"):
            return
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self._munged = self._spawn(["/usr/sbin/munged", "-F"], "munged.out",
                                   user="munge", group="munge", extra_groups=[])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ok = subprocess.run("munge -n | unmunge", shell=True, capture_output=True)
            if ok.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("munged did not come up (munge -n | unmunge fails)\n"
                           + log_tail(self.workdir / "log" / "munged.out"))

    def _spawn(self, argv: list[str], log: str, **kw) -> subprocess.Popen:
        """Start a foreground daemon as our child (so it is reaped), in its own
        session (so Ctrl-C in pytest does not kill it before the teardown)."""
        with open(self.workdir / "log" / log, "ab") as out:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, **self.env, TAG: str(self.workdir)},
                                    **kw)

    def _start_slurmd(self, name: str) -> None:
        self._slurmd[name] = self._spawn(
            ["slurmd", "-D", "-N", name, "-f", str(self.conf_path)], f"slurmd-{name}.out")

    def _start_daemons(self, clear_state: bool) -> None:
        flags = ["-c"] if clear_state else ["-i"]
        self._ctld = self._spawn(["slurmctld", "-D", *flags, "-f", str(self.conf_path)],
                                 "slurmctld.out")
        for name in self.nodes:
            self._start_slurmd(name)
        self._wait_nodes(self.nodes, 60.0)

    def _wait_nodes(self, names: list[str], timeout: float) -> None:
        """Wait until every named node is up (idle/mixed/allocated, responding)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15)
            last = res.stdout + res.stderr
            states = dict(line.split(None, 1) for line in res.stdout.splitlines()
                          if len(line.split()) == 2)
            if all(states.get(n, "").strip() in ("idle", "mixed", "allocated")
                   for n in names):
                return
            time.sleep(0.3)
        raise RuntimeError(f"Slurm nodes {names} not up after {timeout:.0f} s; "
                           f"last sinfo:\n{last}\n{self._tails()}")

    def _check_alive(self) -> None:
        for name, proc in [("slurmctld", self._ctld), *self._slurmd.items()]:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self._tails()}")

    def _tails(self) -> str:
        return "\n".join(log_tail(p, 15) for p in sorted((self.workdir / "log").iterdir()))

    def _stop_daemons(self) -> None:
        procs = [p for p in [self._ctld, *self._slurmd.values()] if p is not None]
        terminate([p.pid for p in procs])
        for p in procs:
            p.wait()
        self._ctld, self._slurmd = None, {}

    def _kill_job_steps(self, node: str | None) -> None:
        """Kill the job step trees of this cluster (or of one node)."""
        names = [node] if node else self.nodes
        logs = {str(self.workdir / "log" / f"slurmd-{n}.log") for n in names}
        kill_job_steps(lambda path: path in logs)


def kill_job_steps(match: Callable[[str], bool]) -> None:
    """Kill slurmstepd processes (and their jobs) having an open file ``match``es.

    slurmstepd re-parents to init and overwrites its environment with its
    title, so it is recognised by the slurmd log file it keeps open."""
    def open_files(pid: int) -> list[str]:
        try:
            return [os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            return []
    steps = [pid for pid in procs_named("slurmstepd") if any(map(match, open_files(pid)))]
    # job processes first (they take SIGTERM), then the steps: slurmstepd
    # ignores SIGTERM, so it gets SIGKILL at once.
    terminate([c for s in steps for c in descendants(s)], timeout=3)
    terminate(steps, timeout=0)


def descendants(pid: int) -> list[int]:
    """All descendant pids of ``pid`` (via /proc/*/stat parent links)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        todo = [k for p in todo for k in kids.get(p, [])]
        out += todo
    return out
