"""This machine as a resource: subprocesses, plain file operations, and the launcher's
helpers called in-process (the same code the remote side runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from pilotflow.errors import ExternalError, UsageError
from pilotflow.transport.base import Result, Transport, unchanged


class LocalTransport(Transport):
    """This machine: subprocesses, plain file operations, and the launcher's helpers called
    in-process (the same code the remote side runs)."""

    def run(self, argv, *, input=None, cwd=None, timeout=120, idempotent=True):
        try:
            p = subprocess.run(argv, input=input, cwd=cwd, capture_output=True, timeout=timeout)
        except FileNotFoundError:
            return Result(argv, 127, "", f"{argv[0]}: command not found")
        except subprocess.TimeoutExpired:
            return Result(argv, 124, "", f"timed out after {timeout:.0f} s")
        return Result(argv, p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))

    def write_file(self, path, data, mode=0o644):
        from pilotflow.launcher import write_atomic
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        os.chmod(path, mode)

    def mkdirs(self, paths):
        for p in paths:
            os.makedirs(p, exist_ok=True)

    def read_file(self, path, start=0, end=None):
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read() if end is None else f.read(max(0, end - start))
        except FileNotFoundError:
            return None

    def put(self, local, remote):
        dst = Path(remote)
        st = local.stat()
        try:
            if unchanged(dst.stat(), st):
                return False
        except FileNotFoundError:
            pass
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        shutil.copy2(local, tmp)
        os.replace(tmp, dst)
        return True

    def get(self, remote, local):
        src = Path(remote)
        if not src.exists():
            return False
        return self.put(src, str(local))

    def helper(self, command, *, python="python3", pool="", **args):
        from pilotflow import launcher
        try:
            return launcher.helper(pool, command, args)
        except launcher.PoolUnreachable as e:
            raise ExternalError(str(e), transient=True) from None
        except launcher.PoolError as e:
            raise UsageError(str(e)) from None

    def expand(self, path):
        return os.path.expanduser(path)
