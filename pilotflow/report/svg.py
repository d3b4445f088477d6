"""The report's two figures as inline SVG text: the timeline and the utilisation curve.

Plain string building (see :mod:`pilotflow.report` for why): coordinates are numbers we
format, and every piece of text from a run (token names, hosts, reasons) goes through
``esc``. Both figures share the same time axis, so they line up on the page.
"""

from __future__ import annotations

import bisect
import math
import time
from html import escape

COLOURS = {"done": "#2e9e5b", "error": "#d62f2f", "retried": "#f08c1a", "lost": "#8c6bb1",
           "running": "#2f7ed8"}
LABELS = {"done": "done", "error": "error", "retried": "failed, retried", "lost": "lost (handed back)",
          "running": "running"}
WIDTH = 1360  # viewBox units; the figure scales to the page width
GUTTER = 210  # labels on the left
RIGHT = 16
AXIS = 26
LANES_PX = 1400  # the height all lanes share at most, before lanes get thinner
MAX_POINTS = 1500  # the utilisation curves are resampled (time averages) beyond this
STEPS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
         43200, 86400, 172800, 604800)


def esc(s) -> str:
    return escape(str(s), quote=True)


def fmt_duration(s: float) -> str:
    if s < 1:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def fmt_clock(t: float, with_date: bool = False) -> str:
    lt = time.localtime(t)
    return time.strftime("%Y-%m-%d %H:%M:%S" if with_date else "%H:%M:%S", lt) + f".{int(t % 1 * 10)}"


def fmt_offset(s: float, step: float) -> str:
    """A tick label (time since the start of the figure), in one style per axis."""
    s = round(s, 6)
    if step < 1:
        return f"{s:.1f}s"
    si = int(round(s))
    d, h, m, sec = si // 86400, si % 86400 // 3600, si % 3600 // 60, si % 60
    if step >= 86400:
        return f"{d}d" + (f"{h:02d}h" if h else "")
    if step >= 3600 or (step >= 60 and si >= 3600):
        return (f"{d}d" if d else "") + f"{h}h{m:02d}"
    if step >= 60:
        return f"{m}m"
    if si < 60:
        return f"{si}s"
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}m{sec:02d}s"


def nice_step(span: float, target: int = 10) -> float:
    for s in STEPS:
        if span / s <= target:
            return s
    return STEPS[-1] * math.ceil(span / STEPS[-1] / target)


class Scale:
    def __init__(self, t0: float, t1: float):
        self.t0, self.t1 = t0, t1
        self.k = (WIDTH - GUTTER - RIGHT) / (t1 - t0)

    def __call__(self, t: float) -> float:
        return GUTTER + (t - self.t0) * self.k

    def ticks(self) -> list[tuple[float, str]]:
        step = nice_step(self.t1 - self.t0)
        n = int((self.t1 - self.t0) / step + 1e-9)
        return [(self(self.t0 + i * step), fmt_offset(i * step, step)) for i in range(n + 1)]


def _axis(x: Scale, y: float, top: float, bottom: float, labels_above: bool) -> list[str]:
    out = ['<g class="grid">']
    for px, _ in x.ticks():
        out.append(f'<line x1="{px:.1f}" y1="{top:.1f}" x2="{px:.1f}" y2="{bottom:.1f}"/>')
    out.append('</g><g class="ticks">')
    ty = y - 6 if labels_above else y + 14
    for px, label in x.ticks():
        out.append(f'<text x="{px:.1f}" y="{ty:.1f}">{label}</text>')
    out.append(f'</g><line class="axis" x1="{GUTTER}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}"/>')
    return out


def _title(a) -> str:
    end = fmt_clock(a.end) + (" (end inferred: no sync saw it)" if a.approx else "")
    lines = [f"{a.token} · attempt {a.attempt} · {LABELS[a.outcome]}",
             f"{fmt_clock(a.start)} → {end}  ({fmt_duration(a.duration)})",
             f"pilot {a.pilot}, node {a.agent} ({a.host}) · {a.cores} core{'s' if a.cores != 1 else ''}"
             + (f" · exit code {a.exit_code}" if a.exit_code is not None else "")]
    if a.reason:
        lines.append(a.reason)
    return escape("\n".join(lines), quote=False)


MAX_BARS = 20_000  # past this many attempts, a lane's back-to-back attempts of one outcome are one bar


