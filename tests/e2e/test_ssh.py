"""Remote resources over a real OpenSSH server on loopback (non-root user, key auth, strict
host keys). Marked ``ssh``; the Slurm-through-SSH test also needs the local Slurm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli, status_json, write_bundle
from tests.daemons.sshd import SshServer

pytestmark = pytest.mark.ssh


def ssh_env(server: SshServer, config: Path | None = None) -> dict:
    return {"PILOTFLOW_SSH_CONFIG": str(config or server.ssh_config_path)}


def remote_bundle(work: Path, host: str = "pf-test", extra: str = "", scheduler: str = "local",
                  body: str | None = None) -> Path:
    (work / "bin").mkdir(exist_ok=True)
    (work / "bin" / "compute.sh").write_text('#!/bin/sh\necho "computed $1 on $(hostname)" > "out/$1.txt"\n')
    (work / "bin" / "compute.sh").chmod(0o755)
    return write_bundle(work, f"""
[bundle]
name = "remote"
lock_timeout = "30s"
[[resource]]
name = "login"
scheduler = "{scheduler}"
host = "{host}"
cores_per_node = 2
python = "/usr/bin/python3"
{extra}
""" + (body or """
[[task]]
name = "prep"
command = "mkdir -p out"
walltime = "2s"
[[task]]
name = "c{i}"
command = "sh bin/compute.sh {i}; echo 'to stderr' >&2"
matrix = { i = "1..6" }
walltime = "2s"
after = ["prep"]
inputs = ["bin/compute.sh"]
outputs = ["out/{i}.txt"]
"""))


def accepted(server: SshServer) -> int:
    return server.log_path.read_text().count("Accepted publickey")


def test_remote_run_stages_inputs_and_brings_back_outputs_and_logs(work, ssh_server):
    env = ssh_env(ssh_server)
    remote_bundle(work)
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0)
    assert sorted(p.name for p in (work / "out").iterdir()) == [f"{i}.txt" for i in range(1, 7)]
    assert (work / "out" / "3.txt").read_text().startswith("computed 3 on")
    logs = cli("logs", "c3", cwd=work, env=env, check=0).stdout
    assert "to stderr" in logs
    st = status_json(work, env=env)
    assert st["counts"]["done"] == 7
    # the pool lives in the remote user's home, owned by that user
    r = ssh_server.run("sh", "-c", "ls -d ~/.pilotflow/remote-*/work/bin/compute.sh && stat -c %U ~/.pilotflow")
    assert r.returncode == 0 and r.stdout.strip().endswith(ssh_server.user)


def test_one_connection_per_command(work, ssh_server):
    env = ssh_env(ssh_server)
    remote_bundle(work)
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0)
    before = accepted(ssh_server)
    cli("status", cwd=work, env=env, check=0)
    assert accepted(ssh_server) - before == 1


def test_unknown_host_key_is_refused_with_the_fix(work, ssh_server, tmp_path):
    cfg = tmp_path / "cfg"
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    cfg.write_text(ssh_server.ssh_config_path.read_text().replace(str(ssh_server.known_hosts_path), str(empty)))
    remote_bundle(work)
    p = cli("submit", "jobs.toml", cwd=work, env=ssh_env(ssh_server, cfg), check=2)
    assert "is not in" in p.stderr and "never trusts an unknown host" in p.stderr
    assert f"ssh -p {ssh_server.port} {ssh_server.user}@127.0.0.1 true" in p.stderr


def test_changed_host_key_is_refused_loudly(work, ssh_server, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    fake = tmp_path / "known_hosts"
    fake.write_text(f"[127.0.0.1]:{ssh_server.port} " + " ".join(Path(str(other) + ".pub").read_text().split()[:2]) + "\n")
    cfg = tmp_path / "cfg"
    cfg.write_text(ssh_server.ssh_config_path.read_text().replace(str(ssh_server.known_hosts_path), str(fake)))
    remote_bundle(work)
    p = cli("submit", "jobs.toml", cwd=work, env=ssh_env(ssh_server, cfg), check=2)
    assert "CHANGED" in p.stderr and "ssh-keygen -R" in p.stderr


def test_proxyjump_and_the_ssh_agent(work, ssh_server, tmp_path):
    # a jump host (the same sshd) and a target reached through it, the key only in an agent
    cfg = tmp_path / "cfg"
    cfg.write_text(f"""Host jump
  HostName 127.0.0.1
  Port {ssh_server.port}
  User {ssh_server.user}
  UserKnownHostsFile {ssh_server.known_hosts_path}
Host target
  HostName 127.0.0.1
  Port {ssh_server.port}
  User {ssh_server.user}
  ProxyJump jump
  UserKnownHostsFile {ssh_server.known_hosts_path}
