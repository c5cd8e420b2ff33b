"""Anomaly checks computed from the records: numbers a reader should distrust before reading on.

Each check returns rows {check, where, detail}. The report shows them next to the numbers and
`llmbench status` prints them for a grid's finished runs. A check never edits a record; it points at it,
and at the disturbance the noise columns recorded for it, when there are such columns.
"""
import numpy as np
import pandas as pd

from llmbench.core.keys import CONFIG_KEYS
from llmbench.results.frame import load
from llmbench.results.ratios import physical_ratios

CI_SHARE = 0.5       # a 95% CI wider than half its median: the median is not a stable number
BOUND_SLACK = 0.98   # a median below 98% of its lower bound: faster than the cost model allows


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


def below_bound(df) -> list[dict]:
    d = _ok(df)
    if "bound_s" not in d or "unit" not in d:
        return []
    b = pd.to_numeric(d.bound_s, errors="coerce")
    d = d[(d.unit == "s") & (b > 0) & (d["median"] < BOUND_SLACK * b)]
    return [_row("faster than its lower bound", r,
                 f"median {r['median'] * 1e3:.3g} ms < lower bound {r['bound_s'] * 1e3:.3g} ms: the cost model or "
                 "the measured ceiling is wrong for this record") for r in d.to_dict("records")]


def wide_ci(df) -> list[dict]:
    d = _ok(df)
    if "ci_low" not in d:
        return []
    d = d[d.ci_low.notna() & d.ci_high.notna() & (d["median"].abs() > 0)]
    d = d[(d.ci_high - d.ci_low) / d["median"].abs() > CI_SHARE]
    return [_row("wide confidence interval", r,
                 f"95% CI {r['ci_low']:.3g}–{r['ci_high']:.3g} is {(r['ci_high'] - r['ci_low']) / abs(r['median']):.0%} "
                 f"of the median {r['median']:.3g} (threshold {CI_SHARE:.0%})") for r in d.to_dict("records")]


def ratio_outside(ratios: pd.DataFrame) -> list[dict]:
    """Ratios (columns: what, ratio, ci_low, ci_high, low, high) outside their physical range beyond the CI."""
    out = []
    for r in ratios.to_dict("records"):
        lo = r["ci_low"] if np.isfinite(r["ci_low"]) else r["ratio"]
        hi = r["ci_high"] if np.isfinite(r["ci_high"]) else r["ratio"]
        if hi < r["low"] or lo > r["high"]:
            out.append({"check": "ratio outside its physical range", "where": r["what"], "run_id": None,
                        "detail": f"{r['ratio']:.3g} (95% CI {lo:.3g}–{hi:.3g}) outside [{r['low']:.3g}, {r['high']:.3g}]: "
                                  f"{r.get('why', '')}"})
    return out


def check_all(df, ratios: pd.DataFrame | None = None) -> pd.DataFrame:
    if df is None or df.empty:
        return pd.DataFrame(columns=["check", "where", "detail", "run_id"])
    rows = ttft_not_increasing(df) + below_bound(df)
    if ratios is not None and len(ratios):
        rows += ratio_outside(ratios)
    rows += wide_ci(df)  # last: the most common and the least alarming
    return pd.DataFrame(rows, columns=["check", "where", "detail", "run_id"])


def status_lines(results_dir) -> list[str]:
    """One line per anomaly in a grid folder's finished runs (for `llmbench status`)."""
    df, _ = load(results_dir)
    if df.empty:
        return []
    a = check_all(df, physical_ratios(df))
    return [f"anomaly  {r.check}: {r.where}: {r.detail}" for r in a.itertuples()]
