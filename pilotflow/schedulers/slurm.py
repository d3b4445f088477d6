"""Slurm: sbatch / squeue (or sacct) / scancel.

State names: https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES
"""

from __future__ import annotations

from pilotflow.schedulers.base import (CANCELLED, ENDED, FAILED, QUEUED, RUNNING, JobState, Scheduler,
                                       check_directive, directive_word, format_hms, renewal_job_name, RENEW_ENV)

STATES = {
    "PENDING": QUEUED, "CONFIGURING": QUEUED, "REQUEUED": QUEUED, "REQUEUE_HOLD": QUEUED,
    "REQUEUE_FED": QUEUED, "RESV_DEL_HOLD": QUEUED, "SUSPENDED": QUEUED, "STOPPED": QUEUED,
    "RUNNING": RUNNING, "COMPLETING": RUNNING, "SIGNALING": RUNNING, "STAGE_OUT": RUNNING,
    "RESIZING": RUNNING,
    "COMPLETED": ENDED, "TIMEOUT": ENDED,  # a pilot reaching its walltime has handed back its tokens
    "FAILED": FAILED, "NODE_FAIL": FAILED, "BOOT_FAIL": FAILED, "OUT_OF_MEMORY": FAILED,
    "PREEMPTED": FAILED, "DEADLINE": FAILED, "SPECIAL_EXIT": FAILED, "REVOKED": FAILED,
    "CANCELLED": CANCELLED,
}


class Slurm(Scheduler):
    name = "slurm"
    prefix = "#SBATCH"
    walltime_step = 60  # --time has minute granularity
    docs = "https://slurm.schedmd.com/squeue.html#SECTION_JOB-STATE-CODES"
    template = "slurm.sh.j2"
    check_commands = ("sbatch", "squeue", "scancel")

    def output_name(self, pilot_id):
        return f"{pilot_id}.%j.out"

    def mpi_style(self, resource):
        return resource.mpi_launcher  # srun (the default) or Open MPI's mpirun

    node_env_clear = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")  # the pilot's own job, not the follow-up's
    node_env_keep = ("SLURM_CONF",)

    def renewal_argv(self, resource, run, gpus=0):
        return (["sbatch", "--parsable", f"--job-name={renewal_job_name(run)}", "--nodes={nodes}",
                 "--time={walltime_hms}", "--output={pilot}.%j.out", f"--export=ALL,{RENEW_ENV}"]
                + ([f"--gres={directive_word(resource.gpu_resource, 'gpu_resource')}:{gpus}"] if gpus else [])
                + ["{script}"])

    def node_submit_probe(self):
        return ["sbatch", "--test-only", "--wrap", "true"]

    def launcher_options(self, resource):
        plugin = ["--mpi-plugin", directive_word(resource.mpi_plugin, "mpi_plugin")] if resource.mpi_plugin else []
        return (super().launcher_options(resource) + plugin
                + ["--agent-var", "SLURM_NODEID", "--node-var", "SLURMD_NODENAME"])

    def directives(self, *, job_name, nodes, cores_per_node, walltime_s, resource, output, gpus=0):
        d = [f"--job-name={directive_word(job_name, 'job name')}",
             f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cores_per_node}",
             f"--time={format_hms(-(-walltime_s // 60) * 60)}",
             f"--output={directive_word(output, 'output file')}"]
        # no --signal: Slurm delivers it to every process of the step (the tasks too, whose
        # default action is to die) and up to a minute early; the launchers know the deadline
        # and hand their tokens back before it by themselves
        if resource.memory_per_node_mb:
            d.append(f"--mem={resource.memory_per_node_mb}M")
        if gpus:  # GRES: understood by every Slurm, count-only configurations included
            d.append(f"--gres={directive_word(resource.gpu_resource, 'gpu_resource')}:{gpus}")
        for key in ("partition", "account", "qos"):
            value = getattr(resource, key)
            if value:
                d.append(f"--{key}={directive_word(value, key)}")
        d.extend(check_directive(x) for x in resource.directives)
        return d

    def submit_argv(self, script, *, after=()):
        argv = ["sbatch", "--parsable"]
        if after:
            argv.append("--dependency=afterany:" + ":".join(after))
        return argv + [script]

    def parse_submit(self, stdout):
        # "123" or "123;cluster"
        line = stdout.strip().splitlines()[-1]
        job = line.split(";")[0].strip()
        if not job.isdigit():
            raise ValueError(f"unexpected sbatch output: {stdout.strip()!r}")
        return job

    def status_argv(self, job_ids):
        return ["squeue", "--noheader", "--states=all", "--jobs=" + ",".join(job_ids), "--format=%i|%T|%r"]

    def parse_status(self, stdout, job_ids):
        out = {}
        for line in stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 2 and parts[0] in job_ids:
                raw = parts[1].strip()
                out[parts[0]] = JobState(STATES.get(raw, RUNNING), raw)
        return out

    def fallback_status_argv(self, job_ids):
        return ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs=" + ",".join(job_ids),
                "--format=JobID,State,ExitCode"]

    def parse_fallback_status(self, stdout, job_ids):
        out = {}
        for line in stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) >= 3 and parts[0] in job_ids:
                raw = parts[1].split()[0]  # "CANCELLED by 0"
                code = parts[2].split(":")[0]
                out[parts[0]] = JobState(STATES.get(raw, ENDED), raw, int(code) if code.isdigit() else None)
        return out

    def cancel_argv(self, job_ids):
        return ["scancel"] + list(job_ids)

    def find_argv(self, name):
        return ["squeue", "--noheader", "--states=all", f"--name={name}", "--format=%i"]


BACKEND = Slurm
