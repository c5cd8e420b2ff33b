"""Grids of notebook runs: one process per grid point, run folders, the local and Ray executors."""
