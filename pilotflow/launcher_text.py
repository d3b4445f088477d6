"""The launcher as text: the source every batch script carries and the SSH helper uploads,
and the hash that names its copy in a pool (``POOL/.launcher-HASH.py``); and as this
interpreter's bytecode, for pilots on this machine (``POOL/.launcher-HASH.pyc``)."""

from __future__ import annotations

import hashlib
import importlib.util
from functools import lru_cache
from importlib import resources
from pathlib import Path


def launcher_source() -> str:
    return _launcher()[0]


def launcher_hash() -> str:
    return _launcher()[1]


@lru_cache(maxsize=1)
def _launcher() -> tuple[str, str]:
    src = resources.files("pilotflow").joinpath("launcher.py").read_text(encoding="utf-8")
    return src, hashlib.sha256(src.encode()).hexdigest()[:16]


def launcher_bytecode() -> bytes | None:
    """This interpreter's cached bytecode of the launcher, when it is that of its source: a
    pilot started with this interpreter runs it without compiling 3,000 lines (~40 ms a start
    here). None when there is no such cache (PYTHONDONTWRITEBYTECODE, a read-only install)."""
    return bytecode_for(Path(__file__).with_name("launcher.py"))


def bytecode_for(source: Path) -> bytes | None:
    """The cached .pyc of ``source`` if its header matches the source (as the import system
    checks it: magic, then mtime and size, or the source's hash), else None."""
    try:
        data = Path(importlib.util.cache_from_source(str(source))).read_bytes()
        st = source.stat()
    except (OSError, NotImplementedError, ValueError):
        return None
    if len(data) < 16 or data[:4] != importlib.util.MAGIC_NUMBER:
        return None
    flags = int.from_bytes(data[4:8], "little")
    if flags & 1:  # hash-based
        return data if data[8:16] == importlib.util.source_hash(source.read_bytes()) else None
    mtime, size = int.from_bytes(data[8:12], "little"), int.from_bytes(data[12:16], "little")
    return data if (mtime, size) == (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF) else None
