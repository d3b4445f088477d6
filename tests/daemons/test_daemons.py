"""Prove the daemon fixtures give working, real Slurm / Grid Engine / sshd."""
from __future__ import annotations

import time
from pathlib import Path

import paramiko
import pytest

from tests.daemons.fixtures import sge_cluster, slurm_cluster, ssh_server  # noqa: F401
from tests.daemons.sge import SgeCluster
from tests.daemons.slurm import SlurmCluster
from tests.daemons.sshd import SshServer, ensure_user


def _wait_file(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size:
            return path.read_text()
        time.sleep(0.2)
    raise AssertionError(f"{path} did not appear in {timeout} s")


def _slurm_state(cluster: SlurmCluster, job: str) -> str:
    res = cluster.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"])
    return res.stdout.strip()


@pytest.mark.slurm
def test_slurm_two_node_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "job-%j.out"
    res = slurm_cluster.run(["sbatch", "--parsable", "-N", "2", "-o", str(out), "--wrap",
                             "srun bash -c 'echo node=$SLURMD_NODENAME'"])
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while _slurm_state(slurm_cluster, job) != "COMPLETED":
        assert time.monotonic() < deadline, _slurm_state(slurm_cluster, job)
        time.sleep(0.3)
    nodes = {line for line in Path(str(out).replace("%j", job)).read_text().split()
             if line.startswith("node=")}
    assert len(nodes) == 2 and nodes <= {f"node={n}" for n in slurm_cluster.nodes}
    listing = slurm_cluster.run(["squeue", "-t", "all", "-o", "%i %T"]).stdout
    assert f"{job} COMPLETED" in listing


@pytest.mark.slurm
def test_slurm_non_root_user(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """A plain user can submit and gets output files it owns."""
    user = ensure_user("pfuser")
    tmp_path.chmod(0o777)
    out = tmp_path / "user.out"
    res = slurm_cluster.run(["runuser", "-u", "pfuser", "--", "sbatch", "--parsable",
                             "-o", str(out), "--wrap", "id -un"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert _wait_file(out).strip() == "pfuser"
    assert out.stat().st_uid == user.pw_uid


@pytest.mark.sge
def test_sge_pe_job(sge_cluster: SgeCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\necho slots=$NSLOTS queue=$QUEUE\n")
    out = tmp_path / "job.out"
    res = sge_cluster.run(["qsub", "-terse", "-sync", "y", "-N", "pe2", "-pe", "smp", "2",
                           "-S", "/bin/bash", "-j", "y", "-o", str(out), str(script)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert _wait_file(out).split() == ["slots=2", "queue=all.q"]


def _paramiko(server: SshServer, known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(server.host, port=server.port, username=server.user,
                   key_filename=str(server.key_path), look_for_keys=False,
                   allow_agent=False, timeout=10)
    return client


@pytest.mark.ssh
def test_ssh_paramiko_non_root(ssh_server: SshServer) -> None:
    client = _paramiko(ssh_server, ssh_server.known_hosts_path)
    try:
        _, stdout, _ = client.exec_command("python3 --version; id -u")
        lines = stdout.read().decode().split()
        assert stdout.channel.recv_exit_status() == 0
    finally:
        client.close()
    assert lines[0] == "Python" and lines[1].startswith("3.")
    assert lines[2] != "0"


@pytest.mark.ssh
def test_ssh_unknown_host_refused(ssh_server: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException):
        _paramiko(ssh_server, empty).close()
