"""What `llmbench status` adds after a grid's runs: one line per anomaly in its finished runs."""
from llmbench.results.anomalies import check_all
from llmbench.results.frame import load
from llmbench.results.ratios import physical_ratios


def status_lines(results_dir) -> list[str]:
    """One line per anomaly in a grid folder's finished runs (for `llmbench status`)."""
    df, _ = load(results_dir)
    if df.empty:
        return []
    a = check_all(df, physical_ratios(df))
    return [f"anomaly  {r.check}: {r.where}: {r.detail}" for r in a.itertuples()]
