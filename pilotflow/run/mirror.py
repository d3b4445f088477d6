"""The local mirror of a run's token states under ./.pilotflow/runs/RUN/.

``states.db`` (SQLite, standard library) holds each token's latest state record with its state
word and pilot, and the counts per state and pilot, kept as records change: ``status`` of a
million-token run reads the counts and the few records that changed, not a million records.
``states.jsonl`` is the history: each sync appends the records that changed (the report draws
attempts no sync saw end from it). A sync appends to the history, commits the database, then
writes ``sync.json``, the per-resource sync cursor: a sync killed at any point leaves a
consistent mirror that the next sync completes (it sees the same changes again). The history
is compacted (atomically rewritten, one record per token) when it has grown to twice its size
after the last compaction (``compacted.json``). A run mirrored by an older pilotflow (a journal
and no database) gets its database from its journal the first time.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from pilotflow.launcher import dump, read_json, write_atomic

_CHUNK = 500  # names per SELECT ... IN (...)


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


class States(Mapping):
    """Token name → state document. In memory (``States()``: tests, the Python API, a
    snapshot built from a dict), or backed by a mirror's database, where nothing is loaded
    until asked: single lookups are queries, counts come from the counts table, and the state
    words of every token are read in one query the first time a caller walks them all."""

    def __init__(self, db: sqlite3.Connection | None = None):
        self._db = db
        self._lock = threading.RLock()
        self._raw: dict[str, bytes] | None = {} if db is None else None
        self._state: dict[str, str] | None = {} if db is None else None  # None: not loaded yet
        self._pilot: dict[str, str] | None = {} if db is None else None

    # reading ------------------------------------------------------------------------------
    def _q(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _all(self) -> dict[str, str]:
        if self._state is None:
            st: dict[str, str] = {}
            pi: dict[str, str] = {}
            for name, state, pilot in self._q("SELECT name, state, pilot FROM s"):
                st[name] = sys.intern(state)
                if pilot:
                    pi[name] = sys.intern(pilot)
            self._state, self._pilot = st, pi
        return self._state

    def raw(self, name: str) -> bytes:
        """The token's record as the history holds it (canonical JSON, with its name)."""
        if self._raw is not None:
            return self._raw[name]
        rows = self._q("SELECT raw FROM s WHERE name = ?", (name,))
        if not rows:
            raise KeyError(name)
        return bytes(rows[0][0])

    def __getitem__(self, name: str) -> dict:
        doc = json.loads(self.raw(name))
        doc.pop("token", None)
        return doc

    def __iter__(self):
        return iter(list(self._all()))

    def __len__(self) -> int:
        if self._state is not None:
            return len(self._state)
        return self._q("SELECT count(*) FROM s")[0][0]

    def __contains__(self, name) -> bool:
        if self._state is not None:
            return name in self._state
        return bool(self._q("SELECT 1 FROM s WHERE name = ?", (name,)))

    def items(self):
        """(name, document) pairs, in one pass."""
        if self._raw is not None:
            return [(n, self[n]) for n in self._raw]
        out = []
        for name, raw in self._q("SELECT name, raw FROM s"):
            doc = json.loads(raw)
            doc.pop("token", None)
            out.append((name, doc))
        return out

    def each(self):
        """(name, document) pairs, one at a time: a million-token report holds no list of them."""
        if self._raw is not None:
            for n in list(self._raw):
                yield n, self[n]
            return
        with self._lock:
            cur = self._db.execute("SELECT name, raw FROM s")
            while rows := cur.fetchmany(2000):
                for name, raw in rows:
                    doc = json.loads(raw)
                    doc.pop("token", None)
                    yield name, doc

    def raws(self):
        """Every record, as the history holds them."""
        if self._raw is not None:
            return list(self._raw.values())
        return [bytes(r[0]) for r in self._q("SELECT raw FROM s")]

    def state(self, name: str) -> str:
        if self._state is not None:
            return self._state.get(name, "todo")
        rows = self._q("SELECT state FROM s WHERE name = ?", (name,))
        return rows[0][0] if rows else "todo"

    def states(self):
        """(name, state word) pairs, without decoding documents."""
        return self._all().items()

    def names_in(self, state: str) -> list[str]:
        """The tokens in one state (a query, not a walk over every token)."""
        if self._state is not None:
            return [n for n, st in self._state.items() if st == state]
        return [r[0] for r in self._q("SELECT name FROM s WHERE state = ?", (state,))]

    def pilot(self, name: str) -> str | None:
        """The pilot of the token's current (or last) attempt, without decoding its document."""
        if self._pilot is not None:
            return self._pilot.get(name)
        rows = self._q("SELECT pilot FROM s WHERE name = ?", (name,))
        return (rows[0][0] or None) if rows else None

    def counts(self) -> dict[str, int]:
        """Tokens per state word (of the tokens that have a record)."""
        if self._db is None:
            return dict(Counter(self._state.values()))
        return {st: n for st, n in self._q("SELECT state, SUM(n) FROM c GROUP BY state") if n}

    def pilot_counts(self) -> dict[str, dict[str, int]]:
        """pilot → state word → tokens whose current (or last) attempt is that pilot's."""
        out: dict[str, dict[str, int]] = {}
        if self._db is None:
            for name, st in self._state.items():
                p = self._pilot.get(name)
                if p:
                    c = out.setdefault(p, {})
                    c[st] = c.get(st, 0) + 1
            return out
        for pilot, st, n in self._q("SELECT pilot, state, n FROM c WHERE pilot != '' AND n > 0"):
            out.setdefault(pilot, {})[st] = n
        return out

    # writing ------------------------------------------------------------------------------
    def put(self, name: str, doc: dict) -> bool:
        """Store; returns whether it differs from what was there."""
        changed = bool(self.put_many({name: doc}))
        self.commit()
        return changed

    def _old(self, names: list[str]) -> dict[str, tuple[bytes, str, str]]:
        if self._raw is not None:
            return {n: (self._raw[n], self._state[n], self._pilot.get(n, "")) for n in names if n in self._raw}
        out = {}
        for i in range(0, len(names), _CHUNK):
            part = names[i:i + _CHUNK]
            q = f"SELECT name, raw, state, pilot FROM s WHERE name IN ({','.join('?' * len(part))})"
            for name, raw, state, pilot in self._q(q, tuple(part)):
                out[name] = (bytes(raw), state, pilot)
        return out

    def put_many(self, docs: dict[str, dict]) -> list[tuple[str, bytes, bytes | None]]:
        """Store the records that differ from what is there (not committed: ``commit``);
        returns (name, new record, old record or None) of each."""
        new = {n: _canonical(dict(d, token=n)) for n, d in docs.items()}
        with self._lock:
            old = self._old(list(new))
            out, rows, delta = [], [], Counter()
            for n, raw in new.items():
                o = old.get(n)
                if o is not None and o[0] == raw:
                    continue
                d = docs[n]
                st, pi = sys.intern(str(d.get("state", "todo"))), sys.intern(str(d.get("pilot") or ""))
                out.append((n, raw, o[0] if o else None))
                rows.append((n, st, pi, raw))
                if o is not None:
                    delta[(o[1], o[2])] -= 1
                delta[(st, pi)] += 1
                if self._raw is not None:
                    self._raw[n] = raw
                if self._state is not None:
                    self._state[n] = st
                    if pi:
                        self._pilot[n] = pi
                    else:
                        self._pilot.pop(n, None)
            if self._db is not None and rows:
                self._db.executemany("INSERT OR REPLACE INTO s (name, state, pilot, raw) VALUES (?, ?, ?, ?)", rows)
                self._db.executemany("INSERT INTO c (state, pilot, n) VALUES (?, ?, ?) ON CONFLICT (state, pilot) "
                                     "DO UPDATE SET n = n + excluded.n",
                                     [(st, pi, k) for (st, pi), k in delta.items() if k])
        return out

    def commit(self) -> None:
        if self._db is not None:
            with self._lock:
                self._db.commit()

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._db.close()


