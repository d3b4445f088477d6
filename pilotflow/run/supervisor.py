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

from pilotflow.errors import ExternalError, PilotflowError, RunFailed, UsageError
from pilotflow.run.failover import broken, fail_over, fail_over_refused
from pilotflow.run.records import RunRecord
from pilotflow.run.pilots import adopt_renewals, nap, refresh_pilots, release_dead
from pilotflow.run.sync import OutputFetcher, Session, Snapshot, sync_states
from pilotflow.schedulers.base import FINISHED


ENDED_GRACE = 5.0  # seconds after its launchers' last end that wind-down stops waiting for a pilot


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
    if any([adopt_renewals(s, name, rounds) for name, rounds in s.rounds.items()]):
        s.record.save()
    if pilots and (refresh_pilots(s) or any(p.state in FINISHED for p in s.record.pilots.values())):
        if release_dead(s):
            snap = sync_states(s)
    return snap


ROUND_IN_FLIGHT_S = 90.0  # a round claimed this recently may still be submitting its pilots


def run_state(s: Session, snap: Snapshot) -> tuple[str, str]:
    """``finished``, ``running`` or ``stalled`` (work left, no pilot queued or running, nothing
    that will start one) with the reason and the command that carries the run on."""
    record = s.record
    counts = snap.counts(record.tokens)
    if counts["todo"] == 0 and counts["locked"] == 0:
        return "finished", ""
    if any(p.state not in FINISHED for p in record.pilots.values()):
        return "running", ""
    now = time.time()
    for rounds in s.rounds.values():
        if any(d.get("state") == "claimed" and now - float(d.get("time") or 0) < ROUND_IN_FLIGHT_S
               for d in rounds.values()):
            return "running", ""  # a pilot is submitting its follow-up right now
    if record.cancelled:
        return "stalled", (f"cancelled with {counts['todo']} token(s) left; `pilotflow retry {record.run}` "
                           "submits pilots for them")
    why = []
    resume = f"`pilotflow wait {record.run}` carries it on from here"
    for name in record.active_resources():
        state = record.resources[name]
        res = record.resource(name)
        if state.broken:
            why.append(f"{name} is broken ({state.broken})")
        if state.followups >= res.max_follow_ups:
            why.append(f"the follow-up budget of {name} is spent ({state.followups} of max_follow_ups = "
                       f"{res.max_follow_ups} rounds)")
            resume = f"`pilotflow retry {record.run}` gives it a fresh budget"
        elif state.renewal:
            why.append(state.renewal)
    notes = sorted({(a.get("end") or {}).get("renewal") for a in snap.agents.values()} - {None})
    why += [n for n in notes if n not in why]
    pilots = list(record.pilots.values())
    if pilots and all(p.state == "failed" for p in pilots):
        why.append(f"every pilot failed (the last: {pilots[-1].id}, {pilots[-1].raw or 'failed'})")
    if not why:
        why.append("every pilot ended with work left and none submitted a follow-up")
    return "stalled", "; ".join(why) + "; " + resume


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
                    resource: str | None = None) -> list:
    """Pilots planned for the todo tokens left (of one resource, or all), submitted; their records."""
    from pilotflow.run.submit import plan_remaining, submit_pilots
    record = s.record
    left = {t.name for t in record.tasks() if snap.states.state(t.name) == "todo"
            and (resource is None or t.resource == resource)}
    if not left:
        return []
    plan = plan_remaining(record, left)
    log(f"{why}: submitting pilots for {len(left)} token(s)")
    done = submit_pilots(record, plan, s.transports(), log=log)
    record.save()
    return done


@dataclass
class Step:
    """What one step saw, and how long to sleep before the next (None: the run finished)."""

    snap: Snapshot
    counts: dict[str, int]
    sleep: float | None


