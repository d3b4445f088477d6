"""Scheduler backends by name. Importing this package runs nothing."""

from __future__ import annotations

from pilotflow.schedulers.base import Scheduler


def backend(name: str) -> Scheduler:
    if name == "slurm":
        from pilotflow.schedulers.slurm import Slurm
        return Slurm()
    if name == "sge":
        from pilotflow.schedulers.sge import Sge
        return Sge()
    if name == "pbs":
        from pilotflow.schedulers.pbs import Pbs
        return Pbs()
    if name == "local":
        from pilotflow.schedulers.local import Local
        return Local()
    raise KeyError(name)
