"""Rendering: figures (plots.py) and, later, the HTML report. Imported lazily by results."""
