"""The ``pilotflow`` subcommands: each calls the library (``pilotflow.run``) and says what
happened. The only printing code of the package lives in ``pilotflow.cli``."""

from __future__ import annotations

import json
import sys
from argparse import Namespace

from pilotflow.errors import UsageError
from pilotflow.run.records import find_run, list_runs


def _err(msg: str) -> None:
    print(msg, file=sys.stderr)


def plan(args: Namespace) -> int:
    from pilotflow.bundle import load_bundle
    from pilotflow.cli.views import print_plan
    from pilotflow.planning import make_plan
    bundle = load_bundle(args.bundle)
    made = make_plan(bundle, margin=args.margin)
    if args.scripts:
        from pilotflow.render import write_scripts
        written = write_scripts(made, args.scripts)
        if not args.json:
            _err(f"wrote {len(written)} script(s) to {args.scripts}/")
    if args.json:
        json.dump(made.to_json(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_plan(made)
    return 0


def submit(args: Namespace) -> int:
    from pilotflow.bundle import load_bundle
    from pilotflow.run.start import new_run
    bundle = load_bundle(args.bundle)
    record, made = new_run(bundle, dry_run=args.dry_run, log=_err)
    if args.dry_run:
        from pilotflow.cli.views import print_plan
        print_plan(made)
        _err("dry run: nothing was created or submitted (`pilotflow plan --scripts DIR` shows the scripts)")
        return 0
    print(record.run, flush=True)
    if args.wait:
        return _wait(record)
    return 0


def status(args: Namespace) -> int:
    from pilotflow.cli.views import print_status
    from pilotflow.run.control import status as sync_for_status, status_json
    record = find_run(args.run)
    if args.watch:
        return _wait(record, watch_only=True)
    st = sync_for_status(record, note=_err)
    snap = st.snap
    if args.json:
        json.dump(status_json(record, snap, st.state, st.reason), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print_status(record, snap, st.state, st.reason)
    counts = snap.counts(record.tokens)
    finished = counts["todo"] == 0 and counts["locked"] == 0
    return 1 if finished and counts["error"] else 0


def wait(args: Namespace) -> int:
    return _wait(find_run(args.run))


def _wait(record, watch_only: bool = False) -> int:
    from pilotflow.cli.views import Progress
    from pilotflow.run.supervisor import wait as supervise
    with Progress(record) as view:
        supervise(record, view, watch_only=watch_only)
    return 0


def sync(args: Namespace) -> int:
    from pilotflow.run.control import sync_all
    record = find_run(args.run)
    snap, n = sync_all(record)
    counts = snap.counts(record.tokens)
    print(f"{record.run}: {len(snap.changed)} state change(s), {n} output file(s) brought back; "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def logs(args: Namespace) -> int:
    from pilotflow.run.control import token_logs
    if len(args.args) > 2:
        raise UsageError("usage: pilotflow logs [RUN] TOKEN")
    run, token = (None, args.args[0]) if len(args.args) == 1 else args.args
    doc, out = token_logs(find_run(run), token)
    print(f"== {token} attempt {doc['attempt']} ({doc.get('state')}, exit code {doc.get('exit_code')}, "
          f"host {doc.get('host')}) ==")
    for ext, label in (("out", "stdout"), ("err", "stderr")):
        print(f"-- {label} --")
        text = out[ext]
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return 0


def retry(args: Namespace) -> int:
    from pilotflow.run.control import move_to, retry as scrub_and_submit
    record = find_run(args.run)
    if args.move_to:
        moved, asked = move_to(record, args.move_to, log=_err)
        if not asked:
            print("no todo token to move")
            return 0
        print(f"moved {len(moved)} token(s) to {args.move_to}"
              + (f"; {asked - len(moved)} were claimed meanwhile or do not fit {args.move_to}"
                 if len(moved) < asked else ""))
        return 0
    r = scrub_and_submit(record, failed=args.failed, stale=args.stale, log=_err)
    print(f"{len(r.scrubbed)} token(s) scrubbed back to todo; {r.left} token(s) to run")
    if r.left:
        if r.live:
            print(f"{r.live} pilot(s) still queued or running; they take the work too")
        print(f"submitted {r.submitted} pilot(s)")
    return 0


def cancel(args: Namespace) -> int:
    from pilotflow.run.control import cancel as cancel_run
    record = find_run(args.run)
    n, counts = cancel_run(record)
    print(f"cancelled {n} pilot(s) of {record.run}; " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


def runs(args: Namespace) -> int:
    from pilotflow.cli.views import print_runs
    print_runs(list_runs())
    return 0


def report(args: Namespace) -> int:
    from pilotflow.report import write_report
    from pilotflow.run.supervisor import sync_run
    from pilotflow.run.sync import Session
    record = find_run(args.run)
    with Session(record) as s:
        snap = sync_run(s)
        path = write_report(record, snap, args.output, session=s)
    print(f"wrote {path}")
    return 0


def check(args: Namespace) -> int:
    from pilotflow.cli.views import print_checks
    from pilotflow.run.check import run_checks
    rows = run_checks(args.bundle, submit=args.submit)
    print_checks(args.bundle, rows)
    return 0 if all(ok is not False for _, _, ok, _ in rows) else 3
