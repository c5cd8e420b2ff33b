"""Ratios from pair records, 3B/1B ratios per configuration with a CI, and the physical range the weights'
bytes allow.

pair_ratios turns the pair records of one kind (05_pairs: both sides loaded in one process, alternating
rounds; model, engine or quant) into ratio rows with a CI from the rounds; the 3B/1B table (paired_ratios),
the report's eager/compiled overhead and peer table (report/engines) and the quantization speed-ups
(paired_speedups: report/sections, claims/checks) all read them. A ratio comes from a pair record where
one exists for the configuration; otherwise from two records measured in different processes, minutes
apart, and labelled so (`source`: CROSS_POINT; SAME_RUN where both come from one run, one after the
other)."""
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


def work_ratio(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """b/a work: the larger of the FLOPs and the bytes ratios of two sides' records (NaN where a FLOPs count
    is missing): with a fixed per-step cost on top of a roofline time, the time ratio lies between 1 and it."""
    if not (a.flops.notna().all() and b.flops.notna().all()):
        return float("nan")
    return max(b.flops.mean() / a.flops.mean(), b.bytes.mean() / a.bytes.mean())


def median_mbu(d: pd.DataFrame) -> float:
    return d.mbu.median() if "mbu" in d else float("nan")


SAME_RUN = "same run: measured one after the other in one process, not alternating"
SIDE_KEYS = ("model", "engine", "quant")  # what a pair's side B may change (its `pair` axis) from side A


def pair_ratios(df: pd.DataFrame, kind: str, invert: bool = False) -> pd.DataFrame:
    """One row per pair configuration and context from the pair records of one kind (model | engine |
    quant; 05_pairs' tpot_ratio: one ratio, B's TPOT over A's, per round of both sides measured side by
    side); several runs of one configuration pool their rounds, and the CI comes from the rounds.
    `invert`: the inverse ratio, A's TPOT over B's (a speed-up of B), with the CI's ends inverted.
    Columns: side A's model, engine, dtype, quant, device, weights, `versus` (B's value of the `kind` axis), `tokens` (context), `A TPOT` /
    `B TPOT` (median seconds), ratio, ci_low, ci_high, `work ratio` (B/A, the larger of the FLOPs and
    bytes ratios), `A MBU` / `B MBU`, `flag` (the anomaly flags of the sides, '' for none), `source`.
    A configuration with a side missing from df (df holds only unflagged records) gets no row: its
    ratio rests on that side."""
    if "pair" not in df or "pairing" not in df or "versus" not in df:
        return pd.DataFrame()
    r = ok(df, experiment="pair", metric="tpot_ratio")
    r = r[r.pair == kind]
    if r.empty:
        return pd.DataFrame()
    sides = ok(df, experiment="pair", metric="tpot").reset_index(drop=True)
    sides = sides[sides.run_id.isin(set(r.run_id)) & (sides.pair == kind)]
    flags = record_flags(sides)
    keys = [k for k in ("model", *PAIR_KEYS) if k in r]
    rows = []
    for k, g in r.groupby([*keys, "versus", "context_len"], dropna=False):
        cfg = dict(zip(keys, k[:-2]))
        rounds = [float(x) for x in pooled(g)]  # one ratio per round: the CI's unit
        lo, hi = median_ci([[x] for x in rounds])
        ratio = float(np.median(rounds))
        if invert:  # inverted after the median: with an even count of rounds the median of the inverses differs
            inv = lambda x: 1 / x if x > 0 else float("inf") if x <= 0 else float("nan")  # a t interval may reach 0
            ratio, lo, hi = 1 / ratio, inv(hi), inv(lo)
        sd = sides[sides.run_id.isin(set(g.run_id))]
        a, b = sd[sd[kind] == cfg[kind]], sd[sd[kind] == k[-2]]
        if not (len(a) and len(b)):
            continue  # a side left out (df holds only unflagged records): the ratio rests on it, so it goes too
        rows.append({**cfg, "versus": k[-2], "tokens": int(k[-1]),
                     "A TPOT": float(np.median(pooled(a))), "B TPOT": float(np.median(pooled(b))),
                     "ratio": ratio, "ci_low": lo, "ci_high": hi, "work ratio": work_ratio(a, b),
                     "A MBU": median_mbu(a), "B MBU": median_mbu(b), "flag": "; ".join(flagged_labels(sd, flags)),
                     "source": f"paired ({', '.join(sorted(set(g.pairing.dropna())))}): {len(rounds)} rounds in one process"})
    return pd.DataFrame(rows)


def paired_ratios(df: pd.DataFrame) -> pd.DataFrame:
    """large/small TPOT ratio per engine, dtype, quant, device and context from the pair records (05_pairs'
    tpot_ratio with pair "model": one ratio per round of both models measured side by side); several runs
    of one configuration pool their rounds. Columns as ratio_table's, `source` says alternating or
    sequential (both models did not fit in memory: one after the other in one process)."""
    p = pair(df)
    t = pair_ratios(df, "model") if p else pd.DataFrame()
    if t.empty:
        return t
    t = t[(t.model == p[0]) & (t.versus == p[1])]
    keys = [k for k in PAIR_KEYS if k in t]
    return pd.DataFrame({"metric": "TPOT", **{k: t[k] for k in keys}, "tokens": t.tokens,
                         p[0]: t["A TPOT"].map(fmt_time), p[1]: t["B TPOT"].map(fmt_time),
                         "ratio": t.ratio, "ci_low": t.ci_low, "ci_high": t.ci_high, "work ratio": t["work ratio"],
                         f"{p[0]} MBU": t["A MBU"], f"{p[1]} MBU": t["B MBU"], "flag": t.flag,
                         "dispatch": [dispatch_bound({p[0]: a, p[1]: b}) for a, b in zip(t["A MBU"], t["B MBU"])],
                         "source": t.source}).reset_index(drop=True)


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
                mbus = {m: median_mbu(x) for m, x in zip(p, (s, l))}
                rows.append({"metric": metric.upper(), **dict(zip(keys, k[:-1])), "tokens": int(k[-1]),
                             p[0]: fmt_time(np.median(pooled(s))), p[1]: fmt_time(np.median(pooled(l))),
                             "ratio": r, "ci_low": lo, "ci_high": hi, "work ratio": work_ratio(s, l),
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


def paired_speedups(df: pd.DataFrame) -> dict:
    """{(model, engine, dtype, method): (speed-up, ci_low, ci_high, flag, source)} from the quant-pair
    records (05_pairs, quant none, versus the method: B/A TPOT per round, so the speed-up is its
    inverse per round, CI from the rounds), smallest context of each configuration."""
    t = pair_ratios(df, "quant", invert=True)
    if t.empty:
        return {}
    t = t[t.quant == "none"].sort_values("tokens")
    return {(r["model"], r.get("engine"), r["dtype"], r["versus"]): (r["ratio"], r["ci_low"], r["ci_high"], r["flag"],
                                                                     r["source"])
            for r in t.drop_duplicates(["model", "engine", "dtype", "versus"]).to_dict("records")}


def run_source(method_rows: pd.DataFrame, base_rows: pd.DataFrame) -> str:
    """SAME_RUN where a method's and its baseline's records come from one run, else CROSS_POINT."""
    return SAME_RUN if set(method_rows.run_id) == set(base_rows.run_id) else CROSS_POINT
