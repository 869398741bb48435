"""The cutover report: GO or NO-GO per mapping and overall, from the control schema's history.

``build_report`` gathers the evidence (control schema, optionally the sidecar's /status) and
judges it against ``report.criteria``; ``render`` writes it as Markdown, HTML or JSON.
"""

from compare.report.gather import build_report
from compare.report.model import Criterion, MappingReport, Report
from compare.report.publish import run_report
from compare.report.render import render

__all__ = ["Criterion", "MappingReport", "Report", "build_report", "render", "run_report"]
