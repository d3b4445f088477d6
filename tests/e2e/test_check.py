"""`pilotflow check`: each resource's passes and failures, each failure with its fix."""

import os

import pytest

from tests.conftest import cli, write_bundle


def test_local_resource_passes_every_check_including_a_test_pilot(work):
    write_bundle(work, '[bundle]\nname = "c"\n[[task]]\nname = "a"\ncommand = "true"\n')
    p = cli("check", "jobs.toml", "--submit", cwd=work, check=0, env={"COLUMNS": "300"})
    for what in ("connection", "python", "local commands", "root writable", "test pilot"):
        assert what in p.stdout
    assert "FAIL" not in p.stdout and "ran on" in p.stdout
    assert "pilots renew themselves" in p.stdout and "can submit its follow-up" in " ".join(p.stdout.split())
    assert not list((work / ".pilotflow").glob(".pilotflow-check-*"))  # it cleans up after itself


def test_failures_say_how_to_fix_them(work):
    write_bundle(work, """
[bundle]
name = "c"
[[resource]]
name = "nopython"
scheduler = "local"
python = "/nonexistent/python3"
[[resource]]
name = "readonly"
scheduler = "local"
root = "/proc/pilotflow-cannot-write-here"
[[resource]]
name = "notpbs"
scheduler = "pbs"
cores_per_node = 4
[[task]]
name = "a"
command = "true"
""")
    env = {"COLUMNS": "300"}  # the qsub here is Grid Engine's, not PBS's
    p = cli("check", "jobs.toml", cwd=work, env=env, check=3)
    out = " ".join(p.stdout.split())
    assert "cannot run /nonexistent/python3" in out and 'set python = "/path/to/python3"' in out
    assert "/proc/pilotflow-cannot-write-here" in out and "writable shared directory" in out
    assert "qsub/qstat here are not PBS's (Grid Engine's?)" in out


def test_fake_pbs_passes_as_pbs(work, tmp_path):
    from tests.e2e.test_batch_schedulers import FAKE_PBS_BIN
    write_bundle(work, '[bundle]\nname = "c"\n[[resource]]\nname = "pbs"\nscheduler = "pbs"\ncores_per_node = 2\n'
                       '[[task]]\nname = "a"\ncommand = "true"\n')
    env = {"PATH": f"{FAKE_PBS_BIN}:{os.environ['PATH']}", "FAKE_PBS_DIR": str(tmp_path), "COLUMNS": "300"}
    p = cli("check", "jobs.toml", "--submit", cwd=work, env=env, check=0)
    assert "found qsub, qstat, qdel" in " ".join(p.stdout.split()) and "ran on" in p.stdout


@pytest.mark.slurm
def test_slurm_test_pilot_runs_on_a_node(work, slurm_cluster):
    write_bundle(work, """
[bundle]
name = "c"
[[resource]]
name = "cluster"
scheduler = "slurm"
cores_per_node = 4
partition = "debug"
[[task]]
name = "a"
command = "true"
""")
    p = cli("check", "jobs.toml", "--submit", cwd=work, env={**slurm_cluster.env, "COLUMNS": "300"}, check=0,
            timeout=200)
    out = " ".join(p.stdout.split())
    assert "slurm commands" in out and "found sbatch, squeue, scancel" in out
    assert "ran on" in out and "can submit its follow-up" in out
    # a site whose nodes cannot submit (here: an sbatch that refuses inside jobs)
    wrap = work / "nosubmit"
    wrap.mkdir()
    (wrap / "sbatch").write_text('#!/bin/sh\necho "sbatch: error: submission from compute nodes is disabled" >&2\n'
                                 'exit 1\n')
    (wrap / "sbatch").chmod(0o755)
    text = (work / "jobs.toml").read_text().replace('partition = "debug"',
                                                    f'partition = "debug"\nsetup = ["PATH={wrap}:$PATH"]')
    (work / "jobs.toml").write_text(text)
    p = cli("check", "jobs.toml", "--submit", cwd=work, env={**slurm_cluster.env, "COLUMNS": "300"}, check=3,
            timeout=200)
    out = " ".join(p.stdout.split())
    assert "cannot submit its follow-up" in out and "submission from compute nodes is disabled" in out
