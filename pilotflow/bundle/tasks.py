"""A bundle's tasks as a sequence that holds a matrix's tasks as one template and its values.

A ``[[task]]`` table with a matrix of a million values is a million tokens, but planning only
needs their shape, which the template fixes: here such a table is one :class:`TaskBlock` (the
fields its tasks share, held once, and the per-variable values), and a :class:`Task` is made
only when it is asked for (by index or iteration), for writing its token. Tables with
``after`` and Python callers' lists are kept as lists of tasks; both kinds mix in one
:class:`Tasks`, which behaves as the list it replaces.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from pilotflow.bundle.model import Task


class TaskBlock(Sequence):
    """The tasks of one table. ``proto`` holds every field the tasks share (the varying ones
    hold their template text); ``fields`` make the varying ones from a task's values.

    ``columns`` are the values of ``variables``: their product (first variable outermost,
    a matrix) or, when ``rows`` is true, taken row by row (a token-list file's lines)."""

    def __init__(self, proto: Task, variables: list[str], columns: list[list[str]], rows: bool,
                 fields: list[tuple[str, Callable[[dict], object]]], names: list[str]):
        self.proto = proto
        self._variables = variables
        self._columns = columns
        self._rows = rows
        self._fields = fields
        self._base = {f: getattr(proto, f) for f in proto.__slots__}
        self._digits = list(zip(reversed(variables), reversed(columns), [len(c) for c in reversed(columns)]))
        self.names = names

    def __len__(self) -> int:
        return len(self.names)

    def values(self, i: int) -> dict[str, str]:
        """The variables' values of task ``i`` (0-based, in expansion order)."""
        if self._rows or len(self._digits) == 1:
            return {v: col[i] for v, col in zip(self._variables, self._columns)}
        out = {}
        for v, col, n in self._digits:
            i, r = divmod(i, n)
            out[v] = col[r]
        return out

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._make(self.values(i), self.names[i])

    def varying(self) -> tuple[str, ...]:
        """The fields made from each task's values; the template holds the others."""
        return tuple(f for f, _ in self._fields)

    def varied(self, i: int) -> dict:
        """Task ``i``'s varying fields and its name, without making the task."""
        values = self.values(i)
        kw = {f: make(values) for f, make in self._fields}
        kw["name"] = self.names[i]
        return kw

    def _fields_of(self, values: dict[str, str], name: str) -> dict:
        kw = dict(self._base)
        for f, make in self._fields:
            kw[f] = make(values)
        kw["name"] = name
        return kw

    def _make(self, values: dict[str, str], name: str) -> Task:
        return self.proto.__class__(**self._fields_of(values, name))

    def _combos(self) -> Iterable:
        return zip(*self._columns) if self._rows else itertools.product(*self._columns)

    def __iter__(self) -> Iterator[Task]:
        for combo, name in zip(self._combos(), self.names):
            yield self._make(dict(zip(self._variables, combo)), name)

    def field_dicts(self) -> Iterator[dict]:
        """Each task's fields (in field order), without making the task: what a run record keeps."""
        for combo, name in zip(self._combos(), self.names):
            yield self._fields_of(dict(zip(self._variables, combo)), name)


class Tasks(Sequence):
    """Every task of a bundle, in bundle order; indices are what plans refer to."""

    def __init__(self, parts: Iterable[TaskBlock | list] = ()):
        self._parts: list = []
        self._starts: list[int] = []
        n = 0
        for p in parts:
            if not len(p):
                continue
            self._starts.append(n)
            self._parts.append(p if isinstance(p, TaskBlock) else list(p))
            n += len(p)
        self._len = n
        self._names: list[str] | None = None
        self._protos: list | None = None

    @classmethod
    def of(cls, tasks: Iterable[Task]) -> Tasks:
        return tasks if isinstance(tasks, Tasks) else cls([list(tasks)])

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        part, j = self.locate(i)
        return part[j]

    def __iter__(self) -> Iterator[Task]:
        for p in self._parts:
            yield from p

    def locate(self, i: int) -> tuple[TaskBlock | list, int]:
        """The block (or list) holding task ``i``, and its index there."""
        k = bisect.bisect_right(self._starts, i) - 1
        return self._parts[k], i - self._starts[k]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"Tasks({len(self)} tasks in {len(self._parts)} part(s))"

    def field_dicts(self, of: Callable[[Task], dict]) -> Iterator[dict]:
        """Each task's fields in order, a block's without making its tasks; ``of`` gives a
        listed task's (the same dict)."""
        for p in self._parts:
            if isinstance(p, TaskBlock):
                yield from p.field_dicts()
            else:
                yield from map(of, p)

    @property
    def parts(self) -> list:
        """The blocks and lists, in order (for passes that can work a block at a time)."""
        return list(self._parts)

    def names(self) -> list[str]:
        """Every task's name, without making the tasks."""
        if self._names is None:
            out: list[str] = []
            for p in self._parts:
                out.extend(p.names if isinstance(p, TaskBlock) else (t.name for t in p))
            self._names = out
        return self._names

    def linked(self) -> bool:
        """Whether any task has ``after`` (blocks never do)."""
        return any(t.after for p in self._parts if not isinstance(p, TaskBlock) for t in p)

    def protos(self) -> list[Task]:
        """Per index, a task with that task's shape, resource and ``after``: the block's
        template for a block's tasks (one object for all of them), the task itself otherwise.
        What the planner reads; names are right only when the bundle has dependencies (then
        every task is made: a name may be another task's ``after``), else use :meth:`names`."""
        if self._protos is None:
            if self.linked():
                self._protos = list(self)
            else:
                out: list = []
                for p in self._parts:
                    out.extend([p.proto] * len(p) if isinstance(p, TaskBlock) else p)
                self._protos = out
        return self._protos
