"""PBS Pro / OpenPBS: qsub / qstat -x -f -F json / qdel.

Job states: https://help.altair.com/2022.1.0/PBS%20Professional/PBSReferenceGuide2022.1.pdf
(§ "Job States"). No PBS server exists on our test machine: tests use a fake that follows
this documented output.
"""

from __future__ import annotations

import json

from pilotflow.schedulers.base import (CANCELLED, ENDED, FAILED, QUEUED, RUNNING, JobState, Scheduler,
                                       check_directive, directive_word, hms, renewal_job_name, RENEW_ENV)

STATES = {"Q": QUEUED, "H": QUEUED, "W": QUEUED, "T": QUEUED, "S": QUEUED, "U": QUEUED, "M": QUEUED,
          "R": RUNNING, "E": RUNNING, "B": RUNNING, "X": ENDED, "F": ENDED}


class Pbs(Scheduler):
    name = "pbs"
    prefix = "#PBS"
    walltime_step = 1
    docs = "PBS Professional Reference Guide, 'Job States'"
    template = "pbs.sh.j2"
    check_commands = ("qsub", "qstat", "qdel")

    job_id_re = r"^(\S+)$"  # "123.server"

    def renewal_argv(self, resource, run, gpus=0):
        chunk = f"{{nodes}}:ncpus={resource.cores_per_node}" + (f":ngpus={gpus}" if gpus else "") + ":mpiprocs=1"
        if resource.memory_per_node_mb:
            chunk += f":mem={resource.memory_per_node_mb}mb"
        return ["qsub", "-N", renewal_job_name(run, 15), "-l", f"select={chunk}", "-l", "walltime={walltime_hms}",
                "-o", "{pilot}.out", "-v", RENEW_ENV, "{script}"]

    def launcher_options(self, resource):
        return super().launcher_options(resource) + ["--agent-var", "PBS_VNODENUM"]

    def flavour_argv(self):
        return ["qstat", "--version"]

    def flavour_problem(self, output):
        if "pbs" not in output.lower():
            return "qsub/qstat here are not PBS's (Grid Engine's?): use scheduler = \"sge\" or put PBS first in PATH"
        return None

    def directives(self, *, job_name, nodes, cores_per_node, walltime_s, resource, output, gpus=0):
        chunk = f"{nodes}:ncpus={cores_per_node}" + (f":ngpus={gpus}" if gpus else "") + ":mpiprocs=1"
        if resource.memory_per_node_mb:
            chunk += f":mem={resource.memory_per_node_mb}mb"
        d = [f"-N {directive_word(job_name, 'job name')[:15]}", f"-l select={chunk}",
             f"-l walltime={hms(walltime_s)}", "-j oe", f"-o {directive_word(output, 'output file')}"]
        if resource.partition:
            d.append(f"-q {directive_word(resource.partition, 'queue')}")
        if resource.account:
            d.append(f"-A {directive_word(resource.account, 'account')}")
        d.extend(check_directive(x) for x in resource.directives)
        return d

    def submit_argv(self, script, *, after=()):
        argv = ["qsub"]
        if after:
            argv += ["-W", "depend=afterany:" + ":".join(after)]
        return argv + [script]

    def parse_submit(self, stdout):
        job = stdout.strip().splitlines()[-1].strip()
        if not job or not job.split(".")[0].replace("[]", "").isdigit():
            raise ValueError(f"unexpected qsub output: {stdout.strip()!r}")
        return job

    def status_argv(self, job_ids):
        return ["qstat", "-x", "-f", "-F", "json"] + list(job_ids)

    def parse_status(self, stdout, job_ids):
        try:
            start = stdout.find("{")  # start-up files on the login node may print first
            jobs = json.loads(stdout[start:] if start >= 0 else "{}").get("Jobs", {})
        except ValueError:
            return {}
        out = {}
        for job, info in jobs.items():
            if job not in job_ids:
                continue
            raw = info.get("job_state", "")
            state = STATES.get(raw, RUNNING)
            code = info.get("Exit_status")
            if state == ENDED and code is not None:
                if int(code) < 0 or int(code) in (271,):  # 271 = 256 + SIGTERM: qdel'ed
                    state = CANCELLED if int(code) == 271 else FAILED
                elif int(code) != 0:
                    state = FAILED
            out[job] = JobState(state, raw, None if code is None else int(code))
        return out

    def cancel_argv(self, job_ids):
        return ["qdel"] + list(job_ids)

    def find_argv(self, name):
        return ["qselect", "-N", name[:15]]


BACKEND = Pbs
