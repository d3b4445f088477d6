"""Human-readable tables (rich) for plans, status and runs; no logic of their own."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from pilotflow.plan import Plan
from pilotflow.units import format_duration


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
                  + (f"\n  why here: {r.why}" if r.why and len(plan.resources) > 1 else ""))
