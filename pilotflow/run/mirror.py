"""The local mirror of a run's token states under ./.pilotflow/runs/RUN/.

The token states are mirrored in ``states.jsonl``, a journal: each sync appends the states that
changed in one write (the last record of a token wins; a torn last line from a killed sync is
ignored) and ``sync.json``, the per-resource sync cursor, is written after it, so a sync killed
at any point leaves a consistent mirror that the next sync completes. The journal is compacted
(atomically rewritten, one record per token) when it has grown to twice its size after the
last compaction (``compacted.json``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from pilotflow.launcher import dump, read_json, write_atomic


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class States(Mapping):
    """Token name → state document, stored compactly: the canonical JSON bytes of each
    document as the journal holds it (the token's name included; decoded only when asked
    for), its state word and its pilot. A client holding a 100k-token run keeps a few hundred
    bytes per token instead of a Python dict per token, and loading the journal decodes each
    line once and encodes nothing."""

    __slots__ = ("_raw", "_state", "_pilot")

    def __init__(self):
        self._raw: dict[str, bytes] = {}
        self._state: dict[str, str] = {}
        self._pilot: dict[str, str] = {}

    def __getitem__(self, name: str) -> dict:
        doc = json.loads(self._raw[name])
        doc.pop("token", None)
        return doc

    def __iter__(self):
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, name) -> bool:
        return name in self._raw

    def put(self, name: str, doc: dict) -> bool:
        """Store; returns whether it differs from what was there."""
        raw = _canonical(dict(doc, token=name))
        if self._raw.get(name) == raw:
            return False
        self._keep(name, raw, doc)
        return True

    def _keep(self, name: str, raw: bytes, doc: dict) -> None:
        self._raw[name] = raw
        self._state[name] = sys.intern(str(doc.get("state", "todo")))
        pilot = doc.get("pilot")
        if pilot:
            self._pilot[name] = sys.intern(str(pilot))
        else:
            self._pilot.pop(name, None)

    def state(self, name: str) -> str:
        return self._state.get(name, "todo")

    def states(self):
        """(name, state word) pairs, without decoding documents."""
        return self._state.items()

    def pilot(self, name: str) -> str | None:
        """The pilot of the token's current (or last) attempt, without decoding its document."""
        return self._pilot.get(name)

    def raw(self, name: str) -> bytes:
        """The journal line of the token (canonical JSON, with its name)."""
        return self._raw[name]


class Mirror:
    """The local copy of a run's token states (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.journal = directory / "states.jsonl"

    def states(self) -> States:
        out = States()
        try:
            f = open(self.journal, "rb")
        except FileNotFoundError:
            return out
        with f:
            for line in f:
                try:
                    doc = json.loads(line)
                    name = doc["token"]
                except (ValueError, KeyError, TypeError):
                    continue  # a record torn by an interrupted sync: the next sync re-sends it
                out._keep(name, line.rstrip(b"\n"), doc)
        return out

    def update(self, docs: dict[str, dict], known: States) -> list[str]:
        """Append the states that differ from ``known`` (which is updated); returns their names."""
        changed = []
        records = []
        for n, d in docs.items():
            if known.put(n, d):
                changed.append(n)
                records.append(known.raw(n))
        if not changed:
            return []
        data = b"\n".join(records) + b"\n"
        fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return changed

    def compact(self, known: States) -> None:
        """Rewrite the journal with one record per token once it grew past twice its size
        after the last rewrite (judged from its size: counting its lines would read the whole
        journal at every sync)."""
        try:
            size = os.stat(self.journal).st_size
        except FileNotFoundError:
            return
        mark = read_json(str(self.dir / "compacted.json"))
        if mark is None:  # the first sync: its journal holds a record per token at most
            write_atomic(str(self.dir / "compacted.json"), dump({"size": size}))
            return
        if size <= 2 * max(int(mark.get("size") or 0), 1 << 20):
            return
        data = b"".join(known.raw(n) + b"\n" for n in known)
        write_atomic(str(self.journal), data)
        write_atomic(str(self.dir / "compacted.json"), dump({"size": len(data)}))

    def cursor(self) -> dict:
        return read_json(str(self.dir / "sync.json")) or {}

    def set_cursor(self, cursor: dict) -> None:
        write_atomic(str(self.dir / "sync.json"), dump(cursor))

    def agents(self) -> dict:
        return read_json(str(self.dir / "agents.json")) or {}

    def set_agents(self, agents: dict) -> None:
        write_atomic(str(self.dir / "agents.json"), dump(agents))
