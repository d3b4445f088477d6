"""Pilots as the schedulers see them: their states, the tokens dead ones still hold, cancelling.

One scheduler call per resource returns every pilot's state. Pilots the scheduler says are
gone cannot hold tokens: what they still hold is handed back at once instead of waiting for
their heartbeat to go stale.
"""

from __future__ import annotations

import os
import select
import time

from pilotflow.errors import ExternalError
from pilotflow.run.events import pilot_events
from pilotflow.run.records import PilotRecord
from pilotflow.run.sync import Session
from pilotflow.schedulers import backend
from pilotflow.schedulers.base import FINISHED, QUEUED, UNKNOWN
from pilotflow.transport import run_checked


def refresh_pilots(s: Session) -> list[str]:
    """Ask each scheduler (one call per resource) about the run's unfinished pilots."""
    record = s.record
    changed = []
    by_res: dict[str, list] = {}
    for p in record.pilots.values():
        # a resource found broken is not asked again: its scheduler may take a minute to fail
        if p.job_id and p.state not in FINISHED and not record.broken(p.resource):
            by_res.setdefault(p.resource, []).append(p)
    for name, pilots in by_res.items():
        res = record.resource(name)
        sched = backend(res)
        ids = [p.job_id for p in pilots]
        asked = time.time()
        try:
            t = s.transport(name)
            here = None if res.remote else sched.status_in_process(ids)
            # with somewhere to fail over to, a failed ask is not retried at once: failover
            # measures how long the scheduler stays silent, over several asks
            states = sched.parse_status(here, ids) if here is not None else \
                _ask(t, sched, sched.status_argv(ids), sched.parse_status, ids, name, retry=len(record.resources) == 1)
        except ExternalError as e:
            s.errors[name] = e
            # unreachable since the failed call began (a dead controller takes a while to say so)
            if record.resources[name].unreachable_since is None:
                record.resources[name].unreachable_since = asked
            if len(record.resources) == 1:  # nowhere to fail over to: say so now
                raise
            continue
        s.errors.pop(name, None)
        missing = [j for j in ids if j not in states]
        argv = sched.fallback_status_argv(missing) if missing else None
        if argv:
            r = t.run(argv)
            if r.returncode == 0:
                states.update(sched.parse_fallback_status(r.stdout, missing))
        agents = s.record.mirror.agents()
        gone = []
        for p in pilots:
            st = states.get(p.job_id)
            if st is None:
                st_name = _fate_from_pool(p, agents)
                raw = "not known to the scheduler"
            else:
                st_name, raw = st.state, st.raw
            if st_name != p.state:
                started = any(a.get("pilot") == p.id for a in agents.values())
                s.events += pilot_events(p.id, p.state, st_name, started,
                                         {"resource": p.resource, "job_id": p.job_id, "raw": raw})
                p.state, p.raw = st_name, raw
                if st_name in FINISHED:
                    p.ended = time.time()
                    gone.append(p.id)
                changed.append(p.id)
        if gone and record.pool(name):  # launchers deciding on follow-ups must not wait for these
            try:
                t.helper("mark", gone=gone, python=res.python, pool=record.pool(name))
            except ExternalError:
                pass
    if changed:
        record.save()
    return changed


def nap(s: Session, seconds: float, woken: set[str]) -> bool:
    """Sleep ``seconds``, or less: until a pilot running as a process on this machine ends
    (its tokens' last states are written just before), so that ``wait`` sees the end at once
    instead of at its next look. Linux pidfds; a plain sleep elsewhere and for batch pilots.
    Returns whether a pilot ended; each wakes it once (``woken``: their job ids)."""
    fds: dict[int, str] = {}
    try:
        for p in s.record.pilots.values():
            res = s.record.resource(p.resource)
            if not p.job_id or p.job_id in woken or p.state in FINISHED or res.remote:
                continue
            for pid in backend(res).pids([p.job_id]):
                try:
                    fds[os.pidfd_open(pid)] = p.job_id
                except ProcessLookupError:
                    woken.add(p.job_id)  # gone already
                    return True
                except (AttributeError, OSError):  # no pidfds here (not Linux, or older than 5.3)
                    pass
        if not fds:
            time.sleep(seconds)
            return False
        ready, _, _ = select.select(list(fds), [], [], seconds)
        woken.update(fds[fd] for fd in ready)
        return bool(ready)
    finally:
        for fd in fds:
            os.close(fd)


