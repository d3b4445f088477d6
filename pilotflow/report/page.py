"""The HTML report of a run: one self-contained page with its timeline and summary figures.

Hand-written SVG, no plotting library and no script. The page is one HTML file with inline
CSS and two inline SVG figures built here as text: one ``<rect>`` per token attempt, whose
``<title>`` is the hover text (name, attempt, times, exit code, reason), drawn over the
pilots' allocation spans, and a step curve of busy vs allocated cores. Why not a plotting
library (matplotlib, plotly, bokeh): none is a dependency of pilotflow; the interactive ones
embed megabytes of JavaScript (or fetch it from a CDN, which a self-contained file must
not); static images lose the per-bar hover text. Why SVG and not a ``<canvas>`` drawn by a
script from embedded JSON: SVG needs no JavaScript, so the page reads the same in any
browser, viewer or mail client with scripts blocked, stays inspectable and testable as a DOM
(the end-to-end test counts the bars Chromium parsed), and prints crisply; at ~150 bytes a
bar, 10,000 attempts make a page of about 2 MB, written in well under a second, which
browsers render without trouble. The price, paid only past some 100,000 attempts, is DOM
size; a canvas would be the next step then.

What the report draws comes from the local mirror: ``states.jsonl`` keeps every state a
sync saw (until it is compacted), so an attempt seen by some sync (running, or ended and
handed back) keeps its own bar even after a later attempt replaced its state. Attempts whose end no sync saw (a failure
retried within one poll interval) are looked up on the resource when a session is given, in
one call per resource: the claim file says when and where the attempt started, the mtime
of its hand-back note when it ended (else the next attempt's start or its node's end bound
it; the hover text says the end was inferred).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from markupsafe import Markup

from pilotflow.version import __version__
from pilotflow.errors import UsageError
from pilotflow.schedulers.base import FINISHED
from pilotflow.launcher import write_atomic
from pilotflow.report.attempts import OUTCOMES, Attempt, attempt_docs, attempts_of
from pilotflow.report.svg import resample, step_curve

MAX_STDERR = 20  # failed tokens whose stderr is fetched from the resource
MAX_FAILURES = 200  # failed tokens listed (the summary counts them all)
TAIL_LINES = 10
SLOWEST = 10
LAG = 2.0  # seconds an attempt's recorded end may trail the start of the next one on its cores


@dataclass
class Row:
    """One node (launcher agent) of one pilot, with its attempts packed in lanes."""
    pilot: str
    agent: int
    host: str
    start: float | None = None
    end: float | None = None
    cores: int | None = None  # the launcher's cores
    lanes: int = 0
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def idle_s(self) -> float | None:
        """Seconds between its launcher's start and end with no attempt running: a pilot
        waiting for work (a Snakemake workflow's next jobs) or for its idle timeout."""
        if self.start is None or self.end is None:
            return None
        busy, reach = 0.0, self.start
        for a in sorted(self.attempts, key=lambda a: a.start):
            lo, hi = max(a.start, reach), min(a.start + a.shown, self.end)
            if hi > lo:
                busy += hi - lo
                reach = hi
        return max(0.0, (self.end - self.start) - busy)


@dataclass
class PilotSpan:
    id: str
    resource: str
    nodes: int
    cores_per_node: int
    walltime_s: float
    state: str
    job_id: str | None
    submitted: float | None
    start: float | None = None  # first agent start
    end: float | None = None  # last agent end (now while it runs)
    rows: list[Row] = field(default_factory=list)
    gpus_per_node: int = 0

    @property
    def idle_s(self) -> float | None:
        """Node-seconds its launchers ran no task (None before any started)."""
        spans = [r.idle_s for r in self.rows if r.idle_s is not None]
        return sum(spans) if spans else None

    @property
    def cores(self) -> int:
        return self.nodes * self.cores_per_node

    @property
    def charged_gpu_s(self) -> float:
        return self.nodes * self.gpus_per_node * (self.end - self.start) if self.start is not None else 0.0

    @property
    def charged_core_s(self) -> float:
        return self.cores * (self.end - self.start) if self.start is not None else 0.0


@dataclass
class Failure:
    token: str
    attempt: int
    exit_code: int | None
    reason: str
    pilot: str | None
    host: str | None
    stderr: str | None  # the tail, None when not available


@dataclass
class Report:
    run: str
    bundle: str
    created: float
    now: float
    tokens: int
    counts: dict[str, int]
    attempts: list[Attempt]
    pilots: list[PilotSpan]
    t0: float
    t1: float
    makespan: float
    used_core_s: float
    done_core_s: float
    charged_core_s: float
    retried_tokens: int
    extra_attempts: int
    busy: tuple[list[float], list[float]]  # step curve: (times, value from that time on)
    allocated: tuple[list[float], list[float]]
    peak_busy: int
    slowest: list[Attempt]
    failures: list[Failure]
    outcome_counts: dict[str, int]
    unseen_attempts: int  # earlier attempts with no start known: no bar
    used_gpu_s: float = 0.0  # GPU-seconds of attempts, and of the pilots' allocations
    charged_gpu_s: float = 0.0

    @property
    def efficiency(self) -> float | None:
        return self.used_core_s / self.charged_core_s if self.charged_core_s > 0 else None


def write_report(record, snap, output, session=None, now: float | None = None) -> Path:
    """Write the report of ``record`` (token states from ``snap``) to ``output``.

    With a ``session`` (see :class:`pilotflow.sync.Session`) the stderr of up to
    ``MAX_STDERR`` failed tokens and unobserved earlier attempts are fetched from the
    resources; without one, only what the local mirror holds is shown.
    """
    output = Path(output)
    if not output.parent.is_dir():
        raise UsageError(f"{output}: directory {output.parent} does not exist (create it, or choose "
                         f"another path, for example -o {output.name})")
    rep = build(record, snap, session=session, now=now)
    write_atomic(str(output), render_html(rep).encode("utf-8"))
    return output


# --- the model -------------------------------------------------------------------------------

def build(record, snap, session=None, now: float | None = None) -> Report:
    now = time.time() if now is None else now
    cores = record.task_cores()
    agents = getattr(snap, "agents", None) or record.mirror.agents()
    pilots = _pilot_spans(record, agents, now)
    docs, retried, extra = attempt_docs(record, snap.states)
    attempts, unseen = attempts_of(docs, cores, pilots, now)
    del docs
    rows = _rows(pilots, agents, attempts, now)
    for row in rows:
        row.lanes = pack_lanes(row.attempts, row.cores)

    used = sum(a.cores * a.shown for a in attempts)
    starts = [a.start for a in attempts] + [p.start for p in pilots.values() if p.start is not None]
    ends = [a.end for a in attempts] + [p.end for p in pilots.values() if p.end is not None]
    t0 = min(starts) if starts else record.created
    t1 = max(ends) if ends else now
    if t1 - t0 < 1e-3:
        t1 = t0 + 1.0
    charged = sum(p.charged_core_s for p in pilots.values())
    busy = step_curve([(a.start, a.cores) for a in attempts] + [(a.start + a.shown, -a.cores) for a in attempts])
    allocated = step_curve([(p.start, p.cores) for p in pilots.values() if p.start is not None]
                           + [(p.end, -p.cores) for p in pilots.values() if p.start is not None])
    counts = snap.counts(record.tokens)
    outcome_counts = {o: 0 for o in OUTCOMES}
    for a in attempts:
        outcome_counts[a.outcome] += 1
    return Report(
        run=record.run, bundle=record.bundle, created=record.created, now=now, tokens=record.tokens,
        counts=counts, attempts=attempts,
        pilots=sorted(pilots.values(), key=lambda p: _natural(p.id)), t0=t0, t1=t1,
        makespan=(max(a.end for a in attempts) - min(a.start for a in attempts)) if attempts else 0.0,
        used_core_s=used, done_core_s=sum(a.cores * a.shown for a in attempts if a.outcome == "done"),
        charged_core_s=charged, retried_tokens=retried, extra_attempts=extra,
        busy=resample(*busy, t0, t1), allocated=resample(*allocated, t0, t1),
        peak_busy=int(max(busy[1], default=0)), slowest=_slowest(attempts),
        failures=_failures(record, snap.states, session), outcome_counts=outcome_counts,
        unseen_attempts=unseen, used_gpu_s=sum(a.gpus * a.shown for a in attempts),
        charged_gpu_s=sum(p.charged_gpu_s for p in pilots.values()))


def _natural(s: str):
    digits = "".join(ch for ch in s if ch.isdigit())
    return (s.rstrip("0123456789"), int(digits) if digits else 0, s)


def _agent_end(a: dict, pilot_finished: bool, now: float) -> float:
    if isinstance(a.get("end"), dict) and a["end"].get("end") is not None:
        return float(a["end"]["end"])
    return float(a.get("beat") or a.get("start") or now) if pilot_finished else now


def _pilot_spans(record, agents: dict, now: float) -> dict[str, PilotSpan]:
    out: dict[str, PilotSpan] = {}
    for p in record.pilots.values():
        out[p.id] = PilotSpan(p.id, p.resource, p.nodes, p.cores_per_node, p.walltime_s, p.state,
                              p.job_id, p.submitted, gpus_per_node=p.gpus_per_node)
    for a in agents.values():
        pid = a.get("pilot")
        if pid not in out:  # a launcher of a pilot this record does not know: show it anyway
            out[pid] = PilotSpan(pid, a.get("resource", "?"), 1, int(a.get("cores") or 1), 0, "unknown", None, None)
        p = out[pid]
        if a.get("start") is None:
            continue
        end = _agent_end(a, p.state in FINISHED, now)
        p.start = a["start"] if p.start is None else min(p.start, a["start"])
        p.end = end if p.end is None else max(p.end, end)
    return out


def _rows(pilots: dict[str, PilotSpan], agents: dict, attempts: list[Attempt], now: float) -> list[Row]:
    rows: dict[tuple[str, int], Row] = {}
    for a in agents.values():
        pid = a.get("pilot")
        key = (pid, int(a.get("agent") or 0))
        p = pilots[pid]
        end = _agent_end(a, p.state in FINISHED, now) if a.get("start") is not None else None
        rows[key] = Row(pid, key[1], str(a.get("host") or "?"), a.get("start"), end,
                        int(a.get("cores") or 0) or p.cores_per_node)
    for at in attempts:
        key = (at.pilot, at.agent)
        if key not in rows:
            if at.pilot not in pilots:
                pilots[at.pilot] = PilotSpan(at.pilot, "?", 1, at.cores, 0, "unknown", None, None)
            rows[key] = Row(at.pilot, at.agent, at.host, cores=pilots[at.pilot].cores_per_node)
        rows[key].attempts.append(at)
    for key in sorted(rows, key=lambda k: (_natural(str(k[0])), k[1])):
        pilots[key[0]].rows.append(rows[key])
    return list(rows.values())


def pack_lanes(attempts: list[Attempt], cores: int | None = None, lag: float = LAG) -> int:
    """Greedy interval packing: each attempt, by start time, goes to the lowest-numbered
    lane free at its start (a new one if none is); returns the number of lanes. This uses
    as few lanes as the most attempts running at once on the node.

    A launcher starts the next tasks on freed cores *before* it writes the ended attempts'
    states (see ``Agent.run``), so a recorded end trails the next start by up to a few
    tenths of a second. A node never runs more than its ``cores``: when an attempt would
    take more, the attempts recorded as ending soonest (within ``lag``) had in fact ended;
    they are drawn (``shown_end``) up to its start and it takes the first one's lane."""
    attempts.sort(key=lambda a: (a.start, a.end, a.token))
    busy: list[tuple[float, int]] = []  # (recorded end, lane) of the lanes in use
    free: list[int] = []
    last: dict[int, Attempt] = {}
    used = lanes = 0
    for a in attempts:
        a.shown_end = a.end
        while busy and busy[0][0] <= a.start:
            lane = heapq.heappop(busy)[1]
            used -= last[lane].cores
            heapq.heappush(free, lane)
        taken = None
        while cores and used + a.cores > cores and busy and busy[0][0] <= a.start + lag:
            lane = heapq.heappop(busy)[1]
            prev = last[lane]
            used -= prev.cores
            prev.shown_end = max(prev.start, a.start)
            if taken is None:
                taken = lane
            else:
                heapq.heappush(free, lane)
        if taken is not None:
            a.lane = taken
        elif free:
            a.lane = heapq.heappop(free)
        else:
            a.lane, lanes = lanes, lanes + 1
        last[a.lane] = a
        used += a.cores
        heapq.heappush(busy, (a.end, a.lane))
    return lanes


def _slowest(attempts: list[Attempt]) -> list[Attempt]:
    latest: dict[str, Attempt] = {}
    for a in attempts:
        if a.token not in latest or a.attempt > latest[a.token].attempt:
            latest[a.token] = a
    return heapq.nlargest(SLOWEST, latest.values(), key=lambda a: (a.duration, a.token))


def _failures(record, states, session) -> list[Failure]:
    out = []
    fetched = 0
    owners = None
    for name in sorted(states.names_in("error"))[:MAX_FAILURES]:
        d = states[name]
        n = int(d.get("attempt") or 0)
        tail = None
        if d.get("start") is not None and n > 0:
            path = record.directory / "logs" / f"{name}.{n}.err"
            if not path.exists() and session is not None and fetched < MAX_STDERR:
                owners = record.owners() if owners is None else owners
                if name in owners:
                    fetched += 1
                    try:
                        from pilotflow.run.sync import fetch_logs
                        fetch_logs(session, name, n, owners[name], d)
                    except Exception:  # noqa: BLE001 - a missing log must not stop the report
                        pass
            if path.exists():
                lines = path.read_text(errors="replace").rstrip("\n").splitlines()
                tail = "\n".join(lines[-TAIL_LINES:])
        code = d.get("exit_code")
        out.append(Failure(name, n, int(code) if code is not None else None, str(d.get("reason") or ""),
                           d.get("pilot"), d.get("host"), tail))
    return out


# --- the page --------------------------------------------------------------------------------

def render_html(rep: Report) -> str:
    from pilotflow.report import svg
    env = jinja2.Environment(loader=jinja2.PackageLoader("pilotflow.report", "."),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["dur"] = svg.fmt_duration
    env.filters["clock"] = lambda t: svg.fmt_clock(t, with_date=True)
    return env.get_template("page.html.j2").render(
        rep=rep, version=__version__, colours=svg.COLOURS, outcomes=OUTCOMES,
        timeline=Markup(svg.timeline_svg(rep)), utilisation=Markup(svg.utilisation_svg(rep)),
        tz=time.strftime("%Z", time.localtime(rep.t0)))
