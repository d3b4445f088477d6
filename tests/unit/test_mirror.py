"""The local mirror: a database of latest records with counts, and a history compacted by size."""

from __future__ import annotations

import builtins
import json

from pilotflow.run.mirror import Mirror, States


def _known(n: int, state: str = "done") -> States:
    known = States()
    for i in range(n):
        known.put(f"t{i}", {"state": state, "attempt": 1, "pilot": "p1"})
    return known


def test_the_journal_loads_what_was_written_with_states_and_pilots(tmp_path):
    m = Mirror(tmp_path)
    known = m.states()
    locked = {"token": "a", "state": "locked", "attempt": 1, "pilot": "p2"}
    assert m.update({"a": locked}, known) == [("a", None)]
    assert m.update({"a": {"token": "a", "state": "done", "attempt": 1, "pilot": "p2", "exit_code": 0},
                     "b": {"token": "b", "state": "error", "attempt": 2}}, known) == [("a", locked), ("b", None)]
    assert m.update({"a": {"token": "a", "state": "done", "attempt": 1, "pilot": "p2", "exit_code": 0}}, known) == []
    loaded = m.states()  # another process: nothing loaded until asked
    assert loaded.counts() == {"done": 1, "error": 1} and loaded.pilot_counts() == {"p2": {"done": 1}}
    assert loaded.state("b") == "error" and loaded.state("zz") == "todo" and "a" in loaded and len(loaded) == 2
    assert loaded["a"] == {"state": "done", "attempt": 1, "pilot": "p2", "exit_code": 0}
    assert loaded.pilot("a") == "p2" and loaded.pilot("b") is None
    assert loaded.raw("a") == known.raw("a")  # byte for byte: comparisons need no re-encoding
    assert dict(loaded.states()) == {"a": "done", "b": "error"}
    # the history has every change; a run mirrored before the database existed gets it from there
    assert len(m.journal.read_bytes().splitlines()) == 3
    with open(m.journal, "ab") as f:
        f.write(b'{"state":"todo","tok')  # a sync killed mid-write
    for f in tmp_path.glob("states.db*"):
        f.unlink()
    again = Mirror(tmp_path).states()
    assert dict(again.states()) == {"a": "done", "b": "error"} and again.counts() == {"done": 1, "error": 1}


def test_counts_follow_every_change_without_loading_the_records(tmp_path):
    m = Mirror(tmp_path)
    known = m.states()
    m.update({f"t{i}": {"state": "locked", "attempt": 1, "pilot": "p1"} for i in range(100)}, known)
    m.update({f"t{i}": {"state": "done", "attempt": 1, "pilot": "p1"} for i in range(60)}, known)
    m.update({f"t{i}": {"state": "error", "attempt": 1, "pilot": "p2"} for i in range(90, 100)}, known)
    fresh = m.states()
    assert fresh.counts() == {"locked": 30, "done": 60, "error": 10}
    assert fresh.pilot_counts() == {"p1": {"locked": 30, "done": 60}, "p2": {"error": 10}}
    assert fresh._state is None  # (nothing was read token by token)


def test_the_journal_is_compacted_by_size_without_reading_it(tmp_path, monkeypatch):
    m = Mirror(tmp_path)
    known = m.states()
    m.update({n: dict(d, token=n) for n, d in _known(1000).items()}, known)
    m.compact(known)  # the first sync: its size becomes the base
    base = m.journal.stat().st_size
    line = known.raw("t0") + b"\n"
    with open(m.journal, "ab") as f:
        f.write(line * ((2 * max(base, 1 << 20) - base) // len(line)))  # just under twice the base
    real_open = builtins.open

    def no_journal_reads(path, *a, **k):
        assert str(path) != str(m.journal), "compaction check read the journal"
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", no_journal_reads)
    m.compact(known)
    monkeypatch.undo()
    grown = m.journal.stat().st_size
    assert grown > base
    with open(m.journal, "ab") as f:
        f.write(line * 10)
    m.compact(known)  # now past twice: one record per token again
    lines = m.journal.read_bytes().splitlines()
    assert len(lines) == 1000 and {json.loads(x)["token"] for x in lines} == set(known)
    assert m.journal.stat().st_size < grown
