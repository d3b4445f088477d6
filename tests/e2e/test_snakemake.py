"""`snakemake --executor pilotflow`: Snakemake's own executor test base, the example workflow
on this machine and on the real local Slurm, a failing job reported with its log, and Ctrl-C
leaving no pilot behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

pytest.importorskip("snakemake", reason="the snakemake extra is not installed (pip install -e '.[test]')")

import snakemake.common.tests  # noqa: E402

from pilotflow.snakemake.executor import ExecutorSettings  # noqa: E402
from tests.conftest import ROOT, status_json  # noqa: E402

EXAMPLE = ROOT / "workflows" / "snakemake"


class TestWorkflows(snakemake.common.tests.TestWorkflowsLocalStorageBase):
    """Snakemake's shared executor tests (a simple DAG and a group job), run in-process, with
    shell jobs run directly (the default)."""

    __test__ = True

    def get_executor(self) -> str:
        return "pilotflow"

    def get_executor_settings(self) -> Optional[ExecutorSettings]:
        return ExecutorSettings(idle_timeout="10s")


class TestWorkflowsClassic(TestWorkflows):
    """The same with every job through its own ``python -m snakemake``."""

    def get_executor_settings(self) -> Optional[ExecutorSettings]:
        return ExecutorSettings(idle_timeout="10s", direct_shell="no")


def snakemake(cwd: Path, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "--executor", "pilotflow", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def example(work: Path) -> Path:
    wf = work / "wf"
    shutil.copytree(EXAMPLE, wf, ignore=shutil.ignore_patterns(".snakemake", ".pilotflow", "results"))
    return wf


def pool_of(wf: Path) -> Path:
    return next(p for p in (wf / ".pilotflow").iterdir() if p.name != "runs")


def check_example(wf: Path, sims: int, env: dict | None = None) -> dict:
    assert (wf / "results" / "report.txt").read_text().strip() == str(sum(i * i for i in range(sims)))
    st = status_json(wf, env=env)  # the run is a pilotflow run like any other
    jobs = sims + sims // 4 + 1  # simulate, aggregate, report ("all" is a local rule)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": jobs, "error": 0}, st["counts"]
    # jobs ran in the workflow's directory, not in the pool's work directory
    assert not any((pool_of(wf) / "work").iterdir())
    return st


def assert_gone(pilots: dict, within: float = 10.0) -> None:
    """No local pilot's process group is left (job_id = the group leader's pid)."""
    def alive(p) -> bool:
        try:
            os.killpg(int(p["job_id"]), 0)
        except ProcessLookupError:
            return False
        return True
    deadline = time.time() + within
    while time.time() < deadline and any(alive(p) for p in pilots.values()):
        time.sleep(0.2)
    assert not [p for p in pilots.values() if alive(p)], pilots


def test_example_workflow_on_this_machine(work):
    wf = example(work)
    r = snakemake(wf, "-j", "50", "--config", "sims=20", "--pilotflow-idle-timeout", "20s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pilotflow: 26 of 26 job(s) ran their shell command directly, 0 through python -m snakemake" in r.stderr
    st = check_example(wf, 20)
    # one pilot for the three rules: the jobs that became ready later were bound to it
    # (late binding) rather than to new pilots
    assert len(st["pilots"]) == 1, st["pilots"]
    assert {t["pilot"] for t in st["tokens"].values()} == {"p1"}
    assert len(list((pool_of(wf) / "defs").iterdir())) > 3  # several batches reached the same pilot
    assert "Traceback" not in r.stderr
    assert_gone(st["pilots"])


def test_a_failed_job_is_reported_with_its_log(work):
    marker = f"boom-{uuid.uuid4().hex[:8]}"
    (work / "Snakefile").write_text(f"""
rule all:
    input: "ok.txt", "bad.txt"

rule ok:
    output: "ok.txt"
    shell: "touch {{output}}"

rule bad:
    output: "bad.txt"
    shell: "echo {marker} >&2; exit 3"
