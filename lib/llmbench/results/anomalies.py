"""Anomaly checks computed from the records: numbers a reader should distrust before reading on.

Each check returns rows {check, where, detail}. The report shows them next to the numbers and
`llmbench status` prints them for a grid's finished runs. A check never edits a record; it points at it,
and at the disturbance the noise columns recorded for it, when there are such columns.
"""
import numpy as np
import pandas as pd

from llmbench.core.keys import CONFIG_KEYS

CI_SHARE = 0.5       # a 95% CI wider than half its median: the median is not a stable number
BOUND_SLACK = 0.98   # a median below 98% of its lower bound: faster than the cost model allows
# Decode MBU below this: the step time is the host's per-step dispatch, not the model's bytes (an H200 ran
# eager decode at 4% and 8% for 1B and 3B, measured on one H200), so a 3B/1B ratio of such steps says nothing
# of the models. The one threshold and label (DISPATCH_LABEL) of the report's engine table, its ratio tables
# (column `dispatch`) and the claims' verdicts (not judged); data/claims.yaml's rules name the label only.
DISPATCH_MBU = 0.15
DISPATCH_LABEL = "dispatch-bound"
DISPATCH_WHY = "its 3B/1B ratio measures the host's per-step dispatch, not the models"


def keys_in(df: pd.DataFrame, keys) -> list[str]:
    return [k for k in keys if k in df.columns]


def _ok(df):
    return df[df.status == "ok"] if "status" in df else df


def _label(r) -> str:
    def v(x):
        return int(x) if isinstance(x, float) and x.is_integer() else x
    parts = [f"{k}={v(r[k])}" for k in ("model", "engine", "dtype", "quant", "batch", "prompt_len", "context_len")
             if k in r and r[k] is not None and not (isinstance(r[k], float) and np.isnan(r[k]))]
    return f"{r.get('metric')} " + " ".join(parts)


def _disturbance(r) -> str:
    """What the noise columns say about the window a record was measured in ('' when nothing)."""
    out = []
    d = r.get("disturbance")
    if isinstance(d, str) and d.strip() and d.strip().lower() not in ("none", "0"):
        out.append(f"disturbance: {d}")
    elif isinstance(d, (int, float)) and np.isfinite(d) and d > 0:
        out.append(f"disturbance: {d:g}")
    q = r.get("quiet")
    if isinstance(q, (bool, np.bool_)) and not q:
        out.append("measured in a window that was not quiet")
    a = r.get("attempts")
    if isinstance(a, (int, float, np.integer)) and np.isfinite(a) and a > 1:
        out.append(f"{int(a)} attempts")
    return "; ".join(out)


def dispatch_bound(mbus: dict) -> str:
    """'' unless a side's decode MBU ({side: MBU}) is below DISPATCH_MBU: then the label with every side's MBU."""
    low = {m: v for m, v in mbus.items() if v is not None and np.isfinite(v)}
    if not low or min(low.values()) >= DISPATCH_MBU:
        return ""
    return (f"{DISPATCH_LABEL} (decode MBU " + ", ".join(f"{m} {v:.0%}" for m, v in low.items())
            + f"; below {DISPATCH_MBU:.0%})")


def _row(check, r, detail) -> dict:
    d = _disturbance(r)
    return {"check": check, "where": _label(r), "detail": detail + (f" ({d})" if d else ""),
            "run_id": r.get("run_id")}


def ttft_not_increasing(df) -> list[dict]:
    """A longer prompt must not finish prefill sooner, beyond both CIs (more FLOPs and bytes, same model)."""
    d = _ok(df)
    d = d[(d.metric == "ttft")] if "metric" in d else d.iloc[0:0]
    out = []
    keys = keys_in(d, [*CONFIG_KEYS, "batch", "run_id"])
    for _, g in d.groupby(keys, dropna=False) if len(d) else []:
        g = g.sort_values("prompt_len")
        rows = g.to_dict("records")
        for a, b in zip(rows, rows[1:]):
            hi_b = b["ci_high"] if np.isfinite(b["ci_high"]) else b["median"]
            lo_a = a["ci_low"] if np.isfinite(a["ci_low"]) else a["median"]
            if hi_b < lo_a:
                d_a = _disturbance(a)  # the shorter prompt is usually the disturbed one
                out.append(_row("TTFT falls with prompt length", b,
                                f"{b['median'] * 1e3:.3g} ms at {int(b['prompt_len'])} tokens < "
                                f"{a['median'] * 1e3:.3g} ms at {int(a['prompt_len'])} tokens, beyond both CIs: "
                                "the shorter prompt's timing was disturbed (or its first shape compiled)"
                                + (f"; at {int(a['prompt_len'])} tokens: {d_a}" if d_a else "")))
    return out


