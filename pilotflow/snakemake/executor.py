"""``snakemake --executor pilotflow``: a workflow's jobs run as tokens in reused pilots.

    snakemake --executor pilotflow --pilotflow-resources cluster.toml -j 500

Each job Snakemake hands us becomes a token (threads → cores, runtime → walltime estimate,
mem_mb → memory) whose command is Snakemake's own job command, run in the workflow's
directory — which, as with Snakemake's own cluster executors, must be a filesystem shared by
this process and the nodes (with a resource's ``host``, the same path must exist there). The
pilot logic (late binding, reuse, new pilots only for what
running ones cannot finish) is in ``pilotflow.snakemake.open_run``; this module is the glue to
``snakemake-interface-executor-plugins`` 9.x. Snakemake imports the plugin package on every
command (every job's own ``python -m snakemake`` too), so pilotflow's planner and transports
are imported only when the executor starts.
"""

# no `from __future__ import annotations`: Snakemake reads the settings' field types at runtime
import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncGenerator, List, Optional

from snakemake_interface_common.exceptions import WorkflowError
from snakemake_interface_executor_plugins.executors.base import SubmittedJobInfo
from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor
from snakemake_interface_executor_plugins.jobs import JobExecutorInterface
from snakemake_interface_executor_plugins.settings import CommonSettings, ExecutorSettingsBase


@dataclass
class ExecutorSettings(ExecutorSettingsBase):
    resources: Optional[Path] = field(default=None, metadata={
        "help": "TOML file of [[resource]] tables (as in a pilotflow job bundle) where pilots may run; "
                "default: this machine (the implicit 'local' resource).",
        "env_var": False, "required": False})
    max_pilots: int = field(default=10, metadata={
        "help": "At most this many pilots queued or running at once, over all resources "
                "(a resource's own max_pilots also applies). Default 10.",
        "env_var": False, "required": False})
    lock_timeout: str = field(default="5m", metadata={
        "help": "A pilot silent this long is dead and its jobs are run elsewhere (e.g. 90s, 5m; default 5m).",
        "env_var": False, "required": False})
    idle_timeout: str = field(default="60s", metadata={
        "help": "How long an idle pilot waits for new jobs before it exits (e.g. 30s, 2m). "
                "Pilots still alive when the workflow ends are cancelled. Default 60s.",
        "env_var": False, "required": False})
    default_runtime: int = field(default=10, metadata={
        "help": "Runtime estimate in minutes for jobs without a 'runtime' resource; the planner "
                "sizes pilot walltimes from these estimates. Default 10.",
        "env_var": False, "required": False})
    optimize: str = field(default="makespan", metadata={
        "help": "After the fewest pilots, the planner prefers the shortest makespan ('makespan') "
                "or the fewest node-hours ('node-hours'). Default: makespan.",
        "choices": ["makespan", "node-hours"], "env_var": False, "required": False})
    direct_shell: str = field(default="yes", metadata={
        "help": "Run the command of eligible shell: jobs directly in the pilots, formatted here as Snakemake "
                "would, instead of a python -m snakemake process per job ('yes', the default, or 'no'). "
                "Jobs with conda, containers, modules, shadow, benchmark, scripts, run: blocks, groups or "
                "storage files always take the python -m snakemake path; --verbose says why per job.",
        "choices": ["yes", "no"], "env_var": False, "required": False})
    status_interval: float = field(default=1.0, metadata={
        "help": "Seconds between status checks. A check reads the token pools (one call per "
                "resource); schedulers are asked about pilots only every 10 s. Default 1.",
        "env_var": False, "required": False})


common_settings = CommonSettings(
    non_local_exec=True,
    implies_no_shared_fs=False,
    job_deploy_sources=False,
    pass_default_storage_provider_args=True,
    pass_default_resources_args=True,
    pass_envvar_declarations_to_cmd=True,
    auto_deploy_default_storage_provider=False,
    init_seconds_before_status_checks=0,
)


