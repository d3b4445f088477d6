"""State-change callbacks (Python API) and bundle hooks: exact event sequences."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest

import pilotflow
from pilotflow.errors import RunFailed
from pilotflow.run.events import token_events
from tests.conftest import cli

EXPECTED = {
    "a": [("todo", "locked"), ("locked", "done")],
    "b": [("todo", "locked"), ("locked", "done")],
    "flaky": [("todo", "locked"), ("locked", "todo"), ("todo", "locked"), ("locked", "done")],
    "broken": [("todo", "locked"), ("locked", "error")],
    "after-broken": [("todo", "error")],
}
TASKS = [
    {"name": "a", "command": "true", "walltime": "5s"},
    {"name": "b", "command": "sleep 0.5", "walltime": "5s"},
    {"name": "flaky", "command": "if [ -f seen ]; then true; else touch seen; exit 1; fi", "retries": 1,
     "walltime": "5s"},
    {"name": "broken", "command": "exit 3", "walltime": "5s"},
    {"name": "after-broken", "command": "true", "after": ["broken"], "walltime": "5s"},
]


def by_token(events):
    out = defaultdict(list)
    for e in events:
        out[e["name"] if isinstance(e, dict) else e.name].append(
            (e["old"], e["new"]) if isinstance(e, dict) else (e.old, e.new))
    return dict(out)


def test_callbacks_see_every_transition_in_order(work):
    b = pilotflow.from_dict({"bundle": {"name": "cb"}, "task": TASKS}, base_dir=work)
    run = pilotflow.start(b, cwd=work)
    tokens, pilots = [], []
    run.on_token(tokens.append).on_pilot(pilots.append)
    with pytest.raises(RunFailed):
        run.wait()
    assert by_token(tokens) == EXPECTED
    assert [(e.old, e.new) for e in pilots] == [("queued", "running"), ("running", "ended")]
    assert next(e for e in tokens if e.name == "flaky" and e.new == "done").attempt == 2
    assert next(e for e in tokens if e.name == "after-broken").info["reason"] == "dependency broken ended in error"
    # the run is an ordinary run: the CLI sees it
    assert cli("status", run.id, cwd=work).returncode == 1


def test_bundle_hooks_get_the_events_as_json_on_stdin(work):
    hooks = {"on_change": "cat >> changes.jsonl; echo >> changes.jsonl",
             "on_finish": "cat > finished.json"}
    lines = ["[bundle]", 'name = "hooks"'] + [f'{k} = "{v}"' for k, v in hooks.items()]
    for t in TASKS:
        lines.append("[[task]]")
        for k, v in t.items():
            lines.append(f"{k} = {json.dumps(v)}")
    (work / "jobs.toml").write_text("\n".join(lines) + "\n")
    cli("submit", "jobs.toml", "--wait", cwd=work, check=1)
    events = [e for line in (work / "changes.jsonl").read_text().splitlines() if line.strip()
              for e in json.loads(line)["events"]]
    assert by_token([e for e in events if e["kind"] == "token"]) == EXPECTED
    assert [(e["old"], e["new"]) for e in events if e["kind"] == "pilot"] == [("queued", "running"),
                                                                             ("running", "ended")]
    finished = json.loads((work / "finished.json").read_text())
    assert finished["counts"] == {"todo": 0, "locked": 0, "done": 3, "error": 2}
    assert finished["run"].startswith("hooks-")


def test_events_do_not_depend_on_what_polling_saw():
    """The same history, seen in one jump or step by step, gives the same events."""
    steps = [{"state": "locked", "attempt": 1}, {"state": "todo", "attempt": 1, "failures": 1},
             {"state": "locked", "attempt": 2}, {"state": "todo", "attempt": 2, "failures": 1, "lost": 1},
             {"state": "locked", "attempt": 3}, {"state": "done", "attempt": 3, "start": 1.0}]
    one_jump = [(e.old, e.new, e.attempt) for e in token_events("t", None, steps[-1])]
    step_by_step = []
    old = None
    for doc in steps:
        step_by_step += [(e.old, e.new, e.attempt) for e in token_events("t", old, doc)]
        old = doc
    assert one_jump == step_by_step == [("todo", "locked", 1), ("locked", "todo", 1), ("todo", "locked", 2),
                                        ("locked", "todo", 2), ("todo", "locked", 3), ("locked", "done", 3)]
    assert token_events("t", steps[-1], steps[2]) == []  # an older record arriving late: nothing


def test_the_api_example_runs():
    import subprocess
    import sys
    from tests.conftest import ROOT
    p = subprocess.run([sys.executable, str(ROOT / "workflows" / "api" / "watch.py")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "token flaky      locked -> todo   (attempt 1)" in p.stdout
    assert "finished: {'todo': 0, 'locked': 0, 'done': 6, 'error': 0}" in p.stdout
