"""Scheduler backends, found by name: every module of this package that defines ``BACKEND``.

Adding a backend (say LSF) is its module here (``lsf.py``: command builders, output parsers,
walltime step, check commands, MPI launch style), its batch-script template
(``pilotflow/templates/lsf.sh.j2``) and its tests; nothing else names schedulers. Importing
this package runs nothing: modules are listed and imported on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache

from pilotflow.schedulers.base import Scheduler


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """The backends' names, e.g. ("local", "pbs", "sge", "slurm")."""
    found = []
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            found.append(mod.name)
    return tuple(sorted(n for n in found if getattr(_module(n), "BACKEND", None) is not None))


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def backend_class(name: str) -> type[Scheduler]:
    """The backend class registered under ``name``; KeyError if there is none."""
    if name not in names():
        raise KeyError(name)
    return _module(name).BACKEND


def backend(resource_or_name) -> Scheduler:
    """A backend instance for a resource (configured from it: e.g. its ``python``) or a name."""
    if isinstance(resource_or_name, str):
        return backend_class(resource_or_name)()
    return backend_class(resource_or_name.scheduler).for_resource(resource_or_name)
