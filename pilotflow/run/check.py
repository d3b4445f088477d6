"""``pilotflow check``: is each resource of a bundle usable, and if not, what fixes it.

Checks, per resource: the connection (host keys included), the remote python3 (>= 3.6, as
the launcher needs), the scheduler's commands, that ``root`` is writable, and with
``--submit`` a tiny test pilot (like ``hq alloc dry-run``) that writes a file into ``root``
from a compute node — the only way to tell that the nodes see the same filesystem — and is
cancelled if it does not start in time.
"""

from __future__ import annotations

import secrets
import shlex
import time
from pathlib import Path

from pilotflow.bundle import Resource, load_bundle
from pilotflow.errors import PilotflowError
from pilotflow.render import default_root, python_words
from pilotflow.schedulers import backend
from pilotflow.schedulers.base import FINISHED, QUEUED, job_name
from pilotflow.transport import connect

SUBMIT_WAIT_S = 90


def run_checks(bundle_path: Path, *, submit: bool = False) -> list[tuple[str, str, bool | None, str]]:
    """Rows of (resource, check, passed (None: skipped), detail or fix), resource by resource."""
    bundle = load_bundle(bundle_path)
    rows = []
    for res in bundle.resources:
        rows.extend((res.name, *r) for r in check_resource(res, bundle.base_dir, submit=submit))
    return rows


def check_resource(res: Resource, base_dir: Path, *, submit: bool):
    """Yields (check, ok (True/False/None for skipped), detail)."""
    where = res.host or "this machine"
    try:
        t = connect(res)
        t.run(["true"])
        yield "connection", True, where
    except PilotflowError as e:
        yield "connection", False, str(e)
        return
    try:
        try:
            argv = shlex.split(res.python) + ["-c", "import sys; print('%d %d %d' % sys.version_info[:3])"]
            r = t.run(argv)
            if r.returncode:
                raise PilotflowError((r.stderr or r.stdout or f"exit code {r.returncode}").strip())
            v = tuple(int(x) for x in r.stdout.split()[-3:])  # last: start-up files may print first
            ok = v >= (3, 6)
            yield "python", ok, (f"{res.python}: Python {'.'.join(map(str, v))}" if ok else
                                 f"{res.python} is Python {'.'.join(map(str, v))}; the launcher needs 3.6 or newer: "
                                 "set python = \"...\" in the [[resource]] or a module load in setup")
        except PilotflowError as e:
            yield "python", False, (f"cannot run {res.python} on {where}: {str(e).splitlines()[0]}; set python = "
                                    "\"/path/to/python3\" in the [[resource]]")
        sched = backend(res)
        missing = []
        for cmd in sched.check_commands:
            r = t.run(["/bin/sh", "-c", f"command -v {shlex.quote(cmd)}"])
            if r.returncode:
                missing.append(cmd)
        if missing:
            yield (f"{res.scheduler} commands", False,
                   f"not found on {where}: {', '.join(missing)}; is this the login node, or is a module needed "
                   "(add it to setup)?")
        else:
            flavour = _flavour(t, sched)
            yield (f"{res.scheduler} commands", flavour is None,
                   "found " + ", ".join(sched.check_commands) if flavour is None else flavour)
        root = t.expand(default_root(res, base_dir))
        probe = f"{root}/.pilotflow-check-{secrets.token_hex(4)}"
        try:
            t.mkdirs([root])
            t.write_file(probe, b"ok\n")
            ok = t.read_file(probe) == b"ok\n"
            t.run(["rm", "-f", probe])
            yield "root writable", ok, root if ok else f"{root}: wrote a file but read something else back"
        except (PilotflowError, OSError) as e:
            yield "root writable", False, f"{root}: {e}; set root = \"...\" to a writable shared directory"
            return
        if res.pool == "couchdb":
            yield _couchdb(res)
        if not submit:
            yield "test pilot", None, "not submitted (add --submit to check that the nodes see root)"
            return
        yield from _test_pilot(t, res, root)
    finally:
        t.close()


def _couchdb(res: Resource) -> tuple[str, bool, str]:
    """The pool's database answers this machine with the credentials given (pilots must reach
    it too: a test pilot does not check that)."""
    from pilotflow.launcher import CLIENT_PATIENCE, CouchDB, PoolError, couch_credentials
    try:
        db = CouchDB(res.couchdb_url, res.couchdb_database, couch_credentials(res.couchdb_credentials),
                     patience=CLIENT_PATIENCE)
        try:
            status, info = db.request("GET", "")
        finally:
            db.close()
    except PoolError as e:
        return "couchdb", False, str(e)
    if status == 404:
        return "couchdb", True, f"{res.couchdb_url}: database {res.couchdb_database} will be created at submit"
    if status != 200:
        return "couchdb", False, f"{res.couchdb_url}/{res.couchdb_database}: HTTP {status}: {info}"
    return "couchdb", True, f"{res.couchdb_url}/{res.couchdb_database}: {info.get('doc_count', '?')} documents"


