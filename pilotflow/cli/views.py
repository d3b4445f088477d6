"""Human-readable tables (rich) for plans, status and runs; no logic of their own."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pilotflow.planning.plan import Plan
from pilotflow.bundle.units import format_duration
from pilotflow.run.control import pilot_idle


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def print_plan(plan: Plan) -> None:
    out = console()
    b = plan.bundle
    out.print(f"[bold]{b.name}[/bold]: {len(b.tasks)} task(s), {len(plan.pilots)} pilot(s) "
              f"on {len(plan.resources)} resource(s)  [dim](solver {plan.solver}, {plan.seconds:.2f}s)[/dim]")
    for r in plan.resources:
        res = r.resource
        limit = "no walltime limit" if res.max_walltime_s is None else \
            f"max {res.max_nodes} node(s) × {format_duration(res.max_walltime_s)} per pilot"
        t = Table(title=f"{res.name} ({res.scheduler}, {res.cores_per_node} cores/node, {limit})",
                  title_justify="left")
        for col, just in (("pilot", "left"), ("nodes", "right"), ("cores", "right"),
                          ("walltime", "right"), ("tasks", "right"), ("node-hours", "right"),
                          ("efficiency", "right")):
            t.add_column(col, justify=just)
        for p in r.pilots:
            t.add_row(p.id, str(p.nodes), str(p.cores), format_duration(p.walltime_s), str(len(p.tasks)),
                      f"{p.node_hours:.2f}", f"{p.efficiency:.3f}")
        out.print(t)
        busy = sum(p.busy_core_s for p in r.pilots)
        charged = sum(p.cores * p.walltime_s for p in r.pilots)
        eff = busy / charged if charged else 0
        out.print(f"  {len(r.tasks)} task(s); {len(r.pilots)} pilot(s), lower bound "
                  f"{r.lower_bound_pilots}; {r.node_hours:.2f} node-hours; efficiency {eff:.3f}"
                  + (f"\n  why here: {r.why}" if r.why and len(plan.bundle.resources) > 1 else ""))
    used = {r.resource.name for r in plan.resources}
    idle = [res.name for res in b.resources if res.name not in used]
    if idle and used:
        out.print(f"not used: {', '.join(idle)} (the tasks need no more pilots elsewhere)")


def _pilot_rows(record, snap):
    """pilot → state → tokens (locked, done, error), from the mirror's counts."""
    return {p: {st: n for st, n in c.items() if st in ("locked", "done", "error")}
            for p, c in snap.states.pilot_counts().items()}


