"""The SSH transport (paramiko): behaves like ``ssh`` for the user, verifies host keys.

``~/.ssh/config`` is honoured (Host aliases, HostName, User, Port, IdentityFile,
UserKnownHostsFile, ProxyJump, ProxyCommand), then the resource's own ``port`` and
``identity_file``; the ssh-agent and the default keys are tried as ``ssh`` does. Host keys
are checked against ``~/.ssh/known_hosts`` (and the config's UserKnownHostsFile): an unknown
or changed key is refused with the command that fixes it — never trusted silently. One
connection per host is opened per pilotflow command and reused by every call.
"""

from __future__ import annotations

import atexit
import os
import shlex
import socket
import stat
import threading
import time
from pathlib import Path

from pilotflow.errors import ExternalError, UsageError
from pilotflow.transport.base import RETRY_DELAYS, Result, Transport, unchanged

_CACHE: dict[tuple, "SshTransport"] = {}
_LOCK = threading.Lock()


def _config() -> "paramiko.SSHConfig":
    import paramiko
    path = Path(os.environ.get("PILOTFLOW_SSH_CONFIG", "~/.ssh/config")).expanduser()
    return paramiko.SSHConfig.from_path(str(path)) if path.exists() else paramiko.SSHConfig()


class Target:
    """Where and how to connect, resolved from the host string, ssh config and resource."""

    def __init__(self, host: str, port: int | None = None, identity: str | None = None):
        user = None
        if "@" in host:
            user, host = host.rsplit("@", 1)
        cfg = _config().lookup(host)
        self.alias = host
        self.hostname = cfg.get("hostname", host)
        self.user = user or cfg.get("user") or os.environ.get("USER") or _whoami()
        self.port = int(port or cfg.get("port", 22))
        self.keys = [str(Path(identity).expanduser())] if identity else []
        self.keys += [str(Path(k).expanduser()) for k in cfg.get("identityfile", []) if Path(k).expanduser().exists()]
        self.known_hosts = [str(Path(p).expanduser()) for p in
                            cfg.get("userknownhostsfile", "~/.ssh/known_hosts").split()]
        self.proxyjump = cfg.get("proxyjump")
        self.proxycommand = cfg.get("proxycommand")
        self.strict = cfg.get("stricthostkeychecking", "yes").lower()

    @property
    def label(self) -> str:
        return f"{self.user}@{self.alias}" + (f":{self.port}" if self.port != 22 else "")

    def known_hosts_key(self) -> str:
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"


def _whoami() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