def _bars(attempts, x, merge: bool):
    """(outcome, x from, x to, lane, title) of each bar. With ``merge``, attempts that follow
    each other on a lane within a pixel and share an outcome become one bar saying how many
    they are: a page of a million attempts stays a few megabytes and opens in a browser."""
    if not merge:
        for a in attempts:
            yield a.outcome, x(a.start), x(a.start + a.shown), a.lane, _title(a)
        return
    runs: dict[tuple[int, str], list] = {}
    for a in sorted(attempts, key=lambda a: (a.lane, a.start)):
        x0, x1 = x(a.start), x(a.start + a.shown)
        cur = runs.get((a.lane, a.outcome))
        if cur is not None and x0 - cur[1] <= 1.0:
            cur[1], cur[2], cur[4] = max(cur[1], x1), max(cur[2], a.start + a.shown), cur[4] + 1
            continue
        if cur is not None:
            yield _merged(a.lane, a.outcome, cur)
        runs[(a.lane, a.outcome)] = [x0, x1, a.start + a.shown, a.start, 1]
    for (lane, outcome), cur in runs.items():
        yield _merged(lane, outcome, cur)


def _merged(lane: int, outcome: str, run: list):
    x0, x1, end, start, n = run
    title = escape(f"{n} attempt{'s' if n != 1 else ''} ({LABELS[outcome]}), {fmt_clock(start)} → {fmt_clock(end)}",
                   quote=False)
    return outcome, x0, x1, lane, title


def timeline_svg(rep) -> str:
    """One bar per attempt, in lanes per node, over the pilots' allocation spans."""
    x = Scale(rep.t0, rep.t1)
    lanes = sum(max(r.lanes, 1) for p in rep.pilots for r in p.rows) or 1
    lane_h = max(1.5, min(12.0, LANES_PX / lanes))
    gap = 1.0 if lane_h >= 4 else 0.0
    back: list[str] = []
    labels: list[str] = []
    bars: dict[str, list[str]] = {o: [] for o in COLOURS}
    y = AXIS + 6
    for p in rep.pilots:
        if not p.rows:
            continue
        top = y
        queued = (f" · queued {fmt_duration(p.start - p.submitted)}"
                  if p.start is not None and p.submitted is not None else "")
        labels.append(f'<text class="pilot" x="8" y="{y + 14:.1f}">pilot {esc(p.id)}'
                      f'<tspan class="meta"> · {p.nodes}×{p.cores_per_node} cores</tspan></text>')
        labels.append(f'<text class="meta" x="{GUTTER + 4}" y="{y + 14:.1f}">{esc(p.id)} on {esc(p.resource)}'
                      f' · job {esc(p.job_id or "-")} · {esc(p.state)}{queued}'
                      + (f" · allocated {fmt_duration(p.end - p.start)}" if p.start is not None else "")
                      + "</text>")
        y += 20
        for r in p.rows:
            h = max(max(r.lanes, 1) * lane_h + 4, 16.0)
            if r.start is not None and r.end is not None:
                back.append(f'<rect class="node" x="{x(r.start):.1f}" y="{y:.1f}" '
                            f'width="{max(x(r.end) - x(r.start), 1):.1f}" height="{h:.1f}">'
                            f'<title>{esc(p.id)} node {r.agent} ({esc(r.host)}): launcher '
                            f'{fmt_clock(r.start)} → {fmt_clock(r.end)}</title></rect>')
            host = r.host if len(r.host) <= 20 else r.host[:19] + "…"
            labels.append(f'<text class="node-label" x="20" y="{y + min(h / 2 + 4, 13):.1f}">node {r.agent} · '
                          f'{esc(host)}<title>{esc(r.host)}</title></text>')
            for kind, x0, x1, lane, title in _bars(r.attempts, x, len(rep.attempts) > MAX_BARS):
                bars[kind].append(
                    f'<rect x="{x0:.1f}" y="{y + 2 + lane * lane_h:.1f}" width="{max(x1 - x0, 0.8):.1f}" '
                    f'height="{lane_h - gap:.1f}"><title>{title}</title></rect>')
            y += h + 2
        if p.start is not None and p.end is not None:
            back.insert(0, f'<rect class="pilot-span" x="{x(p.start):.1f}" y="{top:.1f}" '
                           f'width="{max(x(p.end) - x(p.start), 1):.1f}" height="{y - top:.1f}" rx="3"/>')
            if p.walltime_s and x.t0 <= p.start + p.walltime_s <= x.t1:
                wx = x(p.start + p.walltime_s)
                back.append(f'<line class="walltime" x1="{wx:.1f}" y1="{top:.1f}" x2="{wx:.1f}" y2="{y:.1f}">'
                            f'<title>{esc(p.id)}: end of its walltime</title></line>')
        y += 8
    height = y + AXIS
    out = [f'<svg id="timeline" class="fig" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height:.0f}" '
           f'width="{WIDTH}" height="{height:.0f}" role="img" aria-label="timeline of token attempts">']
    out += _axis(x, AXIS, AXIS, y, labels_above=True)
    out += _axis(x, y, y, y, labels_above=False)
    out.append('<g class="back">' + "".join(back) + "</g>")
    for outcome, items in bars.items():
        if items:
            out.append(f'<g class="bars o-{outcome}" fill="{COLOURS[outcome]}">' + "".join(items) + "</g>")
    out.append('<g class="labels">' + "".join(labels) + "</g></svg>")
    return "\n".join(out)


