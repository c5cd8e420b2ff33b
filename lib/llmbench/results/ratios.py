"""3B/1B ratios: measured per configuration with a CI, and the physical range the weights' bytes allow."""
import numpy as np
import pandas as pd

from llmbench.core.stats import ratio_of_medians
from llmbench.model import costmodel as cm
from llmbench.model.models import load_config
from llmbench.results.fmt import fmt_time
from llmbench.results.frame import config_keys, latency_rows, pair, pooled, repeats


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """large/small ratio of TTFT per prompt length and TPOT per context (`tokens`), with bootstrap CIs, per
    configuration (every config key but the model): no configuration is dropped. `work ratio` is the
    larger of the FLOPs and bytes ratios of the two records: with a fixed per-step cost on top of a
    roofline time, the time ratio lies between 1 and it."""
    p = pair(df)
    if not p:
        return pd.DataFrame()
    rows = []
    for metric, x in (("ttft", "prompt_len"), ("tpot", "context_len")):
        d = latency_rows(df, metric)
        keys = config_keys(d, drop=("model", "weights_source"))
        for k, g in d.groupby([*keys, x], dropna=False):
            s, l = g[g.model == p[0]], g[g.model == p[1]]
            if len(s) and len(l):
                r, lo, hi = ratio_of_medians(repeats(s), repeats(l))
                work = max(l.flops.mean() / s.flops.mean(), l.bytes.mean() / s.bytes.mean()) \
                    if s.flops.notna().all() and l.flops.notna().all() else float("nan")
                rows.append({"metric": metric.upper(), **dict(zip(keys, k[:-1])), "tokens": int(k[-1]),
                             p[0]: fmt_time(np.median(pooled(s))), p[1]: fmt_time(np.median(pooled(l))),
                             "ratio": r, "ci_low": lo, "ci_high": hi, "work ratio": work})
    return pd.DataFrame(rows)


def physical_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Each large/small latency ratio with the range it can physically take: [1, work ratio]."""
    t = ratio_table(df)
    if t.empty:
        return pd.DataFrame(columns=["what", "ratio", "ci_low", "ci_high", "low", "high", "why"])
    keys = [k for k in ("engine", "dtype", "quant", "device") if k in t]
    return pd.DataFrame({
        "what": [f"{r['metric']} {p_[1]}/{p_[0]} at {r['tokens']} tokens, " + " ".join(str(r[k]) for k in keys)
                 for r in t.to_dict("records") for p_ in [pair(df)]],
        "ratio": t.ratio, "ci_low": t.ci_low, "ci_high": t.ci_high, "low": 1.0, "high": t["work ratio"],
        "why": "the larger model does more of every kind of work; with a fixed cost per step the ratio lies "
               "between 1 and the larger of its FLOPs and bytes ratios"})


def weight_ratio(small: str, large: str) -> float:
    """large/small weight bytes at any one dtype (= parameter ratio): the ratio of memory-bound decode times."""
    return cm.count_params(load_config(large))["total"] / cm.count_params(load_config(small))["total"]