class SshTransport(Transport):
    remote = True

    def __init__(self, target: Target, python: str = "python3"):
        self.t = target
        self.label = target.label
        self.python = python
        self._client = None
        self._jump = None
        self._sftp = None
        self._home = None

    @classmethod
    def for_resource(cls, resource) -> "SshTransport":
        key = (resource.host, resource.port, resource.identity_file)
        with _LOCK:
            t = _CACHE.get(key)
            if t is None:
                t = _CACHE[key] = cls(Target(resource.host, resource.port, resource.identity_file),
                                      python=resource.python)
        return t

    # connection ------------------------------------------------------------------------
    def client(self):
        if self._client is not None and self._client.get_transport() and self._client.get_transport().is_active():
            return self._client
        self._drop()
        last = None
        for delay in RETRY_DELAYS + (None,):
            try:
                self._client = self._connect(self.t)
                return self._client
            except ExternalError as e:
                if not e.transient or delay is None:
                    raise
                last = e
            time.sleep(delay)
        raise last  # pragma: no cover

    def _connect(self, t: Target, sock=None):
        import paramiko
        client = paramiko.SSHClient()
        for path in t.known_hosts:
            if os.path.exists(path):
                try:
                    client.load_host_keys(path)
                except (OSError, paramiko.SSHException) as e:
                    raise UsageError(f"cannot read known hosts file {path}: {e}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        if sock is None and t.proxyjump and t.proxyjump.lower() != "none":
            hops = [h.strip() for h in t.proxyjump.split(",")]
            jump = Target(hops[0])
            inner = None
            for hop in hops[1:]:
                inner = self._hop(jump, inner)
                jump = Target(hop)
            self._jump = self._connect(jump, inner)
            sock = self._jump.get_transport().open_channel("direct-tcpip", (t.hostname, t.port), ("127.0.0.1", 0))
        elif sock is None and t.proxycommand and t.proxycommand.lower() != "none":
            sock = paramiko.ProxyCommand(t.proxycommand.replace("%h", t.hostname).replace("%p", str(t.port))
                                         .replace("%r", t.user))
        try:
            client.connect(t.hostname, port=t.port, username=t.user, key_filename=t.keys or None, sock=sock,
                           timeout=15, banner_timeout=20, auth_timeout=20, allow_agent=True, look_for_keys=True)
        except paramiko.BadHostKeyException as e:
            raise UsageError(
                f"{t.label}: the host key of {t.known_hosts_key()} CHANGED (got {e.key.get_name()} "
                f"{e.key.get_base64()[:20]}...). If the server was reinstalled, check the new key with the "
                f"site and remove the old one with: ssh-keygen -R '{t.known_hosts_key()}' -f "
                f"{t.known_hosts[0]}; otherwise someone may be intercepting the connection") from None
        except paramiko.SSHException as e:
            msg = str(e)
            if "not found in known_hosts" in msg:
                raise UsageError(
                    f"{t.label}: the host key of {t.known_hosts_key()} is not in {', '.join(t.known_hosts)}; "
                    f"pilotflow never trusts an unknown host. Check and accept it once with: "
                    f"ssh -p {t.port} {t.user}@{t.hostname} true   (or: ssh-keyscan -p {t.port} {t.hostname} "
                    f">> {t.known_hosts[0]} after checking the fingerprint)") from None
            if isinstance(e, paramiko.AuthenticationException):
                raise UsageError(f"{t.label}: authentication failed ({msg}); check the user, identity_file "
                                 "and that your key is loaded (ssh-add -l)") from None
            raise ExternalError(f"cannot connect to {t.label}: {msg}", transient=True) from None
        except (OSError, socket.error, EOFError) as e:
            raise ExternalError(f"cannot connect to {t.label}: {e}; is the host up and the port right "
                                f"(try: ssh -p {t.port} {t.user}@{t.hostname} true)?", transient=True) from None
        return client

    def _hop(self, t: Target, inner):
        c = self._connect(t, inner)
        return c.get_transport().open_channel("direct-tcpip", (t.hostname, t.port), ("127.0.0.1", 0))

    def _drop(self) -> None:
        for c in (self._sftp, self._client, self._jump):
            try:
                if c is not None:
                    c.close()
            except Exception:  # closing a dead connection
                pass
        self._sftp = self._client = self._jump = None

    def close(self) -> None:
        self._drop()

    # commands --------------------------------------------------------------------------
    def run(self, argv, *, input=None, cwd=None, timeout=120, idempotent=True):
        cmd = shlex.join(argv)
        if cwd:
            cmd = f"cd {_shpath(cwd)} && {cmd}"
        for delay in RETRY_DELAYS + (None,):
            try:
                return self._exec(cmd, argv, input, timeout)
            except (OSError, EOFError, socket.error) as e:
                self._drop()
                if delay is None or not idempotent:
                    raise ExternalError(f"the connection to {self.label} broke while running a command: {e}",
                                        argv=argv, transient=True) from None
                time.sleep(delay)
            except ExternalError as e:
                self._drop()
                if not e.transient or delay is None or not idempotent:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _exec(self, cmd: str, argv, input, timeout) -> Result:
        import paramiko
        try:
            chan = self.client().get_transport().open_session(timeout=15)
        except paramiko.SSHException as e:
            raise ExternalError(f"cannot open a session on {self.label}: {e}", transient=True) from None
        chan.settimeout(timeout)
        chan.exec_command(cmd)
        if input:
            chan.sendall(input)
        chan.shutdown_write()
        out, err = bytearray(), bytearray()
        end = time.time() + timeout
        exited = None  # when the exit status came: sshd may send it before the last of the output
        while True:
            if chan.recv_ready():
                out += chan.recv(65536)
            elif chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
            elif chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                exited = exited or time.time()
                # the output's end (EOF), or a moment's grace for a command that left a process
                # holding its stdout (which may never end)
                if chan.eof_received or time.time() - exited > 2.0:
                    break
                time.sleep(0.002)
            else:
                if time.time() > end:
                    chan.close()
                    return Result(list(argv), 124, out.decode(errors="replace"), f"timed out after {timeout:.0f} s")
                time.sleep(0.002)
        code = chan.recv_exit_status()
        chan.close()
        if code == -1:  # the channel closed without an exit status: the session was cut
            raise EOFError("the session ended without an exit status")
        return Result(list(argv), code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    # files -----------------------------------------------------------------------------
    def sftp(self):
        if self._sftp is None:
            self._sftp = self.client().open_sftp()
        return self._sftp

    def expand(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            if self._home is None:
                self._home = self.sftp().normalize(".")
            return self._home + path[1:]
        return path

    def mkdirs(self, paths):
        paths = [self.expand(p) for p in paths]
        r = self.run(["mkdir", "-p", *paths])
        if r.returncode:
            raise ExternalError(f"cannot create directories on {self.label}", argv=r.argv, returncode=r.returncode,
                                stderr=r.stderr)

    def write_file(self, path, data, mode=0o644):
        path = self.expand(path)
        sftp = self.sftp()
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with sftp.open(tmp, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            sftp.chmod(tmp, mode)
            sftp.posix_rename(tmp, path)
        except FileNotFoundError:
            self.mkdirs([os.path.dirname(path)])
            self.write_file(path, data, mode)

    def read_file(self, path, start=0, end=None):
        try:
            with self.sftp().open(self.expand(path), "rb") as f:
                f.seek(start)
                return f.read() if end is None else f.read(max(0, end - start))
        except FileNotFoundError:
            return None

    def put(self, local, remote):
        remote = self.expand(remote)
        sftp = self.sftp()
        st = local.stat()
        try:
            rs = sftp.stat(remote)
            if unchanged(rs, st):
                return False
        except FileNotFoundError:
            self.mkdirs([os.path.dirname(remote)])
        tmp = f"{remote}.{os.getpid()}.tmp"
        sftp.put(str(local), tmp)
        sftp.chmod(tmp, stat.S_IMODE(st.st_mode))
        sftp.utime(tmp, (st.st_atime, st.st_mtime))
        sftp.posix_rename(tmp, remote)
        return True

    def get(self, remote, local, sftp=None):
        sftp = sftp or self.sftp()
        try:
            rs = sftp.stat(self.expand(remote))
        except FileNotFoundError:
            return False
        try:
            ls = local.stat()
            if unchanged(ls, rs):
                return False
        except FileNotFoundError:
            pass
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        sftp.get(self.expand(remote), str(tmp))
        os.utime(tmp, (rs.st_atime, rs.st_mtime))
        os.replace(tmp, local)
        return True

    def open_extra_sftp(self):
        """Another SFTP channel on the same connection, for parallel transfers."""
        return self.client().open_sftp()

    # the launcher as remote helper -----------------------------------------------------
    def helper(self, command, *, python="python3", pool="", **args):
        import json
        from pilotflow.launcher import parse_answer
        from pilotflow.launcher_text import launcher_hash, launcher_source
        py = shlex.split(python or self.python)
        if command == "info" or not pool:
            argv = py + ["-", "info"]
            r = self.run(argv, input=launcher_source().encode())
        else:
            pool = self.expand(pool)
            path = f"{pool}/.launcher-{launcher_hash()}.py"
            argv = py + [path, "helper", pool, command]
            data = json.dumps(args).encode()
            r = self.run(argv, input=data)
            if r.returncode != 0 and ("No such file" in r.stderr or "can't open file" in r.stderr):
                self.write_file(path, launcher_source().encode())
                r = self.run(argv, input=data)
        if r.returncode == 2 and "pilotflow-launcher:" in r.stderr:  # the pool is not one it can read
            raise UsageError(r.stderr.strip().split("pilotflow-launcher: ", 1)[1])
        if r.returncode == 3 and "pilotflow-launcher:" in r.stderr:  # its database did not answer
            raise ExternalError(r.stderr.strip().split("pilotflow-launcher: ", 1)[1], transient=True)
        if r.returncode != 0:
            raise ExternalError(f"the pilotflow helper failed on {self.label}", argv=argv, returncode=r.returncode,
                                stdout=r.stdout, stderr=r.stderr)
        try:
            return parse_answer(r.stdout)
        except ValueError:
            raise ExternalError(f"the pilotflow helper on {self.label} printed something that is not JSON",
                                argv=argv, stdout=r.stdout, stderr=r.stderr) from None


def _shpath(path: str) -> str:
    if path == "~" or path.startswith("~/"):
        return '"$HOME"' + (shlex.quote(path[1:]) if len(path) > 1 else "")
    return shlex.quote(path)


@atexit.register
def _close_all() -> None:
    for t in list(_CACHE.values()):
        t.close()
    _CACHE.clear()