def _below_mask(d) -> pd.Series:
    """Timed records faster than BOUND_SLACK x their lower bound."""
    if "bound_s" not in d or "unit" not in d:
        return pd.Series(False, index=d.index)
    b = pd.to_numeric(d.bound_s, errors="coerce")
    return (d.unit == "s") & (b > 0) & (d["median"] < BOUND_SLACK * b)


def _above_ceiling(r) -> list[str]:
    """MBU or MFU above 100%: the record moved more bytes (or FLOPs) per second than the measured ceiling."""
    out = []
    for k, what in (("mbu", "MBU"), ("mfu", "MFU")):
        v = r.get(k)
        if isinstance(v, (int, float, np.floating)) and np.isfinite(v) and v > 1:
            out.append(f"{what} {v:.1%} above 100% of the measured ceiling")
    return out


def below_bound(df) -> list[dict]:
    d = _ok(df)
    d = d[_below_mask(d)]
    return [_row("faster than its lower bound", r,
                 f"median {r['median'] * 1e3:.3g} ms < lower bound {r['bound_s'] * 1e3:.3g} ms: the cost model or "
                 "the measured ceiling is wrong for this record") for r in d.to_dict("records")]


def above_ceiling(df) -> list[dict]:
    """MBU or MFU above 100% in records that below_bound does not already name (within its slack, or no bound)."""
    d = _ok(df)
    d = d[~_below_mask(d)]
    return [_row("MBU or MFU above 100%", r, "; ".join(why) + ": faster than the measured ceiling allows")
            for r in d.to_dict("records") for why in [_above_ceiling(r)] if why]


# A record derived from a timed one (same run, configuration and shape) inherits its flag: tokens/s is
# batch / step time, so a step faster than its bound makes an impossible tokens/s too.
DERIVED_FROM = {"decode_tokens_per_s": "decode_step_time", "prefill_tokens_per_s": "prefill_time",
                "tokens_per_s": "generate_latency", "requests_per_s": "generate_latency"}


def record_flags(df) -> pd.Series:
    """Why each record cannot be a measurement as it stands ('' for none), indexed like df: faster than its
    lower bound, MBU or MFU above 100%, or derived from such a record. Claims are never judged on these."""
    why = [""] * len(df)
    if df.empty or "metric" not in df:
        return pd.Series(why, index=df.index, dtype=object)
    ok = (df.status == "ok").to_numpy() if "status" in df else np.ones(len(df), bool)
    below = _below_mask(df).to_numpy()
    recs = df.to_dict("records")  # positional: df's index may repeat (concatenated frames)
    for i, r in enumerate(recs):
        if ok[i]:
            why[i] = "; ".join(([f"faster than its lower bound: median {r['median'] * 1e3:.3g} ms < "
                                 f"{r['bound_s'] * 1e3:.3g} ms"] if below[i] else []) + _above_ceiling(r))
    keys = keys_in(df, [*CONFIG_KEYS, "run_id", "experiment", "batch", "prompt_len", "context_len", "new_tokens"])

    def key(r):
        return tuple(str(r[k]) for k in keys)  # str: NaN == NaN
    src = {(r["metric"], key(r)): w for r, w in zip(recs, why) if w}
    for i, r in enumerate(recs):
        f = src.get((DERIVED_FROM.get(r["metric"]), key(r)))
        if ok[i] and f and not why[i]:
            why[i] = f"from its {DERIVED_FROM[r['metric']]} record: {f}"
    return pd.Series(why, index=df.index, dtype=object)


def flagged_labels(df, flags: pd.Series) -> list[str]:
    """'<record> is flagged (<why>)' for each flagged record of df (a selection of the frame flags was computed
    on, whose index must be unique)."""
    f = flags.reindex(df.index).fillna("")
    return [f"{_label(r)} is flagged ({w})" for r, w in zip(df.to_dict("records"), f) if w]


