"""A run that stays open: tokens keep arriving while it runs, and its pilots are reused.

This is the pilot side of the Snakemake executor (``pilotflow/snakemake.py`` is only the glue
to Snakemake's interface), kept apart so it can be read and tested without Snakemake. It is a
client of the same machinery as ``pilotflow submit``: a RunRecord under ./.pilotflow/runs (so
``pilotflow status`` / ``logs`` / ``cancel`` work on it), a token pool per resource, the
planner, ``submit_pilots`` and the sync functions.

Late binding. A new token goes to a *live* pilot (queued or running) that can still finish
it: one whose remaining walltime holds the token's estimate and whose spare capacity (cores
× remaining walltime, minus the estimated work it already holds) covers it. Its plan file is
extended first, then the token's definition is published as a new ``defs`` batch; running
launchers notice the batch (one ``listdir`` per poll), reload the plans and claim the token.
Tokens no live pilot can finish wait in a backlog until Snakemake's burst of ready jobs is
over (a quiet second and a half), then the planner (``make_plan``) places the whole backlog
on the resources and sizes new pilots for it: new pilots are submitted only when the work
exceeds what the live ones can do in their remaining walltime. Pilots are started with
``--idle-timeout``: an idle pilot waits that long for new tokens, then exits.

A token whose runtime is only a default guess is bound with an estimate from similar finished
tokens (``estimates.Runtimes``), not left for a new pilot while a live one idles. When new pilots
are planned on a resource, running pilots there that hold no work are released at once (the new
pilot may wait for their nodes); queued pilots whose tokens all ran elsewhere are cancelled.

Tokens whose pilot ended before claiming them (or can no longer fit them) are "orphans": the
other live pilots steal them, and what they cannot hold is planned into new pilots at the
next poll.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Container

from pilotflow.bundle import Bundle, Resource, Task
from pilotflow.errors import ExternalError
from pilotflow.launcher import dump, handback_guard
from pilotflow.render import pool_path
from pilotflow.run.records import ResourceState, RunRecord, new_run_id, runs_dir, task_to_dict
from pilotflow.schedulers import backend
from pilotflow.schedulers.base import FINISHED
from pilotflow.run.pilots import cancel_pilots, refresh_pilots, release_dead
from pilotflow.run.sync import Session, fetch_logs, sync_states
from pilotflow.snakemake.estimates import Capacity, Runtimes

FRUITLESS_LIMIT = 3  # pilots in a row that end without running anything while jobs wait: stop
SCHEDULER_EVERY_S = 10.0  # how often schedulers are asked about pilots (token states come from the pools)
SETTLE_S, MAX_SETTLE_S = 1.5, 10.0  # the backlog is planned after this quiet time (or this long at most)
TASKS_SAVE_EVERY_S = 10.0  # tasks.json (for `pilotflow status/logs`) is rewritten at most this often
TOKEN_NAME_BAD = re.compile(r"[^A-Za-z0-9_.+=-]")


def token_name(label: str, jobid: object, taken: Container[str]) -> str:
    """A unique token name (a file name) for a job: ``LABEL-JOBID``, ``.N`` added on reuse."""
    base = f"{TOKEN_NAME_BAD.sub('_', label)[:120]}-{TOKEN_NAME_BAD.sub('_', str(jobid))[:64]}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}.{n}"
    return name


class OpenRun:
    """A pilotflow run fed token by token (see the module docstring). Thread-safe."""

    def __init__(self, resources: list[Resource], *, workdir: Path, name: str = "snakemake",
                 lock_timeout_s: int = 300, idle_timeout_s: float = 60.0, max_pilots: int = 10,
                 optimize: str = "makespan", log: Callable[[str], None] = lambda msg: None):
        self.resources = {r.name: r for r in resources}
        self.workdir = Path(workdir).resolve()
        self.idle_timeout_s = idle_timeout_s
        self.max_pilots = max_pilots
        self.optimize = optimize
        self.log = log
        run = new_run_id(name)
        self.record = RunRecord(run=run, bundle=name, bundle_path="", base_dir=str(self.workdir),
                                created=time.time(), lock_timeout=lock_timeout_s, resources={},
                                directory=runs_dir(self.workdir) / run)
        self.record.directory.mkdir(parents=True, exist_ok=True)
        self.record.save()
        self.session = Session(self.record)
        self.lock = threading.RLock()
        self.tasks: dict[str, Task] = {}  # every token, pinned to the resource whose pool holds it
        self.rank: dict[str, int] = {}
        self.open: set[str] = set()  # tokens not yet done or error
        self.owner: dict[str, str] = {}  # token → the pilot whose plan holds it
        self.plans: dict[str, list[str]] = {}  # pilot → the tokens of its plan file
        self.batches: dict[str, int] = {}  # resource → number of the next defs batch
        self.agents: dict[str, dict] = {}
        self.asked = 0.0
        self.backlog: list[Task] = []  # tokens no live pilot could take, not yet planned or published
        self.backlog_first = self.backlog_last = 0.0  # when the backlog's first and last tokens came
        self.judged: set[str] = set()  # pilots whose end was looked at
        self.fruitless = 0  # pilots in a row that ended without running anything while jobs waited
        self.tasks_saved = 0.0
        self.closed = False
        self.runtimes = Runtimes()  # estimates for tokens whose walltime is a default guess
        self.released: set[str] = set()  # pilots cancelled because they could run nothing

    @property
    def run(self) -> str:
        return self.record.run

    # adding work ---------------------------------------------------------------------------
    def add(self, tasks: list[Task], kinds: dict[str, str] | None = None, guessed: Container[str] = ()) -> None:
        """Take new tokens: those live pilots can finish are bound to them and published at
        once; the rest wait in the backlog for the next planning round (see ``poll``). Tasks
        must fit a resource (``pilotflow.bundle.unfit``). ``kinds``: a label per token (the
        Snakemake rule) whose finished tokens' runtimes estimate the others'; ``guessed``:
        tokens whose walltime is a default guess, not the user's estimate (see ``Runtimes``)."""
        if not tasks:
            return
        with self.lock:
            now = time.time()
            for t in tasks:
                self.rank[t.name] = len(self.rank)
                self.runtimes.add(t, (kinds or {}).get(t.name), t.name in guessed)
            self.backlog.extend(self._bind(tasks))
            if self.backlog:
                self.backlog_first = self.backlog_first or now
                self.backlog_last = now

    def _bind(self, tasks: list[Task]) -> list[Task]:
        """Bind what live pilots can finish (plans extended, then one defs batch per pool);
        returns the tasks left over."""
        caps = self._capacities()
        bound: dict[str, list[Task]] = {}
        rest: list[Task] = []
        for t in tasks:
            est = self.runtimes.estimate(t)
            cap = self._best(est, caps.values())
            if cap is None:
                rest.append(t)  # planned with the full guess: new pilots are sized safely
                continue
            t = est
            cap.spare -= t.cores * t.walltime_s
            bound.setdefault(cap.pilot, []).append(replace(t, resource=cap.resource.name))
        # plans of live pilots first, then the definitions: a launcher that sees the new
        # batch reads the plans again and finds the tokens already bound to it
        by_res: dict[str, list[Task]] = {}
        for pilot, ts in bound.items():
            self._extend_plan(pilot, [t.name for t in ts])
            by_res.setdefault(ts[0].resource, []).extend(ts)
        for res_name, ts in by_res.items():
            self._publish(self.resources[res_name], ts)
        return rest

    def _plan_backlog(self, now: float) -> None:
        """Plan the backlog into new pilots once Snakemake's burst of ready jobs is over (it
        releases at most 100 jobs a second by default): one plan for the burst packs better
        than one per second. Live pilots get first pick; the planner places the rest on the
        resources and the pilots are submitted (as many as the limits allow)."""
        if not self.backlog or (now - self.backlog_last < SETTLE_S and now - self.backlog_first < MAX_SETTLE_S):
            return
        rest = self._bind(self.backlog)
        self.backlog, self.backlog_first, self.backlog_last = [], 0.0, 0.0
        if not rest:
            return
        plan = self._plan(rest, list(self.resources.values()))
        for rp in plan.resources:
            res = self.resources[rp.resource.name]
            self._publish(res, [replace(plan.bundle.tasks[i], resource=res.name) for i in rp.tasks])
        self._submit(plan)

    def _best(self, t: Task, caps) -> Capacity | None:
        """The live pilot to bind a token to: running before queued, then the most spare."""
        fitting = [c for c in caps if c.fits(t) and c.spare >= t.cores * t.walltime_s]
        return max(fitting, key=lambda c: (c.running, c.spare), default=None)

    def _plan(self, tasks: list[Task], resources: list[Resource]):
        from pilotflow.planning.plan import make_plan
        # limits on pilot counts are applied when submitting (live pilots count too)
        bundle = Bundle(name=self.record.bundle, tasks=tasks, resources=[replace(r, max_pilots=None) for r in resources],
                        lock_timeout_s=self.record.lock_timeout, optimize=self.optimize)
        return make_plan(bundle)

    def _submit(self, plan) -> None:
        """Submit a plan's pilots, as many as the pilot limits allow (largest first); the
        tokens of pilots left out stay in the pool for live pilots to steal."""
        from pilotflow.run.submit import submit_pilots
        room = self._room(None)
        for rp in plan.resources:
            res = self.resources[rp.resource.name]
            allowed = min(room, self._room(res))
            keep = sorted(rp.pilots, key=lambda p: len(p.tasks), reverse=True)[:max(0, allowed)]
            if len(keep) < len(rp.pilots):
                self.log(f"pilotflow: pilot limit reached on {res.name} (max_pilots); "
                         f"{len(rp.pilots) - len(keep)} planned pilot(s) not submitted, live pilots take their jobs")
            rp.pilots = [p for p in rp.pilots if p in keep]
            room -= len(rp.pilots)
        if not any(rp.pilots for rp in plan.resources):
            return
        for rp in plan.resources:  # the new pilots' work is what live ones could not take
            if rp.pilots:
                self._release_idle(rp.resource.name, len(rp.tasks))
        names = plan.bundle.tasks.names()
        transports = {rp.resource.name: self.session.transport(rp.resource.name) for rp in plan.resources}
        submit_pilots(self.record, plan, transports, launcher_args=["--idle-timeout", f"{self.idle_timeout_s:g}"],
                      log=self.log)
        for p in plan.pilots:
            self.plans[p.id] = [names[i] for i in p.tasks]
            for i in p.tasks:
                self.owner[names[i]] = p.id

    def _holds_work(self, pilot: str) -> bool:
        """Whether a pilot runs a token or has one bound to it that no other pilot has taken."""
        for name in self.open:
            word = self.state_word(name)
            if word == "todo" and self.owner.get(name) == pilot:
                return True
            if word == "locked" and self.state(name).get("pilot") == pilot:
                return True
        return False

    def _release_idle(self, res_name: str, waiting: int) -> None:
        """Running pilots on a resource that hold no work while new pilots are planned there
        for work they cannot take (too little walltime left, too small nodes) are cancelled
        now rather than after their idle timeout: on a busy cluster the new pilots may wait
        for exactly their nodes."""
        if not backend(self.resources[res_name]).batch:
            return  # pilots on this machine have no walltime: they take any work
        idle = [p for p in self.record.pilots.values()
                if p.resource == res_name and p.state not in FINISHED and p.job_id and not self._ended(p.id)
                and any(a.get("pilot") == p.id for a in self.agents.values()) and not self._holds_work(p.id)]
        self._let_go(idle, f"released idle pilot(s) {{}} on {res_name}: they cannot run the {waiting} waiting "
                           f"job(s) (too little walltime left or too small)")

    def _drop_needless(self) -> None:
        """Queued pilots whose jobs all ran in other pilots would start only to idle: cancelled."""
        needless = [p for p in self.record.pilots.values()
                    if p.state not in FINISHED and p.job_id and p.id not in self.released
                    and not any(a.get("pilot") == p.id for a in self.agents.values())
                    and self.plans.get(p.id) and not self._holds_work(p.id)]
        self._let_go(needless, "cancelled queued pilot(s) {}: their jobs ran in other pilots")

    def _let_go(self, pilots: list, why: str) -> None:
        """Cancel pilots that would run nothing; their ends are not held against the resource."""
        if pilots:
            cancel_pilots(self.session, pilots, check=False)
            self.released.update(p.id for p in pilots)
            self.log("pilotflow: " + why.format(", ".join(p.id for p in pilots)))

    def _room(self, res: Resource | None) -> int:
        """How many more pilots may be submitted, over all resources or on ``res``."""
        live = [p for p in self.record.pilots.values() if p.state not in FINISHED]
        if res is None:
            return self.max_pilots - len(live)
        mine = sum(1 for p in live if p.resource == res.name)
        return self.max_pilots if res.max_pilots is None else res.max_pilots - mine

    def _extend_plan(self, pilot: str, names: list[str]) -> None:
        rec = self.record.pilots[pilot]
        tokens = self.plans.setdefault(pilot, [])
        tokens.extend(names)
        for n in names:
            self.owner[n] = pilot
        self.session.transport(rec.resource).write_file(
            f"{self.record.pool(rec.resource)}/plans/{pilot}.json",
            dump({"pilot": pilot, "tokens": tokens, "stage": rec.stage}))

    def _publish(self, res: Resource, tasks: list[Task]) -> None:
        """Write one defs batch to the resource's pool (created on first use)."""
        from pilotflow.run.submit import token_def
        pool = self._pool(res)
        n = self.batches[res.name]
        self.batches[res.name] = n + 1
        defs = [token_def(t, self.rank[t.name]) for t in tasks]
        self.session.transport(res.name).write_file(f"{pool}/defs/{n:06d}.json", dump(defs))
        for t in tasks:
            self.tasks[t.name] = t
            self.open.add(t.name)
            self.session.owner[t.name] = res.name  # sync takes a pool's states of its own tokens only
        self.record.tokens = len(self.tasks)

    def _pool(self, res: Resource) -> str:
        if res.name in self.record.resources:
            return self.record.pool(res.name)
        from pilotflow.run.submit import create_pool, resolve_root
        taken = self.record.pools_taken()
        self.record.resources[res.name] = ResourceState.of(res, "")
        t = self.session.transport(res.name)
        pool = pool_path(res, resolve_root(res, t, self.workdir), self.run, taken)
        self.record.resources[res.name].pool = pool
        self.record.save()
        # the tasks run in the workflow's directory, which the nodes must share with us
        create_pool(t, pool, {"run": self.run, "lock_timeout": self.record.lock_timeout, "resource": res.name,
                              "created": self.record.created, "workdir": str(self.workdir), "logs": res.logs}, [],
                    expected=100_000, python=res.python)
        self.batches[res.name] = 1  # create_pool wrote the (empty) batch 0
        return pool

    # following the run -----------------------------------------------------------------------
    def poll(self) -> list[str]:
        """One status round: every pool's changed states (one helper call per resource), the
        schedulers now and then, and new pilots for orphaned tokens. Returns changed tokens."""
        with self.lock:
            now = time.time()
            self._plan_backlog(now)
            if not self.record.resources:
                return []
            snap = sync_states(self.session)
            self.agents = snap.agents
            changed = list(snap.changed)
            now = time.time()
            if now - self.asked >= (2.0 if self._pilot_news(now) else SCHEDULER_EVERY_S):
                self.asked = now
                refresh_pilots(self.session)
                if release_dead(self.session):
                    changed += sync_states(self.session).changed
                self._drop_needless()
            self._judge_ended_pilots()
            self.runtimes.observe(changed, self.state_word, self.state)
            for n in changed:
                if self.state_word(n) in ("done", "error"):
                    self.open.discard(n)
            if not self.backlog:  # the backlog's planning round takes orphans into account
                self._adopt_orphans()
            if now - self.tasks_saved >= TASKS_SAVE_EVERY_S:
                self._save_tasks()
            return changed

    def state(self, name: str) -> dict:
        """The token's last synced state document (``{"state": "todo"}`` before any)."""
        known = self.session.known
        return known[name] if name in known else {"state": "todo"}

    def state_word(self, name: str) -> str:
        """todo, locked, done or error, without decoding the state document."""
        return self.session.known.state(name)

    def logs(self, name: str) -> tuple[list[str], str]:
        """Paths of the latest attempt's stdout and stderr (copied into the run's mirror) and
        the tail of its stderr, for an error message."""
        with self.lock:
            doc = self.state(name)
            attempt = int(doc.get("attempt") or 0)
            if not attempt:
                return [], ""
            res = self.tasks[name].resource
            text = fetch_logs(self.session, name, attempt, res, doc)
            base = self.record.directory / "logs" / f"{name}.{attempt}"
            tail = "\n".join((text["err"] or text["out"]).strip().splitlines()[-20:])
            return [f"{base}.out", f"{base}.err"], tail

    def _judge_ended_pilots(self) -> None:
        """Pilots that end without running anything while jobs wait for them point at a
        broken resource (a setup line, the nodes' python, a directory the nodes cannot see):
        after FRUITLESS_LIMIT in a row, stop with the last one's output instead of submitting
        pilots forever."""
        for p in self.record.pilots.values():
            if p.id in self.judged or not (p.state in FINISHED or self._ended(p.id)):
                continue
            self.judged.add(p.id)
            if p.id in self.released:
                continue  # we cancelled it: its end says nothing about the resource
            ran = sum(int((a.get("end") or {}).get("ran", 0)) for a in self.agents.values() if a.get("pilot") == p.id)
            if ran:
                self.fruitless = 0
            elif any(self.state_word(n) == "todo" for n in self.plans.get(p.id, ())):
                self.fruitless += 1
                if self.fruitless >= FRUITLESS_LIMIT:
                    raise ExternalError(f"{self.fruitless} pilots in a row ended on {p.resource} without running a "
                                        f"job while jobs waited for them; the last, {p.id} ({p.resource} job "
                                        f"{p.job_id}, {p.raw or p.state}), said:\n{self._pilot_output(p)}")

    def _pilot_output(self, p) -> str:
        """The tail of a pilot's own output file (where the scheduler put its stdout)."""
        pool = self.record.pool(p.resource)
        t = self.session.transport(p.resource)
        for name in (f"{p.id}.{p.job_id}.out", f"{p.id}.sh.out", f"{p.id}.out"):
            data = t.read_file(f"{pool}/pilots/{name}")
            if data is not None:
                text = "\n".join(data.decode(errors="replace").strip().splitlines()[-15:])
                return f"{pool}/pilots/{name}:\n{text}" if text else f"{pool}/pilots/{name} is empty"
        return f"(no output file in {pool}/pilots/)"

    def _pilot_news(self, now: float) -> bool:
        """Whether the scheduler is worth asking sooner: a live pilot's launchers all said
        goodbye, or jobs wait, no launcher runs and a pilot was submitted in the last minute
        (one that fails at once is noticed in seconds; a long queue wait is not polled hard)."""
        live = [p for p in self.record.pilots.values() if p.state not in FINISHED]
        if any(self._ended(p.id) for p in live):
            return True
        running = any("end" not in a for a in self.agents.values())
        return bool(self.open) and not running and any(now - (p.submitted or 0) < 60 for p in live)

    def _ended(self, pilot: str) -> bool:
        mine = [a for a in self.agents.values() if a.get("pilot") == pilot]
        return bool(mine) and all("end" in a for a in mine)

    def _capacities(self) -> dict[str, Capacity]:
        """Live pilots and what they can still take, from their walltimes, their launchers'
        deadlines and the estimated work they hold (todo tokens bound to them, locked
        tokens they run)."""
        now = time.time()
        caps: dict[str, Capacity] = {}
        for p in self.record.pilots.values():
            if p.state in FINISHED or self._ended(p.id):
                continue
            res = self.resources[p.resource]
            mine = [a for a in self.agents.values() if a.get("pilot") == p.id]
            if not backend(res).batch:
                remaining = math.inf  # a pilot on this machine has no walltime: it lives until idle
            else:
                deadlines = [a["deadline"] for a in mine if a.get("deadline")]
                remaining = (min(deadlines) - now) if deadlines else float(p.walltime_s)
                remaining -= handback_guard(p.walltime_s)  # what the launcher keeps back before its deadline
            cores = p.nodes * p.cores_per_node
            caps[p.id] = Capacity(p.id, res, cores, remaining, bool(mine), cores * max(0.0, remaining))
        for name in self.open:
            t = self.tasks[name]
            if self.state_word(name) == "locked":
                doc = self.state(name)
                cap = caps.get(doc.get("pilot"))
                left = t.walltime_s - (now - float(doc.get("start") or now))
            else:
                cap = caps.get(self.owner.get(name))
                left = t.walltime_s
            if cap is not None:
                cap.spare -= t.cores * max(0.0, left)
        return caps

    def _adopt_orphans(self) -> None:
        """Todo tokens whose pilot ended (or can no longer fit them): live pilots steal what
        their spare capacity covers; new pilots are planned for the rest."""
        caps = self._capacities()
        orphans = []
        for name in sorted(self.open, key=self.rank.__getitem__):
            if self.state_word(name) != "todo":
                continue
            cap = caps.get(self.owner.get(name))
            if cap is not None and cap.fits(self.tasks[name]):
                continue
            orphans.append(self.tasks[name])
        if not orphans:
            return
        by_res: dict[str, list[Task]] = {}
        for t in orphans:
            cap = self._best(t, [c for c in caps.values() if c.resource.name == t.resource])
            if cap is not None:
                cap.spare -= t.cores * t.walltime_s
                self.owner.pop(t.name, None)  # a thief will take it
            elif min(self._room(None), self._room(self.resources[t.resource])) > 0:
                # new pilots are sized for the full guess, not the estimate it was bound with
                by_res.setdefault(t.resource, []).append(replace(t, walltime_s=max(t.walltime_s, self.runtimes.guess(t.name))))
        for res_name, ts in by_res.items():
            self.log(f"pilotflow: {len(ts)} job(s) on {res_name} have no live pilot that can run them; planning pilots")
            self._submit(self._plan(ts, [self.resources[res_name]]))

    # ending --------------------------------------------------------------------------------------
    def cancel(self, wait_s: float = 20.0) -> int:
        """Cancel every live pilot (their launchers stop their tasks and hand the tokens back)
        and wait until the schedulers say they are gone. Returns how many were cancelled."""
        with self.lock:
            if not self.record.pilots:
                return 0
            refresh_pilots(self.session)
            live = [p for p in self.record.pilots.values() if p.job_id and p.state not in FINISHED]
            cancel_pilots(self.session, live)
            self.record.cancelled = True
            # gone for the scheduler, and their launchers said goodbye (tokens handed back)
            deadline = time.time() + wait_s
            while live and time.time() < deadline:
                refresh_pilots(self.session)
                self.agents = sync_states(self.session).agents
                started = {a.get("pilot") for a in self.agents.values()}
                if all(p.state in FINISHED and (p.id not in started or self._ended(p.id)) for p in live):
                    break
                time.sleep(0.3)
            release_dead(self.session)
            sync_states(self.session)
            self.record.save()
            return len(live)

    def close(self) -> None:
        """End the run: pilots still alive are cancelled (no work is left for them)."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            try:
                if any(p.state not in FINISHED for p in self.record.pilots.values()):
                    self.cancel()
            finally:
                self._save_tasks()
                self.record.save()
                self.session.close()

    def _save_tasks(self) -> None:
        self.tasks_saved = time.time()
        self.record.save_task_rows([task_to_dict(t) for t in self.tasks.values()])
        self.record.save_owners({n: t.resource for n, t in self.tasks.items()})