def adopt_renewals(s: Session, resource: str, rounds: dict) -> list[str]:
    """Pilots that launchers submitted themselves (follow-up rounds in the pool) join the run
    record, so that status shows them and the scheduler is asked about them."""
    record = s.record
    state = record.resources[resource]
    res = record.resource(resource)
    added = []
    last = None  # the latest round that tried to submit: its outcome says whether renewal works
    for k, doc in sorted(rounds.items(), key=lambda kv: int(kv[0])):
        if doc.get("state") in ("done", "failed"):
            last = doc
        for p in doc.get("pilots") or ():
            if p["id"] in record.pilots:
                continue
            rec = PilotRecord(id=p["id"], resource=resource, nodes=int(p.get("nodes", 1)),
                              cores_per_node=res.cores_per_node, walltime_s=int(p.get("walltime_s", 0)), stage=0,
                              tasks=int(p.get("tokens", 0)), job_id=str(p["job_id"]),
                              submitted=float(doc.get("ended") or time.time()), state=QUEUED,
                              gpus_per_node=int(p.get("gpus_per_node", 0)))
            record.add_pilot(rec)
            s.events += pilot_events(rec.id, "planned", QUEUED, False,
                                     {"resource": resource, "job_id": rec.job_id, "raw": f"follow-up round {k}"})
            added.append(rec.id)
    state.renewal = None
    if last is not None and last.get("state") == "failed":
        state.renewal = (f"the follow-up submitted from {last.get('host', 'a node')} was refused: "
                         f"{last.get('error')}")
    state.followups = s.spent.get(resource, state.followups)
    return added


def _ask(t, sched, argv, parse, ids, name, retry: bool = True):
    try:
        r = run_checked(t, argv, f"asking {name} about its pilots",
                        transient=(lambda r: sched.transient(r.returncode, r.stderr)) if retry else None, timeout=60)
    except ExternalError as e:
        if "invalid job id" in (e.stderr or "").lower():
            return {}  # every job id is gone (squeue refuses them all): use the fallback
        raise
    return parse(r.stdout, ids)


def _fate_from_pool(p, agents: dict) -> str:
    """A pilot the scheduler no longer knows: its launchers' end records decide."""
    mine = [a for k, a in agents.items() if a.get("pilot") == p.id]
    if mine and all("end" in a for a in mine):
        return "ended"
    if mine:
        return "failed"  # it started, and its launchers never said goodbye
    return UNKNOWN if time.time() - (p.submitted or 0) < 60 else "failed"


def release_dead(s: Session) -> list[str]:
    """Tokens still locked by pilots that are finished go back to todo, right away."""
    record = s.record
    out = []
    for name in record.active_resources():
        dead = [p.id for p in record.pilots.values() if p.resource == name and p.state in FINISHED]
        if not dead:
            continue
        locked = [n for n in s.known.names_in("locked") if s.known.pilot(n) in dead]
        if not locked:
            continue
        res = record.resource(name)
        r = s.transport(name).helper("scrub", stale=True, pilots=dead, names=locked,
                                     reason="its pilot ended while running it", python=res.python,
                                     pool=record.pool(name))
        out += r["scrubbed"]
    return out


def cancel_pilots(s: Session, pilots: list[PilotRecord], *, check: bool = True) -> None:
    """Ask each resource's scheduler to cancel these pilots, one call per resource.
    ``check=True``: transient failures are retried, the last failure raised. ``check=False``
    (a resource given up on): one try, failures ignored — the pilots find their tokens gone
    and exit by themselves."""
    by_res: dict[str, list[PilotRecord]] = {}
    for p in pilots:
        if p.job_id:
            by_res.setdefault(p.resource, []).append(p)
    for name, mine in by_res.items():
        sched = backend(s.record.resource(name))
        argv = sched.cancel_argv([p.job_id for p in mine])
        try:
            run_checked(s.transport(name), argv, f"cancelling pilots on {name}",
                        transient=(lambda r: sched.transient(r.returncode, r.stderr)) if check else None)
        except ExternalError:
            if check:
                raise
