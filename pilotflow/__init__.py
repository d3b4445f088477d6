"""pilotflow: many tasks, few pilot allocations.

The Python API (:mod:`pilotflow.api`) is re-exported here lazily: ``import pilotflow`` stays
cheap (no scheduler calls, no heavy imports) so the CLI and the Snakemake shim start fast.
"""

from pilotflow.version import __version__

# (not "plan", "bundle", "submit": those are module names, which would shadow them)
_API = {"Bundle", "Event", "Plan", "Resource", "Run", "Task", "from_dict", "load", "plan_for", "start"}


def __getattr__(name):
    if name in _API:
        from pilotflow import api
        return getattr(api, name)
    raise AttributeError(f"module 'pilotflow' has no attribute {name!r}")
