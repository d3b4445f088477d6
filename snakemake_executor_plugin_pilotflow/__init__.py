"""Snakemake finds executor plugins by package name; the executor lives in pilotflow.snakemake.

Kept to one import: Snakemake imports every installed plugin on every command (each job's own
``python -m snakemake`` too), and a plugin that fails to import breaks them all.
"""

from pilotflow.snakemake.executor import Executor, ExecutorSettings, common_settings

__all__ = ["Executor", "ExecutorSettings", "common_settings"]
