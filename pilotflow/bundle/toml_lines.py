"""Line numbers of TOML keys and tables, which ``tomllib`` does not give.

Bundle errors must say ``FILE:LINE``. This is a small, forgiving scanner over the source: it
tracks table headers (counting ``[[array]]`` occurrences so ``task #3`` maps to its header),
``key =`` lines (bare, quoted and dotted keys), and skips over strings, comments, multi-line
strings and multi-line arrays so that their content is never mistaken for a key. It never
raises: a position it cannot find falls back to the enclosing table's line.
"""

from __future__ import annotations

import re

Path = tuple  # a key path: ("task", 2, "cores") — array-of-tables entries are indexed

_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_KEY = rf"(?:{_BARE}|{_QUOTED})"
_DOTTED = rf"{_KEY}(?:\s*\.\s*{_KEY})*"
_KEY_LINE = re.compile(rf"^\s*({_DOTTED})\s*=")
_HEADER = re.compile(rf"^\s*(\[\[|\[)\s*({_DOTTED})\s*(\]\]|\])")
_PART = re.compile(_KEY)


def _split_key(dotted: str) -> list[str]:
    parts = []
    for m in _PART.finditer(dotted):
        tok = m.group(0)
        if tok[0] in "\"'":
            tok = tok[1:-1]
        parts.append(tok)
    return parts


class LineMap:
    """Maps key paths of a TOML document to 1-based line numbers."""

    def __init__(self, source: str):
        self._lines: dict[tuple, int] = {}
        self._scan(source)

    def line(self, path: tuple) -> int | None:
        """The line of ``path`` or of its nearest enclosing key/table that has one."""
        path = tuple(path)
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None

    def _scan(self, source: str) -> None:
        counts: dict[tuple, int] = {}
        arrays: set[tuple] = set()  # array-of-tables names, as unindexed paths
        current: tuple = ()
        state = _ValueState()
        for lineno, text in enumerate(source.splitlines(), start=1):
            if state.busy():
                state.feed(text)
                continue
            m = _HEADER.match(text)
            if m and not _KEY_LINE.match(text):
                names = _split_key(m.group(2))
                is_array = m.group(1) == "[["
                current = self._resolve_header(names, is_array, counts, arrays)
                self._lines.setdefault(current, lineno)
                state.feed(text[m.end():])
                continue
            m = _KEY_LINE.match(text)
            if m:
                keys = _split_key(m.group(1))
                for i in range(1, len(keys) + 1):
                    self._lines.setdefault(current + tuple(keys[:i]), lineno)
                rest = text[m.end():]
                self._inline_keys(current + tuple(keys), rest, lineno)
                state.feed(rest)

    def _resolve_header(self, names: list[str], is_array: bool, counts: dict, arrays: set) -> tuple:
        # Insert the current index after every prefix that is an array of tables.
        path: tuple = ()
        plain: tuple = ()
        for i, name in enumerate(names):
            plain += (name,)
            path += (name,)
            last = i == len(names) - 1
            if last and is_array:
                arrays.add(plain)
                idx = counts.get(path, 0)
                counts[path] = idx + 1
                path += (idx,)
            elif plain in arrays:
                path += (counts.get(path, 1) - 1,)
        return path

    def _inline_keys(self, base: tuple, rest: str, lineno: int) -> None:
        # Keys of a one-line inline table: `matrix = { i = "1..3", depth = [1] }`.
        if not rest.lstrip().startswith("{"):
            return
        for m in re.finditer(rf"[{{,]\s*({_DOTTED})\s*=", rest):
            for k in _split_key(m.group(1))[:1]:
                self._lines.setdefault(base + (k,), lineno)


class _ValueState:
    """Whether the scanner is inside a multi-line string or an open bracket."""

    def __init__(self) -> None:
        self.depth = 0
        self.ml: str | None = None  # the open multi-line string delimiter

    def busy(self) -> bool:
        return self.depth > 0 or self.ml is not None

    def feed(self, text: str) -> None:
        i, n = 0, len(text)
        while i < n:
            if self.ml is not None:
                j = text.find(self.ml, i)
                if j < 0:
                    return
                i = j + 3
                self.ml = None
                continue
            ch = text[i]
            if ch == "#":
                return
            if text.startswith('"""', i) or text.startswith("'''", i):
                self.ml = text[i:i + 3]
                i += 3
                continue
            if ch == '"':
                i += 1
                while i < n and text[i] != '"':
                    i += 2 if text[i] == "\\" else 1
                i += 1
                continue
            if ch == "'":
                j = text.find("'", i + 1)
                i = n if j < 0 else j + 1
                continue
            if ch in "[{":
                self.depth += 1
            elif ch in "]}":
                self.depth = max(0, self.depth - 1)
            i += 1
