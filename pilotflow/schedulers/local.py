"""The embedded default: a pilot is a detached process group on this machine.

Like BigJob's fork://localhost. ``job_id`` is the pid of the process-group (and session)
leader; cancel sends SIGTERM to the group, which makes the launcher hand its tokens back.
"""

from __future__ import annotations

from pilotflow.schedulers.base import ENDED, RUNNING, JobState, Scheduler

# Reads /proc (Linux) and falls back to kill(0): prints "PID STATE" for each live group leader
# of PIDS (a remote host runs it with the resource's python; this machine runs it in-process).
_PROBE_BODY = r"""
import os
for pid in PIDS:
    try:
        with open("/proc/%s/stat" % pid) as f:
            st = f.read().rsplit(")", 1)[1].split()[0]
        print(pid, "Z" if st in "ZX" else "R")
    except (IOError, OSError, IndexError):
        try:
            os.kill(int(pid), 0)
            print(pid, "R")
        except OSError:
            pass
"""
_PROBE = "import sys\nPIDS = sys.argv[1:]\n" + _PROBE_BODY


class Local(Scheduler):
    name = "local"
    prefix = "#"
    walltime_step = 1
    docs = "processes on this machine"
    template = "local.sh.j2"
    batch = False
    check_commands = ("setsid", "/bin/sh")

    def __init__(self, python: str = "python3"):
        self.python = python  # the status probe runs the resource's own python

    @classmethod
    def for_resource(cls, resource):
        return cls(python=resource.python)

    def directives(self, **kw):  # a process on this machine: nothing to ask for
        return []

    def submit_argv(self, script, *, after=()):
        # setsid: the pilot survives the pilotflow command and is its own process group
        return ["/bin/sh", "-c", 'setsid /bin/sh "$1" >"$1.out" 2>&1 </dev/null & echo $!', "sh", script]

    def parse_submit(self, stdout):
        pid = stdout.strip().splitlines()[-1].strip()
        if not pid.isdigit():
            raise ValueError(f"unexpected output starting the pilot: {stdout.strip()!r}")
        return pid

    def renewal_argv(self, resource, run, gpus=0):
        return ["/bin/sh", "-c", 'PILOTFLOW_RENEW_PILOT="$2" PILOTFLOW_RENEW_WALLTIME="$3" PILOTFLOW_RENEW_NODES=1 '
                'setsid /bin/sh "$1" >"$2.out" 2>&1 </dev/null & echo $!', "sh", "{script}", "{pilot}", "{walltime_s}"]

    def status_argv(self, job_ids):
        return [self.python, "-c", _PROBE] + list(job_ids)

    def status_in_process(self, job_ids):
        # the probe's own code, without starting an interpreter for it (~0.1 s a look)
        lines: list[str] = []
        exec(_PROBE_BODY, {"PIDS": list(job_ids), "print": lambda *a: lines.append(" ".join(map(str, a)))})
        return "\n".join(lines) + "\n"

    def pids(self, job_ids):
        return [int(j) for j in job_ids if j.isdigit()]

    def parse_status(self, stdout, job_ids):
        out = {}
        for line in stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in job_ids:
                out[parts[0]] = JobState(RUNNING if parts[1] == "R" else ENDED, parts[1])
        for job in job_ids:  # not found: the process is gone
            out.setdefault(job, JobState(ENDED, "gone"))
        return out

    def cancel_argv(self, job_ids):
        # no "--": dash's kill does not take it; "-PID" is the process group
        return ["/bin/sh", "-c", 'for p; do kill -TERM "-$p" 2>/dev/null; done; true', "sh"] + list(job_ids)


BACKEND = Local
