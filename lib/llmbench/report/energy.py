"""The report's energy section, computed from the energy records (lib/llmbench/energy.py wrote them):
a table, J/token and tokens/J against batch for 1B and 3B, the 3B/1B ratio with a CI, a sentence
saying why where energy was not readable, and the checks of the seed's energy claims.

Tokens are generated tokens. TOPS/W is taken as useful FLOPs (the 2N of the cost model per generated
token) times tokens per joule: what the device achieved on this workload, not its rated efficiency.
"""
import numpy as np
import pandas as pd

from llmbench.core.stats import ratio_of_medians
from llmbench.report import figures as F
from llmbench.results import fmt, frame, ratios
from llmbench.results.energy import METRICS, SHAPE, _pairs, _stat, meter, not_readable, rows


def table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per study, configuration and shape: each energy metric as median (95% CI), and the meter."""
    d = rows(df)
    d = d[d.metric.isin(METRICS)]
    if d.empty:
        return pd.DataFrame()
    cfg = frame.config_keys(d)
    keys = ["study", *cfg, *SHAPE]
    out = []
    for k, g in d.groupby(keys, dropna=False, sort=True):
        r = dict(zip(keys, k))
        for m, label in METRICS.items():
            x = g[g.metric == m]
            if len(x):
                s = _stat(x)
                r[label] = fmt.fmt_ci(s["median"], s["ci_low"], s["ci_high"])
        r["meter"] = meter(g.note.iat[0])
        out.append(r)
    t = pd.DataFrame(out)
    for c in SHAPE:
        t[c] = t[c].astype("Int64")
    const = [c for c in cfg if c != "model" and t[c].nunique(dropna=False) <= 1]  # said once, in the text
    return t.drop(columns=const).dropna(axis=1, how="all")


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """large/small J per generated token at the same configuration and shape, with a bootstrap 95% CI."""
    p, out = frame.pair(df), []
    for key, s, l in _pairs(df, "energy_per_token"):
        r, lo, hi = ratio_of_medians(frame.pooled(s), frame.pooled(l))
        key.update({c: int(key[c]) for c in SHAPE if pd.notna(key[c])})
        out.append({**{k: v for k, v in key.items() if k not in ("device", "weights", "tokens")},
                    f"{p[0]} J/token": f"{np.median(frame.pooled(s)):.3g}",
                    f"{p[1]} J/token": f"{np.median(frame.pooled(l)):.3g}",
                    f"{p[1]}/{p[0]} J/token": fmt.fmt_ci(r, lo, hi), "_ratio": r, "_lo": lo, "_hi": hi})
    return pd.DataFrame(out)


def _sweep(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    d = rows(df, metric)
    sweep = d[d.study == "batch_sweep"] if "study" in d else d
    return sweep if len(sweep) else d


def figure(df: pd.DataFrame, figures_dir):
    """J/token and tokens/J against batch, one line per configuration (color: model); None without data."""
    plt = F.plt
    jt, tj = _sweep(df, "energy_per_token"), _sweep(df, "tokens_per_joule")
    if jt.empty:
        return None
    keys = ["model", *[k for k in frame.config_keys(jt, drop=("model",)) if jt[k].nunique() > 1]]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    labels = []
    for a, d in ((ax[0], jt), (ax[1], tj)):
        for k, g in d.groupby(keys, sort=True):
            k = k if isinstance(k, tuple) else (k,)
            cfg = dict(zip(keys, k))
            pts = pd.DataFrame([{"batch": b, **_stat(x)} for b, x in g.groupby("batch")]).sort_values("batch")
            label = " ".join(map(str, k))
            labels.append(label)
            a.errorbar(pts.batch, pts["median"], yerr=[(pts["median"] - pts.ci_low).clip(lower=0).fillna(0),
                                                       (pts.ci_high - pts["median"]).clip(lower=0).fillna(0)],
                       color=F.color(cfg["model"]), marker=F.MARKERS.get(cfg.get("quant"), "o"),
                       ls=F.ENGINE_LS.get(cfg.get("engine"), "-"), capsize=3, label=label)
        F.pow2_ticks(a, d.batch.dropna())
    ax[0].set(xlabel="batch size (requests)", ylabel="energy per generated token (J/token)", yscale="log",
              title="Energy per token (median, 95% CI)")
    ax[1].set(xlabel="batch size (requests)", ylabel="generated tokens per joule (tokens/J)", yscale="log",
              title="Tokens per joule (median, 95% CI)")
    F.legend_below(fig, ax)
    return F.save(fig, figures_dir, "energy_per_token", _alt(jt, keys, sorted(dict.fromkeys(labels))))


def _alt(jt: pd.DataFrame, keys, labels) -> str:
    batches = sorted({int(b) for b in jt.batch.dropna()})
    ends = []
    for b in sorted({batches[0], batches[-1]}):
        at = jt[jt.batch == b]
        vals = ", ".join(f"{' '.join(map(str, k if isinstance(k, tuple) else (k,)))} {_stat(g)['median']:.3g}"
                         for k, g in at.groupby(keys, sort=True))
        ends.append(f"at batch {b}: {vals} J/token")
    return (f"Two line charts against batch size ({', '.join(map(str, batches))}), log scales, with 95% confidence "
            f"bars, one line per configuration ({'; '.join(labels)}), one color per model. Left: energy per "
            f"generated token in joules; right: generated tokens per joule. Medians " + "; ".join(ends) + ".")


def text(df: pd.DataFrame) -> str:
    """What was measured and how, or why nothing was: every number from the records."""
    parts = []
    bad = not_readable(df)
    for (kind, name), g in bad.groupby(["device", "device_name"], dropna=False):
        reasons = sorted(set(g.status))
        parts.append(f"Energy was **not readable** on {name} ({kind}): {'; '.join(reasons)}. {len(g)} energy "
                     f"record{'s say' if len(g) != 1 else ' says'} so; no energy figure for this device is estimated "
                     "(from a TDP or otherwise).")
    d = rows(df, "energy_per_token")
    if d.empty and not parts:
        return "No energy records in these runs: no experiment that meters energy was run."
    if len(d):
        meters = sorted({meter(n) for n in d.note})
        parts.append(f"Energy per generated token was metered by {'; '.join(meters)}, over windows of many "
                     f"calls (each split into sub-windows, the samples behind each CI); {len(d)} configurations "
                     "and shapes.")
        rt = ratio_table(df)
        if len(rt):
            lo, hi = rt._ratio.min(), rt._ratio.max()
            span = f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}–{hi:.3g}"
            parts.append(f"The 3B spends {span} times the 1B's energy per token across "
                         f"{len(rt)} matched configurations and batch sizes (the weight-bytes ratio is "
                         f"{ratios.weight_ratio(*frame.pair(df)):.2f}).")
    idle = rows(df, "idle_power")
    for (kind, name), g in idle.groupby(["device", "device_name"], dropna=False):
        s = _stat(g)
        watts = fmt.fmt_ci(s["median"], s["ci_low"], s["ci_high"])
        parts.append(f"Idle draw of {name}, measured by 00_device: {watts} W "
                     f"({meter(g.note.iat[0])}); the *above idle* columns subtract it.")
    return " ".join(parts)


# --- the seed's energy claims (registered in claims.CHECKS) --------------------------------------------


