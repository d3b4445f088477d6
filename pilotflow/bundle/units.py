"""Durations and sizes as users write them in bundles and as schedulers want them.

Accepted durations follow what HPC users already type: ``"90s"``, ``"5m"``, ``"2h"``,
``"1h30m"``, ``"2d"``, Slurm's ``"1-12:00:00"`` / ``"01:30:00"`` / ``"MM:SS"``, or an integer
of seconds. Sizes: ``"512M"``, ``"2G"``, ``"1T"``, ``"300K"`` (binary units, as Slurm and PBS
use them) or an integer of megabytes.
"""

from __future__ import annotations

import math
import re

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_COMPOUND = re.compile(r"^(?:(\d+(?:\.\d+)?)\s*([smhdw]))+$", re.IGNORECASE)
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_CLOCK = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")

DURATION_HELP = 'a duration such as "90s", "5m", "1h30m", "1-12:00:00", "01:30:00" or an integer of seconds'
SIZE_HELP = 'a size such as "512M", "2G" or an integer of megabytes'


def parse_duration(value: object) -> int:
    """Seconds in a duration; raises ValueError with the accepted forms on anything else."""
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value}")
        return value
    if isinstance(value, float) and value >= 0 and math.isfinite(value):
        return math.ceil(value)
    if not isinstance(value, str):
        raise ValueError(f"expected {DURATION_HELP}")
    text = value.strip().replace(" ", "")
    if not text:
        raise ValueError(f"expected {DURATION_HELP}")
    if text.isdigit():
        return int(text)
    if _COMPOUND.match(text):
        total = sum(float(n) * _UNIT_SECONDS[u.lower()] for n, u in _PART.findall(text))
        return math.ceil(total)
    m = _CLOCK.match(text)
    if m:
        days, a, b, c = m.groups()
        if days is not None:
            # Slurm: days-hours[:minutes[:seconds]]
            h, mi, s = int(a), int(b or 0), int(c or 0)
            return _checked(int(days) * 86400 + h * 3600 + mi * 60 + s, mi, s, value)
        if c is not None:  # HH:MM:SS
            return _checked(int(a) * 3600 + int(b) * 60 + int(c), int(b), int(c), value)
        if b is not None:  # MM:SS, as Slurm reads two fields
            return _checked(int(a) * 60 + int(b), 0, int(b), value)
    raise ValueError(f"expected {DURATION_HELP}")


def _checked(total: int, minutes: int, seconds: int, original: object) -> int:
    if minutes >= 60 or seconds >= 60:
        raise ValueError(f"minutes and seconds must be below 60 in {original!r}")
    return total


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$", re.IGNORECASE)
_SIZE_MB = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024**2, "p": 1024**3}


def parse_size_mb(value: object) -> int:
    """Megabytes (MiB) in a size; a bare number means megabytes, as with ``sbatch --mem``."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_HELP}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if m:
            return math.ceil(float(m.group(1)) * _SIZE_MB[m.group(2).lower()])
    raise ValueError(f"expected {SIZE_HELP}")


def format_duration(seconds: float) -> str:
    """Compact human form for tables: ``1h30m``, ``45s``, ``2d3h``."""
    s = int(math.ceil(seconds))
    if s < 60:
        return f"{s}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts[:2])
