"""Reports: the self-contained HTML page of a study (page.py) and of an audit (audit.py), with their
figures and tables (docs/api.md, section 6)."""

from diffmem.io.results import find_jobs
from diffmem.report.audit import write_audit
from diffmem.report.page import load_phase, transitions_text, write_report
from diffmem.viz.study_figures import phase_figure

__all__ = ["find_jobs", "load_phase", "phase_figure", "transitions_text", "write_audit", "write_report"]