def print_status(record, snap, state: str, reason: str = "") -> None:
    out = console()
    counts = snap.counts(record.tokens)
    head = "[red]stalled[/red]" if state == "stalled" else state
    out.print(f"[bold]{record.run}[/bold] ({head}): " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    if reason:
        out.print(f"  [red]stalled:[/red] {reason}")
    if len(record.resources) > 1:  # per-resource progress (tokens move on failover)
        per_res: dict[str, dict[str, int]] = {}
        for name, res in record.owners().items():
            c = per_res.setdefault(res, {"todo": 0, "locked": 0, "done": 0, "error": 0})
            st = snap.states.state(name)
            c[st] = c.get(st, 0) + 1
        for res, c in per_res.items():
            broken = record.broken(res)
            out.print(f"  {res}: " + "  ".join(f"{k} {v}" for k, v in c.items())
                      + (f"  [red](broken: {broken})[/red]" if broken else ""))
    t = Table(title_justify="left")
    for col in ("pilot", "resource", "job", "state", "nodes", "running", "done", "error", "idle"):
        t.add_column(col)
    per = _pilot_rows(record, snap)
    idle = pilot_idle(snap.agents or {})
    for p in record.pilots.values():
        c = per.get(p.id, {})
        t.add_row(p.id, p.resource, str(p.job_id or "-"), p.state, str(p.nodes), str(c.get("locked", 0)),
                  str(c.get("done", 0)), str(c.get("error", 0)),
                  "-" if idle.get(p.id) is None else f"{idle[p.id]:.0f} s")
    out.print(t)
    errors = snap.states.names_in("error")
    for n in errors[:10]:
        out.print(f"  [red]error[/red] {n}: {snap.states[n].get('reason', '')}")
    if len(errors) > 10:
        out.print(f"  ... and {len(errors) - 10} more in error")


def print_runs(records) -> None:
    out = console()
    if not records:
        out.print("no runs in ./.pilotflow/runs")
        return
    t = Table()
    t.add_column("run", no_wrap=True)  # a run id is what users copy
    for col in ("bundle", "created", "pilots", "tokens", "state (as last seen)"):
        t.add_column(col)
    import time as _t
    for r in records:
        state = f"[red]stalled[/red]: {r.reason}" if r.state == "stalled" else r.state
        t.add_row(r.run, r.bundle, _t.strftime("%Y-%m-%d %H:%M:%S", _t.localtime(r.created)),
                  str(len(r.pilots)), str(r.tokens), state)
    out.print(t)


class Progress:
    """``wait`` / ``status --watch``: a live view on a terminal (bar, counts, throughput, ETA,
    one row per pilot), one plain line per change otherwise (logs, CI, pipes)."""

    def __init__(self, record):
        import sys as _s
        self.record = record
        self.tty = _s.stderr.isatty()
        self.last = None
        self.started = _t_now()
        self.history: list[tuple[float, int]] = []  # (time, finished) for the throughput
        self._live = None
        self._snap = None
        self._counts = None

    def __enter__(self):
        if self.tty:
            from rich.live import Live
            self._live = Live(self._render(), console=console(stderr=True), refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)

    def rate_eta(self, finished: int) -> tuple[float, float | None]:
        now = _t_now()
        self.history.append((now, finished))
        self.history = [h for h in self.history if now - h[0] <= 60] or self.history[-1:]
        t0, f0 = self.history[0]
        rate = (finished - f0) / (now - t0) if now > t0 else 0.0
        left = self.record.tokens - finished
        return rate, (left / rate if rate > 0 and left > 0 else None)

    def update(self, snap, counts) -> None:
        self._snap, self._counts = snap, counts
        finished = counts["done"] + counts["error"]
        rate, eta = self.rate_eta(finished)
        if self._live is not None:
            self._live.update(self._render(rate, eta))
            return
        text = "  ".join(f"{k} {v}" for k, v in counts.items())
        if text != self.last:
            import sys as _s
            extra = f"  {rate:.1f} tokens/s" if rate else ""
            extra += f"  ETA {format_duration(eta)}" if eta else ""
            print(f"{self.record.run}: {text}{extra}", file=_s.stderr, flush=True)
        self.last = text

    def _render(self, rate: float = 0.0, eta: float | None = None):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.text import Text
        counts = self._counts or {"todo": self.record.tokens, "locked": 0, "done": 0, "error": 0}
        finished = counts["done"] + counts["error"]
        head = Text.assemble((self.record.run, "bold"), f"  {finished}/{self.record.tokens} finished  ",
                             f"elapsed {format_duration(_t_now() - self.started)}",
                             f"  {rate:.1f} tokens/s" if rate else "", f"  ETA {format_duration(eta)}" if eta else "")
        bar = ProgressBar(total=max(self.record.tokens, 1), completed=finished, width=60)
        line = Text("  ".join(f"{k} {v}" for k, v in counts.items()))
        t = Table(box=None, pad_edge=False)
        for col in ("pilot", "resource", "job", "state", "running", "done", "error"):
            t.add_column(col)
        per = _pilot_rows(self.record, self._snap) if self._snap is not None else {}
        for p in list(self.record.pilots.values())[-12:]:
            c = per.get(p.id, {})
            t.add_row(p.id, p.resource, str(p.job_id or "-"), p.state, str(c.get("locked", 0)),
                      str(c.get("done", 0)), str(c.get("error", 0)))
        return Group(head, bar, line, t)

    def events(self, events) -> None:
        """Pilot changes and token errors get a line of their own."""
        for e in events:
            if e.kind == "pilot":
                self.note(f"pilot {e.name}: {e.old} -> {e.new}")
            elif e.new == "error":
                self.note(f"token {e.name} failed: {e.info.get('reason', '')}")

    def note(self, text: str) -> None:
        import sys as _s
        if self._live is not None:
            self._live.console.print(text)
        else:
            print(text, file=_s.stderr, flush=True)

    def done(self, counts) -> None:
        self.note(f"{self.record.run} finished: " + "  ".join(f"{k} {v}" for k, v in counts.items())
                  + f" in {format_duration(_t_now() - self.started)}")


def _t_now() -> float:
    import time as _t
    return _t.time()


def print_checks(bundle_path, rows) -> None:
    """``pilotflow check``: one row per resource and check."""
    t = Table(title=f"pilotflow check: {bundle_path}", title_justify="left")
    for col in ("resource", "check", "result", "detail / fix"):
        t.add_column(col)
    for name, what, ok, detail in rows:
        t.add_row(name, what, "[green]pass[/green]" if ok is True else ("[yellow]skip[/yellow]" if ok is None
                                                                           else "[red]FAIL[/red]"), detail)
    console().print(t)
