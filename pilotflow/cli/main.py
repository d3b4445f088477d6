"""The ``pilotflow`` command: argument parsing and printing only.

Every failure the user can cause or fix is a :class:`PilotflowError` and becomes one message
on stderr and the SPEC's exit code; a traceback appears only with ``--debug``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from pilotflow.errors import PilotflowError

INTERNAL_ERROR = 4  # not in SPEC §3: a bug in pilotflow itself (README, "Deviations")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pilotflow", description="Run many tasks in few pilot allocations.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and pilotflow's debug log")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("plan", help="validate and plan a bundle (no cluster needed)")
    s.add_argument("bundle", type=Path)
    s.add_argument("--json", action="store_true", help="print the plan as JSON (SPEC §3)")
    s.add_argument("--scripts", type=Path, metavar="DIR", help="write the batch scripts submit would submit")
    s.add_argument("--margin", type=float, help="override every resource's walltime_margin")

    s = sub.add_parser("submit", help="plan, stage inputs, write the token pool and submit the pilots")
    s.add_argument("bundle", type=Path)
    s.add_argument("--wait", action="store_true", help="then wait until every token is done or error")
    s.add_argument("--dry-run", action="store_true", help="show what would be submitted, change nothing")

    s = sub.add_parser("status", help="sync states and show counts per state and per pilot")
    s.add_argument("run", nargs="?")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="keep showing a live view until the run ends")

    s = sub.add_parser("wait", help="show progress until every token is done or error")
    s.add_argument("run", nargs="?")

    s = sub.add_parser("sync", help="bring back state files, logs and declared outputs")
    s.add_argument("run", nargs="?")

    s = sub.add_parser("logs", help="stdout and stderr of a token's latest attempt")
    s.add_argument("args", nargs="+", metavar="[RUN] TOKEN")

    s = sub.add_parser("retry", help="scrub failed / stale tokens back to todo and submit pilots for them")
    s.add_argument("run", nargs="?")
    s.add_argument("--failed", action="store_true", help="tokens in error")
    s.add_argument("--stale", action="store_true", help="tokens locked by pilots that stopped beating")
    s.add_argument("--move-to", metavar="RESOURCE", help="move the remaining todo tokens to RESOURCE")

    s = sub.add_parser("cancel", help="cancel the run's pilots; running tokens go back to todo")
    s.add_argument("run", nargs="?")

    s = sub.add_parser("report", help="write a self-contained HTML timeline of a run")
    s.add_argument("run", nargs="?")
    s.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.html")

    sub.add_parser("runs", help="list known runs, newest first")

    s = sub.add_parser("check", help="check that each resource of a bundle is usable")
    s.add_argument("bundle", type=Path)
    s.add_argument("--submit", action="store_true", help="also submit and cancel a tiny test pilot")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:  # pilotflow's own debug log (e.g. what a solver printed) on stderr
        import logging
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pilotflow debug: %(name)s: %(message)s"))
        logger = logging.getLogger("pilotflow")
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    with own_stdout():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except PilotflowError as e:
        print(f"pilotflow: {_label(e)}{e}", file=sys.stderr)
        if args.debug:
            raise
        return e.exit_code
    except KeyboardInterrupt:
        print("pilotflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug: say so plainly, keep the traceback for --debug
        if args.debug:
            raise
        print(f"pilotflow: internal error: {type(e).__name__}: {e}\n"
              "  rerun with --debug for the traceback and report it", file=sys.stderr)
        return INTERNAL_ERROR


@contextlib.contextmanager
def own_stdout() -> Iterator[None]:
    """Keep the process's stdout for pilotflow's own output alone.

    ``plan --json``, ``status --json`` and the run id of ``submit`` are parsed by scripts, so
    no other byte may reach them: a C library (a solver's banner), a child that inherits the
    descriptor, a stray ``print`` in a dependency. ``sys.stdout`` is moved to a private copy
    of descriptor 1, and descriptor 1 itself is pointed at stderr for the command's duration,
    so whatever else writes there is still visible, on stderr."""
    original = sys.stdout
    try:
        original.flush()
        if original.fileno() != 1:
            raise ValueError("stdout is not descriptor 1")
        mine = open(os.dup(1), "w", encoding=original.encoding, errors=original.errors,
                    buffering=1 if original.line_buffering else -1)
    except (AttributeError, OSError, ValueError):  # no real stdout (embedded, captured): nothing to guard
        yield
        return
    os.dup2(2, 1)
    sys.stdout = mine
    try:
        yield
    finally:
        sys.stdout = original
        try:
            mine.flush()
        except OSError:  # a closed pipe (`| head`): nothing more can reach it anyway
            pass
        os.dup2(mine.fileno(), 1)
        try:
            mine.close()
        except OSError:
            pass


def _label(e: PilotflowError) -> str:
    from pilotflow.errors import BundleError, ExternalError
    if isinstance(e, BundleError):
        return f"{len(e.problems)} problem(s) in the bundle:\n" if len(e.problems) > 1 else ""
    if isinstance(e, ExternalError):
        return "external command failed: "
    return ""


def _dispatch(args: argparse.Namespace) -> int:
    from pilotflow.cli import commands
    return getattr(commands, args.command.replace("-", "_"))(args)
