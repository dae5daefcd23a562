"""The study report: one self-contained HTML page with its figures and tables."""
