"""The MILP solver behind the planner, and the guarantee that it never prints.

HiGHS (``highspy``, in-process) is the default; CBC (a subprocess through PuLP's
``COIN_CMD``) is the fallback where no highspy wheel can be installed. Solvers are chatty at
depths PuLP's ``msg=False`` does not reach: highspy >= 1.16 prints a copyright banner on the
C-level stdout when its first model is *created*, before any option can be set. Machine-
readable output (``plan --json``, the run id of ``submit``) must stay exactly that, so every
model is built and solved with file descriptors 1 and 2 pointed at a scratch file; whatever a
solver wrote there goes to this module's logger at debug level, never to the user's streams.

``PILOTFLOW_SOLVER=highs|cbc`` chooses a solver by hand (tests use it to run both).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import threading
from typing import Iterator

from pilotflow.errors import NoSolver

SOLVE_SECONDS = 20
log = logging.getLogger("pilotflow.planning.solver")
_fd_lock = threading.Lock()


def solver_name(strict: bool = False) -> str:
    """``"HiGHS"`` or ``"CBC"``: the one :func:`solve` will use. Without ``strict``, highspy
    is looked for, not imported (it imports numpy: 0.2 s of every ``submit`` whose plan needs
    no model, which only names the solver)."""
    forced = os.environ.get("PILOTFLOW_SOLVER", "").strip().lower()
    if forced in ("highs", "cbc"):
        if forced == "highs" and not _have_highspy(strict):
            raise NoSolver("PILOTFLOW_SOLVER=highs but highspy cannot be imported; "
                           "install it: pip install highspy")
        if forced == "cbc" and _cbc_path() is None:
            raise NoSolver("PILOTFLOW_SOLVER=cbc but no CBC binary was found; "
                           "install one: pip install cbcbox (or put `cbc` on PATH)")
        return "HiGHS" if forced == "highs" else "CBC"
    if forced:
        raise NoSolver(f"PILOTFLOW_SOLVER={forced!r} is not a solver pilotflow knows; use highs or cbc")
    if _have_highspy(strict):
        return "HiGHS"
    if _cbc_path() is not None:
        return "CBC"
    raise NoSolver("no MILP solver for the planner: install highspy (pip install highspy), "
                   "or a CBC binary (pip install cbcbox)")


def variable(prob, name: str, low=None, up=None, cat: str = "Continuous"):
    """A model variable made by the problem (PuLP 3.3+; direct ``LpVariable`` is deprecated)."""
    return prob.add_variable(name, low, up, cat=cat)


def solve(prob) -> str:
    """Solve a PuLP problem silently; returns PuLP's status text (``"Optimal"``, …)."""
    import pulp
    with quiet_stdio():
        status = prob.solve(_make_solver(solver_name(strict=True)))
    return pulp.LpStatus[status]


def _make_solver(name: str):
    import pulp
    if name == "HiGHS":
        return pulp.HiGHS(msg=False, timeLimit=SOLVE_SECONDS)
    return pulp.COIN_CMD(path=_cbc_path(), msg=False, timeLimit=SOLVE_SECONDS)


def _have_highspy(strict: bool = False) -> bool:
    if not strict:
        return importlib.util.find_spec("highspy") is not None
    try:
        import highspy  # noqa: F401
    except ImportError:
        return False
    return True


def _cbc_path() -> str | None:
    """A CBC binary: the ``cbcbox`` wheel's, one on PATH, or the one PuLP 3 bundles.

    PuLP 3 bundles CBC but deprecates the ``PULP_CBC_CMD`` class that runs it, and PuLP 4
    drops both; ``COIN_CMD`` with an explicit path works on either."""
    try:
        import cbcbox  # type: ignore[import-not-found]
        path = cbcbox.cbc_bin_path()
        if path and os.access(path, os.X_OK):
            return str(path)
    except Exception:  # noqa: BLE001 - an optional package: any failure means "not there"
        pass
    on_path = shutil.which("cbc")
    if on_path:
        return on_path
    try:
        from pulp.apis import coin_api
        bundled = getattr(coin_api, "pulp_cbc_path", None)
    except ImportError:
        return None
    if bundled and os.path.isfile(bundled):
        if not os.access(bundled, os.X_OK):
            try:
                os.chmod(bundled, 0o755)
            except OSError:
                return None
        return bundled
    return None


@contextlib.contextmanager
def quiet_stdio() -> Iterator[None]:
    """Point file descriptors 1 and 2 at a scratch file for the duration; restore them even if
    the body raises. C-level stdio buffers are flushed before restoring, or a buffered banner
    would reach the real stdout later, at exit. Serialised: fds are process-wide."""
    with _fd_lock:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (AttributeError, OSError, ValueError):
                pass
        saved = []
        try:
            scratch = tempfile.TemporaryFile()
        except OSError:  # nowhere to put it: /dev/null will do
            scratch = open(os.devnull, "w+b")
        try:
            for fd in (1, 2):
                try:
                    saved.append((fd, os.dup(fd)))
                except OSError:  # fd not open (a daemon): nothing to protect
                    continue
                os.dup2(scratch.fileno(), fd)
            try:
                yield
            finally:
                _flush_c_stdio()
                for fd, copy in saved:
                    os.dup2(copy, fd)
                    os.close(copy)
                _log_scratch(scratch)
        finally:
            scratch.close()


def _flush_c_stdio() -> None:
    try:
        _libc().fflush(None)
    except (OSError, AttributeError):
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None)


def _log_scratch(scratch) -> None:
    try:
        scratch.seek(0)
        text = scratch.read(64 * 1024).decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        return
    if text:
        log.debug("solver output (kept off stdout/stderr):\n%s", text)