""")
    r = snakemake(work, "-j", "4", "--pilotflow-idle-timeout", "5s", "--retries", "1")
    assert r.returncode != 0
    assert "Error in rule bad" in r.stderr
    # run directly, the command's own exit code is the token's
    assert "pilotflow token bad-" in r.stderr and "failed: exit code 3" in r.stderr
    assert marker in r.stderr  # the tail of the token's log is in the message
    # Snakemake's retry is a second token (its own log); both logs' paths were reported
    err_logs = sorted((work / ".pilotflow" / "runs").glob("*/logs/bad-*.err"))
    assert len(err_logs) == 2 and all(marker in f.read_text() for f in err_logs)
    assert all(str(f) in r.stderr for f in err_logs)
    assert (work / "ok.txt").exists() and not (work / "bad.txt").exists()


def test_bad_settings_give_one_clear_message(work):
    (work / "Snakefile").write_text('rule all:\n    output: "x"\n    shell: "touch {output}"\n')
    (work / "res.toml").write_text('[[resource]]\nname = "c"\nscheduler = "slurm"\ncores_per_node = 4\n'
                                   'max_walltme = "1h"\n')
    r = snakemake(work, "-j", "1", "--pilotflow-resources", "res.toml")
    assert r.returncode != 0
    assert "res.toml:5: unknown key 'max_walltme' in [resource]; did you mean 'max_walltime'?" in r.stderr
    r = snakemake(work, "-j", "1", "--pilotflow-resources", "missing.toml")
    assert r.returncode != 0 and "missing.toml: no such file" in r.stderr
    r = snakemake(work, "-j", "1", "--pilotflow-idle-timeout", "soon")
    assert r.returncode != 0 and "--pilotflow-idle-timeout 'soon': expected a duration" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_job_no_resource_can_hold_fails_with_the_reason(work):
    (work / "Snakefile").write_text('rule all:\n    output: "x"\n    resources: runtime=120\n'
                                    '    shell: "touch {output}"\n')
    (work / "res.toml").write_text('[[resource]]\nname = "local"\nscheduler = "local"\nmax_walltime = "1h"\n')
    r = snakemake(work, "-j", "1", "--pilotflow-resources", "res.toml")
    assert r.returncode != 0
    # the same reason a bundle would give (one definition of "fits")
    assert "no resource can run this job" in r.stderr and "longer than any resource's max_walltime (local: 1h)" in r.stderr


def test_pilots_that_never_run_a_job_stop_the_workflow_with_their_output(work):
    # a setup line that fails: every pilot exits before its launcher starts
    (work / "Snakefile").write_text('rule all:\n    output: "x"\n    shell: "touch {output}"\n')
    (work / "res.toml").write_text('[[resource]]\nname = "broken"\nscheduler = "local"\n'
                                   'setup = ["echo cannot load the module >&2; exit 7"]\n')
    r = snakemake(work, "-j", "1", "--pilotflow-resources", "res.toml", timeout=120)
    assert r.returncode != 0
    assert "3 pilots in a row ended on broken without running a job" in r.stderr
    assert "cannot load the module" in r.stderr  # the last pilot's own output
    assert r.stderr.count("submitted pilot") == 3  # and no more


SLEEPY = """
rule all:
    input: expand("s{{i}}.txt", i=range(6))

rule sleepy:
    output: "s{{i}}.txt"
    resources: runtime=5
    shell: "echo {marker}; sleep 300; touch {{output}}"
"""


def ctrl_c(wf: Path, marker: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    """Start the workflow, wait until its jobs run in a pilot, send SIGINT to snakemake alone."""
    p = subprocess.Popen([sys.executable, "-m", "snakemake", "--executor", "pilotflow", "-j", "10", *args],
                         cwd=wf, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True,
                         # a test run started in the background by a non-interactive shell
                         # inherits SIGINT ignored; a user's Ctrl-C is never ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not running_with(marker):
            assert p.poll() is None, p.communicate()[0][-3000:]
            time.sleep(0.5)
        assert running_with(marker), "the jobs never started"
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def running_with(marker: str) -> list[int]:
    """Pids of live processes whose command line holds ``marker``."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (d / "cmdline").read_bytes() and int(d.name) != os.getpid():
                if "State:\tZ" not in (d / "status").read_text():
                    found.append(int(d.name))
        except OSError:
            continue
    return found


def test_ctrl_c_leaves_no_pilot_on_this_machine(work):
    marker = f"sleepy-{uuid.uuid4().hex[:8]}"
    (work / "Snakefile").write_text(SLEEPY.format(marker=marker))
    r = ctrl_c(work, marker, [], {})
    assert "cancelled 1 pilot(s)" in r.stdout, r.stdout[-3000:]
    assert not running_with(marker)
    st = status_json(work)
    assert st["counts"]["locked"] == 0 and st["counts"]["done"] == 0  # handed back, not lost
    assert all(p["state"] in ("ended", "cancelled") for p in st["pilots"].values()), st["pilots"]
    assert_gone(st["pilots"])


# --- the real local Slurm (tests/daemons) ----------------------------------------------------

@pytest.mark.slurm
def test_example_workflow_on_slurm(work, slurm_cluster):
    env = dict(slurm_cluster.env)
    wf = example(work)
    r = snakemake(wf, "-j", "100", "--config", "sims=40", "--pilotflow-resources", "slurm.toml",
                  "--pilotflow-idle-timeout", "20s", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    st = check_example(wf, 40, env=env)
    # a few pilots, reused across the rules, spread over the simulated nodes
    assert 1 <= len(st["pilots"]) <= 3, st["pilots"]
    assert len({t["host"] for t in st["tokens"].values()}) >= 2
    ids = [p["job_id"] for p in st["pilots"].values()]
    assert not squeue_live(slurm_cluster, ids)  # the workflow's end cancelled what was idle


def squeue_live(cluster, ids: list[str]) -> list[str]:
    out = cluster.run(["squeue", "--noheader", "--states=all", "--format=%i|%T"]).stdout
    states = dict(line.strip().split("|") for line in out.splitlines() if "|" in line)
    return [j for j in ids if states.get(j) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")]


@pytest.mark.slurm
def test_ctrl_c_leaves_no_pilot_on_slurm(work, slurm_cluster):
    env = dict(slurm_cluster.env)
    marker = f"sleepy-{uuid.uuid4().hex[:8]}"
    (work / "Snakefile").write_text(SLEEPY.format(marker=marker))
    (work / "slurm.toml").write_text((EXAMPLE / "slurm.toml").read_text())
    r = ctrl_c(work, marker, ["--pilotflow-resources", "slurm.toml"], env)
    assert "cancelled" in r.stdout and "pilot(s)" in r.stdout, r.stdout[-3000:]
    st = status_json(work, env=env)
    ids = [p["job_id"] for p in st["pilots"].values()]
    assert ids and not squeue_live(slurm_cluster, ids)
    deadline = time.time() + 30  # slurmstepd kills the job's processes as the job ends
    while time.time() < deadline and running_with(marker):
        time.sleep(0.5)
    assert not running_with(marker)
    assert st["counts"]["locked"] == 0 and st["counts"]["done"] == 0