def _step_path(x: Scale, yv, times, values, base: float) -> str:
    if not times:
        return ""
    parts = [f"M{x(times[0]):.1f},{base:.1f}"]
    for i, t in enumerate(times):
        if i:
            parts.append(f"H{x(t):.1f}")
        parts.append(f"V{yv(values[i]):.1f}")
    parts.append(f"V{base:.1f}Z")
    return "".join(parts)


def utilisation_svg(rep) -> str:
    """Busy cores (sum of running attempts' cores) over allocated cores (pilots alive)."""
    x = Scale(rep.t0, rep.t1)
    top, h = 30, 150
    base = top + h
    vmax = max(max(rep.allocated[1], default=0), max(rep.busy[1], default=0), 1)
    ystep = nice_step(vmax, 5) if vmax > 5 else 1
    ymax = math.ceil(vmax / ystep) * ystep

    def yv(v: float) -> float:
        return base - v / ymax * h

    out = [f'<svg id="utilisation" class="fig" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {base + 34}" '
           f'width="{WIDTH}" height="{base + 34}" role="img" aria-label="busy and allocated cores over time">']
    out += _axis(x, base, top, base, labels_above=False)
    out.append('<g class="yticks">')
    v = 0.0
    while v <= ymax + 1e-9:
        out.append(f'<line x1="{GUTTER}" y1="{yv(v):.1f}" x2="{WIDTH - RIGHT}" y2="{yv(v):.1f}"/>'
                   f'<text x="{GUTTER - 6}" y="{yv(v) + 4:.1f}">{v:g}</text>')
        v += ystep
    out.append("</g>")
    out.append(f'<text class="ylabel" x="8" y="{top + h / 2:.1f}">cores</text>')
    alloc = _step_path(x, yv, *rep.allocated, base)
    busy = _step_path(x, yv, *rep.busy, base)
    if alloc:
        out.append(f'<path class="alloc" d="{alloc}"><title>allocated cores (pilots alive)</title></path>')
    if busy:
        out.append(f'<path class="busy" d="{busy}"><title>busy cores (attempts running)</title></path>')
    lx = WIDTH - RIGHT - 330
    out.append(f'<g class="legend"><rect class="alloc" x="{lx}" y="8" width="14" height="10"/>'
               f'<text x="{lx + 20}" y="17">allocated cores</text>'
               f'<rect class="busy" x="{lx + 150}" y="8" width="14" height="10"/>'
               f'<text x="{lx + 170}" y="17">busy cores (peak {rep.peak_busy})</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def step_curve(events: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """(time, delta) events → breakpoints and the value from each breakpoint on."""
    times: list[float] = []
    values: list[float] = []
    cur = 0.0
    for t, d in sorted(events):
        cur += d
        if times and t == times[-1]:
            values[-1] = cur
        else:
            times.append(t)
            values.append(cur)
    return times, values


def resample(times: list[float], values: list[float], t0: float, t1: float,
             points: int = MAX_POINTS) -> tuple[list[float], list[float]]:
    """The same step curve with at most ``points`` steps: time averages over equal bins
    (areas, hence core-hours, are kept)."""
    if len(times) <= points:
        return times, values
    cum = [0.0]  # area from times[0] up to times[i]
    for i in range(1, len(times)):
        cum.append(cum[-1] + values[i - 1] * (times[i] - times[i - 1]))

    def area(t: float) -> float:
        i = bisect.bisect_right(times, t) - 1
        return 0.0 if i < 0 else cum[i] + values[i] * (t - times[i])

    w = (t1 - t0) / points
    edges = [t0 + k * w for k in range(points + 1)]
    areas = [area(e) for e in edges]
    return edges, [(areas[k + 1] - areas[k]) / w for k in range(points)] + [0.0]
