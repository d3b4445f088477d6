"""Validators for bundle values: each returns the parsed value or raises ValueError.

Messages name what was expected, so that the bundle reader can prefix them with
``FILE:LINE: key = value:`` and the user sees what, where and how to fix in one line.
"""

from __future__ import annotations

import re
from typing import Any, Callable
from urllib.parse import urlsplit

from pilotflow.bundle.units import parse_duration, parse_size_mb

from pilotflow.schedulers.base import DIRECTIVE_WORD_RE

Validator = Callable[[Any], Any]

NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
TASK_NAME_RE = re.compile(r"[A-Za-z0-9_.+=-]{1,200}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Values that end up inside a scheduler directive (#SBATCH --partition=VALUE): no spaces,
# quotes, newlines or shell metacharacters, whatever the scheduler.
HOST_RE = re.compile(r"(?:[A-Za-z0-9_.+-]+@)?[A-Za-z0-9_.:%\[\]-]+")
COUCHDB_NAME_RE = re.compile(r"[a-z][a-z0-9_$()+/-]*")


def show(value: Any) -> str:
    """A value as the user wrote it in TOML, shortened for messages."""
    if isinstance(value, str):
        text = '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "{...}"
    elif isinstance(value, list):
        text = "[" + ", ".join(show(v) for v in value) + "]"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + '..."'


def integer(lo: int = 0, hi: int | None = None) -> Validator:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected a whole number{_range(lo, hi)}")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"expected a whole number{_range(lo, hi)}")
        return v
    return check


def _range(lo: int, hi: int | None) -> str:
    if hi is None:
        return f" ≥ {lo}"
    return f" from {lo} to {hi}"


def fraction(lo: float = 0.0, hi: float = 1.0) -> Validator:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise ValueError(f"expected a number from {lo:g} to {hi:g}")
        return float(v)
    return check


def duration(v: Any) -> int:
    return parse_duration(v)


def positive_duration(v: Any) -> int:
    s = parse_duration(v)
    if s <= 0:
        raise ValueError("expected a duration longer than zero")
    return s


def size_mb(v: Any) -> int:
    return parse_size_mb(v)


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("expected a string")
    if "\x00" in v:
        raise ValueError("a NUL character cannot be passed to a program")
    return v


def nonempty_text(v: Any) -> str:
    v = text(v)
    if not v.strip():
        raise ValueError("expected a non-empty string")
    return v


def one_line(v: Any) -> str:
    v = text(v)
    if any(c in v for c in "\n\r"):
        raise ValueError("expected a single line")
    return v


def name(v: Any) -> str:
    v = text(v)
    if not NAME_RE.fullmatch(v) or set(v) == {"."}:
        raise ValueError("expected a name of letters, digits, '_', '.' and '-'")
    return v


def choice(*options: str) -> Validator:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError("expected one of " + ", ".join(f'"{o}"' for o in options))
        return v
    return check


def couchdb_url(v: Any) -> str:
    """Where a CouchDB pool's server is. Credentials never go in the bundle (it is shared,
    committed, and shown in logs): they come from a file or the environment."""
    v = one_line(v)
    u = urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError('expected http(s)://HOST[:PORT], for example "https://picas.surfsara.nl:6984"')
    if u.username or u.password:
        raise ValueError("credentials never go in the bundle: put user:password in a file only you may read "
                         "(chmod 600) and name it in couchdb_credentials, or set PILOTFLOW_COUCHDB_USER "
                         "and PILOTFLOW_COUCHDB_PASSWORD")
    if u.query or u.fragment:
        raise ValueError("expected no query or fragment")
    return v


def couchdb_name(v: Any) -> str:
    v = text(v)
    if not COUCHDB_NAME_RE.fullmatch(v):
        raise ValueError("expected a CouchDB database name: lowercase letters first, then a-z 0-9 _ $ ( ) + - /")
    return v


def directive_word(v: Any) -> str:
    """A value placed inside a scheduler directive such as ``--partition=VALUE``."""
    v = text(v)
    if not DIRECTIVE_WORD_RE.fullmatch(v):
        raise ValueError("expected letters, digits and _.,:+@%=/- only (it goes into a scheduler directive)")
    return v


def host(v: Any) -> str:
    v = text(v)
    if not HOST_RE.fullmatch(v) or v.startswith("-"):
        raise ValueError('expected "host", "user@host" or an ~/.ssh/config alias')
    return v


def str_list(item: Validator = text) -> Validator:
    """A list of strings; a single string is taken as a list of one, as users often write."""
    def check(v: Any) -> tuple:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise ValueError("expected a list of strings")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except ValueError as e:
                raise ValueError(f"item {i + 1} ({show(x)}): {e}") from None
        return tuple(out)
    return check


def relative_path(v: Any) -> str:
    """A path inside the bundle's directory / the run's work directory."""
    v = one_line(v)
    parts = v.replace("\\", "/").split("/")
    if v.startswith(("/", "~")) or ".." in parts:
        raise ValueError("expected a relative path inside the bundle's directory (no leading / or ~, no ..)")
    return v


def command_name(v: Any) -> str:
    """An interpreter to start: words, but nothing a shell would act on."""
    v = nonempty_text(v)
    if any(c in v for c in ";|&$`<>()\n\\'\"*?"):
        raise ValueError('expected a command such as "python3" or "/usr/bin/env python3" '
                         "(no shell operators or quotes)")
    return v


def directive(v: Any) -> str:
    """An extra scheduler option: one option, starting with '-', on one line."""
    v = one_line(v)
    if not v.startswith("-"):
        raise ValueError('expected a scheduler option starting with "-", for example "--constraint=rome"')
    return v


def env_table(v: Any) -> tuple:
    """Environment variables: names checked, scalar values turned into strings as written."""
    if not isinstance(v, dict):
        raise ValueError('expected a table, for example { OMP_NUM_THREADS = "1" }')
    out = []
    for k, x in v.items():
        if not ENV_NAME_RE.fullmatch(k):
            raise ValueError(f"{show(k)} is not a valid environment variable name")
        if isinstance(x, bool):
            x = "true" if x else "false"
        elif isinstance(x, (int, float)):
            x = str(x)
        elif not isinstance(x, str):
            raise ValueError(f"value of {k} must be a string or a number")
        if "\x00" in x:
            raise ValueError(f"value of {k} contains a NUL character")
        out.append((k, x))
    return tuple(out)
