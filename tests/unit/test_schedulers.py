"""Scheduler backends: command builders, and parsers fed with real captured output."""

from pathlib import Path

import pytest

from pilotflow.bundle import Resource
from pilotflow.schedulers import backend
from pilotflow.schedulers.base import CANCELLED, ENDED, FAILED, QUEUED, RUNNING

DATA = Path(__file__).parent.parent / "data" / "captured"


def test_slurm_commands():
    s = backend("slurm")
    assert s.submit_argv("/p/p1.sh") == ["sbatch", "--parsable", "/p/p1.sh"]
    assert s.submit_argv("/p/p2.sh", after=["11", "12"]) == ["sbatch", "--parsable", "--dependency=afterany:11:12", "/p/p2.sh"]
    assert s.parse_submit("123\n") == "123" and s.parse_submit("456;cluster2\n") == "456"
    assert s.status_argv(["1", "2"]) == ["squeue", "--noheader", "--states=all", "--jobs=1,2", "--format=%i|%T|%r"]
    assert s.cancel_argv(["1", "2"]) == ["scancel", "1", "2"]
    with pytest.raises(ValueError):
        s.parse_submit("sbatch: error: Batch job submission failed")


def test_slurm_squeue_real_output():
    s = backend("slurm")
    got = s.parse_status((DATA / "slurm_squeue.txt").read_text(), ["1", "2", "3", "9"])
    assert {k: v.state for k, v in got.items()} == {"1": ENDED, "2": RUNNING, "3": QUEUED}
    assert "9" not in got  # squeue says nothing of unknown ids (exit 0): the fallback asks
    got = s.parse_status((DATA / "slurm_squeue_after_scancel.txt").read_text(), ["2", "3"])
    assert got["2"].state == CANCELLED and got["2"].raw == "CANCELLED"


def test_slurm_sacct_fallback():
    s = backend("slurm")
    out = "7|COMPLETED|0:0\n8|CANCELLED by 0|0:15\n9|TIMEOUT|0:0\n10|NODE_FAIL|1:0\n"
    got = s.parse_fallback_status(out, ["7", "8", "9", "10"])
    assert {k: v.state for k, v in got.items()} == {"7": ENDED, "8": CANCELLED, "9": ENDED, "10": FAILED}
    assert s.parse_fallback_status("", ["7"]) == {}  # no accounting: nothing known


def test_slurm_transient_errors():
    s = backend("slurm")
    assert s.transient(1, "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation")
    assert s.transient(1, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
    assert not s.transient(1, "sbatch: error: Batch job submission failed: Invalid partition name specified")


def test_sge_real_output():
    s = backend("sge")
    assert s.submit_argv("/p/p1.sh", after=["5"]) == ["qsub", "-terse", "-hold_jid", "5", "/p/p1.sh"]
    assert s.parse_submit("47\n") == "47"
    got = s.parse_status((DATA / "sge_qstat.txt").read_text(), ["47", "48", "51", "52", "60"])
    assert {k: v.state for k, v in got.items()} == {"47": RUNNING, "48": QUEUED, "51": CANCELLED, "52": FAILED}
    got = s.parse_fallback_status((DATA / "sge_qacct.txt").read_text(), ["49", "47", "999999"])
    assert got["49"].state == ENDED and got["49"].exit_code == 0
    assert got["47"].state == FAILED and got["47"].exit_code == 137  # qdel'ed while running
    assert "999999" not in got


def test_pbs_documented_output():
    s = backend("pbs")
    assert s.submit_argv("/p/p1.sh", after=["101.srv"]) == ["qsub", "-W", "depend=afterany:101.srv", "/p/p1.sh"]
    assert s.parse_submit("101.pbs-server\n") == "101.pbs-server"
    ids = ["101.pbs-server", "102.pbs-server", "103.pbs-server", "104.pbs-server", "105.pbs-server"]
    got = s.parse_status((DATA / "pbs_qstat.json").read_text(), ids)
    assert {k.split(".")[0]: v.state for k, v in got.items()} == {
        "101": RUNNING, "102": QUEUED, "103": ENDED, "104": CANCELLED, "105": FAILED}
    assert s.status_argv(["1.s"]) == ["qstat", "-x", "-f", "-F", "json", "1.s"]


def test_local_commands():
    s = backend("local")
    assert s.parse_submit("4242\n") == "4242"
    assert s.parse_status("4242 R\n77 Z\n", ["4242", "77", "5"]) == {
        "4242": s.parse_status("4242 R", ["4242"])["4242"], "77": s.parse_status("77 Z", ["77"])["77"],
        "5": s.parse_status("", ["5"])["5"]}
    assert s.parse_status("4242 R\n", ["4242"])["4242"].state == RUNNING
    assert s.parse_status("", ["5"])["5"].state == ENDED
    assert "--" not in s.cancel_argv(["1"])[2]  # dash's kill takes no "--"


@pytest.mark.parametrize("value", ["a b", "x\n#SBATCH --y", "q'uote", 'dq"', "semi;colon", "$(id)"])
def test_directive_values_are_validated_for_directive_context(value):
    res = Resource(name="c", scheduler="slurm", cores_per_node=4, max_walltime_s=600, partition=value)
    with pytest.raises(ValueError, match="cannot go into a scheduler directive"):
        backend("slurm").directives(job_name="j", nodes=1, cores_per_node=4, walltime_s=600, resource=res,
                                    output="p1.%j.out")


@pytest.mark.parametrize("bad", ["--x\n--y", "nodash", "--a\x00"])
def test_extra_directives_must_be_one_option_line(bad):
    res = Resource(name="c", scheduler="slurm", cores_per_node=4, max_walltime_s=600, directives=(bad,))
    with pytest.raises(ValueError):
        backend("slurm").directives(job_name="j", nodes=1, cores_per_node=4, walltime_s=600, resource=res,
                                    output="o")


def test_local_status_in_process_answers_as_the_probe_does():
    import os
    import subprocess
    import sys
    sched = backend(Resource(name="l", scheduler="local", python=sys.executable))
    zombie = subprocess.Popen(["true"])
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # ended, not reaped yet
    ids = [str(os.getpid()), str(zombie.pid), "999999999"]
    probed = subprocess.run(sched.status_argv(ids), capture_output=True, text=True, check=True).stdout
    here = sched.status_in_process(ids)
    assert here == probed == f"{os.getpid()} R\n{zombie.pid} Z\n"
    states = sched.parse_status(here, ids)
    assert [states[i].state for i in ids] == [RUNNING, ENDED, ENDED]
    zombie.wait()
    assert backend(Resource(name="s", scheduler="slurm", cores_per_node=4)).status_in_process(ids) is None
