"""3B/1B ratios: measured per configuration with a CI, and the physical range the weights' bytes allow.

A TPOT ratio comes from a pair record (05_pairs: both models loaded in one process, alternating rounds)
where one exists for the configuration; otherwise from two 01_latency records measured in different
processes, minutes apart, and labelled so (`source`: CROSS_POINT)."""
import numpy as np
import pandas as pd

from llmbench.core.stats import median_ci, ratio_of_medians
from llmbench.model import costmodel as cm
from llmbench.model.models import load_config
from llmbench.results.anomalies import dispatch_bound, flagged_labels, record_flags
from llmbench.results.fmt import fmt_time
from llmbench.results.frame import config_keys, latency_rows, ok, pair, pooled, repeats

CROSS_POINT = "cross-point: measured in different processes"
PAIR_KEYS = ("engine", "dtype", "quant", "device", "weights")  # a pair record's configuration, less the model


def paired_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """large/small TPOT ratio per engine, dtype, quant, device and context from the pair records (05_pairs'
    tpot_ratio with pair "model": one ratio per round of both models measured side by side); several runs
    of one configuration pool their rounds. Columns as ratio_table's, `source` says alternating or
    sequential (both models did not fit in memory: one after the other in one process)."""
    p = pair(df)
    if not p or "pair" not in df or "pairing" not in df:
        return pd.DataFrame()
    r = ok(df, experiment="pair", metric="tpot_ratio")
    r = r[(r.pair == "model") & (r.model == p[0]) & (r.versus == p[1])]
    sides = ok(df, experiment="pair", metric="tpot").reset_index(drop=True)
    sides = sides[sides.run_id.isin(set(r.run_id))]
    flags = record_flags(sides)
    keys = [k for k in PAIR_KEYS if k in r]
    rows = []
    for k, g in r.groupby([*keys, "context_len"], dropna=False):
        rounds = [[float(x)] for x in pooled(g)]  # one ratio per round: the rounds are the unit of the CI
        lo, hi = median_ci(rounds)
        sd = sides[sides.run_id.isin(set(g.run_id))]
        s, l = sd[sd.model == p[0]], sd[sd.model == p[1]]
        if not (len(s) and len(l)):
            continue  # a side left out (df holds only unflagged records): the ratio rests on it, so it goes too
        work = max(l.flops.mean() / s.flops.mean(), l.bytes.mean() / s.bytes.mean()) \
            if s.flops.notna().all() and l.flops.notna().all() else float("nan")
        rows.append({"metric": "TPOT", **dict(zip(keys, k[:-1])), "tokens": int(k[-1]),
                     p[0]: fmt_time(np.median(pooled(s))), p[1]: fmt_time(np.median(pooled(l))),
                     "ratio": float(np.median(pooled(g))), "ci_low": lo, "ci_high": hi, "work ratio": work,
                     **{f"{m} MBU": x.mbu.median() for m, x in zip(p, (s, l))},
                     "flag": "; ".join(flagged_labels(sd, flags)),
                     "dispatch": dispatch_bound({m: x.mbu.median() for m, x in zip(p, (s, l))}),
                     "source": f"paired ({', '.join(sorted(set(g.pairing.dropna())))}): {len(rounds)} rounds in one process"})
    return pd.DataFrame(rows)


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """large/small ratio of TTFT per prompt length and TPOT per context (`tokens`), with bootstrap CIs, per
    configuration (every config key but the model): no configuration is dropped. `work ratio` is the
    larger of the FLOPs and bytes ratios of the two records: with a fixed per-step cost on top of a
    roofline time, the time ratio lies between 1 and it. Each side's median MBU and the anomaly flags of
    the records behind a ratio (`flag`, '' for none) come with it, so no ratio is shown without them;
    `dispatch` labels a TPOT ratio one of whose sides decodes below anomalies.DISPATCH_MBU ('' otherwise): it
    measures the host's dispatch, and the claims do not judge the models by it.
    A TPOT ratio comes from the pair records where a configuration has them (paired_ratios; its
    cross-point rows are then left out), else from two latency records (`source`: CROSS_POINT)."""
    p = pair(df)
    if not p:
        return pd.DataFrame()
    paired = paired_ratios(df)
    done = {tuple(str(r.get(k)) for k in PAIR_KEYS) for r in paired.to_dict("records")}
    rows = []
    for metric, x in (("ttft", "prompt_len"), ("tpot", "context_len")):
        d = latency_rows(df, metric).reset_index(drop=True)
        flags = record_flags(d)
        keys = config_keys(d, drop=("model", "weights_source"))
        for k, g in d.groupby([*keys, x], dropna=False):
            s, l = g[g.model == p[0]], g[g.model == p[1]]
            cfg = dict(zip(keys, k[:-1]))
            if metric == "tpot" and tuple(str(cfg.get(c)) for c in PAIR_KEYS) in done:
                continue  # measured side by side: the pair record gives this configuration's ratio
            if len(s) and len(l):
                r, lo, hi = ratio_of_medians(repeats(s), repeats(l))
                work = max(l.flops.mean() / s.flops.mean(), l.bytes.mean() / s.bytes.mean()) \
                    if s.flops.notna().all() and l.flops.notna().all() else float("nan")
                mbus = {m: x.mbu.median() if "mbu" in x else float("nan") for m, x in zip(p, (s, l))}
                rows.append({"metric": metric.upper(), **dict(zip(keys, k[:-1])), "tokens": int(k[-1]),
                             p[0]: fmt_time(np.median(pooled(s))), p[1]: fmt_time(np.median(pooled(l))),
                             "ratio": r, "ci_low": lo, "ci_high": hi, "work ratio": work,
                             **{f"{m} MBU": v for m, v in mbus.items()},
                             "flag": "; ".join(flagged_labels(g, flags)),
                             # decode only: prefill is compute-bound, its low MBU says nothing of dispatch
                             "dispatch": dispatch_bound(mbus) if metric == "tpot" else "", "source": CROSS_POINT})
    return pd.concat([pd.DataFrame(rows), paired], ignore_index=True) if len(paired) else pd.DataFrame(rows)


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
