"""pilotflow as a Python library: load or build a bundle, plan, submit, watch with callbacks.

    import pilotflow
    b = pilotflow.load("jobs.toml")                  # or pilotflow.from_dict({...}) in code
    print(pilotflow.plan_for(b).to_json())
    run = pilotflow.start(b)
    run.on_token(lambda e: print(e.name, e.old, "->", e.new))
    run.on_pilot(lambda e: print("pilot", e.name, e.new))
    counts = run.wait()                             # raises RunFailed if tokens end in error

Callbacks receive :class:`pilotflow.run.events.Event` objects (kind, name, old, new, attempt,
time, info), the same events the bundle's ``on_change`` hook gets as JSON, in an order that
does not depend on how often the run was polled. Runs live where the CLI keeps them
(``./.pilotflow/runs`` of ``cwd``), so ``pilotflow status`` sees runs made from Python and
:meth:`Run.open` picks up runs submitted with the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from pilotflow.bundle import Bundle, Resource, Task, bundle_from_dict, load_bundle
from pilotflow.run.events import Event
from pilotflow.planning.plan import Plan, make_plan

__all__ = ["Bundle", "Event", "Plan", "Resource", "Run", "Task", "from_dict", "load", "plan_for", "start"]


def load(path: str | os.PathLike) -> Bundle:
    """A bundle file, validated and expanded (BundleError lists every problem)."""
    return load_bundle(path)


def from_dict(data: dict, base_dir: str | os.PathLike | None = None) -> Bundle:
    """A bundle built in code, from the dict a TOML file would give (same rules, same errors)."""
    path = Path(base_dir or os.getcwd()) / "<python>.toml"
    return bundle_from_dict(data, path=path)


def plan_for(b: Bundle, **kw) -> Plan:
    """The pilots ``pilotflow plan`` would show (``margin=`` overrides walltime margins)."""
    return make_plan(b, **kw)


def start(b: Bundle, *, cwd: str | os.PathLike | None = None, log: Callable[[str], None] | None = None) -> "Run":
    """Create the run (pools, inputs, pilots) and return it; nothing is waited for."""
    from pilotflow.run.start import new_run
    cwd = Path(cwd) if cwd else Path.cwd()
    record, _ = new_run(b, cwd=cwd, log=log or (lambda _msg: None))
    return Run(record.run, cwd)


class Run:
    """A run, by id, as seen from a directory (like the CLI's RUN argument)."""

    def __init__(self, run: str, cwd: str | os.PathLike | None = None):
        self.id = run
        self.cwd = Path(cwd) if cwd else Path.cwd()
        self._token_cbs: list[Callable[[Event], None]] = []
        self._pilot_cbs: list[Callable[[Event], None]] = []

    @classmethod
    def open(cls, run: str | None = None, cwd: str | os.PathLike | None = None) -> "Run":
        """An existing run (default: the newest one started from ``cwd``)."""
        from pilotflow.run.records import find_run
        return cls(find_run(run, Path(cwd) if cwd else None).run, cwd)

    def on_token(self, callback: Callable[[Event], None]) -> "Run":
        self._token_cbs.append(callback)
        return self

    def on_pilot(self, callback: Callable[[Event], None]) -> "Run":
        self._pilot_cbs.append(callback)
        return self

    def _dispatch(self, e: Event) -> None:
        for cb in (self._token_cbs if e.kind == "token" else self._pilot_cbs):
            cb(e)

    def _record(self):
        from pilotflow.run.records import find_run
        return find_run(self.id, self.cwd)

    def status(self) -> dict:
        """The ``status --json`` document (SPEC §3), after a sync."""
        from pilotflow.run.control import status, status_json
        record = self._record()
        st = status(record)
        for e in st.events:
            self._dispatch(e)
        return status_json(record, st.snap, st.state, st.reason)

    def wait(self, *, view=None) -> dict:
        """Until every token is done or error, calling the callbacks as things change;
        returns the counts (raises RunFailed when tokens ended in error). ``view``: any
        object with the methods of ``pilotflow.run.supervisor.Observer`` (default: silent)."""
        from pilotflow.run.supervisor import wait
        return wait(self._record(), view, callbacks=[self._dispatch])

    def cancel(self) -> int:
        """Cancel the run's pilots (running tokens go back to todo); how many were cancelled."""
        from pilotflow.run.control import cancel
        return cancel(self._record())[0]

    def retry(self, *, failed: bool = False, stale: bool = False):
        """Scrub failed / stale tokens back to todo and submit pilots for what is left."""
        from pilotflow.run.control import retry
        return retry(self._record(), failed=failed, stale=stale)
