"""Keeping a run going from the client: sync, follow-up pilots, failover, hooks.

``wait`` (the CLI's ``wait``, ``submit --wait`` and ``status --watch``, and the Python API's
``Run.wait``) is a loop of :meth:`Supervisor.step`. One step syncs the token states (cheap:
one helper call per resource), asks the schedulers about pilots now and then (every 10 s,
backing off to a minute while work progresses, at once when it stalls), hands the events to
the observer, the callbacks and the bundle's ``on_change`` hook, moves the work of broken
resources elsewhere, and submits follow-up pilots for resources whose pilots all ended with
work left. Nothing here prints: an :class:`Observer` shows what happens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from pilotflow.errors import PilotflowError, RunFailed, UsageError
from pilotflow.run.failover import broken, fail_over
from pilotflow.run.records import RunRecord
from pilotflow.run.pilots import refresh_pilots, release_dead
from pilotflow.run.sync import OutputFetcher, Session, Snapshot, sync_states
from pilotflow.schedulers.base import FINISHED

MAX_FOLLOWUPS = 3  # automatic follow-up rounds per resource when pilots end with work left


class Observer(Protocol):
    """What a supervisor tells whoever watches (the CLI's live view; nothing, in the API)."""

    def update(self, snap: Snapshot, counts: dict[str, int]) -> None: ...

    def events(self, events: list) -> None: ...

    def note(self, text: str) -> None: ...

    def done(self, counts: dict[str, int]) -> None: ...


class Quiet:
    """An observer that shows nothing."""

    def update(self, snap, counts) -> None:
        pass

    def events(self, events) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def done(self, counts) -> None:
        pass


def sync_run(s: Session, pilots: bool = True) -> Snapshot:
    """Sync token states; ask the schedulers about pilots too when ``pilots``, and hand back
    at once what pilots the scheduler says are gone still held."""
    snap = sync_states(s)
    if pilots and (refresh_pilots(s) or any(p.state in FINISHED for p in s.record.pilots.values())):
        if release_dead(s):
            snap = sync_states(s)
    return snap


def idle_resources(record: RunRecord, owner: dict[str, str], states) -> list[str]:
    """Resources (not broken) holding todo tokens with no pilot queued or running."""
    todo = {r for n, r in owner.items() if states.state(n) == "todo"}
    out = []
    for name in sorted(todo):
        if record.broken(name):
            continue
        if not any(p.resource == name and p.state not in FINISHED for p in record.pilots.values()):
            out.append(name)
    return out


def submit_followup(s: Session, snap: Snapshot, why: str, log: Callable[[str], None],
                    resource: str | None = None) -> int:
    """Pilots planned for the todo tokens left (of one resource, or all); how many."""
    from pilotflow.run.submit import plan_remaining, submit_pilots
    record = s.record
    left = {t.name for t in record.tasks() if snap.states.state(t.name) == "todo"
            and (resource is None or t.resource == resource)}
    if not left:
        return 0
    plan = plan_remaining(record, left)
    log(f"{why}: submitting pilots for {len(left)} token(s)")
    done = submit_pilots(record, plan, s.transports(), log=log)
    record.save()
    return len(done)


@dataclass
class Step:
    """What one step saw, and how long to sleep before the next (None: the run finished)."""

    snap: Snapshot
    counts: dict[str, int]
    sleep: float | None


class Supervisor:
    """One run, kept going (see the module docstring). ``clock`` is injectable for tests."""

    def __init__(self, s: Session, view: Observer | None = None, callbacks=(), *,
                 max_followups: int = MAX_FOLLOWUPS, clock: Callable[[], float] = time.time):
        self.s = s
        self.record = s.record
        self.view = view or Quiet()
        self.callbacks = list(callbacks)
        self.max_followups = max_followups
        self.clock = clock
        self.delay = 0.25
        self.ask_every, self.asked, self.progress = 10.0, 0.0, clock()

    def step(self, *, watch_only: bool = False) -> Step:
        """One round; raises RunFailed / UsageError when the run cannot go on by itself."""
        record = self.record
        now = self.clock()
        stalled = now - self.progress > max(5.0, 4 * self.delay)
        ask = now - self.asked >= (self.ask_every if not stalled else 5.0)
        snap = sync_run(self.s, pilots=ask)
        if ask:
            self.asked = now
            self.ask_every = min(self.ask_every * 1.5, 60.0)
        if snap.changed:
            self.progress = now
        counts = snap.counts(record.tokens)
        self.deliver()
        self.view.update(snap, counts)
        if counts["todo"] == 0 and counts["locked"] == 0:
            return Step(snap, counts, None)
        # poll often while tokens change, back off (to 5 s) while nothing does
        self.delay = 0.25 if snap.changed else min(self.delay * 1.5, 5.0)
        if watch_only:
            return Step(snap, counts, self.delay)
        if record.cancelled:
            if not any(p.state not in FINISHED for p in record.pilots.values()):
                raise UsageError(f"run {record.run} was cancelled with {counts['todo']} token(s) left; "
                                 f"`pilotflow retry {record.run}` submits pilots for them")
            return Step(snap, counts, self.delay)
        if ask and len(record.resources) > 1:
            self.fail_over(snap)
        idle = idle_resources(record, self.s.owner, snap.states)
        if idle and not ask:
            self.asked = 0.0  # make sure with a fresh answer before deciding on follow-ups
            return Step(snap, counts, 0.0)
        for name in idle:
            self.follow_up(snap, name)
        return Step(snap, counts, self.delay)

    def fail_over(self, snap: Snapshot) -> None:
        for name, why in broken(self.s, snap, now=self.clock()).items():
            if fail_over(self.s, name, why, self.view.note):
                self.delay, self.ask_every = 0.5, 10.0

    def follow_up(self, snap: Snapshot, name: str) -> None:
        """Every pilot on ``name`` ended with work left: a round of follow-up pilots, at most
        ``max_followups`` rounds."""
        record = self.record
        state = record.resources[name]
        if state.followups >= self.max_followups:
            raise RunFailed(f"every pilot of run {record.run} on {name} ended with token(s) left after "
                            f"{state.followups} follow-up round(s); check `pilotflow status` and the pilots' "
                            f"output, then `pilotflow retry {record.run}`")
        state.followups += 1
        n = submit_followup(self.s, snap, f"every pilot on {name} ended with work left", self.view.note,
                            resource=name)
        self.view.note(f"submitted {n} follow-up pilot(s) on {name}")
        self.delay, self.ask_every = 0.5, 10.0

    def deliver(self) -> None:
        """Hand the events seen so far to the view, the callbacks and the on_change hook."""
        events, self.s.events = self.s.events, []
        if not events:
            return
        for cb in self.callbacks:
            for e in events:
                cb(e)
        self.view.events(events)
        hook = self.record.on_change
        if hook:
            from pilotflow.run.events import run_hook
            err = run_hook(hook, {"run": self.record.run, "events": [e.to_json() for e in events]},
                           self.record.base_dir)
            if err:
                self.view.note(err)

    def wind_down(self, timeout: float = 15.0) -> None:
        """With no work left, pilots exit at once: see them end, so their events are complete."""
        s = self.s
        end = time.time() + timeout

        def alive(p) -> bool:
            return bool(p.job_id) and p.state not in FINISHED and not s.record.broken(p.resource)
        while time.time() < end and any(alive(p) for p in s.record.pilots.values()):
            time.sleep(0.5)
            try:
                refresh_pilots(s)
            except PilotflowError:
                break
        self.deliver()

    def finished(self, counts: dict[str, int]) -> None:
        """The run's end: the on_finish hook (once per run), then RunFailed if tokens failed."""
        record = self.record
        if record.on_finish and not record.finished_notified:
            from pilotflow.run.events import run_hook
            err = run_hook(record.on_finish, {"run": record.run, "bundle": record.bundle, "counts": counts,
                                              "pilots": {p.id: p.state for p in record.pilots.values()}},
                           record.base_dir)
            if err:
                self.view.note(err)
            record.finished_notified = True
            record.save()
        if counts["error"]:
            raise RunFailed(f"run {record.run} finished with {counts['error']} token(s) in error: "
                            f"see `pilotflow status {record.run}` and `pilotflow logs {record.run} TOKEN`")


def wait(record: RunRecord, view: Observer | None = None, *, callbacks=(), watch_only: bool = False) -> dict:
    """Until every token is done or error: outputs come home in the background as tokens
    finish. Returns the final counts; raises RunFailed when tokens ended in error."""
    view = view or Quiet()
    with Session(record) as s:
        sup = Supervisor(s, view, callbacks)
        fetcher = OutputFetcher(s)
        fetcher.submit(list(s.known))  # outputs of tokens already done before this wait
        while True:
            st = sup.step(watch_only=watch_only)
            fetcher.submit(st.snap.changed)
            if st.sleep is None:
                break
            time.sleep(st.sleep)
        sup.wind_down()
        fetcher.finish()
        for e in fetcher.errors[:5]:
            view.note(f"could not bring back an output: {e}")
        view.done(st.counts)
        sup.finished(st.counts)
        return st.counts
