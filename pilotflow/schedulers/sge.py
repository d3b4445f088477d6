"""(Son of) Grid Engine: qsub / qstat (or qacct) / qdel.

State letters: qstat(1), "the state of the job" — https://arc.liv.ac.uk/SGE/htmlman/htmlman1/qstat.html
"""

from __future__ import annotations

from pilotflow.schedulers.base import (CANCELLED, ENDED, FAILED, QUEUED, RUNNING, JobState, Scheduler,
                                       check_directive, directive_word, hms, renewal_job_name, RENEW_ENV)


def _state(letters: str) -> str:
    if "E" in letters:
        return FAILED
    if "d" in letters:
        return CANCELLED
    if "r" in letters or "t" in letters or "R" in letters or "s" in letters or "S" in letters:
        return RUNNING
    return QUEUED  # qw, hqw, ...


class Sge(Scheduler):
    name = "sge"
    prefix = "#$"
    walltime_step = 1
    docs = "https://arc.liv.ac.uk/SGE/htmlman/htmlman1/qstat.html"
    template = "sge.sh.j2"
    check_commands = ("qsub", "qstat", "qdel")

    def renewal_argv(self, resource, run, gpus=0):
        gpu = ["-l", f"{directive_word(resource.gpu_resource, 'gpu_resource')}={gpus}"] if gpus else []
        return ["qsub", "-terse", "-N", renewal_job_name(run), "-pe", directive_word(resource.pe, "pe"), "{slots}",
                "-l", "h_rt={walltime_hms}", "-o", "{pilot}.out", "-v", RENEW_ENV, *gpu, "{script}"]

    def node_submit_probe(self):
        return ["qsub", "-w", "v", "-b", "y", "true"]

    def flavour_argv(self):
        return ["qstat", "-help"]

    def flavour_problem(self, output):
        if "GE" not in output.split("\n", 1)[0]:
            return "qsub/qstat here are not Grid Engine's (PBS's?): use scheduler = \"pbs\""
        return None

    def directives(self, *, job_name, nodes, cores_per_node, walltime_s, resource, output, gpus=0):
        d = [f"-N {directive_word(job_name, 'job name')}", "-S /bin/sh", "-cwd", "-j y",
             f"-o {directive_word(output, 'output file')}",
             f"-pe {directive_word(resource.pe, 'parallel environment')} {nodes * cores_per_node}",
             # h_rt only: the launchers hand their tokens back before it by themselves
             f"-l h_rt={hms(walltime_s)}"]
        if gpus:  # the complex the site configured for GPUs (per host)
            d.append(f"-l {directive_word(resource.gpu_resource, 'gpu_resource')}={gpus}")
        if resource.partition:
            d.append(f"-q {directive_word(resource.partition, 'queue')}")
        if resource.account:
            d.append(f"-P {directive_word(resource.account, 'project')}")
        d.extend(check_directive(x) for x in resource.directives)
        return d

    def submit_argv(self, script, *, after=()):
        argv = ["qsub", "-terse"]
        if after:
            argv += ["-hold_jid", ",".join(after)]
        return argv + [script]

    def parse_submit(self, stdout):
        job = stdout.strip().splitlines()[-1].split(".")[0].strip()
        if not job.isdigit():
            raise ValueError(f"unexpected qsub output: {stdout.strip()!r}")
        return job

    def status_argv(self, job_ids):
        return ["qstat", "-u", "*"]

    def parse_status(self, stdout, job_ids):
        out = {}
        for line in stdout.splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[0] in job_ids:
                out[parts[0]] = JobState(_state(parts[4]), parts[4])
        return out

    def fallback_status_argv(self, job_ids):
        # qacct answers one job per -j; a shell loop keeps it to one round trip
        return ["/bin/sh", "-c", 'for j; do echo "== $j"; qacct -j "$j" 2>/dev/null; done', "sh"] + list(job_ids)

    def parse_fallback_status(self, stdout, job_ids):
        out = {}
        job = None
        info: dict[str, str] = {}

        def flush():
            if job and info:
                failed = info.get("failed", "0").split()[0]
                code = info.get("exit_status", "0").split()[0]
                code_i = int(code) if code.isdigit() else None
                state = ENDED if failed == "0" and code_i == 0 else FAILED
                if failed.startswith("100") or code_i in (137, 143):
                    state = CANCELLED if "qdel" in info.get("failed", "") else state
                out[job] = JobState(state, f"failed={failed} exit_status={code}", code_i)

        for line in stdout.splitlines():
            if line.startswith("== "):
                flush()
                job, info = line[3:].strip(), {}
                continue
            parts = line.split(None, 1)
            if len(parts) == 2:
                info.setdefault(parts[0], parts[1].strip())
        flush()
        return out

    def cancel_argv(self, job_ids):
        return ["qdel"] + list(job_ids)

    def find_argv(self, name):
        # qstat -j NAME prints "job_number: ID" for every job of that name
        return ["/bin/sh", "-c", 'qstat -j "$1" 2>/dev/null | sed -n "s/^job_number: *//p"', "sh", name]


BACKEND = Sge
