"""Faults: a full disk, garbage state files, flaky scheduler commands, clock skew, a broken
SSH connection in the middle of a submission (SPEC §4: nothing lost, nothing run twice at
the same time, clear messages)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pilotflow.launcher import Pool
from tests.conftest import cli, status_json, write_bundle
from tests.e2e.test_launcher import LAUNCHER, assert_no_overlap

REC = 'mkdir -p "$REC"; s=$(date +%s%N); {work} echo "$s $(date +%s%N)" > "$REC/$PILOTFLOW_TOKEN.$PILOTFLOW_ATTEMPT.$$"'


def executions(rec: Path) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list] = {}
    for f in rec.iterdir():
        parts = f.read_text().split()
        if len(parts) == 2:
            out.setdefault(f.name.split(".")[0], []).append((int(parts[0]), int(parts[1])))
    return out


@pytest.fixture
def tiny_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "tiny"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", "-l", str(d)])


def test_a_full_disk_under_the_pool_loses_nothing(tiny_fs, tmp_path):
    rec = tmp_path / "rec"  # the tasks' own records live on the big disk
    pool = Pool.create(str(tiny_fs / "run"), {"run": "full", "lock_timeout": 300})
    n = 40
    tokens = [{"name": f"t{i:03d}", "command": REC.format(work="sleep 0.05;"), "rank": i,
               "env": [["REC", str(rec)]]} for i in range(n)]
    # token 5 fills the disk (and succeeds: dd's failure is not the point)
    tokens[5]["command"] = "dd if=/dev/zero of=filler bs=64k count=100 2>/dev/null; " + tokens[5]["command"]
    pool.add_defs(tokens)
    pool.write_plan("p1", [t["name"] for t in tokens])
    p = subprocess.Popen([sys.executable, str(LAUNCHER), "run", str(tiny_fs / "run"), "--pilot", "p1", "--cores", "2",
                          "--poll", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not (tiny_fs / "run" / "work" / "filler").exists():
        time.sleep(0.05)
    time.sleep(2)  # the launcher now meets a full disk
    assert p.poll() is None, "the launcher must not die of a full disk"
    (tiny_fs / "run" / "work" / "filler").unlink()  # space comes back
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "cannot write to the pool" in err
    states = pool.states()
    assert Counter(d["state"] for d in states.values()) == {"done": n}
    execs = executions(rec)
    assert sorted(execs) == [t["name"] for t in tokens]
    assert all(len(v) == 1 for v in execs.values())


def test_garbage_state_files_on_the_resource_lose_nothing(work):
    write_bundle(work, """
[bundle]
name = "garbage"
lock_timeout = "3s"
[[task]]
name = "t{i}"
command = "echo $PILOTFLOW_ATTEMPT >> runs-{i}.txt"
matrix = { i = "1..6" }
walltime = "2s"
""")
    run = cli("submit", "jobs.toml", "--wait", cwd=work, check=0).stdout.strip()
    pool = next((work / ".pilotflow").glob("garbage-*"))
    p = Pool(str(pool))
    for name, junk in (("t1", b'{"token": "t1", "sta'), ("t2", b"\x00\xff garbage")):
        path = Path(p.shard(name), f"{name}.{p.latest(name)}")
        assert path.stat().st_nlink > 1  # (the pool's format: a link to its launcher's journal)
        path.unlink()
        path.write_bytes(junk)  # a file in its place, truncated or garbage
    # t3's result line in its launcher's journal overwritten with garbage
    journal = Path(p.shard("t3"), f"t3.{p.latest('t3')}")
    data = journal.read_bytes()
    lines = data.split(b"\n")
    (i,) = [k for k, line in enumerate(lines) if b'"token":"t3"' in line and b'"state":"done"' in line]
    lines[i] = b"\x00" * len(lines[i])
    journal.write_bytes(b"\n".join(lines))
    for name in ("t1", "t2", "t3"):
        assert Pool(str(pool)).state(name)["state"] in ("todo", "locked")
    st = status_json(work, run)
    # what cannot be read is not claimed done: it reads as todo (its attempt unreadable) and
    # runs again; the other tokens are untouched
    assert {k: v["state"] for k, v in st["tokens"].items() if k not in ("t1", "t2", "t3")} == \
        {f"t{i}": "done" for i in range(4, 7)}
    p = cli("wait", cwd=work, check=0)
    st = status_json(work, run)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": 6, "error": 0}
    assert (pool / "work" / "runs-4.txt").read_text() == "1\n"  # untouched tokens ran once
    assert (pool / "work" / "runs-3.txt").read_text().split() == ["1", "2"]  # unreadable ones again


def flaky_bin(d: Path, command: str, failures: int, message: str) -> Path:
    """A FAKE wrapper: `command` fails `failures` times with `message`, then runs the real one."""
    d.mkdir(parents=True, exist_ok=True)
    real = shutil.which(command)
    counter = d / f"{command}.count"
    (d / command).write_text(f"""#!/bin/sh
n=$(cat "{counter}" 2>/dev/null || echo 0); echo $((n + 1)) > "{counter}"
if [ "$n" -lt {failures} ]; then echo "{message}" >&2; exit 1; fi
exec {real} "$@"
""")
    (d / command).chmod(0o755)
    return d


@pytest.mark.slurm
def test_a_busy_controller_is_retried_then_reported(work, slurm_cluster, tmp_path):
    write_bundle(work, """
