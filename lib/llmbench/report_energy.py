"""The report's energy section, computed from the energy records (lib/llmbench/energy.py wrote them):
a table, J/token and tokens/J against batch for 1B and 3B, the 3B/1B ratio with a CI, a sentence
saying why where energy was not readable, and the checks of the seed's energy claims.

Tokens are generated tokens. TOPS/W is taken as useful FLOPs (the 2N of the cost model per generated
token) times tokens per joule: what the device achieved on this workload, not its rated efficiency.
"""
import numpy as np
import pandas as pd

from . import costmodel as cm
from . import report as R
from .models import load_config
from .stats import ratio_of_medians, summarize

METRICS = {"energy_per_token": "J/token", "tokens_per_joule": "tokens/J", "energy_per_request": "J/request",
           "avg_power": "average W", "energy_per_token_above_idle": "J/token above idle",
           "avg_power_above_idle": "W above idle"}
SHAPE = ["batch", "prompt_len", "new_tokens"]


def rows(df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    d = R.ok(df, experiment="energy") if "experiment" in df else df.iloc[0:0]
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
    return summarize(R.pooled(g))


def table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per notebook, configuration and shape: each energy metric as median (95% CI), and the meter."""
    d = rows(df)
    d = d[d.metric.isin(METRICS)]
    if d.empty:
        return pd.DataFrame()
    cfg = R.config_keys(d)
    keys = ["notebook", *cfg, *SHAPE]
    out = []
    for k, g in d.groupby(keys, dropna=False, sort=True):
        r = dict(zip(keys, k))
        for m, label in METRICS.items():
            x = g[g.metric == m]
            if len(x):
                s = _stat(x)
                r[label] = R.fmt_ci(s["median"], s["ci_low"], s["ci_high"])
        r["meter"] = meter(g.note.iat[0])
        out.append(r)
    t = pd.DataFrame(out)
    for c in SHAPE:
        t[c] = t[c].astype("Int64")
    const = [c for c in cfg if c != "model" and t[c].nunique(dropna=False) <= 1]  # said once, in the text
    return t.drop(columns=const).dropna(axis=1, how="all")


def _pairs(df: pd.DataFrame, metric: str):
    """(config without model, shape, small rows, large rows) for every configuration both models ran."""
    p = R.pair(df)
    d = rows(df, metric)
    if not p or d.empty:
        return
    keys = [*R.config_keys(d, drop=("model",)), *SHAPE]
    for k, g in d.groupby(keys, dropna=False, sort=True):
        s, l = g[g.model == p[0]], g[g.model == p[1]]
        if len(s) and len(l):
            yield dict(zip(keys, k)), s, l


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """large/small J per generated token at the same configuration and shape, with a bootstrap 95% CI."""
    p, out = R.pair(df), []
    for key, s, l in _pairs(df, "energy_per_token"):
        r, lo, hi = ratio_of_medians(R.pooled(s), R.pooled(l))
        key.update({c: int(key[c]) for c in SHAPE if pd.notna(key[c])})
        out.append({**{k: v for k, v in key.items() if k not in ("device", "weights", "tokens")},
                    f"{p[0]} J/token": f"{np.median(R.pooled(s)):.3g}",
                    f"{p[1]} J/token": f"{np.median(R.pooled(l)):.3g}",
                    f"{p[1]}/{p[0]} J/token": R.fmt_ci(r, lo, hi), "_ratio": r, "_lo": lo, "_hi": hi})
    return pd.DataFrame(out)


def _sweep(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    d = rows(df, metric)
    sweep = d[d.notebook == "02_batch_sweep"] if "notebook" in d else d
    return sweep if len(sweep) else d


def figure(df: pd.DataFrame, figures_dir):
    """J/token and tokens/J against batch, one line per configuration (color: model); None without data."""
    from . import figures as F
    plt = F.plt
    jt, tj = _sweep(df, "energy_per_token"), _sweep(df, "tokens_per_joule")
    if jt.empty:
        return None
    keys = ["model", *[k for k in R.config_keys(jt, drop=("model",)) if jt[k].nunique() > 1]]
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
                         f"{R.weight_ratio(*R.pair(df)):.2f}).")
    idle = rows(df, "idle_power")
    for (kind, name), g in idle.groupby(["device", "device_name"], dropna=False):
        s = _stat(g)
        watts = R.fmt_ci(s["median"], s["ci_low"], s["ci_high"])
        parts.append(f"Idle draw of {name}, measured by 00_device: {watts} W "
                     f"({meter(g.note.iat[0])}); the *above idle* columns subtract it.")
    return " ".join(parts)


# --- the seed's energy claims (registered in claims.CHECKS) --------------------------------------------

def _no_energy(df) -> str:
    bad = sorted(set(not_readable(df).status))
    return f"a readable energy meter (here: {bad[0]})" if bad else "energy records of both models"


def energy_per_request(claim, ctx):
    """1B uses less energy per request: 3B/1B J/request above 1 at every matched configuration and batch."""
    from . import claims as C
    found = []
    for key, s, l in _pairs(ctx["df"], "energy_per_request"):
        found.append((key, *ratio_of_medians(R.pooled(s), R.pooled(l))))
    if not found:
        return {"value": "no energy per request of both models", "verdict": C.untestable(_no_energy(ctx["df"])),
                "basis": "measured", "why": ""}
    out = []
    for eng in sorted({str(k.get("engine")) for k, *_ in found}):
        mine = [(k, r, lo, hi) for k, r, lo, hi in found if str(k.get("engine")) == eng]
        # every CI above 1 supports, one wholly below 1 contradicts, one holding 1 leaves it open
        verdict, why = C.all_of([C.ci_verdict(r, lo, hi, 1.0) for _, r, lo, hi in mine])
        value = "; ".join(f"{k.get('dtype')} {k.get('quant')} batch {int(k['batch'])}: 3B/1B J/request "
                          f"{R.fmt_ci(r, lo, hi)}" for k, r, lo, hi in mine)
        out.append({"engine": eng, "value": value, "verdict": verdict, "basis": "measured",
                    "why": "; ".join(w for w in ("a ratio above 1 (its whole CI, where there is one) means the 1B "
                                                 "used less energy", why) if w)})
    return out


def tops_per_watt(claim, ctx):
    """On the NPU, 3B achieves a higher TOPS/W than 1B (its bigger matmuls keep the device busier)."""
    from . import claims as C
    d, p = rows(ctx["df"], "tokens_per_joule"), R.pair(ctx["df"])
    if d.empty or not p or not set(p) <= set(d.model):
        return {"value": "no tokens per joule of both models", "verdict": C.untestable(_no_energy(ctx["df"])),
                "basis": "measured", "why": ""}
    best = {m: max(_stat(g)["median"] for _, g in d[d.model == m].groupby(R.config_keys(d) + SHAPE, dropna=False))
            * cm.flops_per_token(load_config(m)) / 1e12 for m in p}
    value = ", ".join(f"{m}: best {v:.3g} TOPS/W (2N FLOPs per generated token x tokens/J)" for m, v in best.items())
    if ctx["kind"] != "npu":
        return C._not_here(ctx, value, "achieved TOPS/W here, for context")
    return {"value": value, "verdict": C._verdict(best[p[1]] > best[p[0]]), "basis": "measured",
            "why": "prefill and attention FLOPs are left out, the same way for both models"}


def quant_energy_gap(claim, ctx):
    """Quantization narrows the energy gap: the 3B/1B J/token ratio is smaller quantized than not."""
    from . import claims as C
    ratios = {}
    for key, s, l in _pairs(ctx["df"], "energy_per_token"):
        ratios[tuple((k, v) for k, v in key.items() if k != "quant"), key.get("quant")] = \
            ratio_of_medians(R.pooled(s), R.pooled(l))
    base = {k: v for (k, q), v in ratios.items() if q == "none"}
    pairs = [(dict(k), q, v, base[k]) for (k, q), v in ratios.items() if q != "none" and k in base]
    if not pairs:
        why = _no_energy(ctx["df"]) if not ratios else "energy of both models with and without quantization"
        return {"value": "no matched quantized and unquantized energy records", "verdict": C.untestable(why),
                "basis": "measured", "why": ""}
    value = "; ".join(f"{k.get('dtype')} {k.get('engine')} batch {int(k['batch'])}: 3B/1B J/token {qn} "
                      f"{R.fmt_ci(*q)} vs none {R.fmt_ci(*n)}" for k, qn, q, n in pairs)
    verdict, why = C.all_of([_narrower(q, n) for _, _, q, n in pairs])
    return {"value": value, "verdict": verdict, "basis": "measured",
            "why": "; ".join(w for w in ("the two ratios' CIs compared at the same dtype, engine and batch", why) if w)}


def _narrower(q, n) -> tuple[str, str]:
    """Quantized ratio q against unquantized n, each (ratio, ci_low, ci_high): smaller only if q's CI lies
    wholly below n's, larger only if wholly above; overlapping CIs cannot tell."""
    from . import claims as C
    (qr, qlo, qhi), (nr, nlo, nhi) = q, n
    if not all(np.isfinite(x) for x in (qlo, qhi, nlo, nhi)):
        return C._verdict(qr < nr), "no CI (too few samples): medians compared"
    if qhi < nlo:
        return C.SUPPORTED, ""
    if qlo > nhi:
        return C.CONTRADICTED, ""
    return (f"{C.INCONCLUSIVE}: CI {qlo:.3g}-{qhi:.3g} (quantized) overlaps CI {nlo:.3g}-{nhi:.3g} (none)",
            "overlapping CIs support neither a narrower nor a wider gap")


CLAIM_CHECKS = {f.__name__: f for f in (energy_per_request, tops_per_watt, quant_energy_gap)}
