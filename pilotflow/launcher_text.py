"""The launcher as text: the source every batch script carries and the SSH helper uploads,
and the hash that names its copy in a pool (``POOL/.launcher-HASH.py``)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources


def launcher_source() -> str:
    return _launcher()[0]


def launcher_hash() -> str:
    return _launcher()[1]


@lru_cache(maxsize=1)
def _launcher() -> tuple[str, str]:
    src = resources.files("pilotflow").joinpath("launcher.py").read_text(encoding="utf-8")
    return src, hashlib.sha256(src.encode()).hexdigest()[:16]
