"""The records of finished runs as one tidy frame, and the selections every table, figure and claim makes of it:
the configuration keys that vary, rows of one configuration, 1B/3B pairs, samples pooled over repeats.

Each function takes the frame of all finished runs (measure.records.read_all) and returns a frame or
numbers; none prints or plots.
"""
import numpy as np
import pandas as pd

from llmbench.core.files import published, read_json
from llmbench.core.keys import CONFIG_KEYS, STUDIES
from llmbench.core.stats import regroup
from llmbench.measure.records import ok_runs, read_all


PAIRS = [("llama-3.2-1b", "llama-3.2-3b"), ("tiny-1b", "tiny-3b")]


REQUEST = (128, 128)  # prompt and new tokens of one "request" in projections (the seed's 128-token input)


LONG_PROMPT = 1024  # a long-document prompt, for the projected TTFT


def load(results_dir) -> tuple[pd.DataFrame, list[dict]]:
    runs = [read_json(r / "run.json") for r in ok_runs(results_dir)]
    df = read_all(results_dir)
    by_id = {r["run_id"]: r["notebook"] for r in runs}
    df["notebook"] = df["run_id"].map(by_id)  # provenance only: selections use `study`
    # read_all gives every column, empty where a run predates it: an old record's study follows from its
    # notebook, and records from before the engine axis all ran HF transformers eagerly
    df["study"] = df["study"].fillna(df["notebook"].map(STUDIES))
    df.loc[df.engine.isna() & df.model.notna(), "engine"] = "eager"
    return df, runs


def config_keys(df: pd.DataFrame, drop=()) -> list[str]:
    """The configuration keys present in df (config.CONFIG_KEYS), less `drop`: group by these, so a new
    axis shows as a new row and never collapses into another configuration's."""
    return [k for k in CONFIG_KEYS if k in df.columns and k not in drop]


def pooled(g: pd.DataFrame) -> np.ndarray:
    """All raw samples of the rows of one configuration and shape (several runs of it are pooled)."""
    parts = [np.asarray(s, dtype=float) for s in g["samples"] if isinstance(s, (list, tuple, np.ndarray)) and len(s)]
    return np.concatenate(parts) if parts else np.asarray(g["median"], dtype=float)


def repeats(g: pd.DataFrame):
    """The raw samples of the rows of one configuration and shape as measured: cut into repeats where
    every row records its `sample_blocks` (several runs' repeats pooled as repeats), else one flat list.
    Pass these to stats.ratio_of_medians, so a ratio's CI resamples as the records' own CIs did."""
    cut = [regroup(s, b) for s, b in zip(g["samples"], g["sample_blocks"] if "sample_blocks" in g else [None] * len(g))]
    cut = [c for c in cut if len(c)]
    if cut and all(isinstance(c[0], list) for c in cut):
        return [blk for c in cut for blk in c]
    return pooled(g)


def trend(values, lows, highs) -> str:
    """'rises', 'falls' or 'is flat' from the first to the last point, judged beyond both CIs."""
    lo0 = lows[0] if np.isfinite(lows[0]) else values[0]
    hi0 = highs[0] if np.isfinite(highs[0]) else values[0]
    lo1 = lows[-1] if np.isfinite(lows[-1]) else values[-1]
    hi1 = highs[-1] if np.isfinite(highs[-1]) else values[-1]
    return "rises" if lo1 > hi0 else "falls" if hi1 < lo0 else "is flat (within the CIs)"


def ok(df: pd.DataFrame, **eq) -> pd.DataFrame:
    sel = df[df.status == "ok"]
    for k, v in eq.items():
        sel = sel[sel[k].isin(v) if isinstance(v, (list, tuple, set)) else sel[k] == v]
    return sel


def pair(df: pd.DataFrame):
    """(small, large) model names present in the data, e.g. the 1B and the 3B."""
    present = set(df.model.dropna())
    return next(((s, l) for s, l in PAIRS if s in present and l in present), None)


def role(model: str, p) -> str | None:
    return None if not p else {p[0]: "small", p[1]: "large"}.get(model)


def device_kind(df: pd.DataFrame) -> str:
    kinds = df.device.dropna()
    return kinds.mode().iat[0] if len(kinds) else "none"


def weights_used(df: pd.DataFrame) -> str:
    w = sorted(set(df.weights.dropna()))
    return " and ".join(w) if w else "no"


def latency_rows(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Batch-1 TTFT or TPOT of unquantized models from the latency notebook."""
    return ok(df, study="latency", metric=metric, quant="none", batch=1)


def published_ratios() -> pd.DataFrame:
    """3B/1B decode ratios computed from published tokens/s pairs (data/published.yaml, with sources)."""
    rows = [{"setup": p["setup"], "1B tokens/s": p["small"], "3B tokens/s": p["large"],
             "3B/1B time ratio": p["small"] / p["large"], "source": p["source"]
             + (f" ({p['unconfirmed']})" if p.get("unconfirmed") else "")} for p in published()["decode_tokens_per_s"]]
    return pd.DataFrame(rows)