""")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if sock.exists():
                break
            time.sleep(0.05)
        subprocess.run(["ssh-add", str(ssh_server.key_path)], env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
                       check=True, capture_output=True)
        env = {**ssh_env(ssh_server, cfg), "SSH_AUTH_SOCK": str(sock), "HOME": str(tmp_path)}
        remote_bundle(work, host="target")
        cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0)
        assert len(list((work / "out").iterdir())) == 6
    finally:
        agent.terminate()


def test_a_chatty_login_shell_does_not_reach_machine_readable_output(work, ssh_server):
    # Cluster start-up files often print (module banners, quota notes) even for `ssh host cmd`.
    home = Path(os.path.expanduser(f"~{ssh_server.user}"))
    rc = home / ".bashrc"
    saved = rc.read_bytes() if rc.exists() else None
    rc.write_text('echo "Welcome to the test cluster (a chatty .bashrc)"\n' + (saved or b"").decode())
    try:
        assert "Welcome" in ssh_server.run("true").stdout  # the banner really reaches remote commands' stdout
        env = ssh_env(ssh_server)
        remote_bundle(work)
        run = cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0).stdout
        assert len(run.splitlines()) == 1 and "Welcome" not in run
        st = status_json(work, env=env)
        assert st["counts"]["done"] == 7
        assert "to stderr" in cli("logs", "c3", cwd=work, env=env, check=0).stdout
        assert "Welcome" not in cli("check", "jobs.toml", cwd=work, env=env, check=0).stdout.replace("\n", " ")
    finally:
        if saved is None:
            rc.unlink()
        else:
            rc.write_bytes(saved)


def test_pilots_outlive_the_client_and_a_later_status_picks_the_run_up(work, ssh_server):
    env = ssh_env(ssh_server)
    remote_bundle(work, body="""
[[task]]
name = "slow{i}"
command = "sleep 3"
matrix = { i = "1..4" }
walltime = "5s"
""")
    cli("submit", "jobs.toml", cwd=work, env=env, check=0)
    ssh_server.kill_connections()  # the laptop goes away
    time.sleep(8)
    st = status_json(work, env=env)
    assert st["counts"]["done"] == 4


def test_all_output_of_a_command_that_exits_at_once_comes_back(work, ssh_server, monkeypatch):
    """sshd may send a command's exit status before the last of its output (a helper exits
    without the interpreter's teardown): the client reads to the output's end."""
    from pilotflow.bundle import Resource
    from pilotflow.transport.ssh import SshTransport
    monkeypatch.setenv("PILOTFLOW_SSH_CONFIG", str(ssh_server.ssh_config_path))
    t = SshTransport.for_resource(Resource(name="login", scheduler="local", host="pf-test"))
    try:
        n = 600_000
        for _ in range(20):
            r = t.run(["/usr/bin/python3", "-c", f"import os; os.write(1, b'x' * {n}); os._exit(0)"])
            assert (r.returncode, len(r.stdout)) == (0, n)
    finally:
        t.close()


def test_a_sync_cut_at_any_point_leaves_a_consistent_mirror(work, ssh_server):
    env = ssh_env(ssh_server)
    remote_bundle(work, body="""
[[task]]
name = "t{i}"
command = "true"
matrix = { i = "1..400" }
walltime = "1s"
""")
    cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0)
    run_dir = next((work / ".pilotflow" / "runs").iterdir())
    # throw the mirror away and cut syncs at different moments: connection and process
    for f in ("states.jsonl", "sync.json", "states.db", "states.db-wal", "states.db-shm"):
        (run_dir / f).unlink(missing_ok=True)
    for delay in (0.05, 0.15, 0.3):
        p = subprocess.Popen([sys.executable, "-m", "pilotflow", "sync"], cwd=work, env={**os.environ, **env},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        ssh_server.kill_connections()
        p.send_signal(signal.SIGKILL)
        p.wait()
        from pilotflow.run.mirror import Mirror
        Mirror(run_dir).states()  # always readable
    st = status_json(work, env=env)
    assert st["counts"] == {"todo": 0, "locked": 0, "done": 400, "error": 0}


@pytest.mark.slurm
def test_slurm_through_ssh(work, ssh_server, slurm_cluster, tmp_path_factory):
    server = SshServer.start(tmp_path_factory.mktemp("sshd-slurm"), env=slurm_cluster.env)
    try:
        env = ssh_env(server)
        remote_bundle(work, scheduler="slurm", extra='max_nodes = 2\nmax_walltime = "5m"\npartition = "debug"\ncores_per_node = 4'
                      .replace("cores_per_node = 4", ""))
        cli("submit", "jobs.toml", "--wait", cwd=work, env=env, check=0, timeout=300)
        st = status_json(work, env=env)
        assert st["counts"]["done"] == 7
        assert st["pilots"]["p1"]["job_id"].isdigit()
        assert len(list((work / "out").iterdir())) == 6
    finally:
        server.stop()