class Mirror:
    """The local copy of a run's token states (see the module docstring)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.journal = self.dir / "states.jsonl"
        self.db_path = self.dir / "states.db"

    def states(self) -> States:
        fresh = not self.db_path.exists()
        db = sqlite3.connect(str(self.db_path), timeout=60, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")  # readers do not wait for a sync (wait + status)
        db.execute("PRAGMA synchronous = NORMAL")  # consistent after any crash; a lost sync is redone
        db.execute("CREATE TABLE IF NOT EXISTS s (name TEXT PRIMARY KEY, state TEXT NOT NULL, "
                   "pilot TEXT NOT NULL, raw BLOB NOT NULL) WITHOUT ROWID")
        db.execute("CREATE TABLE IF NOT EXISTS c (state TEXT NOT NULL, pilot TEXT NOT NULL, n INTEGER NOT NULL, "
                   "PRIMARY KEY (state, pilot)) WITHOUT ROWID")
        db.commit()
        out = States(db)
        if fresh:
            docs = self.history_latest()
            if docs:
                out.put_many(docs)
                out.commit()
        return out

    def history_latest(self) -> dict[str, dict]:
        """The last record of each token in the history (a torn last line is skipped)."""
        docs: dict[str, dict] = {}
        try:
            f = open(self.journal, "rb")
        except FileNotFoundError:
            return docs
        with f:
            for line in f:
                try:
                    doc = json.loads(line)
                    name = doc.pop("token")
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a record torn by an interrupted sync: the next sync re-sends it
                docs[name] = doc
        return docs

    def update(self, docs: dict[str, dict], known: States) -> list[tuple[str, dict | None]]:
        """Store the records that differ from ``known`` (and append them to the history);
        returns (name, previous document or None) of each."""
        changed = known.put_many(docs)
        if not changed:
            return []
        data = b"\n".join(raw for _, raw, _ in changed) + b"\n"
        with open(self.journal, "ab") as f:
            f.write(data)
        known.commit()  # after the history: a record in the database is always in the history too
        return [(n, json.loads(old) if old is not None else None) for n, _, old in changed]

    def compact(self, known: States) -> None:
        """Rewrite the history with one record per token once it grew past twice its size
        after the last rewrite (judged from its size: a million-token history is ~300 MB)."""
        try:
            size = self.journal.stat().st_size
        except FileNotFoundError:
            return
        mark = read_json(str(self.dir / "compacted.json"))
        if mark is None:  # the first sync: its history holds a record per token at most
            write_atomic(str(self.dir / "compacted.json"), dump({"size": size}))
            return
        if size <= 2 * max(int(mark.get("size") or 0), 1 << 20):
            return
        data = b"".join(raw + b"\n" for raw in known.raws())
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
