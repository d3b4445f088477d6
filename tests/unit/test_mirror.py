"""The local mirror's journal: loaded without re-encoding, compacted by size (no line count)."""

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
    known = States()
    assert m.update({"a": {"token": "a", "state": "locked", "attempt": 1, "pilot": "p2"}}, known) == ["a"]
    assert m.update({"a": {"token": "a", "state": "done", "attempt": 1, "pilot": "p2", "exit_code": 0},
                     "b": {"token": "b", "state": "error", "attempt": 2}}, known) == ["a", "b"]
    assert m.update({"a": {"token": "a", "state": "done", "attempt": 1, "pilot": "p2", "exit_code": 0}}, known) == []
    with open(m.journal, "ab") as f:
        f.write(b'{"state":"todo","tok')  # a sync killed mid-write
    loaded = m.states()
    assert dict(loaded.states()) == {"a": "done", "b": "error"}
    assert loaded["a"] == {"state": "done", "attempt": 1, "pilot": "p2", "exit_code": 0}
    assert loaded.pilot("a") == "p2" and loaded.pilot("b") is None
    assert loaded.raw("a") == known.raw("a")  # byte for byte: comparisons need no re-encoding


def test_the_journal_is_compacted_by_size_without_reading_it(tmp_path, monkeypatch):
    m = Mirror(tmp_path)
    known = _known(1000)
    m.update({n: dict(known[n], token=n) for n in known}, States())
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
