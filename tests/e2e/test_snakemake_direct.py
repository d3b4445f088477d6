"""Snakemake shell jobs run directly by the launcher (``pilotflow.snakemake.direct``): the same
outputs, failures and logs as through a ``python -m snakemake`` per job, mixed workflows, and
``--rerun-incomplete`` after a pilot and the workflow were killed mid-job."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("snakemake", reason="the snakemake extra is not installed (pip install -e '.[test]')")

from tests.conftest import cli, status_json  # noqa: E402
from tests.e2e.test_snakemake import running_with, snakemake  # noqa: E402

PITFALLS = r'''
NAMES = ["a b", "it's", "plain"]

rule all:
    input:
        expand("out/q_{name}.txt", name=NAMES),
        "out/threads.txt", "out/params.txt", "out/mem.txt", "out/pipefail.txt", "out/unset.txt",
        "out/logged.txt", "out/exit.txt", "out/pyrun.txt", "out/deep/dir/made.txt", "out/allres.txt"

rule quoted:  # wildcards with spaces and quotes
    output: "out/q_{name}.txt"
    shell: "echo {wildcards.name:q} > {output:q}"

rule threads:
    output: "out/threads.txt"
    threads: 2
    shell: "echo {threads} $OMP_NUM_THREADS $MKL_NUM_THREADS > {output}"

rule params:
    output: "out/params.txt"
    params: p="x y", n=3
    shell: "echo {params.p:q} {params.n} {params} > {output}"

rule mem:
    output: "out/mem.txt"
    resources: mem_mb=123
    shell: "echo {resources.mem_mb} {resources[mem_mb]} > {output}"

rule allres:  # all of them: some are set on the node, so this one takes the classic path
    output: "out/allres.txt"
    resources: mem_mb=123
    shell: "echo {resources} | tr ' ' '\\n' | sort > {output}"  # Snakemake's order varies

rule pipefail:  # a failing command in a pipe: bash's pipefail
    output: "out/pipefail.txt"
    shell: "false | cat > {output}"

rule unset:  # an unset variable: set -u
    output: "out/unset.txt"
    shell: "echo $PILOTFLOW_NEVER_SET_ANYWHERE > {output}"

rule logged:
    output: "out/logged.txt"
    log: "logs/logged.log"
    shell: "echo to-the-log > {log}; echo on-stderr >&2; echo out > {output}"

rule exit:  # fails after writing part of its output: the output is removed, the log kept
    output: "out/exit.txt"
    log: "logs/exit.log"
    shell: "echo before-failing > {log}; echo partial > {output}; exit 4"

rule made:  # its output directory does not exist before it runs
    output: "out/deep/dir/made.txt"
    shell: "echo made > {output}"

rule pyrun:  # a run: block always goes through python -m snakemake
    output: "out/pyrun.txt"
    run:
        with open(output[0], "w") as f:
            f.write("from python\n")
'''


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


def run_pitfalls(work: Path, direct: str):
    wf = work / f"direct-{direct}"
    wf.mkdir()
    (wf / "Snakefile").write_text(PITFALLS)
    r = snakemake(wf, "-j", "10", "-k", "--verbose", "--pilotflow-idle-timeout", "5s",
                  "--pilotflow-direct-shell", direct)
    return wf, r


def test_direct_and_classic_give_the_same_outputs_failures_and_logs(work):
    results = {d: run_pitfalls(work, d) for d in ("yes", "no")}
    seen = {}
    for direct, (wf, r) in results.items():
        assert r.returncode != 0, r.stderr[-3000:]  # three jobs fail
        failed = sorted(set(re.findall(r"Error in rule (\w+):", r.stderr)))
        st = status_json(wf)
        seen[direct] = (tree(wf / "out"), tree(wf / "logs"), failed, st["counts"])
    assert seen["yes"] == seen["no"]
    outs, logs, failed, counts = seen["yes"]
    assert failed == ["exit", "pipefail", "unset"]
    assert outs["q_a b.txt"] == "a b\n" and outs["q_it's.txt"] == "it's\n"
    assert outs["threads.txt"].split() == ["2", "2", "2"]
    assert outs["params.txt"] == "x y 3 x y 3\n"
    assert outs["mem.txt"] == "123 123\n" and "123" in outs["allres.txt"].split()
    assert outs["deep/dir/made.txt"] == "made\n" and outs["pyrun.txt"] == "from python\n"
    assert "exit.txt" not in outs and "pipefail.txt" not in outs  # removed after the failure
    assert logs == {"logged.log": "to-the-log\n", "exit.log": "before-failing\n"}
    assert counts == {"todo": 0, "locked": 0, "done": 10, "error": 3}

    yes = results["yes"][1].stderr
    # a mixed workflow: the run: block went the classic way, with the reason for --verbose
    assert re.search(r"job \d+ \(pyrun\) runs through python -m snakemake: its rule has a run: block", yes)
    assert re.search(r"job \d+ \(allres\) runs through python -m snakemake: its command uses \{resources\}", yes)
    assert "pilotflow: 11 of 13 job(s) ran their shell command directly, 2 through python -m snakemake" in yes
    assert "0 of 13 job(s) ran their shell command directly" in results["no"][1].stderr
    # the failed job's stderr is in its token's log either way, and in Snakemake's error
    # message when run directly (a job's own Snakemake adds 20 lines of its own after it)
    for wf, _ in results.values():
        err = next((wf / ".pilotflow" / "runs").glob("*/logs/unset-*.err"))
        assert "PILOTFLOW_NEVER_SET_ANYWHERE: unbound variable" in err.read_text()
    assert "PILOTFLOW_NEVER_SET_ANYWHERE: unbound variable" in yes
    # run directly, the token's log holds the command's own output only (`pilotflow logs`)
    wf = results["yes"][0]
    token = next(n for n in status_json(wf)["tokens"] if n.startswith("logged-"))
    shown = cli("logs", token, cwd=wf, check=0).stdout
    assert shown.endswith("-- stdout --\n-- stderr --\non-stderr\n"), shown


INCOMPLETE = """
rule all:
    input: "b.txt"

