"""What the Snakemake run's placement decisions estimate: a live pilot's spare capacity, and
the runtime of a token whose walltime is only a default guess."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

INF = float("inf")

from pilotflow.bundle import Resource, Task


@dataclass
class Capacity:
    """What a live pilot can still take: its node shape, remaining seconds and spare core-seconds."""

    pilot: str
    resource: Resource
    cores: int
    remaining: float
    running: bool
    spare: float

    def fits(self, t: Task) -> bool:
        return (t.cores <= self.resource.cores_per_node and t.walltime_s <= self.remaining
                and not (t.memory_mb and self.resource.memory_per_node_mb
                         and t.memory_mb > self.resource.memory_per_node_mb))


class Runtimes:
    """Runtimes of finished tokens per kind (a Snakemake rule), and estimates from them for
    tokens whose walltime is a default guess: so a live pilot takes such a token instead of
    idling while a new pilot is planned for the guess. Walltimes are estimates, not limits: a
    token that runs over is handed back at its pilot's end and is then planned with the full
    guess (``guess``)."""

    def __init__(self) -> None:
        self.kind: dict[str, str] = {}  # token → its kind
        self.guessed: dict[str, int] = {}  # token → its default-guess walltime
        self.observed: dict[str, float] = {}  # kind → the longest runtime of its finished tokens

    def add(self, t: Task, kind: str | None, guessed: bool) -> None:
        if kind:
            self.kind[t.name] = kind
        if guessed:
            self.guessed[t.name] = t.walltime_s

    def guess(self, name: str) -> int:
        """The token's default-guess walltime (0: it has its user's estimate)."""
        return self.guessed.get(name, 0)

    def estimate(self, t: Task) -> Task:
        """``t`` with the estimate from similar tokens (its kind's, else the run's longest
        observed runtime) with a margin, when its walltime is a guess and that is shorter."""
        guess = self.guessed.get(t.name)
        if guess is None or not self.observed:
            return t
        known = [v for v in self.observed.values() if v != INF]
        seen = self.observed.get(self.kind.get(t.name, ""), max(known, default=INF))
        if seen == INF:
            return t
        est = int(min(guess, max(2 * seen + 10, seen * 1.5)))
        return replace(t, walltime_s=max(1, est)) if est < t.walltime_s else t

    def observe(self, names: list[str], word: Callable[[str], str], doc: Callable[[str], dict]) -> None:
        """Take the runtimes of those of ``names`` that finished successfully. A guessed token
        handed back after an attempt (its pilot ended while it ran: it may have outrun its
        estimate) makes its kind's estimate the full guess from then on."""
        for n in names:
            if n not in self.kind and n not in self.guessed:
                continue
            w = word(n)
            if w == "todo" and n in self.guessed and int(doc(n).get("attempt") or 0) > 0:
                self.observed[self.kind.get(n, "")] = INF
                continue
            if w != "done":
                continue
            d = doc(n)
            try:
                took = float(d["end"]) - float(d["start"])
            except (KeyError, TypeError, ValueError):
                continue
            k = self.kind.get(n, "")
            self.observed[k] = max(self.observed.get(k, 0.0), took)
