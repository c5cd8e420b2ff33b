"""One module per experiment notebook, the notebooks' parameters and plans, and the run session."""
