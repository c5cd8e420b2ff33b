"""Frames over the records of finished runs: selections, formatting, 3B/1B ratios, energy rows, anomalies, decode fits."""
