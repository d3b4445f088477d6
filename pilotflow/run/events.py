"""State-change events of tokens and pilots, for callbacks and bundle hooks.

Syncs see snapshots, not every transition: a task may start and end between two polls. The
events are rebuilt from what the state files record (attempt numbers, failures), so the
sequence a callback sees does not depend on how often anyone polled. A token that went from
todo to done at its second attempt after one failure yields, whatever was observed in
between: todo→locked, locked→todo, todo→locked, locked→done (BigJobAsync's callbacks and the
AIMES demo's hooks, without their missed states).
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import asdict, dataclass, field

from pilotflow.schedulers.base import FINISHED, QUEUED


@dataclass
class Event:
    kind: str  # "token" or "pilot"
    name: str
    old: str
    new: str
    attempt: int | None = None
    time: float = field(default_factory=time.time)
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def token_events(name: str, old: dict | None, new: dict) -> list[Event]:
    """The transitions between two states of a token (``old`` None: never seen, i.e. todo)."""
    o_state = (old or {}).get("state", "todo")
    o_att = int((old or {}).get("attempt", 0))
    n_state = new.get("state", "todo")
    n_att = int(new.get("attempt", 0))
    info = {k: new.get(k) for k in ("exit_code", "pilot", "host", "reason") if new.get(k) is not None}
    out: list[Event] = []
    cur = o_state

    def step(to: str, attempt: int, extra: dict | None = None) -> None:
        nonlocal cur
        if to != cur:
            out.append(Event("token", name, cur, to, attempt, info=extra or {}))
            cur = to

    if n_att < o_att or (n_att == o_att and n_state == o_state):
        return []  # nothing new (or an older record arriving late)
    if n_att == o_att:
        step(n_state, n_att, info)
        return out
    # attempt o_att ended: it was locked (seen) and ended without being final
    if o_state == "locked":
        step("todo", o_att)
    # attempts in between started and ended unseen
    for a in range(o_att + 1, n_att):
        step("locked", a)
        step("todo", a)
    if n_state == "moved":
        step("moved", n_att, info)
    elif n_state == "error" and new.get("start") is None:
        step("error", n_att, info)  # a dependency failed: it never ran
    else:
        step("locked", n_att, info if n_state == "locked" else {})
        if n_state != "locked":
            step(n_state, n_att, info)
    return out


def pilot_events(pid: str, old: str, new: str, started: bool, info: dict | None = None) -> list[Event]:
    """Pilot transitions; ``started`` says its launchers ran, so a pilot that went from
    queued to ended between two polls still shows it ran."""
    out = []
    cur = old
    if new in FINISHED and cur in ("planned", QUEUED) and started:
        out.append(Event("pilot", pid, cur, "running", info=info or {}))
        cur = "running"
    if new != cur:
        out.append(Event("pilot", pid, cur, new, info=info or {}))
    return out


def run_hook(command: str, payload: dict, cwd: str) -> str | None:
    """Run a bundle hook with the payload as JSON on stdin; returns an error text or None.

    Hooks are the user's own shell commands (e.g. mail a summary, as the AIMES demo did): they
    run in the bundle's directory; a failing hook is reported, never fatal to the run."""
    try:
        p = subprocess.run(["/bin/sh", "-c", command], input=json.dumps(payload).encode(), cwd=cwd,
                           capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"hook {command!r} failed: {e}"
    if p.returncode:
        return f"hook {command!r} exited {p.returncode}: {p.stderr.decode(errors='replace').strip()[-300:]}"
    return None
