"""The study report: one self-contained HTML page with its figures and tables."""

from diffmem.io.results import find_jobs
from diffmem.report.page import load_phase, transitions_text, write_report
from diffmem.viz.study_figures import phase_figure

__all__ = ["find_jobs", "load_phase", "phase_figure", "transitions_text", "write_report"]
