"""A private OpenSSH server on 127.0.0.1, logging in a non-root test user.

Why: pilotflow drives clusters over SSH (paramiko, ProxyJump); tests need a
real sshd with real host-key checking, and a non-root login, since real
clusters never let you in as root. The server has its own host key, config,
authorized keys and pid file in ``workdir``; it does not touch
/etc/ssh/sshd_config or a system sshd.

Remote commands run with sshd's default PATH
(/usr/local/bin:/usr/bin:/bin:/usr/games), so ``python3`` there is Debian's
/usr/bin/python3, not the pyenv python of root (whose /root is not readable by
the test user). ``env`` is passed to sessions with sshd's ``SetEnv`` (e.g.
SLURM_CONF, which the local Slurm needs but a real cluster has in /etc).
"""
from __future__ import annotations

import os
import pwd
import socket
import subprocess
import time
from pathlib import Path

from tests.daemons.slurm import (MARKER, descendants, log_tail, make_traversable,
                                 procs_named, stale, terminate)

SSHD = "/usr/sbin/sshd"


def ensure_user(user: str) -> pwd.struct_passwd:
    """Create ``user`` with a home if missing, and unlock it: useradd makes it
    locked ("!"), which sshd refuses with UsePAM no; "*" allows key logins."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", user], check=True,
                       capture_output=True)
    subprocess.run(["usermod", "-p", "*", user], check=True, capture_output=True)
    return pwd.getpwnam(user)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 chosen by the kernel."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SshServer:
    """Handle on a running sshd; create it with ``SshServer.start``."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, user: str, port: int) -> None:
        self.workdir = Path(workdir).resolve()
        self.user = user
        self.port = port
        self.key_path = self.workdir / "id_ed25519"
        self.known_hosts_path = self.workdir / "known_hosts"
        self.ssh_config_path = self.workdir / "ssh_config"
        self.config_path = self.workdir / "sshd_config"
        self.log_path = self.workdir / "sshd.log"
        self.host_key_line = ""
        self._proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, workdir: Path, user: str = "pfuser", env: dict[str, str] | None = None,
              timeout: float = 30.0) -> "SshServer":
        """Create user, keys and config, start sshd and wait for its banner."""
        server = cls(workdir, user, free_port())
        w = server.workdir
        if w in _LIVE:
            _LIVE.pop(w).stop()
        cls.cleanup_leftovers(w)
        w.mkdir(parents=True, exist_ok=True)
        make_traversable(w)  # sshd reads authorized_keys as the user
        (w / MARKER).write_text(f"{os.getpid()}\n")
        ensure_user(user)
        for key in (server.key_path, w / "ssh_host_ed25519_key"):
            if not key.exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                "pilotflow-test", "-f", str(key)], check=True)
        (w / "authorized_keys").mkdir(exist_ok=True)
        auth = w / "authorized_keys" / user
        auth.write_text(server.key_path.with_suffix(".pub").read_text())
        auth.chmod(0o644)
        host_pub = (w / "ssh_host_ed25519_key.pub").read_text().split()
        server.host_key_line = f"[{cls.host}]:{server.port} {host_pub[0]} {host_pub[1]}"
        server.known_hosts_path.write_text(server.host_key_line + "\n")
        setenv = " ".join(f'"{k}={v}"' for k, v in (env or {}).items())
        server.config_path.write_text(f"""# written by tests/daemons/sshd.py
ListenAddress {cls.host}
Port {server.port}
HostKey {w}/ssh_host_ed25519_key
PidFile {w}/sshd.pid
AuthorizedKeysFile {w}/authorized_keys/%u
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
X11Forwarding no
PrintMotd no
MaxStartups 200
MaxSessions 100
LogLevel VERBOSE
Subsystem sftp internal-sftp
{"SetEnv " + setenv if setenv else ""}
""")
        server.ssh_config_path.write_text(f"""Host pf-test
  HostName {cls.host}
  Port {server.port}
  User {user}
  IdentityFile {server.key_path}
  IdentitiesOnly yes
  UserKnownHostsFile {server.known_hosts_path}
  StrictHostKeyChecking yes
  BatchMode yes
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        server._start(timeout)
        _LIVE[w] = server
        return server

    @staticmethod
    def cleanup_leftovers(workdir: Path | None = None) -> None:
        """Stop sshd listeners of ``workdir`` or of a test process that died."""
        def stale_listener(argv: list[str]) -> bool:
            words = " ".join(argv).split()
            conf = words[words.index("-f") + 1] if "-f" in words[:-1] else "/etc/ssh/x"
            return "[listener]" in words and stale(Path(conf).parent, workdir, tagged=False)
        terminate([pid for pid, argv in procs_named("sshd").items() if stale_listener(argv)])

    def _start(self, timeout: float) -> None:
        check = subprocess.run([SSHD, "-t", "-f", str(self.config_path)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"sshd rejects {self.config_path}: {check.stderr}")
        self._proc = subprocess.Popen(
            [SSHD, "-D", "-f", str(self.config_path), "-E", str(self.log_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self._proc.returncode}\n"
                                   + log_tail(self.log_path))
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        self._proc.kill()
        self._proc.wait()
        raise RuntimeError(f"sshd not answering on port {self.port} after {timeout:.0f} s\n"
                           + log_tail(self.log_path))

    def stop(self) -> None:
        """Stop the listener, its connections and the commands they left."""
        if self._proc is not None:
            self.kill_connections()
            terminate([self._proc.pid], timeout=5)
            self._proc.wait()
            self._proc = None
        terminate(self.session_processes(), timeout=3)
        _LIVE.pop(self.workdir, None)

    def session_processes(self) -> list[int]:
        """Processes started over this server's connections (SSH_CONNECTION
        names our port), except batch jobs they submitted (SLURM_JOB_ID /
        JOB_ID set), which belong to the scheduler, as on a real cluster."""
        mark = f" {self.host} {self.port}".encode()
        found = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(e.startswith(b"SSH_CONNECTION=") and e.endswith(mark) for e in env) \
                    and not any(e.startswith((b"SLURM_JOB_ID=", b"JOB_ID=")) for e in env):
                found.append(int(entry.name))
        return found

    def kill_connections(self) -> int:
        """SIGKILL the per-connection sshd processes but not the listener, like a
        cut network link; returns how many were killed. The sessions' commands
        keep running unless they use the closed pipes (as after a real cut);
        ``stop()`` ends them."""
        if self._proc is None:
            return 0
        sshds = set(procs_named("sshd"))
        victims = [p for p in descendants(self._proc.pid) if p in sshds]
        terminate(victims, timeout=0)
        return len(victims)

    def ssh_argv(self, *command: str) -> list[str]:
        """OpenSSH client argv running ``command`` as the test user."""
        return ["ssh", "-F", str(self.ssh_config_path), "pf-test", *command]

    def run(self, *command: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``command`` remotely with the OpenSSH client (text output, no check)."""
        return subprocess.run(self.ssh_argv(*command), capture_output=True, text=True,
                              timeout=timeout)


_LIVE: dict[Path, SshServer] = {}  # servers started by this process, by workdir
