"""3B/1B ratios: measured per configuration with a CI, and the physical range the weights' bytes allow."""
import numpy as np
import pandas as pd

from llmbench.core.stats import ratio_of_medians
from llmbench.model import costmodel as cm
from llmbench.model.models import load_config
from llmbench.results.anomalies import flagged_labels, record_flags
from llmbench.results.fmt import fmt_time
from llmbench.results.frame import config_keys, latency_rows, pair, pooled, repeats


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """large/small ratio of TTFT per prompt length and TPOT per context (`tokens`), with bootstrap CIs, per
    configuration (every config key but the model): no configuration is dropped. `work ratio` is the
    larger of the FLOPs and bytes ratios of the two records: with a fixed per-step cost on top of a
    roofline time, the time ratio lies between 1 and it. Each side's median MBU and the anomaly flags of
    the records behind a ratio (`flag`, '' for none) come with it, so no ratio is shown without them."""
    p = pair(df)
    if not p:
        return pd.DataFrame()
    rows = []
    for metric, x in (("ttft", "prompt_len"), ("tpot", "context_len")):
        d = latency_rows(df, metric).reset_index(drop=True)
        flags = record_flags(d)
        keys = config_keys(d, drop=("model", "weights_source"))
        for k, g in d.groupby([*keys, x], dropna=False):
            s, l = g[g.model == p[0]], g[g.model == p[1]]
            if len(s) and len(l):
                r, lo, hi = ratio_of_medians(repeats(s), repeats(l))
                work = max(l.flops.mean() / s.flops.mean(), l.bytes.mean() / s.bytes.mean()) \
                    if s.flops.notna().all() and l.flops.notna().all() else float("nan")
                rows.append({"metric": metric.upper(), **dict(zip(keys, k[:-1])), "tokens": int(k[-1]),
                             p[0]: fmt_time(np.median(pooled(s))), p[1]: fmt_time(np.median(pooled(l))),
                             "ratio": r, "ci_low": lo, "ci_high": hi, "work ratio": work,
                             **{f"{m} MBU": x.mbu.median() if "mbu" in x else float("nan") for m, x in zip(p, (s, l))},
                             "flag": "; ".join(flagged_labels(g, flags))})
    return pd.DataFrame(rows)


def physical_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Each large/small latency ratio with its physical floor (`low` = 1: the larger model does more of every
    kind of work) and the work ratio (`high`), which a ratio may exceed when the larger model reads at a lower
    rate; `flag` names flagged records behind it, `mbu_small` / `mbu_large` each side's MBU."""
    t = ratio_table(df)
    cols = ["what", "ratio", "ci_low", "ci_high", "low", "high", "why", "flag", "mbu_small", "mbu_large"]
    if t.empty:
        return pd.DataFrame(columns=cols)
    p = pair(df)
    keys = [k for k in ("engine", "dtype", "quant", "device") if k in t]
    return pd.DataFrame({
        "what": [f"{r['metric']} {p[1]}/{p[0]} at {r['tokens']} tokens, " + " ".join(str(r[k]) for k in keys)
                 for r in t.to_dict("records")],
        "ratio": t.ratio, "ci_low": t.ci_low, "ci_high": t.ci_high, "low": 1.0, "high": t["work ratio"],
        "why": "the larger model does more of every kind of work, so it cannot take less time than the smaller",
        "flag": t.flag, "mbu_small": t[f"{p[0]} MBU"], "mbu_large": t[f"{p[1]} MBU"]})[cols]


def weight_ratio(small: str, large: str) -> float:
    """large/small weight bytes at any one dtype (= parameter ratio): the ratio of memory-bound decode times."""
    return cm.count_params(load_config(large))["total"] / cm.count_params(load_config(small))["total"]
