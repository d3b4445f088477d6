"""Session-scoped pytest fixtures for the real local daemons.

Use from tests/conftest.py with ``from tests.daemons.fixtures import *``.
Why session scope: starting Slurm takes ~1.5 s and stopping Grid Engine's
qmaster ~8 s, and every test can share one cluster (jobs are independent).

Each fixture installs the Debian packages through install.sh when the
binaries are missing and we are root with apt-get; when that is impossible it
skips with the reason. A daemon that is installed but fails to start is an
error, not a skip: that is a real breakage CI must show.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.daemons.couchdb import PouchServer, install as install_pouchdb, picas_venv
from tests.daemons.sge import SgeCluster
from tests.daemons.slurm import SlurmCluster
from tests.daemons.sshd import SshServer

INSTALL_SH = Path(__file__).with_name("install.sh")

__all__ = ["slurm_cluster", "sge_cluster", "ssh_server", "couchdb_server", "picas_python", "ensure_installed"]


def ensure_installed(binaries: list[str], packages: list[str]) -> str | None:
    """None when ``binaries`` exist (installing ``packages`` if needed and
    possible), else the reason why the daemon cannot be had here."""
    def missing() -> list[str]:
        return [b for b in binaries if not (shutil.which(b) or os.path.exists(b))]
    if not missing():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (f"{', '.join(missing())} missing and cannot be installed here "
                f"(needs root and apt-get: run {INSTALL_SH})")
    res = subprocess.run(["bash", str(INSTALL_SH), *packages], capture_output=True,
                         text=True, timeout=900)
    if missing():
        return (f"{', '.join(missing())} still missing after {INSTALL_SH} "
                f"(exit {res.returncode}): {(res.stdout + res.stderr)[-2000:]}")
    return None


_SHARED: dict[str, list] = {}  # name -> [daemon, users]


def _shared(name: str, start: Callable[[], Any]) -> Iterator[Any]:
    """Start a daemon once per process even when these fixtures are registered
    twice (e.g. imported by tests/conftest.py and by a test module): pytest
    would then run each copy, and a second Grid Engine cell cannot start."""
    if name not in _SHARED:
        _SHARED[name] = [start(), 0]
    _SHARED[name][1] += 1
    try:
        yield _SHARED[name][0]
    finally:
        _SHARED[name][1] -= 1
        if _SHARED[name][1] == 0:
            _SHARED.pop(name)[0].stop()


def _skip_if(reason: str | None) -> None:
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A 3-node Slurm cluster (4 CPUs per node, fast scheduling)."""
    _skip_if(ensure_installed(
        ["/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch", "/usr/sbin/munged"],
        ["slurmctld", "slurmd", "slurm-client", "munge"]))
    if os.geteuid() != 0:
        _skip_if("starting slurmctld/slurmd/munged needs root")
    yield from _shared("slurm", lambda: SlurmCluster.start(tmp_path_factory.mktemp("slurm")))


@pytest.fixture(scope="session")
def sge_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SgeCluster]:
    """Grid Engine cell with queue all.q (4 slots) and PE smp."""
    _skip_if(ensure_installed(
        ["/usr/lib/gridengine/sge_qmaster", "/usr/lib/gridengine/sge_execd", "qsub"],
        ["gridengine-master", "gridengine-exec", "gridengine-client"]))
    if os.geteuid() != 0:
        _skip_if("starting sge_qmaster/sge_execd needs root")
    yield from _shared("sge", lambda: SgeCluster.start(tmp_path_factory.mktemp("sge")))


@pytest.fixture(scope="session")
def ssh_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """sshd on 127.0.0.1 logging in the non-root user ``pfuser`` by key."""
    _skip_if(ensure_installed(["/usr/sbin/sshd", "ssh-keygen", "ssh"], ["openssh-server"]))
    if os.geteuid() != 0:
        _skip_if("creating the test user and running sshd on a port needs root")
    yield from _shared("ssh", lambda: SshServer.start(tmp_path_factory.mktemp("sshd")))


@pytest.fixture(scope="session")
def couchdb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PouchServer]:
    """A CouchDB-API server (pouchdb-server, persistent mode) on 127.0.0.1, admin party."""
    if not shutil.which("npm"):
        _skip_if(ensure_installed(["node", "npm"], ["nodejs", "npm"]))
    prog = install_pouchdb()
    _skip_if(prog if isinstance(prog, str) else None)
    yield from _shared("couchdb", lambda: PouchServer.start(prog, tmp_path_factory.mktemp("couchdb")))


@pytest.fixture(scope="session")
def picas_python() -> Path:
    """A Python interpreter with the real picas package (a virtual environment of its own)."""
    py = picas_venv()
    _skip_if(py if isinstance(py, str) else None)
    return py