class Executor(RemoteExecutor):
    """Snakemake's side: jobs in, token states out. See the module docstring."""

    def __post_init__(self) -> None:
        from pilotflow.bundle import load_resources_file
        from pilotflow.errors import PilotflowError
        from pilotflow.snakemake.open_run import OpenRun
        s = self.workflow.executor_settings or ExecutorSettings()
        try:
            resources = load_resources_file(s.resources) if s.resources else _local()
            lock_timeout, idle_timeout = _duration("lock_timeout", s.lock_timeout), _duration("idle_timeout", s.idle_timeout)
        except PilotflowError as e:
            raise WorkflowError(f"pilotflow: {e}") from None
        for key in ("max_pilots", "default_runtime"):
            if getattr(s, key) < 1:
                raise WorkflowError(f"pilotflow: --pilotflow-{key.replace('_', '-')} must be at least 1")
        if s.status_interval <= 0:
            raise WorkflowError("pilotflow: --pilotflow-status-interval must be more than 0 seconds")
        couch = [r.name for r in resources if r.pool == "couchdb"]
        if couch:
            raise WorkflowError(f"pilotflow: resource {couch[0]} has pool = \"couchdb\": the Snakemake plugin "
                                "runs on file pools only (remove the pool line, or give another resource)")
        self.settings = s
        self.resources = resources
        self._job_cores: Optional[int] = None
        self._warned: set[str] = set()
        self.direct = {"direct": 0, "classic": 0}  # jobs submitted each way
        self.pilots = OpenRun(resources, workdir=Path(os.getcwd()), lock_timeout_s=lock_timeout,
                              idle_timeout_s=idle_timeout, max_pilots=s.max_pilots, optimize=s.optimize,
                              log=self.logger.info)
        self.logger.info(f"pilotflow: run {self.pilots.run} on {', '.join(r.name for r in resources)} "
                         f"(`pilotflow status {self.pilots.run}` shows its tokens and pilots)")

    # submitting -------------------------------------------------------------------------------
    def run_jobs(self, jobs: List[JobExecutorInterface]) -> None:
        """All jobs Snakemake found ready at once: each becomes a token, bound to a live pilot
        if one can finish it, else planned with the rest of the burst into new pilots."""
        from pilotflow.errors import PilotflowError
        from pilotflow.bundle import unfit
        from pilotflow.snakemake.open_run import token_name
        from snakemake.exceptions import RuleException
        accepted = []
        for job in jobs:
            self.run_job_pre(job)
            try:
                task = self._task(job, token_name(job.name, job.jobid, self.pilots.rank))
            except (WorkflowError, RuleException, OSError) as e:  # preparing a direct job: protected outputs, ...
                self.report_job_error(SubmittedJobInfo(job), msg=f"pilotflow: job {job.jobid} ({job.name}) "
                                      f"could not be prepared: {e}")
                continue
            why = unfit(task, self.resources)
            if why:
                self.report_job_error(SubmittedJobInfo(job), msg=f"pilotflow: no resource can run this job "
                                      f"({task.cores} cores, {task.memory_mb or 0} MB, runtime {task.walltime_s} s): "
                                      f"{why[1]}")
                continue
            accepted.append((job, task))
        guessed = {t.name for job, t in accepted if not _runtime(job)}
        try:
            self.pilots.add([t for _, t in accepted], kinds={t.name: job.name for job, t in accepted}, guessed=guessed)
        except PilotflowError as e:
            raise WorkflowError(f"pilotflow: {e}") from None
        for job, task in accepted:
            self.report_job_submission(SubmittedJobInfo(job, external_jobid=task.name, aux={"token": task.name}))

    def run_job(self, job: JobExecutorInterface) -> None:
        self.run_jobs([job])

    def _task(self, job: JobExecutorInterface, name: str):
        """The token for a job: its shell command run directly (see ``direct``), or else
        Snakemake's own job command."""
        from pilotflow.bundle import Task
        cores = max(1, int(job.threads or 1))
        largest = max(r.cores_per_node for r in self.resources)
        direct = self._direct(job, largest)
        if cores > largest:
            if job.name not in self._warned:
                self._warned.add(job.name)
                self.logger.warning(f"pilotflow: {job.name} asks for {cores} threads but the largest node has "
                                    f"{largest} cores; its jobs run with {largest}")
            cores = largest
        runtime = _runtime(job)
        walltime = int(runtime * 60) if runtime else self.settings.default_runtime * 60
        mem = job.resources.get("mem_mb")
        memory = int(mem) if isinstance(mem, (int, float)) and mem > 0 else None
        if direct is not None:
            self.workflow.async_run(job.prepare())  # what the job's own Snakemake does first
            self.direct["direct"] += 1
            return Task(name=name, command=direct.command, shell=direct.shell, env=direct.env, cores=cores,
                        walltime_s=max(1, walltime), memory_mb=memory)
        self.direct["classic"] += 1
        self._job_cores = cores  # read by `cores` below while the command is formatted
        try:
            command = self.format_job_exec(job)
        finally:
            self._job_cores = None
        return Task(name=name, command=command, cores=cores, walltime_s=max(1, walltime), memory_mb=memory)

    def _direct(self, job: JobExecutorInterface, largest: int):
        """The job's command to run directly, or None (the reason is logged for --verbose)."""
        if self.settings.direct_shell == "no":
            return None
        from pilotflow.snakemake.direct import direct_job, ineligible
        why = ineligible(job, largest)
        if why is None:
            direct = direct_job(job, self.workflow, self.envvars())
            if not isinstance(direct, str):
                return direct
            why = direct
        self.logger.debug(f"pilotflow: job {job.jobid} ({job.name}) runs through python -m snakemake: {why}")
        return None

    @property
    def cores(self):
        """``--cores`` of a job's own Snakemake: the cores its token holds on the node."""
        return self._job_cores if getattr(self, "_job_cores", None) else super().cores

    # following -------------------------------------------------------------------------------
    async def check_active_jobs(self, active_jobs: List[SubmittedJobInfo]
                                ) -> AsyncGenerator[SubmittedJobInfo, None]:
        """One pool scan per resource, then each job's token state decides."""
        if not active_jobs or getattr(self, "pilots", None) is None:
            for j in active_jobs:
                yield j
            return
        from pilotflow.errors import PilotflowError
        try:
            async with self.status_rate_limiter:
                self.pilots.poll()
        except PilotflowError as e:
            raise WorkflowError(f"pilotflow: {e}") from None
        for j in active_jobs:
            token = j.aux["token"]
            state = self.pilots.state_word(token)
            if state == "done":
                self.report_job_success(j)
            elif state == "error":
                doc = self.pilots.state(token)
                paths, tail = self.pilots.logs(token)
                msg = (f"pilotflow token {token} failed: {doc.get('reason') or 'exit code ' + str(doc.get('exit_code'))} "
                       f"(pilot {doc.get('pilot')}, host {doc.get('host')}, attempt {doc.get('attempt')})")
                if tail:
                    msg += "\n    last lines of its log:\n        " + tail.replace("\n", "\n        ")
                self.report_job_error(j, msg=msg + "\n", aux_logs=paths)
            else:
                yield j

    async def sleep(self) -> None:
        """Between status checks. Overridden because the interface's waiting thread starts
        before ``__post_init__`` and would sleep Snakemake's default 10 s before the first
        check; a check is cheap, so short jobs are reported within a second."""
        settings = getattr(self, "settings", None)
        await asyncio.sleep(settings.status_interval if settings is not None else 0.2)

    def cancel_jobs(self, active_jobs: List[SubmittedJobInfo]) -> None:
        """Ctrl-C or a failed workflow: cancel the pilots; their launchers stop the jobs and
        hand the tokens back."""
        if getattr(self, "pilots", None) is not None:
            n = self.pilots.cancel()
            if n:
                self.logger.info(f"pilotflow: cancelled {n} pilot(s) of run {self.pilots.run}")

    def shutdown(self) -> None:
        super().shutdown()
        if getattr(self, "pilots", None) is not None:
            n = self.direct["direct"] + self.direct["classic"]
            if n:
                self.logger.info(f"pilotflow: {self.direct['direct']} of {n} job(s) ran their shell command "
                                 f"directly, {self.direct['classic']} through python -m snakemake")
            self.pilots.close()


def _runtime(job) -> float | None:
    """The job's ``runtime`` resource in minutes, if it has one."""
    runtime = job.resources.get("runtime")
    return float(runtime) if isinstance(runtime, (int, float)) and runtime > 0 else None


def _local() -> list:
    from pilotflow.bundle import local_resource
    return [local_resource()]


def _duration(key: str, value: str) -> int:
    from pilotflow.errors import UsageError
    from pilotflow.bundle.units import parse_duration
    try:
        return parse_duration(value)
    except ValueError as e:
        raise UsageError(f"--pilotflow-{key.replace('_', '-')} {value!r}: {e}") from None
