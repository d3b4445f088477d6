"""The HTML report of a run: one self-contained page (``page``) of inline SVG (``svg``)."""

from pilotflow.report.page import Attempt, build, pack_lanes, write_report
from pilotflow.report.svg import resample, step_curve

__all__ = ["Attempt", "build", "pack_lanes", "resample", "step_curve", "write_report"]