def _flavour(t, sched) -> str | None:
    """None if the commands found belong to the scheduler asked for, else what is wrong:
    Grid Engine and PBS both call their commands qsub and qstat."""
    argv = sched.flavour_argv()
    if argv is None:
        return None
    r = t.run(argv)
    return sched.flavour_problem(r.stdout + r.stderr)


def _test_pilot(t, res: Resource, root: str):
    sched = backend(res)
    tag = secrets.token_hex(4)
    marker = f"{root}/.pilotflow-check-{tag}.node"
    renew = f"{root}/.pilotflow-check-{tag}.renew"
    directives = sched.directives(job_name=job_name(f"check-{tag}", "p0"), nodes=1, cores_per_node=res.cores_per_node,
                                  walltime_s=120, resource=res, output=f".pilotflow-check-{tag}.out")
    lines = ["#!/bin/sh"] + [f"{sched.prefix} {d}" for d in directives] + list(res.setup) + [
        _renew_probe(sched, res, renew),
        f"{python_words(res)} -c 'import socket,sys; open(sys.argv[1], \"w\").write(socket.gethostname())' "
        f"{shlex.quote(marker)}"]
    script = f"{root}/.pilotflow-check-{tag}.sh"
    t.write_file(script, ("\n".join(lines) + "\n").encode(), mode=0o755)
    r = t.run(sched.submit_argv(script), cwd=root)
    if r.returncode:
        yield "test pilot", False, f"submission refused: {(r.stderr or r.stdout).strip()[-300:]}"
        return
    job = sched.parse_submit(r.stdout)
    started = time.time()
    try:
        state = _await_marker(t, sched, job, marker)
        node = t.read_file(marker)
        if node is not None:
            yield "test pilot", True, (f"job {job} ran on {node.decode().strip()} and wrote into {root} "
                                       f"({time.time() - started:.0f} s after submission)")
            said = (t.read_file(renew) or b"").decode(errors="replace").strip()
            yield "pilots renew themselves", said == "yes", (
                f"a pilot on {node.decode().strip()} can submit its follow-up" if said == "yes" else
                f"a pilot cannot submit its follow-up from the node ({said or 'no answer'}); runs go on only "
                "while `pilotflow wait` runs on the login node")
        elif state == QUEUED:
            yield "test pilot", None, f"job {job} still queued after {SUBMIT_WAIT_S} s (cancelled); the queue is busy"
        else:
            yield "test pilot", False, (f"job {job} ended ({state}) without writing into {root}: the nodes may not "
                                        "see this directory; set root to a filesystem shared with the nodes")
    finally:
        t.run(sched.cancel_argv([job]))
        t.run(["rm", "-f", marker, renew, script, f"{root}/.pilotflow-check-{tag}.out", f"{script}.out"])


def _renew_probe(sched, res: Resource, out: str) -> str:
    """A shell line for the test pilot: can this node run the scheduler's submit command (and,
    where the scheduler has one, a dry-run submission)? Writes "yes" or why not to ``out``."""
    argv = sched.renewal_argv(res, "check")
    if argv is None:
        return f"echo 'this scheduler has no way for pilots to submit' > {shlex.quote(out)}"
    cmd = shlex.quote(argv[0])
    dry = sched.node_submit_probe()
    test = f"command -v {cmd} >/dev/null 2>&1"
    if dry:
        test += " && " + " ".join(shlex.quote(a) for a in dry) + f" >/dev/null 2>{shlex.quote(out)}.err"
    return (f"if {test}; then echo yes; else echo \"{argv[0]} does not work here: "
            f"$(tail -c 300 {shlex.quote(out)}.err 2>/dev/null)\"; fi > {shlex.quote(out)}; rm -f {shlex.quote(out)}.err")


def _await_marker(t, sched, job: str, marker: str) -> str:
    """Poll until the test pilot wrote its marker, ended, or SUBMIT_WAIT_S passed; its state."""
    started = time.time()
    state = QUEUED
    while time.time() - started < SUBMIT_WAIT_S:
        if t.read_file(marker) is not None:
            break
        s = t.run(sched.status_argv([job]))
        st = sched.parse_status(s.stdout, [job]).get(job) if s.returncode == 0 else None
        state = st.state if st else state
        if state in FINISHED and t.read_file(marker) is None:
            break
        time.sleep(1)
    return state
