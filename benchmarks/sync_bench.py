#!/usr/bin/env python3
"""Sync speed over SSH: 10,000 token state files on the remote side, full and incremental.

    python benchmarks/sync_bench.py [--tokens 10000] [--changed 100]   (root; starts its own sshd)

Side by side in one run against a real OpenSSH server on loopback (a non-root user, key
auth, strict host keys):
  pilotflow   one helper round trip (the launcher file lists what changed since the cursor
              and returns it as one JSON document), appended to the local journal
  naive       SFTP: list the state directory, then `get` every (changed) file
Full sync: an empty mirror. Incremental: 100 state files rewritten since the last sync.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pilotflow.launcher import Pool, dump, write_atomic  # noqa: E402
from pilotflow.run.records import ResourceState, RunRecord  # noqa: E402
from pilotflow.bundle import Resource  # noqa: E402
from pilotflow.run.sync import Session, sync_states  # noqa: E402
from tests.daemons.sshd import SshServer  # noqa: E402


def make_pool(root: Path, n: int, user: str) -> Pool:
    pool = Pool.create(str(root), {"run": "bench", "lock_timeout": 300})
    pool.add_defs([{"name": f"t{i:05d}", "command": "true"} for i in range(n)])
    now = time.time()
    for i in range(n):
        name = f"t{i:05d}"
        pool.claim(name, 1, dump({"token": name, "pilot": "p1", "start": now}))
        pool.put(name, {"token": name, "state": "done", "attempt": 1, "exit_code": 0, "pilot": "p1",
                        "host": "node1", "start": now, "end": now + 1})
    pw = pwd.getpwnam(user)
    subprocess.run(["chown", "-R", f"{pw.pw_uid}:{pw.pw_gid}", str(root)], check=True)
    return pool


def connect(server: SshServer):
    import paramiko
    c = paramiko.SSHClient()
    c.load_host_keys(str(server.known_hosts_path))
    c.set_missing_host_key_policy(paramiko.RejectPolicy())
    c.connect("127.0.0.1", port=server.port, username=server.user, key_filename=str(server.key_path))
    return c, c.open_sftp()


def naive(sftp, remote: str, since: float | None) -> int:
    """Every state file (in every state directory) listed with its mtime, the changed ones read."""
    n = 0
    for shard in sftp.listdir(f"{remote}/state"):
        for a in sftp.listdir_attr(f"{remote}/state/{shard}"):
            if since is None or a.st_mtime >= int(since):  # SFTP mtimes are whole seconds
                with sftp.open(f"{remote}/state/{shard}/{a.filename}", "rb") as f:
                    f.read()
                n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--changed", type=int, default=100)
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="pf-sync-bench-"))
    server = SshServer.start(base / "sshd")
    home = Path(pwd.getpwnam(server.user).pw_dir)
    remote = home / ".pilotflow-bench" / "run"
    try:
        shutil.rmtree(remote.parent, ignore_errors=True)
        pool = make_pool(remote, a.tokens, server.user)
        os.environ["PILOTFLOW_SSH_CONFIG"] = str(server.ssh_config_path)
        res = Resource(name="r", scheduler="local", host="pf-test", cores_per_node=2, python="/usr/bin/python3")
        rundir = base / "mirror"
        rundir.mkdir()
        record = RunRecord(run="bench", bundle="b", bundle_path="", base_dir=str(base), created=time.time(),
                           lock_timeout=300, resources={"r": ResourceState.of(res, str(remote))},
                           tokens=a.tokens, directory=rundir)
        record.save()
        with Session(record) as s:
            s.transport("r").client()  # connected outside the timing, as for the naive way
            t = time.perf_counter()
            snap = sync_states(s)
            full = time.perf_counter() - t
            assert len(snap.changed) == a.tokens
            time.sleep(1.1)
            marker = time.time()
            for i in range(a.changed):
                name = f"t{i:05d}"
                pool.put(name, {"token": name, "state": "done", "attempt": 1, "exit_code": 0, "changed": True})
            subprocess.run(["chown", "-R", server.user, str(remote / "state")], check=True)
            t = time.perf_counter()
            snap = sync_states(s)
            incr = time.perf_counter() - t
            assert len(snap.changed) == a.changed, len(snap.changed)
        client, sftp = connect(server)
        t = time.perf_counter()
        assert naive(sftp, str(remote), None) == a.tokens
        naive_full = time.perf_counter() - t
        t = time.perf_counter()
        assert naive(sftp, str(remote), marker) >= a.changed
        naive_incr = time.perf_counter() - t
        client.close()
        print(f"{a.tokens} state files over SSH (loopback), {a.changed} changed for the incremental sync:")
        print(f"  full sync         pilotflow {full:6.2f} s   naive SFTP get per file {naive_full:6.2f} s   "
              f"({naive_full / full:.0f}× faster)")
        print(f"  incremental sync  pilotflow {incr:6.2f} s   naive SFTP get per file {naive_full:6.2f} s   "
              f"({naive_full / incr:.0f}× faster)")
        print(f"                    a smarter SFTP baseline (list with mtimes, get the changed) {naive_incr:6.2f} s   "
              f"({naive_incr / incr:.1f}× faster)")
        print("  (both with an open connection; a pilotflow command opens one per host, ~0.1 s)")
    finally:
        server.stop()
        shutil.rmtree(remote.parent, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
