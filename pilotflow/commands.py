"""The ``pilotflow`` subcommands other than ``plan``: glue between runs, sync and views."""

from __future__ import annotations

import json
import sys
import time
from argparse import Namespace

from pilotflow.errors import PilotflowError, RunFailed, UsageError
from pilotflow.schedulers.base import FINISHED
from pilotflow.runs import find_run, list_runs
from pilotflow.sync import Session, fetch_logs, fetch_outputs, refresh_pilots, release_dead, sync_states

MAX_FOLLOWUPS = 3  # automatic follow-up rounds per run when pilots end with work left


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def submit(args: Namespace) -> int:
    from pilotflow.bundle import load_bundle
    from pilotflow.submit import new_run
    bundle = load_bundle(args.bundle)
    record, plan = new_run(bundle, dry_run=args.dry_run, log=_err)
    if args.dry_run:
        from pilotflow.views import print_plan
        print_plan(plan)
        _err("dry run: nothing was created or submitted (`pilotflow plan --scripts DIR` shows the scripts)")
        return 0
    print(record.run)
    if args.wait:
        return _wait(record.run)
    return 0


def status(args: Namespace) -> int:
    from pilotflow.views import print_status, status_json
    record = find_run(args.run)
    if args.watch:
        return _wait(record.run, watch_only=True)
    with Session(record) as s:
        snap = _sync(s)
    if args.json:
        json.dump(status_json(record, snap), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_status(record, snap)
    counts = snap.counts(record.tokens)
    finished = counts["todo"] == 0 and counts["locked"] == 0
    return 1 if finished and counts["error"] else 0


def _sync(s: Session, pilots: bool = True):
    """Sync token states; ask the schedulers about pilots too when ``pilots``."""
    snap = sync_states(s)
    if pilots and (refresh_pilots(s) or any(p.state in ("ended", "failed", "cancelled")
                                            for p in s.record.pilots.values())):
        if release_dead(s):
            snap = sync_states(s)
    return snap


def wait(args: Namespace) -> int:
    return _wait(find_run(args.run).run)


def _deliver(s: Session, view, callbacks=()) -> None:
    """Hand the events seen so far to the view, the callbacks and the bundle's on_change hook."""
    events, s.events = s.events, []
    if not events:
        return
    for cb in callbacks:
        for e in events:
            cb(e)
    view.events(events)
    hook = s.record.on_change
    if hook:
        from pilotflow.events import run_hook
        err = run_hook(hook, {"run": s.record.run, "events": [e.to_json() for e in events]}, s.record.base_dir)
        if err:
            view.note(err)


def _wind_down(s: Session, view, callbacks, timeout: float = 15.0) -> None:
    """With no work left, pilots exit at once: see them end, so their events are complete."""
    end = time.time() + timeout
    def alive(p) -> bool:
        return bool(p.job_id) and p.state not in FINISHED and not s.record.resources.get(p.resource, {}).get("broken")
    while time.time() < end and any(alive(p) for p in s.record.pilots.values()):
        time.sleep(0.5)
        try:
            refresh_pilots(s)
        except PilotflowError:
            break
    _deliver(s, view, callbacks)


def _finished(s: Session, counts: dict, view) -> None:
    record = s.record
    if record.on_finish and not record.finished_notified:
        from pilotflow.events import run_hook
        err = run_hook(record.on_finish, {"run": record.run, "bundle": record.bundle, "counts": counts,
                                          "pilots": {p.id: p.state for p in record.pilots.values()}},
                       record.base_dir)
        if err:
            view.note(err)
        record.finished_notified = True
        record.save()


def _wait(run: str, watch_only: bool = False, callbacks=(), cwd=None, quiet: bool = False) -> int:
    from pilotflow.views import Progress, QuietProgress
    record = find_run(run, cwd)
    delay = 0.25
    # token states come from the pools (cheap); schedulers are asked about pilots rarely:
    # every 10 s, backing off to a minute while work progresses, at once when it stalls
    ask_every, asked, progress = 10.0, 0.0, time.time()
    from pilotflow.sync import OutputFetcher
    with Session(record) as s, (QuietProgress(record) if quiet else Progress(record)) as view:
        fetcher = OutputFetcher(s)
        fetcher.submit(list(s.known))  # outputs of tokens already done before this wait
        while True:
            now = time.time()
            stalled = now - progress > max(5.0, 4 * delay)
            ask = now - asked >= (ask_every if not stalled else 5.0)
            snap = _sync(s, pilots=ask)
            if ask:
                asked = now
                ask_every = min(ask_every * 1.5, 60.0)
            if snap.changed:
                progress = now
                fetcher.submit(snap.changed)
            counts = snap.counts(record.tokens)
            _deliver(s, view, callbacks)
            view.update(snap, counts)
            if counts["todo"] == 0 and counts["locked"] == 0:
                _wind_down(s, view, callbacks)
                fetcher.finish()
                for e in fetcher.errors[:5]:
                    view.note(f"could not bring back an output: {e}")
                view.done(counts)
                _finished(s, counts, view)
                if counts["error"]:
                    raise RunFailed(f"run {record.run} finished with {counts['error']} token(s) in error: "
                                    f"see `pilotflow status {record.run}` and `pilotflow logs {record.run} TOKEN`")
                return 0
            # poll often while tokens change, back off (to 5 s) while nothing does
            delay = 0.25 if snap.changed else min(delay * 1.5, 5.0)
            if watch_only:
                time.sleep(delay)
                continue
            if record.cancelled:
                alive = [p for p in record.pilots.values() if p.state not in FINISHED]
                if not alive:
                    raise UsageError(f"run {record.run} was cancelled with {counts['todo']} token(s) left; "
                                     f"`pilotflow retry {record.run}` submits pilots for them")
                time.sleep(delay)
                continue
            if ask and len(record.resources) > 1:
                from pilotflow.failover import broken, fail_over
                for name, why in broken(s, snap).items():
                    if fail_over(s, name, why, view.note):
                        delay, ask_every = 0.5, 10.0
            idle = _idle_resources(s, snap)
            if idle and not ask:
                asked = 0.0  # make sure with a fresh answer before deciding on follow-ups
                continue
            for name in idle:
                rounds = record.resources[name].get("followups", 0)
                if rounds >= MAX_FOLLOWUPS:
                    raise RunFailed(f"every pilot of run {record.run} on {name} ended with token(s) left after "
                                    f"{rounds} follow-up round(s); check `pilotflow status` and the pilots' "
                                    f"output, then `pilotflow retry {record.run}`")
                record.resources[name]["followups"] = rounds + 1
                n = _followup(s, snap, f"every pilot on {name} ended with work left", resource=name)
                view.note(f"submitted {n} follow-up pilot(s) on {name}")
                delay, ask_every = 0.5, 10.0
            time.sleep(delay)


def _idle_resources(s: Session, snap) -> list[str]:
    """Resources (not broken) with todo tokens and no pilot queued or running."""
    record = s.record
    todo = {r for n, r in s.owner.items() if snap.states.state(n) == "todo"}
    out = []
    for name in sorted(todo):
        if record.resources.get(name, {}).get("broken"):
            continue
        if not any(p.resource == name and p.state not in FINISHED for p in record.pilots.values()):
            out.append(name)
    return out


def _followup(s: Session, snap, why: str, resource: str | None = None) -> int:
    from pilotflow.submit import plan_remaining, submit_pilots
    record = s.record
    left = {t.name for t in record.tasks() if snap.states.state(t.name) == "todo"
            and (resource is None or t.resource == resource)}
    if not left:
        return 0
    plan = plan_remaining(record, left)
    _err(f"{why}: submitting pilots for {len(left)} token(s)")
    done = submit_pilots(record, plan, LazyTransports(s), log=_err)
    record.save()
    return len(done)


class LazyTransports(dict):
    """The session's transports, connected only for the resources actually used."""

    def __init__(self, s: Session):
        super().__init__()
        self.s = s

    def __missing__(self, name: str):
        return self.s.transport(name)


def sync(args: Namespace) -> int:
    record = find_run(args.run)
    with Session(record) as s:
        snap = _sync(s)
        n = fetch_outputs(s)
    counts = snap.counts(record.tokens)
    print(f"{record.run}: {len(snap.changed)} state change(s), {n} output file(s) brought back; "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def logs(args: Namespace) -> int:
    if len(args.args) > 2:
        raise UsageError("usage: pilotflow logs [RUN] TOKEN")
    run, token = (None, args.args[0]) if len(args.args) == 1 else args.args
    record = find_run(run)
    task = next((t for t in record.tasks() if t.name == token), None)
    if task is None:
        raise UsageError(f"run {record.run} has no token '{token}'")
    with Session(record) as s:
        snap = sync_states(s)
        doc = snap.states.get(token)
        if not doc or not doc.get("attempt"):
            raise UsageError(f"token '{token}' has not run yet (state: {(doc or {}).get('state', 'todo')})")
        out = fetch_logs(s, token, int(doc["attempt"]), task.resource)
    print(f"== {token} attempt {doc['attempt']} ({doc.get('state')}, exit code {doc.get('exit_code')}, "
          f"host {doc.get('host')}) ==")
    print("-- stdout --")
    sys.stdout.write(out["out"] if out["out"].endswith("\n") or not out["out"] else out["out"] + "\n")
    print("-- stderr --")
    sys.stdout.write(out["err"] if out["err"].endswith("\n") or not out["err"] else out["err"] + "\n")
    return 0


def retry(args: Namespace) -> int:
    record = find_run(args.run)
    if args.move_to:
        return _move_to(record, args.move_to)
    with Session(record) as s:
        _sync(s)
        scrubbed: list[str] = []
        for name in record.active_resources():
            res = record.resource(name)
            opts = []
            if args.failed:
                opts.append("failed=1")
            if args.stale:
                opts.append("stale=1")
            if opts:
                r = s.transport(name).helper("scrub", *opts, python=res.python, pool=record.pool(name))
                scrubbed += r["scrubbed"]
        snap = sync_states(s)
        record.cancelled = False
        for info in record.resources.values():  # a retry gives every resource a fresh chance
            info.pop("followups", None)
            info.pop("broken", None)
            info.pop("unreachable_since", None)
        live = {p.id for p in record.pilots.values() if p.state not in ("ended", "failed", "cancelled")}
        left = {t.name for t in record.tasks() if snap.states.state(t.name) == "todo"}
        print(f"{len(scrubbed)} token(s) scrubbed back to todo; {len(left)} token(s) to run")
        if not left:
            return 0
        if live:
            print(f"{len(live)} pilot(s) still queued or running; they take the work too")
        n = _followup(s, snap, "retry")
        print(f"submitted {n} pilot(s)")
    return 0


def _move_to(record, dst: str) -> int:
    from pilotflow.failover import move
    if dst not in record.resources:
        raise UsageError(f"run {record.run} has no resource '{dst}'; its resources: {', '.join(record.resources)}")
    with Session(record) as s:
        snap = _sync(s)
        names = [n for n, r in s.owner.items() if r != dst and snap.states.state(n) == "todo"]
        if not names:
            print("no todo token to move")
            return 0
        moved = move(s, names, dst, log=_err)
        record.resources[dst].pop("broken", None)
        record.save()
    print(f"moved {len(moved)} token(s) to {dst}" + (f"; {len(names) - len(moved)} were claimed meanwhile or do not "
                                                     f"fit {dst}" if len(moved) < len(names) else ""))
    return 0


def cancel(args: Namespace) -> int:
    from pilotflow.schedulers import backend
    from pilotflow.schedulers.base import FINISHED
    from pilotflow.transport import run_checked
    record = find_run(args.run)
    with Session(record) as s:
        refresh_pilots(s)
        live = [p for p in record.pilots.values() if p.job_id and p.state not in FINISHED]
        by_res: dict[str, list] = {}
        for p in live:
            by_res.setdefault(p.resource, []).append(p)
        for name, pilots in by_res.items():
            res = record.resource(name)
            sched = backend(res.scheduler)
            run_checked(s.transport(name), sched.cancel_argv([p.job_id for p in pilots]),
                        f"cancelling pilots on {name}", transient=lambda r: sched.transient(r.returncode, r.stderr))
        record.cancelled = True
        record.save()
        # launchers hand their tokens back on SIGTERM; give them a moment, then make sure
        deadline = time.time() + 15
        while time.time() < deadline:
            refresh_pilots(s)
            if all(p.state in FINISHED for p in live):
                break
            time.sleep(0.5)
        for p in live:
            if p.state not in FINISHED:
                p.state, p.raw = "cancelled", "cancel requested"
        record.save()
        snap = _sync(s)
    counts = snap.counts(record.tokens)
    print(f"cancelled {len(live)} pilot(s) of {record.run}; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def runs(args: Namespace) -> int:
    from pilotflow.views import print_runs
    print_runs(list_runs())
    return 0


def report(args: Namespace) -> int:
    from pilotflow.report import write_report
    record = find_run(args.run)
    with Session(record) as s:
        snap = _sync(s)
        path = write_report(record, snap, args.output, session=s)
    print(f"wrote {path}")
    return 0


def check(args: Namespace) -> int:
    from pilotflow.check import run_checks
    return run_checks(args.bundle, submit=args.submit)
