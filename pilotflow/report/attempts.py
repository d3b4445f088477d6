"""The attempts a report draws, read from the local mirror in one pass.

A million-token run has a million attempts or more: each record is kept as a small tuple
(``Rec``) of what the report reads, not as its decoded document, and the current states are
read one at a time from the mirror's database, never as one list of documents.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import NamedTuple

from pilotflow.schedulers.base import FINISHED

OUTCOMES = ("done", "error", "retried", "lost", "running")


@dataclass(slots=True)
class Attempt:
    token: str
    attempt: int
    outcome: str  # one of OUTCOMES
    start: float
    end: float
    pilot: str
    agent: int
    host: str
    cores: int
    exit_code: int | None = None
    reason: str = ""
    approx: bool = False  # end not observed: bounded by the next attempt's start / its node's end
    gpus: int = 0
    lane: int = 0
    shown_end: float = -1.0  # the end drawn (see pack_lanes); -1: not packed yet

    @property
    def duration(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def shown(self) -> float:
        """Seconds drawn: the recorded duration, less the launcher's bookkeeping lag."""
        return max(0.0, (self.shown_end if self.shown_end >= 0 else self.end) - self.start)


class Rec(NamedTuple):
    """What the report reads of one attempt's record (a million of them: a tuple, not a dict)."""
    state: str | None
    start: float | None
    end: float | None
    pilot: str
    agent: int
    host: str
    exit_code: int | None
    reason: str
    failures: int
    scrubs: int
    lost: int
    returned: float | None
    gpus: int

    @classmethod
    def of(cls, doc: dict) -> "Rec":
        code = doc.get("exit_code")
        return cls(doc.get("state"), doc.get("start"), doc.get("end"), sys.intern(str(doc.get("pilot") or "?")),
                   int(doc.get("agent") or 0), sys.intern(str(doc.get("host") or "?")),
                   int(code) if code is not None else None, str(doc.get("reason") or ""),
                   int(doc.get("failures") or 0), int(doc.get("scrubs") or 0), int(doc.get("lost") or 0),
                   doc.get("returned"), len(doc.get("gpus") or ()))

    @property
    def ended(self) -> bool:
        return self.state != "locked" and self.end is not None


def attempt_docs(record, states) -> tuple[dict[str, dict[int, Rec]], int, int]:
    """Every attempt's most telling record: the journal's history, the earlier attempts each
    state keeps (``history``), then the current states; with the tokens retried and the
    attempts beyond each token's first (from the current states, read once, one at a time).
    The first record of an attempt that has ended wins (a later scrub of an error does not
    hide that it failed); a record with an end beats a running (locked) one."""
    docs: dict[str, dict[int, Rec]] = {}

    def add(name: str, doc: dict) -> None:
        n = int(doc.get("attempt") or 0)
        by_n = docs.get(name)
        if by_n is None:
            docs[name] = {n: Rec.of(doc)}
            return
        cur = by_n.get(n)
        if cur is None or not cur.ended:
            by_n[n] = Rec.of(doc)

    try:
        with open(record.mirror.journal, "rb") as f:
            for line in f:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue  # a torn last record
                if isinstance(doc, dict) and isinstance(doc.get("token"), str) and doc["token"]:
                    add(sys.intern(doc["token"]), doc)
    except FileNotFoundError:
        pass
    retried = extra = 0
    for name, doc in (states.each() if hasattr(states, "each") else states.items()):
        name = sys.intern(name)
        for old in doc.get("history") or ():  # earlier attempts no sync saw end, as the pool kept them
            add(name, old)
        add(name, doc)
        n = int(doc.get("attempt") or 0)
        retried += n > 1
        extra += max(0, n - 1)
    return docs, retried, extra


def outcome(doc: Rec, nxt: Rec | None) -> str:
    st = doc.state
    if st in ("done", "error"):
        return st
    if st == "todo":
        if doc.exit_code is not None:
            return "retried"
        return "error" if doc.reason.startswith("scrubbed") else "lost"
    if nxt is None:
        return "running"
    for key, outcome in (("failures", "retried"), ("scrubs", "error"), ("lost", "lost")):
        if getattr(nxt, key) > getattr(doc, key):
            return outcome
    return "lost"


def attempts_of(docs: dict[str, dict[int, Rec]], cores: dict[str, int], pilots, now) -> tuple[list[Attempt], int]:
    out: list[Attempt] = []
    unseen = 0
    for name, by_n in docs.items():
        c = cores.get(name, 1)
        ns = sorted(by_n)
        unseen += sum(1 for k in range(1, ns[-1] + 1) if k not in by_n)
        for i, n in enumerate(ns):
            doc = by_n[n]
            if doc.start is None or n == 0:
                continue  # never ran (a dependency failed) or a todo that never started
            nxt = by_n[ns[i + 1]] if i + 1 < len(ns) else None
            how = outcome(doc, nxt)
            p = pilots.get(doc.pilot)
            node_end = p.end if p is not None and p.state in FINISHED else None
            start, approx = float(doc.start), False
            if doc.ended:
                end = float(doc.end)
                if how == "lost" and node_end is not None:
                    end = min(end, node_end)  # handed back after its node was gone
            elif how == "running":
                end = now if node_end is None else min(now, node_end)
            else:
                bounds = [b for b in (doc.returned, nxt.start if nxt else None, node_end) if b is not None]
                if not bounds:
                    continue
                end, approx = min(bounds), True
            out.append(Attempt(name, n, how, start, max(start, end), doc.pilot, doc.agent, doc.host, c,
                               doc.exit_code, doc.reason, approx, gpus=doc.gpus))
    return out, unseen