class Supervisor:
    """One run, kept going (see the module docstring). ``clock`` is injectable for tests."""

    def __init__(self, s: Session, view: Observer | None = None, callbacks=(), *,
                 max_followups: int | None = None, clock: Callable[[], float] = time.time):
        self.s = s
        self.record = s.record
        self.view = view or Quiet()
        self.callbacks = list(callbacks)
        self.max_followups = max_followups
        self.clock = clock
        self.delay = 0.25
        self.ask_every, self.asked, self.progress = 10.0, 0.0, clock()
        self.seen = (clock(), -1)  # (when, tokens finished): the pace, for how often to look
        self.woken: set[str] = set()  # job ids of pilots on this machine whose end cut a pause short

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
        self.delay = self.pace(now, counts) if snap.changed else min(self.delay * 1.5, 5.0)
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

    def pause(self, seconds: float) -> None:
        """Until the next step; a pilot on this machine that ends cuts it short, and the
        schedulers are asked at the next step."""
        if nap(self.s, seconds, self.woken):
            self.asked = 0.0

    def pace(self, now: float, counts: dict[str, int]) -> float:
        """A look every 0.25 s while tokens change, but once a second while more than 3 s of
        work is left at the pace seen (a sync costs CPU that tasks on a local resource would
        use), and every 0.1 s in the last second (the end is seen sooner)."""
        finished = counts["done"] + counts["error"]
        when, before = self.seen
        self.seen = (now, finished)
        if before < 0 or now <= when:
            return 0.25
        rate = (finished - before) / (now - when)
        if rate <= 0:
            return 0.25
        left = (counts["todo"] + counts["locked"]) / rate
        return 1.0 if left > 3.0 else 0.25 if left > 1.0 else 0.1

    def fail_over(self, snap: Snapshot) -> None:
        for name, why in broken(self.s, snap, now=self.clock()).items():
            if fail_over(self.s, name, why, self.view.note):
                self.delay, self.ask_every = 0.5, 10.0

    def follow_up(self, snap: Snapshot, name: str) -> None:
        """Every pilot on ``name`` ended with work left: one round of follow-up pilots. Rounds
        are claimed in the pool, exclusively, like the rounds pilots submit themselves, and
        count against the resource's ``max_follow_ups``."""
        record = self.record
        res = record.resource(name)
        budget = res.max_follow_ups if self.max_followups is None else self.max_followups
        t = self.s.transport(name)
        pool = record.pool(name)
        r = t.helper("round", op="claim", by="client", wait=30, python=res.python, pool=pool)
        k = r["round"]
        if k is None:
            return  # a pilot is submitting this round right now: the next sync shows its pilots
        record.resources[name].followups = r["spent"]
        if r["spent"] >= budget:
            t.helper("round", op="end", round=k, state="void", info={"reason": "budget spent"},
                     python=res.python, pool=pool)
            raise RunFailed(f"every pilot of run {record.run} on {name} ended with token(s) left after "
                            f"{r['spent']} follow-up round(s) (max_follow_ups = {budget}); check `pilotflow "
                            f"status` and the pilots' output, then `pilotflow retry {record.run}`")
        snap = sync_run(self.s, pilots=False)  # an earlier round may have submitted pilots meanwhile
        if not r["ready"] or name not in idle_resources(record, self.s.owner, snap.states):
            t.helper("round", op="end", round=k, state="void", info={"reason": "a pilot takes the work"},
                     python=res.python, pool=pool)
            return
        try:
            pilots = submit_followup(self.s, snap, f"every pilot on {name} ended with work left", self.view.note,
                                     resource=name)
        except PilotflowError as e:
            t.helper("round", op="end", round=k, state="failed", info={"error": str(e)[:500], "by": "client"},
                     python=res.python, pool=pool)
            if not isinstance(e, ExternalError) or len(record.resources) == 1:
                raise
            fail_over_refused(self.s, {name: e}, self.view.note)  # its work goes elsewhere
            return
        t.helper("round", op="end", round=k, state="done" if pilots else "void",
                 info={"by": "client", "pilots": [{"id": p.id, "job_id": p.job_id, "nodes": p.nodes,
                                                   "walltime_s": p.walltime_s, "tokens": p.tasks} for p in pilots]},
                 python=res.python, pool=pool)
        record.resources[name].followups = r["spent"] + bool(pilots)
        record.save()
        self.view.note(f"submitted {len(pilots)} follow-up pilot(s) on {name} (round {k})")
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
        started = time.time()
        end = started + timeout
        cursor, agents = s.record.mirror.cursor(), s.record.mirror.agents()

        def silent(p) -> bool:
            """One of its launchers stopped beating more than lock_timeout ago, without an end
            (a crashed node: its tokens were taken over; the job does not end by itself, and
            the scheduler may take minutes to notice the node)."""
            now = cursor.get(p.resource)
            now = now.get("t") if isinstance(now, dict) else now
            return isinstance(now, (int, float)) and any(
                a.get("pilot") == p.id and "end" not in a and now - float(a.get("beat") or 0) > s.record.lock_timeout
                for a in agents.values())

        def said_goodbye(p) -> bool:
            """Every launcher of it ended more than ENDED_GRACE seconds ago: its batch script
            has nothing left to do, and a scheduler that still lists it waits for a node that
            went away after its launcher ended (or reports ends slowly: a later look sees it)."""
            now = cursor.get(p.resource)
            now = now.get("t") if isinstance(now, dict) else now
            ends = [(a.get("end") or {}).get("end") if isinstance(a.get("end"), dict) else a.get("end")
                    for a in agents.values() if a.get("pilot") == p.id]
            if not ends or not isinstance(now, (int, float)) or not all(isinstance(e, (int, float)) for e in ends):
                return False
            return now + (time.time() - started) - max(ends) > ENDED_GRACE

        def alive(p) -> bool:
            return (bool(p.job_id) and p.state not in FINISHED and not s.record.broken(p.resource) and not silent(p)
                    and not said_goodbye(p))
        # a pilot with nothing left exits within moments: look soon, then less often; a look
        # at this machine's processes costs nothing (no scheduler to ask): often for a second
        here = all(not r.remote and r.scheduler == "local"
                   for r in (s.record.resource(p.resource) for p in s.record.pilots.values() if alive(p)))
        pause, often = 0.05, time.time() + (1.0 if here else 0.0)
        if here:  # (they may have ended already: the pause woke when one did)
            try:
                refresh_pilots(s)
            except PilotflowError:
                pass
        while time.time() < end and any(alive(p) for p in s.record.pilots.values()):
            time.sleep(pause)
            if time.time() > often:
                pause = min(pause * 2, 0.5)
            try:
                refresh_pilots(s)
            except PilotflowError:
                break
        self.deliver()

    def finished(self, counts: dict[str, int]) -> None:
        """The run's end: the on_finish hook (once per run), then RunFailed if tokens failed."""
        record = self.record
        notify_finished(record, counts, self.view.note)
        if counts["error"]:
            raise RunFailed(f"run {record.run} finished with {counts['error']} token(s) in error: "
                            f"see `pilotflow status {record.run}` and `pilotflow logs {record.run} TOKEN`")


def notify_finished(record: RunRecord, counts: dict[str, int], note: Callable[[str], None]) -> None:
    """Run the bundle's on_finish hook, once per run (whoever sees the end first: ``wait``, or
    the first ``status`` of a run that finished unattended)."""
    record.state, record.reason = "finished", ""
    if record.on_finish and not record.finished_notified:
        from pilotflow.run.events import run_hook
        err = run_hook(record.on_finish, {"run": record.run, "bundle": record.bundle, "counts": counts,
                                          "pilots": {p.id: p.state for p in record.pilots.values()}},
                       record.base_dir)
        if err:
            note(err)
        record.finished_notified = True
    record.save()


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
            fetcher.submit(s.take_changed())
            if st.sleep is None:
                break
            sup.pause(st.sleep)
        sup.wind_down()
        fetcher.submit(list(s.known))  # whatever changed in a sync the loop did not see
        fetcher.finish()
        for e in fetcher.errors[:5]:
            view.note(f"could not bring back an output: {e}")
        view.done(st.counts)
        sup.finished(st.counts)
        return st.counts
