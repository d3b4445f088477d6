"""Snakemake ``shell:`` jobs run directly by the launcher, without a Snakemake process each.

A job through Snakemake's remote-executor path runs as its own ``python -m snakemake`` on the
node, which parses the Snakefile and builds a DAG (about a CPU-second) to run a command that
often takes less. Snakemake's own local executor runs shell jobs in its main process, which
already holds the parsed workflow; this module does the same for pilots: the main process
formats the job's command as ``snakemake.shell`` would (the same variables, the same shell
executable and strict-mode prefix and suffix, the same thread and temporary-directory
variables) and prepares the job (output and log directories, old outputs removed), and the
launcher runs ``SHELL -c COMMAND`` in the workflow's directory. Everything Snakemake does
after a job (checking and touching outputs, ``touch``/``protected`` flags, metadata, the
incomplete marker, cleanup after a failure) happens in the main process as for any remote job.

Eligibility is conservative, decided per job: anything Snakemake would do in the job's own
process beyond running the command (conda, containers, modules, shadow directories,
benchmarks, scripts, storage) keeps the ``python -m snakemake`` path.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

# Snakemake writes longer commands to a script file first (snakemake.shell.MAX_ARG_LEN)
MAX_ARG_LEN = 16 * 4096 - 1
THREAD_VARS = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
TMP_VARS = ("TMPDIR", "TMP", "TEMPDIR", "TEMP")


@dataclass(frozen=True)
class DirectJob:
    """What a token needs to run a job's command as Snakemake's ``shell()`` would."""

    command: str
    shell: str | None  # None: /bin/sh, as Snakemake without an executable
    env: tuple[tuple[str, str], ...]


def ineligible(job, max_threads: int) -> str | None:
    """Why a job must run through its own ``python -m snakemake`` (None: it can run directly)."""
    if job.is_group():
        return "it is part of a group job"
    if not job.is_shell:
        kind = next((k for k in ("script", "notebook", "wrapper", "cwl", "template_engine")
                     if getattr(job, f"is_{k}", False)), None)
        return f"its rule has a {kind}: directive" if kind else "its rule has a run: block"
    for why, yes in (("conda", lambda: job.conda_env_spec), ("container", lambda: job.container_img_url),
                     ("envmodules", lambda: job.env_modules), ("shadow", lambda: job.is_shadow),
                     ("benchmark", lambda: job.benchmark)):
        if yes():
            return f"its rule has a {why}: directive"
    if job.is_pipe or job.is_service:
        return "it has pipe or service outputs"
    if any(True for _ in job.storage_input) or any(True for _ in job.storage_output):
        return "it reads or writes storage-plugin files"
    if int(job.threads or 1) > max_threads:
        return f"it asks for {job.threads} threads, more than the largest node's {max_threads} cores"
    for name, attr in fields(job.rule.shellcmd):
        if name == "resources" and (attr is None or attr in NODE_RESOURCES):
            return (f"its command uses {{resources{'.' + attr if attr else ''}}}, which the job's own "
                    f"Snakemake evaluates on the node")
    return None


# resources a job's own Snakemake sets on the node (the main process holds placeholders or none)
NODE_RESOURCES = ("tmpdir", "_cores", "_nodes", "disk_mb", "disk", "disk_mib")


def fields(pattern: str):
    """(name, first attribute or key) of each replacement field of a format string:
    ``{resources.mem_mb}`` gives ("resources", "mem_mb"), ``{input}`` ("input", None)."""
    from string import Formatter
    out = []
    try:
        parsed = list(Formatter().parse(pattern))
    except ValueError:
        return out
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        m = re.match(r"\s*(\w+)\s*(?:\.(\w+)|\[['\"]?([^'\"\]]+)['\"]?\])?", field)
        if m:
            out.append((m.group(1), m.group(2) or m.group(3)))
        if spec and "{" in spec:
            out.extend(fields(spec))
    return out


def direct_job(job, workflow, envvars: dict[str, str]) -> DirectJob | str:
    """The job's command, shell and environment as Snakemake's ``shell()`` would use them in
    the job's own process, or why it cannot be had here (a string)."""
    from snakemake.shell import shell
    from snakemake.utils import format as sm_format
    threads = int(job.threads or 1)
    # the names a rule's shell() sees: the Snakefile's globals and the rule function's arguments
    variables = dict(
        input=job.input._plainstrings(), output=job.output._plainstrings(), params=job.params,
        wildcards=job.wildcards, threads=threads, resources=job.resources, log=job.log._plainstrings(),
        rule=job.rule.name, conda_env=None, container_img=None, singularity_args="", use_singularity=False,
        env_modules=None, bench_record=None, jobid=job.jobid, is_shell=True, bench_iteration=None,
        cleanup_scripts=True, shadow_dir=None, edit_notebook=None, conda_base_path=None,
        basedir=job.rule.basedir, sourcecache_path=None, runtime_sourcecache_path=None, runtime_paths=None)
    formatter = eval("lambda __pattern, __vars, __format: __format(__pattern, **__vars)", workflow.globals)
    try:
        cmd = formatter(job.rule.shellcmd, variables, sm_format)
    except Exception as e:  # the job's own Snakemake reports it as Snakemake would
        return f"its command cannot be formatted here ({type(e).__name__}: {e})"
    if "<TBD>" in cmd:  # a value only the node knows (snakemake.common.tbdstring)
        return "its command uses a value the job's own Snakemake evaluates on the node"
    executable = job.resources.get("shell_exec") or shell.get_executable()
    prefix = process_prefix(shell, executable)
    cmd = " ".join((prefix, cmd, getattr(shell, "_process_suffix", "") or "")).strip()
    if len(cmd.replace("'", r"'\''")) + 2 > MAX_ARG_LEN:
        return "its command is longer than Snakemake passes on a command line"
    env = [(k, str(threads)) for k in THREAD_VARS]
    tmpdir = job.resources.get("tmpdir")
    if tmpdir and str(tmpdir) != "<TBD>" and os.path.abspath(str(tmpdir)) != os.path.abspath(tempfile.gettempdir()):
        env += [(k, str(tmpdir)) for k in TMP_VARS]  # set for the job; the default is the node's own
    env += sorted(envvars.items())
    return DirectJob(command=cmd, shell=portable_shell(executable), env=tuple(env))


def process_prefix(shell, executable: str | None) -> str:
    """The strict-mode prefix ``snakemake.shell`` puts before a command: ``set -euo pipefail;``
    for bash unless the Snakefile set ``shell.prefix``."""
    custom = getattr(shell, "_process_prefix", None)
    name = os.path.basename(executable).lower() if executable else None
    if name == "bash" and custom is None:
        return "set -euo pipefail; "
    return custom or ""


def portable_shell(executable: str | None) -> str | None:
    """Snakemake's default shell is ``bash`` found on this machine's PATH; the node finds its
    own (its path may differ). A shell the Snakefile set by path is used by that path."""
    if not executable:
        return None
    import shutil
    name = os.path.basename(executable)
    return name if name == "bash" and shutil.which("bash") == executable else executable
