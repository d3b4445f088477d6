"""Turning task templates into concrete tasks: matrix products, token-list files, ``after``.

Placeholders are deliberately narrow: ``{var}`` is replaced only when ``var`` is one of the
task's own matrix variables (or ``n`` for ``tasks_from``). Every other brace is left alone, so
shell code such as ``awk '{print $1}'`` or ``${HOME}`` needs no escaping in a command.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable

MAX_EXPANSION = 1_000_000
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")


def matrix_values(value: object) -> list[str]:
    """The values of one matrix variable, as strings; raises ValueError with the accepted forms."""
    if isinstance(value, str):
        m = _RANGE.match(value)
        if not m:
            raise ValueError('expected a list of values or an inclusive range such as "1..100"')
        a, b = m.group(1), m.group(2)
        lo, hi = int(a), int(b)
        if lo > hi:
            raise ValueError(f"the range {value!r} is empty: write the smaller number first")
        if hi - lo + 1 > MAX_EXPANSION:
            raise ValueError(f"the range {value!r} has more than {MAX_EXPANSION:,} values")
        width = len(a) if a.startswith("0") and len(a) > 1 else 0
        return [str(i).zfill(width) for i in range(lo, hi + 1)]
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list expands to no tasks")
        return [scalar_text(v) for v in value]
    return [scalar_text(value)]


def scalar_text(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise ValueError("matrix values must be strings, numbers or booleans")


def check_matrix_size(variables: dict[str, list[str]]) -> int:
    """The number of combinations (tasks), or ValueError past :data:`MAX_EXPANSION`. The
    combinations themselves are never listed: :class:`~pilotflow.bundle.tasks.TaskBlock`
    makes one from its index when a task is needed."""
    total = 1
    for vals in variables.values():
        total *= len(vals)
    if total > MAX_EXPANSION:
        raise ValueError(f"the matrix expands to {total:,} tasks; the limit is {MAX_EXPANSION:,}")
    return total


class Substituter:
    """Replaces ``{var}`` for a fixed set of variable names, leaving other braces alone."""

    def __init__(self, names: Iterable[str]):
        names = sorted(set(names), key=len, reverse=True)
        self._re = re.compile(r"\{(" + "|".join(map(re.escape, names)) + r")\}") if names else None

    def __call__(self, text: str, values: dict[str, str]) -> str:
        if self._re is None or "{" not in text:
            return text
        return self._re.sub(lambda m: values[m.group(1)], text)

    def template(self, text: str, order: list[str] | None = None):
        """``text`` made into a function of the values, for expanding it many times: None when
        it holds no placeholder (it stays as it is); else ``str.format_map`` of a template
        with every other brace doubled (a million names in C rather than a regex each). With
        ``order``, ``str.format`` taking the values positionally in that order (no dict per task)."""
        if self._re is None or "{" not in text or not self._re.search(text):
            return None
        parts, last = [], 0
        for m in self._re.finditer(text):
            parts.append(text[last:m.start()].replace("{", "{{").replace("}", "}}"))
            parts.append("{" + (str(order.index(m.group(1))) if order else m.group(1)) + "}")
            last = m.end()
        parts.append(text[last:].replace("{", "{{").replace("}", "}}"))
        made = "".join(parts)
        return made.format if order else made.format_map

    def unknown(self, text: str, known: Iterable[str]) -> list[str]:
        """Placeholder-looking words that are not variables (to warn about likely typos)."""
        known = set(known)
        return [w for w in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", text) if w not in known]


def token_lines(text: str) -> list[tuple[int, str]]:
    """PiCaS-style token list: one command per non-empty line that is not a # comment."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s and not s.startswith("#"):
            out.append((lineno, s))
    return out


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class AfterResolver:
    """Resolves ``after`` names and globs to task names, caching each distinct pattern."""

    def __init__(self, names: list[str]):
        self._names = names
        self._set = set(names)
        self._cache: dict[str, list[str]] = {}

    def resolve(self, pattern: str) -> list[str]:
        if not is_glob(pattern):
            return [pattern] if pattern in self._set else []
        hit = self._cache.get(pattern)
        if hit is None:
            rx = re.compile(fnmatch.translate(pattern))
            hit = [n for n in self._names if rx.match(n)]
            self._cache[pattern] = hit
        return hit

    def closest(self, pattern: str) -> str | None:
        import difflib
        got = difflib.get_close_matches(pattern, self._names[:5000], n=1, cutoff=0.6)
        return got[0] if got else None


def find_cycle(deps: dict[str, tuple[str, ...]]) -> list[str] | None:
    """One dependency cycle as a list of names (first == last), or None. Iterative DFS."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(deps, WHITE)
    for root in deps:
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(deps[root]))]
        colour[root] = GREY
        path = [root]
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = BLACK
                stack.pop()
                path.pop()
                continue
            c = colour.get(nxt, BLACK)
            if c == GREY:
                return path[path.index(nxt):] + [nxt]
            if c == WHITE:
                colour[nxt] = GREY
                stack.append((nxt, iter(deps[nxt])))
                path.append(nxt)
    return None