rule a:
    output: "a.txt"
    shell: "echo a >> runs.log; echo a > {{output}}"

rule b:
    input: "a.txt"
    output: "b.txt"
    shell: "echo b >> runs.log; echo partial > {{output}}; echo {marker}; sleep 300; echo whole >> {{output}}"
"""


def test_rerun_incomplete_after_the_pilot_and_the_workflow_were_killed(work):
    import subprocess
    import sys
    marker = f"incomplete-{uuid.uuid4().hex[:8]}"
    (work / "Snakefile").write_text(INCOMPLETE.format(marker=marker))
    p = subprocess.Popen([sys.executable, "-m", "snakemake", "--executor", "pilotflow", "-j", "4"], cwd=work,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not running_with(marker):
            assert p.poll() is None, "snakemake ended before b ran"
            time.sleep(0.3)
        assert running_with(marker), "b never started"
        os.killpg(p.pid, signal.SIGKILL)  # the workflow's process, as a closed laptop would
        p.wait()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    pilots = status_json(work)["pilots"]
    for pl in pilots.values():  # and the pilot: its reaper stops b and hands its token back
        os.killpg(int(pl["job_id"]), signal.SIGKILL)
    deadline = time.time() + 20
    while time.time() < deadline and running_with(marker):
        time.sleep(0.2)
    assert not running_with(marker)
    assert (work / "b.txt").read_text() == "partial\n"

    r = snakemake(work, "--unlock")
    assert r.returncode == 0, r.stderr[-2000:]
    r = snakemake(work, "-j", "4", "--pilotflow-idle-timeout", "5s")
    assert r.returncode != 0 and "b.txt" in r.stderr and "incomplete" in r.stderr.lower()
    # the long job now finishes quickly
    (work / "Snakefile").write_text(INCOMPLETE.format(marker=marker).replace("sleep 300", "true"))
    r = snakemake(work, "-j", "4", "--pilotflow-idle-timeout", "5s", "--rerun-incomplete")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (work / "runs.log").read_text() == "a\nb\nb\n"  # exactly the incomplete job ran again
    assert (work / "b.txt").read_text() == "partial\nwhole\n"


LEVELS = """
rule all:
    input: "l4.txt"

rule l1:
    output: "l1/{i}.txt"
    resources: runtime=1
    shell: "sleep 0.5; echo {wildcards.i} > {output}"

rule l2:
    input: "l1/{i}.txt"
    output: "l2/{i}.txt"
    RUNTIME
    shell: "sleep 0.5; cat {input} > {output}"

rule l3:
    input: lambda wc: expand("l2/{i}.txt", i=range(int(wc.k) * 10, (int(wc.k) + 1) * 10))
    output: "l3/{k}.txt"
    shell: "sleep 0.5; cat {input} > {output}"

rule l4:
    input: expand("l3/{k}.txt", k=range(4))
    output: "l4.txt"
    shell: "cat {input} > {output}"
"""


def idle_gaps(tokens: dict) -> list[float]:
    """Lengths of the intervals, between the first start and the last end, with no token running."""
    spans = sorted((t["start"], t["end"]) for t in tokens.values() if t.get("start") and t.get("end"))
    gaps, reach = [], spans[0][1]
    for start, end in spans[1:]:
        if start > reach:
            gaps.append(start - reach)
        reach = max(reach, end)
    return gaps


@pytest.mark.slurm
@pytest.mark.parametrize("runtime", ["guessed", "declared"])
def test_a_multi_level_workflow_on_slurm_never_waits_on_an_idle_pilot(work, slurm_cluster, runtime):
    """The first pilot is sized for the first level (1 minute each): 3 nodes, 5 minutes.
    guessed: the second level has no runtime (the 10-minute default guess); the first level's
    observed runtimes place it in the same pilot. declared: it says 10 minutes, which the first
    pilot cannot hold; the new pilot needs the same 3 nodes, so the idle first pilot is released
    at once instead of idling until its 60 s timeout."""
    from tests.e2e.test_snakemake import EXAMPLE, squeue_live
    env = dict(slurm_cluster.env)
    (work / "Snakefile").write_text(LEVELS.replace("RUNTIME", "resources: runtime=10" if runtime == "declared" else ""))
    (work / "slurm.toml").write_text((EXAMPLE / "slurm.toml").read_text())
    t0 = time.time()
    r = snakemake(work, "-j", "500", "--pilotflow-resources", "slurm.toml", env=env)
    took = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    st = status_json(work, env=env)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": 85, "error": 0}
    gaps = idle_gaps(st["tokens"])
    # between levels: Snakemake's status check, binding, the launcher's next look -- seconds,
    # not a pilot's idle timeout (60 s) while the guessed jobs waited for a new pilot
    assert max(gaps) < 6, (sorted(gaps)[-5:], r.stderr[-3000:])
    ran = {t["pilot"] for t in st["tokens"].values()}
    assert ran == set(st["pilots"]), (ran, st["pilots"])  # no pilot submitted that ran nothing
    if runtime == "guessed":
        assert ran == {"p1"}, st["pilots"]
    else:
        assert "released idle pilot(s) p1 on slurm" in r.stderr and len(ran) == 2
    assert took < 90, took
    assert not squeue_live(slurm_cluster, [p["job_id"] for p in st["pilots"].values()])
