"""The report's sections, figures and what-to-choose table, built from results and claims; build.py renders the HTML."""