[bundle]
name = "busy"
[[resource]]
name = "c"
scheduler = "slurm"
cores_per_node = 4
partition = "debug"
[[task]]
name = "t{i}"
command = "true"
matrix = { i = "1..4" }
walltime = "2s"
""")
    flaky = flaky_bin(tmp_path / "bin", "sbatch", 2,
                      "sbatch: error: Batch job submission failed: Socket timed out on send/recv operation")
    env = {**slurm_cluster.env, "PATH": f"{flaky}:{os.environ['PATH']}"}
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=200)
    assert (flaky / "sbatch.count").read_text().strip() == "3"  # two failures, then it went through
    st = status_json(work, env=env)
    assert st["counts"]["done"] == 4
    # a controller that stays down: exit 3 with the command, its exit code and stderr
    dead = flaky_bin(tmp_path / "bin2", "sbatch", 99, "sbatch: error: Unable to contact slurm controller")
    env = {**slurm_cluster.env, "PATH": f"{dead}:{os.environ['PATH']}"}
    p = cli("submit", "jobs.toml", cwd=work, env=env, check=3, timeout=200)
    assert "command: sbatch --parsable" in p.stderr and "exit code: 1" in p.stderr
    assert "Unable to contact slurm controller" in p.stderr


def test_clock_skew_between_client_and_resource_loses_no_change(work):
    if not shutil.which("faketime"):
        pytest.skip("faketime is not installed (tests/daemons/install.sh installs it as root)")
    write_bundle(work, """
[bundle]
name = "skew"
[[task]]
name = "t{i}"
command = "sleep 0.3"
matrix = { i = "1..8" }
walltime = "2s"
""")
    run = cli("submit", "jobs.toml", cwd=work, check=0).stdout.strip()
    seen = set()
    for offset in ("+2h", "-2h", "+0", "-30m"):  # the client's clock jumps around
        p = subprocess.run(["faketime", "-f", offset, sys.executable, "-m", "pilotflow", "status", run, "--json"],
                           cwd=work, capture_output=True, text=True)
        assert p.returncode in (0, 1), p.stderr
        seen |= {k for k, v in json.loads(p.stdout)["tokens"].items() if v["state"] == "done"}
        time.sleep(0.4)
    cli("wait", run, cwd=work, check=0)
    st = status_json(work, run)
    assert st["counts"]["done"] == 8  # the sync cursor is the resource's clock, not ours


@pytest.mark.ssh
@pytest.mark.slurm
def test_ssh_cut_in_the_middle_of_sbatch_does_not_submit_twice(work, slurm_cluster, tmp_path_factory):
    import tempfile
    from tests.daemons.sshd import SshServer
    d = Path(tempfile.mkdtemp(prefix="pf-cut-", dir="/tmp"))  # writable by the remote user
    os.chmod(d, 0o777)
    # a FAKE sbatch on the remote side: submits for real, then kills the SSH session it runs
    # in, once — the client sees the connection break and does not know the job id
    real = shutil.which("sbatch")
    (d / "sbatch").write_text(f"""#!/bin/sh
out=$({real} "$@") || exit $?
if [ ! -e "{d}/cut" ]; then touch "{d}/cut"; kill -9 $(ps -o ppid= -p $PPID) $PPID 2>/dev/null; sleep 5; fi
echo "$out"
""")
    (d / "sbatch").chmod(0o755)
    server = SshServer.start(tmp_path_factory.mktemp("sshd-cut"),
                             env={**slurm_cluster.env, "PATH": f"{d}:/usr/local/bin:/usr/bin:/bin"})
    try:
        write_bundle(work, """
[bundle]
name = "cut"
[[resource]]
name = "c"
scheduler = "slurm"
host = "pf-test"
cores_per_node = 4
partition = "debug"
python = "/usr/bin/python3"
[[task]]
name = "t{i}"
command = "true"
matrix = { i = "1..4" }
walltime = "2s"
""")
        env = {"PILOTFLOW_SSH_CONFIG": str(server.ssh_config_path)}
        run = cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=300).stdout.strip()
        assert (d / "cut").exists()
        jobs = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%j"], env={**os.environ,
                              **slurm_cluster.env}, capture_output=True, text=True).stdout.split()
        assert jobs.count(f"pf-p1-{run}") == 1  # adopted by name, not submitted twice
        assert status_json(work, run, env=env)["counts"]["done"] == 4
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_a_node_crashing_mid_run_loses_nothing(work, slurm_cluster):
    """One node's slurmd and every process of the job on it are killed, as in a crash."""
    write_bundle(work, """
[bundle]
name = "crash"
lock_timeout = "8s"
optimize = "makespan"
[[resource]]
name = "c"
scheduler = "slurm"
cores_per_node = 4
max_nodes = 3
max_walltime = "10m"
partition = "debug"
[[task]]
name = "t{i}"
command = 'mkdir -p rec; s=$(date +%s%N); sleep 1; echo "$s $(date +%s%N)" > rec/$PILOTFLOW_TOKEN.$PILOTFLOW_ATTEMPT.$$'
matrix = { i = "1..90" }
walltime = "2s"
""")
    env = slurm_cluster.env
    run = cli("submit", "jobs.toml", cwd=work, env=env, check=0).stdout.strip()
    deadline = time.time() + 120
    while time.time() < deadline:
        st = status_json(work, run, env=env)
        if {t["host"] for t in st["tokens"].values() if t["state"] == "done"} >= {"n1", "n2", "n3"}:
            break
        time.sleep(0.5)
    slurm_cluster.stop_node("n2", kill_jobs=True)
    try:
        cli("wait", run, cwd=work, env=env, check=0, timeout=240)
    finally:
        slurm_cluster.start_node("n2")
    st = status_json(work, run, env=env)
    assert st["counts"]["done"] == 90
    pool = next((work / ".pilotflow").glob("crash-*"))
    execs = executions(pool / "work" / "rec")
    assert sorted(execs) == sorted(f"t{i}" for i in range(1, 91))
    assert_no_overlap(execs)
