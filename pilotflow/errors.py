"""Error types that map one-to-one onto the exit codes of SPEC §3.

The CLI turns any of these into one clear message and an exit code; anything else is a bug
and is shown with a traceback only under ``--debug``.
"""

from __future__ import annotations


class PilotflowError(Exception):
    """Base class: a user-facing failure with a message that says what, where and how to fix."""

    exit_code = 2


class UsageError(PilotflowError):
    """Bad input or usage: exit 2."""

    exit_code = 2


class BundleError(UsageError):
    """One or more problems in a job bundle, all reported at once (``FILE:LINE: message``)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RunNotFound(UsageError):
    """A run id that is not recorded in ./.pilotflow/runs (or no run at all)."""


class NoSolver(UsageError):
    """No MILP solver can be used (neither highspy nor a CBC binary): a setup problem, exit 2."""


class ExternalError(PilotflowError):
    """An external system (ssh, a scheduler command) failed after retries: exit 3.

    ``transient`` tells retry loops whether trying again can help (a busy controller,
    a dropped connection) or not (a rejected job script).
    """

    exit_code = 3

    def __init__(self, message: str, *, argv: list[str] | None = None, returncode: int | None = None,
                 stdout: str = "", stderr: str = "", transient: bool = False):
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.transient = transient
        super().__init__(message)

    def __str__(self) -> str:
        text = self.args[0]
        if self.argv is not None:
            text += f"\n  command: {' '.join(self.argv)}"
        if self.returncode is not None:
            text += f"\n  exit code: {self.returncode}"
        tail = _tail(self.stderr) or _tail(self.stdout)
        if tail:
            text += "\n  output: " + tail.replace("\n", "\n          ")
        return text


class RunFailed(PilotflowError):
    """The run finished with tokens in ``error``: exit 1 (not a usage problem)."""

    exit_code = 1


def _tail(text: str, lines: int = 8) -> str:
    text = (text or "").strip()
    return "\n".join(text.splitlines()[-lines:])
