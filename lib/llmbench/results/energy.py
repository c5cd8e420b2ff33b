"""Energy records as a frame: which rows measured energy, with which meter, and 1B/3B pairs of them."""
import pandas as pd

from llmbench.core.stats import summarize
from llmbench.results import frame


METRICS = {"energy_per_token": "J/token", "tokens_per_joule": "tokens/J", "energy_per_request": "J/request",
           "avg_power": "average W", "energy_per_token_above_idle": "J/token above idle",
           "avg_power_above_idle": "W above idle"}


SHAPE = ["batch", "prompt_len", "new_tokens"]


def rows(df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    d = frame.ok(df, experiment="energy") if "experiment" in df else df.iloc[0:0]
    return d[d.metric == metric] if metric else d


def not_readable(df: pd.DataFrame) -> pd.DataFrame:
    """Energy records that say why nothing was measured ("unsupported: ..." or "error: ...")."""
    if "experiment" not in df:
        return df.iloc[0:0]
    return df[(df.experiment == "energy") & (df.status != "ok")]


def meter(note) -> str:
    """The meter's description: the first clause of a record's note."""
    return str(note).split(";")[0] if isinstance(note, str) and note else ""


def _stat(g: pd.DataFrame) -> dict:
    return summarize(frame.pooled(g))


def _pairs(df: pd.DataFrame, metric: str):
    """(config without model, shape, small rows, large rows) for every configuration both models ran."""
    p = frame.pair(df)
    d = rows(df, metric)
    if not p or d.empty:
        return
    keys = [*frame.config_keys(d, drop=("model",)), *SHAPE]
    for k, g in d.groupby(keys, dropna=False, sort=True):
        s, l = g[g.model == p[0]], g[g.model == p[1]]
        if len(s) and len(l):
            yield dict(zip(keys, k)), s, l