def wide_ci(df) -> list[dict]:
    d = _ok(df)
    if "ci_low" not in d:
        return []
    d = d[d.ci_low.notna() & d.ci_high.notna() & (d["median"].abs() > 0)]
    d = d[(d.ci_high - d.ci_low) / d["median"].abs() > CI_SHARE]
    return [_row(WIDE_CI, r,
                 f"95% CI {r['ci_low']:.3g}–{r['ci_high']:.3g} is {(r['ci_high'] - r['ci_low']) / abs(r['median']):.0%} "
                 f"of the median {r['median']:.3g} (threshold {CI_SHARE:.0%})") for r in d.to_dict("records")]


def ratio_outside(ratios: pd.DataFrame) -> list[dict]:
    """Ratios (columns: what, ratio, ci_low, ci_high, low, high; optional flag) that cannot be measurements:
    below `low` beyond the CI (the larger model taking less time), or resting on a flagged record (`flag`).
    A ratio above `high` (the bytes ratio) is possible: the larger model may read at a lower rate (on a 2-core
    Xeon, eager 3B/1B 2.92 with MBU 0.54 vs 0.61), so it is not flagged (ratio_note says it)."""
    out = []
    for r in ratios.to_dict("records"):
        lo = r["ci_low"] if np.isfinite(r["ci_low"]) else r["ratio"]
        hi = r["ci_high"] if np.isfinite(r["ci_high"]) else r["ratio"]
        if hi < r["low"]:
            out.append({"check": "ratio outside its physical range", "where": r["what"], "run_id": None,
                        "detail": f"{r['ratio']:.3g} (95% CI {lo:.3g}–{hi:.3g}) below {r['low']:.3g}: "
                                  f"{r.get('why', '')}"})
        elif isinstance(r.get("flag"), str) and r["flag"]:
            out.append({"check": "ratio from a flagged record", "where": r["what"], "run_id": None,
                        "detail": f"{r['ratio']:.3g} (95% CI {lo:.3g}–{hi:.3g}) rests on {r['flag']}"})
    return out


def ratio_note(ratio, ci_low, ci_high, high, mbu_small, mbu_large) -> str:
    """'' unless the ratio lies above `high` (the bytes ratio) beyond its CI: then the larger model read its
    bytes at a lower rate than the smaller one, which is possible, and this says so with both MBUs."""
    lo = ci_low if np.isfinite(ci_low) else ratio
    if not (np.isfinite(high) and lo > high):
        return ""
    mbu = (f" (MBU {mbu_large:.2f} vs {mbu_small:.2f}, larger vs smaller)"
           if np.isfinite(mbu_small) and np.isfinite(mbu_large) else "")
    return f"above the bytes ratio {high:.2f}: the larger model reads at a lower rate{mbu}"


WIDE_CI = "wide confidence interval"


def listed(anomalies: pd.DataFrame, wide_shown: int = 40) -> tuple[pd.DataFrame, str]:
    """(rows to list, the line above them): every anomaly but a wide CI, then the first `wide_shown` wide CIs
    (the most common and least alarming kind: a busy machine makes hundreds); the line says how many were left out."""
    if anomalies.empty:
        return anomalies, "No anomaly found in these records."
    wide = anomalies.check == WIDE_CI
    left = max(0, int(wide.sum()) - wide_shown)
    rows = pd.concat([anomalies[~wide], anomalies[wide].head(wide_shown)])
    return rows, (f"{len(anomalies)} anomalies" + (f"; {left} of the {int(wide.sum())} wide confidence intervals are not "
                                                    "listed (`llmbench status` prints all)." if left else "."))


def check_all(df, ratios: pd.DataFrame | None = None) -> pd.DataFrame:
    if df is None or df.empty:
        return pd.DataFrame(columns=["check", "where", "detail", "run_id"])
    rows = ttft_not_increasing(df) + below_bound(df) + above_ceiling(df)
    if ratios is not None and len(ratios):
        rows += ratio_outside(ratios)
    rows += wide_ci(df)  # last: the most common and the least alarming
    return pd.DataFrame(rows, columns=["check", "where", "detail", "run_id"])


