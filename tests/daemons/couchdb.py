"""A CouchDB-API server on loopback for the couchdb-marked tests: pouchdb-server.

Why pouchdb-server: it serves CouchDB's HTTP API (documents with revisions and 409
conflicts, design-document views, the changes feed, attachments, basic auth) from the npm
registry, which this machine reaches; CouchDB itself is not in Debian 12. Its versions are
pinned by ``pouchdb/package-lock.json`` and installed with ``npm ci`` into a cache directory
named by the lock's hash. Node and npm come with the machine or from Debian (``nodejs npm``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).with_name("pouchdb")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pilotflow-tests"


def install() -> Path | str:
    """The pouchdb-server program (installed if needed), or why it cannot be had."""
    if not shutil.which("npm") or not shutil.which("node"):
        return "node and npm are missing (Debian: apt-get install nodejs npm)"
    lock = (HERE / "package-lock.json").read_bytes()
    target = CACHE / f"pouchdb-{hashlib.sha256(lock).hexdigest()[:12]}"
    prog = target / "node_modules" / ".bin" / "pouchdb-server"
    if prog.exists():
        return prog
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ("package.json", "package-lock.json"):
        shutil.copy(HERE / f, tmp / f)
    r = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=tmp,
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return f"npm ci of pouchdb-server failed (exit {r.returncode}): {(r.stdout + r.stderr)[-1500:]}"
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return prog


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PouchServer:
    """One pouchdb-server process; ``restart`` keeps its data (persistent mode)."""

    def __init__(self, prog: Path, workdir: Path, port: int, in_memory: bool = False):
        self.prog, self.dir, self.port, self.in_memory = prog, workdir, port, in_memory
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    @classmethod
    def start(cls, prog: Path, workdir: Path, in_memory: bool = False) -> "PouchServer":
        workdir.mkdir(parents=True, exist_ok=True)
        srv = cls(prog, workdir, free_port(), in_memory)
        srv.launch()
        return srv

    def launch(self) -> None:
        argv = [str(self.prog), "--port", str(self.port), "--host", "127.0.0.1"]
        argv += ["--in-memory"] if self.in_memory else ["--dir", str(self.dir / "data")]
        (self.dir / "data").mkdir(exist_ok=True)
        log = open(self.dir / "server.log", "ab")
        # its config and log files go to its working directory
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pouchdb-server exited ({self.proc.returncode}): "
                                   f"{(self.dir / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"pouchdb-server did not answer on {self.url} within 60 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.launch()

    def request(self, method: str, path: str, body=None, auth: tuple[str, str] | None = None):
        """(status, JSON) of one request: for tests that look at the database directly."""
        import base64
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


def picas_venv() -> Path | str:
    """A Python with the real ``picas`` package (tests/daemons/picas-requirements.txt), or why not."""
    req = Path(__file__).with_name("picas-requirements.txt")
    target = CACHE / f"picas-{hashlib.sha256(req.read_bytes()).hexdigest()[:12]}"
    py = target / "bin" / "python"
    if py.exists():
        return py
    tmp = target.with_name(target.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for argv in (["python3", "-m", "venv", str(tmp)],
                 [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  "--no-deps", "-r", str(req)]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            return f"{' '.join(argv[:4])} failed (exit {r.returncode}): {(r.stdout + r.stderr)[-1500:]}"
    shutil.rmtree(target, ignore_errors=True)
    os.rename(tmp, target)
    return py
