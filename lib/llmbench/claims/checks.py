"""Check each quantitative claim of the seed document against measured, derived or bounded numbers.

data/claims.yaml holds the claims (short quote, English gloss, the numbers claimed, which device the
claim is about) and each claim's rule: what is compared, with which tolerance, and why. The rule is
shown in the report's table. CHECKS maps a claim's `check` name to a function below. Verdicts:
- supported / contradicted: the rule applied to measured (or derived) numbers;
- contradicted by a physical bound: the claimed speed exceeds what the device's published peak
  allows under the most generous reading of the claim, so no measurement is needed;
- not testable: needs <input>: the missing input is named (an Ascend 910, real weights, a 16-bit run);
- inconclusive: CI a-b ...: a ratio's 95% CI straddles a bound of the claimed range (or is wider than
  the range): supported needs the CI inside the range, contradicted needs it wholly outside;
- not judged: <why>: the value would rest on a record the anomaly checks flag (faster than its lower
  bound, MBU above 100%, a ratio below 1) and no unflagged record answers the claim, or the engine is
  dispatch-bound (decode MBU below results/anomalies.DISPATCH_MBU), so its 3B/1B ratio measures the host,
  not the models.
`basis` says where the value came from: measured (these runs), derived (cost model on the exact
configs), bound (cost model on a published spec), or published.
"""
from dataclasses import dataclass

import numpy as np
import pandas as pd
import yaml

from llmbench.core import paths
from llmbench.core.stats import ratio_of_medians
from llmbench.measure.ceilings import load_specs
from llmbench.model import costmodel as cm
from llmbench.model.models import describe_model, is_real, load_config
from llmbench.results import anomalies as A
from llmbench.results import fmt, frame, ratios

SUPPORTED, CONTRADICTED = "supported", "contradicted"
BOUND = "contradicted by a physical bound"
UNTESTABLE = "not testable"
INCONCLUSIVE = "inconclusive"
NOT_JUDGED = "not judged"
MODELS = ("llama-3.2-1b", "llama-3.2-3b")
SIXTEEN = ("bf16", "fp16")



@dataclass(frozen=True)
class ClaimContext:
    """What every claim check reads (claims.check_all builds it)."""
    df: pd.DataFrame                  # the records a verdict may rest on: the unflagged ones
    kind: str                         # the records' device kind: npu | cuda | cpu
    pair: tuple | None                # (small, large) model names both measured, else None
    proj: pd.DataFrame | None = None  # the cost model's projection (report.sections.projection)
    all: pd.DataFrame | None = None   # every record, flagged ones included (None: df is all of them)
    flags: pd.Series | None = None    # why each record of `all` is flagged ('' for none)

def untestable(needs: str) -> str:
    return f"{UNTESTABLE}: needs {needs}"


def load_claims(path=None) -> list[dict]:
    return yaml.safe_load((path or paths.CLAIMS).read_text())["claims"]


def _verdict(ok: bool) -> str:
    return SUPPORTED if ok else CONTRADICTED


def _inside(x, lo, hi) -> bool:
    return lo <= x <= hi


def ci_verdict(r, lo_ci, hi_ci, lo, hi=float("inf")) -> tuple[str, str]:
    """(verdict, why) of a ratio with a 95% CI against a claimed range [lo, hi] (hi = inf: "above lo").
    Supported only if the CI lies inside the range, contradicted only if it lies wholly outside; a CI that
    straddles a bound is inconclusive (a CI wider than the range always does, unless it lies outside)."""
    if lo_ci is None or not (np.isfinite(lo_ci) and np.isfinite(hi_ci)):
        return _verdict(_inside(r, lo, hi)), "no CI (too few samples): judged on the median alone"
    if lo <= lo_ci and hi_ci <= hi:
        return SUPPORTED, ""
    if hi_ci < lo or lo_ci > hi:
        return CONTRADICTED, ""
    reasons = [f"is wider than the claimed range {lo:g}-{hi:g}"] if np.isfinite(hi) and hi_ci - lo_ci > hi - lo else []
    straddled = [b for b, inside in ((lo, lo_ci < lo <= hi_ci), (hi, lo_ci <= hi < hi_ci)) if np.isfinite(b) and inside]
    reasons.append(f"straddles the claimed bound{'s' if len(straddled) > 1 else ''} "
                   + " and ".join(f"{b:g}" for b in straddled))
    return (f"{INCONCLUSIVE}: CI {lo_ci:.3g}-{hi_ci:.3g} " + " and ".join(reasons),
            "the CI holds values on both sides of a bound, so these samples support neither verdict")


def all_of(verdicts: list[tuple[str, str]]) -> tuple[str, str]:
    """One (verdict, why) for a claim that must hold at every point: contradicted if any point is, supported
    if all are, else the first inconclusive one."""
    for want in (CONTRADICTED, INCONCLUSIVE):
        hit = [v for v in verdicts if v[0].startswith(want)]
        if hit:
            return hit[0]
    return SUPPORTED, next((w for _, w in verdicts if w), "")


def not_judged(why: str) -> str:
    return f"{NOT_JUDGED}: {why}"


def _all(ctx) -> pd.DataFrame:
    """Every record, flagged ones included (ctx.df holds only the unflagged ones)."""
    return ctx.df if ctx.all is None else ctx.all


def _flagged(ctx, sel) -> list[str]:
    """'<record> is flagged (<why>)' for the flagged records of a selection of _all(ctx)."""
    return A.flagged_labels(sel, ctx.flags) if ctx.flags is not None else []


def _excluded(labels: list[str], shown=2) -> str:
    if not labels:
        return ""
    more = f" and {len(labels) - shown} more" if len(labels) > shown else ""
    return "; not counted: " + "; ".join(labels[:shown]) + more


def _dispatch_bound(mbus: dict) -> str:
    """'' unless a side's decode MBU is below A.DISPATCH_MBU: then the label and why the ratio measures the host."""
    label = A.dispatch_bound(mbus)
    return f"{label}: {A.DISPATCH_WHY}" if label else ""


def _keyed(t: pd.DataFrame, keys) -> pd.Series:
    """One string per row for its configuration (NaN-safe: groupby keys compare by their text)."""
    return t[keys].astype(str).agg("|".join, axis=1) if len(t) else pd.Series([], dtype=str)


def _has_pair(ctx) -> bool:
    return ctx.pair == MODELS


def _npu_needed(ctx) -> str:
    return untestable(f"an Ascend NPU (the claim is about one; these runs are on {ctx.kind})")


def _not_here(ctx, value: str, why="") -> dict:
    return {"value": value, "verdict": _npu_needed(ctx), "basis": "measured here, for context", "why": why}


def flops_per_token(claim, ctx):
    got = {m: cm.flops_per_token(load_config(m)) for m in MODELS}
    exp = claim["expected"]
    ok = all(abs(got[m] / exp[r] - 1) <= claim["tolerance"] for m, r in zip(MODELS, ("small", "large")))
    return {"value": f"1B {got[MODELS[0]]:.3g}, 3B {got[MODELS[1]]:.3g} FLOPs/token (2N; attention adds "
                     f"{cm.attention_flops_per_pair(load_config(MODELS[0])):.3g} and "
                     f"{cm.attention_flops_per_pair(load_config(MODELS[1])):.3g} per context token)",
            "verdict": _verdict(ok), "basis": "derived from the exact configs",
            "why": "the seed counts N FLOPs per token; a multiply-add is 2 FLOPs, so a forward pass is 2N"}


def _best_tpot(ctx, quantized: bool, df=None) -> dict:
    d = frame.ok(ctx.df if df is None else df, metric="tpot", batch=1)
    d = d[d.quant != "none"] if quantized else d
    return {m: d[d.model == m]["median"].min() for m in MODELS if (d.model == m).any()}


def _bound_tpot(ctx, model) -> float:
    p = ctx.proj
    p = p[(p.model == model) & (p._key == "ascend-910a")] if len(p) else p
    return float(p._tpot_s.min()) if len(p) else float("nan")


def latency_range(claim, ctx):
    best = _best_tpot(ctx, quantized=True)
    here = ", ".join(f"{m}: {fmt.fmt_time(v)}" for m, v in best.items()) or "no unflagged quantized TPOT measured"
    q = frame.ok(_all(ctx), metric="tpot", batch=1)
    flagged = _flagged(ctx, q[q.quant != "none"])
    rng = claim["range"]
    bounds = {m: _bound_tpot(ctx, m) for m in MODELS}
    bound_txt = ", ".join(f"{m} {fmt.fmt_time(b)}" for m, b in bounds.items())
    # a claimed latency below the projection's lower bound (the fastest it can be) is impossible
    below = [m for m, r in zip(MODELS, ("small", "large")) if np.isfinite(bounds[m]) and rng[r][1] < bounds[m]]
    value = (f"best quantized TPOT here: {here}{_excluded(flagged)}; lower bounds on an Ascend 910 (int8 weights): "
             f"{bound_txt}")
    if below:
        return {"value": value, "verdict": BOUND, "basis": "bound (published spec)",
                "why": f"the whole claimed range lies below the lower bound for {', '.join(below)}"}
    if ctx.kind != "npu":
        return _not_here(ctx, value, "the claimed range is above the lower bound, so only a measurement can judge it")
    if len(best) < 2:
        verdict = not_judged(flagged[0]) if flagged and len(_best_tpot(ctx, True, _all(ctx))) == 2 \
            else untestable("a quantized TPOT of both models")
        return {"value": value, "verdict": verdict, "basis": "measured", "why": ""}
    ok = _inside(best[MODELS[0]], *rng["small"]) and _inside(best[MODELS[1]], *rng["large"])
    return {"value": value, "verdict": _verdict(ok), "basis": "measured", "why": ""}


def _ratio_rows(ctx, metric="TPOT", df=None):
    t = ratios.ratio_table(ctx.df if df is None else df)
    return t[t.metric == metric] if len(t) else t


def tpot_ratio(claim, ctx):
    """One verdict per engine (and dtype): the ratio depends on how much of a step is fixed cost. The ratio
    at the smallest context whose records are unflagged and not below 1 decides, by its CI; a dispatch-bound
    engine is not judged. Where the pair experiment ran, ratios.ratio_table gives only its side-by-side
    ratio for that configuration, so the verdict rests on it; the value names its source."""
    t = _ratio_rows(ctx, df=_all(ctx))
    if not _has_pair(ctx) or t.empty:
        return {"value": "no TPOT of both 1B and 3B", "verdict": untestable("batch-1 TPOT of both models"),
                "basis": "measured", "why": ""}
    lo, hi = claim["range"]
    keys = [k for k in ("engine", "dtype", "quant") if k in t]
    clean = _ratio_rows(ctx) if (t.flag != "").any() and ctx.flags is not None else t
    clean = clean[clean.flag == ""] if len(clean) else clean
    ck = _keyed(clean, keys)
    out = []
    for _, g in t.groupby(keys, dropna=False):
        first = g.loc[g.tokens.idxmin()]
        cand = clean[ck == _keyed(g.iloc[:1], keys).iat[0]].sort_values("tokens") if len(clean) else clean
        hi_ci = cand.ci_high.where(np.isfinite(cand.ci_high), cand.ratio) if len(cand) else cand
        below = cand[hi_ci < 1] if len(cand) else cand
        cand = cand[hi_ci >= 1] if len(cand) else cand
        r = cand.iloc[0] if len(cand) else first
        value = (f"3B/1B TPOT = {fmt.fmt_ci(r.ratio, r.ci_low, r.ci_high)} ({r.get('engine', 'eager')}, {r['dtype']}, "
                 f"context {int(r['tokens'])}; {r.get('source') or ratios.CROSS_POINT}); weight-bytes ratio "
                 f"{ratios.weight_ratio(*MODELS):.2f}")
        mbus = {m: r.get(f"{m} MBU", float("nan")) for m in MODELS}
        if all(np.isfinite(v) for v in mbus.values()):
            value += "; decode MBU " + ", ".join(f"{m} {v:.0%}" for m, v in mbus.items())
        skipped = []
        if first.flag:
            skipped.append(first.flag)
        skipped += [f"the 3B/1B TPOT ratio at context {int(b.tokens)} is flagged "
                    f"({fmt.fmt_ci(b.ratio, b.ci_low, b.ci_high)} below 1: the larger model cannot take less time)"
                    for b in below.itertuples() if b.tokens <= r.tokens]
        if not len(cand):
            value += " [flagged: see verdict]"
        if claim["device"] == "npu" and ctx.kind != "npu":
            res = _not_here(ctx, value)
        elif not len(cand):
            res = {"value": value, "verdict": not_judged("; ".join(skipped)), "basis": "measured",
                   "why": "no unflagged record of this engine answers the claim"}
        elif _dispatch_bound(mbus):
            res = {"value": value, "verdict": not_judged(f"{r.get('engine', 'eager')} ({r['dtype']}) is "
                                                         + _dispatch_bound(mbus)),
                   "basis": "measured", "why": "excluded from ratio verdicts about the models"}
        else:
            verdict, why = ci_verdict(r.ratio, r.ci_low, r.ci_high, lo, hi)
            notes = [w for w in (why, A.ratio_note(r.ratio, r.ci_low, r.ci_high, r["work ratio"], *mbus.values()))
                     if w]
            if skipped:
                notes.append(f"judged at context {int(r.tokens)}, the smallest whose records are unflagged: "
                             + "; ".join(skipped))
            res = {"value": value, "verdict": verdict, "basis": "measured", "why": "; ".join(notes)}
        out.append({**res, "engine": r.get("engine")})
    return out


def _request_bounds(model, spec_key, prompt, new, batch) -> dict:
    """Upper bounds on requests/s on one published device spec at the claim's batch, int8 weights at the
    int8 peak (the claims are about quantized models), for two readings of "request"."""
    spec = load_specs()[spec_key]
    cfg = load_config(model)
    peak = (spec["peak_TFLOPS"].get("int8") or spec["peak_TFLOPS"]["fp16"]) * 1e12
    bw = spec["bandwidth_GBps"] * 1e9
    wb = cm.dense_weight_bytes(cfg, 1)
    pre = cm.bound_s(cm.prefill_flops(cfg, batch, prompt), cm.prefill_bytes(cfg, wb, batch, prompt, "bf16"), peak, bw)
    step = cm.bound_s(cm.decode_flops(cfg, batch, prompt + new // 2),
                      cm.decode_bytes(cfg, wb, batch, prompt + new // 2, "bf16"), peak, bw)
    return {"prefill-only": batch / pre, "full": batch / (pre + new * step)}


def throughput_range(claim, ctx):
    """A claimed rate above the device's upper bound is contradicted without a measurement. The verdict uses
    the reading named in the claim's rule; the other reading is shown beside it."""
    d = frame.ok(ctx.df, study="batch_sweep", metric="requests_per_s")
    flagged = _flagged(ctx, frame.ok(_all(ctx), study="batch_sweep", metric="requests_per_s"))
    here = ", ".join(f"{m}: {d[d.model == m]['median'].max():.3g} requests/s" for m in MODELS if (d.model == m).any())
    req, reading, spec = claim["request"], claim["reading"], claim.get("spec", "ascend-910a")
    parts, impossible = [], []
    for m, r in zip(MODELS, ("small", "large")):
        b = _request_bounds(m, spec, req["prompt"], req["new"], claim["batch"][r])
        parts.append(f"{m} at batch {claim['batch'][r]}: at most {b['full']:.3g} requests/s for a {req['prompt']}-token "
                     f"prompt and {req['new']} generated tokens, {b['prefill-only']:.3g} if a request were only its "
                     f"prefill (claimed {claim['range'][r][0]:g}-{claim['range'][r][1]:g})")
        if claim["range"][r][0] > b[reading]:
            impossible.append(m)
    value = (f"Upper bounds on the {load_specs()[spec]['name']} (int8 peak and int8 weights): " + "; ".join(parts)
             + f". Best here: {here or 'none unflagged'}{_excluded(flagged)}.")
    if impossible:
        return {"value": value, "verdict": BOUND, "basis": "bound (published spec)",
                "why": f"the claimed range's low end exceeds the '{reading}' bound for {', '.join(impossible)}"}
    if ctx.kind != "npu":
        return _not_here(ctx, value, "the claimed range is within the bound, so only a measurement can judge it")
    if flagged and not all((d.model == m).any() for m in MODELS):
        return {"value": value, "verdict": not_judged(flagged[0]), "basis": "measured",
                "why": "no unflagged record answers the claim"}
    ok = all((d.model == m).any() and _inside(d[d.model == m]["median"].max(), *claim["range"][r])
             for m, r in zip(MODELS, ("small", "large")))
    return {"value": value, "verdict": _verdict(ok), "basis": "measured", "why": ""}


def throughput_ratio(claim, ctx):
    """1B/3B decode tokens/s per engine and dtype at the largest batch both models ran with unflagged records,
    judged by its CI; a dispatch-bound step there (decode MBU below A.DISPATCH_MBU) is not judged."""
    a = frame.ok(_all(ctx), study="batch_sweep", quant="none")
    metric = "decode_tokens_per_s" if (a.metric == "decode_tokens_per_s").any() else "tokens_per_s"
    a = a[a.metric == metric]
    if not _has_pair(ctx) or a.empty:
        return {"value": "no batch sweep of both models", "verdict": untestable("a batch sweep of both models"),
                "basis": "measured", "why": ""}
    d = frame.ok(ctx.df, study="batch_sweep", quant="none")
    steps, d = d[d.metric == A.DERIVED_FROM[metric]], d[d.metric == metric]  # the step times behind tokens/s
    keys = [k for k in ("engine", "dtype") if k in a]
    dk, sk = _keyed(d, keys), _keyed(steps, keys)
    lo_c, hi_c = claim["range"]
    out = []
    for key, ga in a.groupby(keys, dropna=False):
        name = " ".join(map(str, key if isinstance(key, tuple) else (key,)))
        engine = ga.engine.iat[0] if "engine" in ga else None
        k = _keyed(ga.iloc[:1], keys).iat[0]
        g, st = (d[dk == k] if len(d) else d), (steps[sk == k] if len(steps) else steps)
        common = set.intersection(*(set(g[g.model == m].batch) for m in MODELS))  # unflagged
        common_all = set.intersection(*(set(ga[ga.model == m].batch) for m in MODELS))
        if not common_all:
            continue
        b = max(common or common_all)
        src = g if common else ga
        l, s = (frame.repeats(src[(src.model == m) & (src.batch == b)]) for m in (MODELS[1], MODELS[0]))
        r, lo, hi = ratio_of_medians(l, s)  # median(s) / median(l): 1B over 3B tokens/s
        value = f"1B/3B {metric.replace('_', ' ')} at batch {int(b)}: {fmt.fmt_ci(r, lo, hi)} ({name})"
        mbus = {m: st[(st.model == m) & (st.batch == b)].mbu.median() if len(st) else float("nan") for m in MODELS}
        skipped = _flagged(ctx, ga[ga.batch > b] if common else ga[ga.batch == b])
        if not common:
            res = {"value": value + " [flagged: see verdict]", "verdict": not_judged("; ".join(skipped[:2])),
                   "why": "no unflagged record of this engine answers the claim"}
        elif (hi if np.isfinite(hi) else r) < 1:
            res = {"value": value, "verdict": not_judged(f"the 1B/3B ratio at batch {int(b)} is flagged (below 1: the "
                                                         "larger model cannot decode faster)"), "why": ""}
        elif _dispatch_bound(mbus):
            res = {"value": value, "verdict": not_judged(f"{name} is " + _dispatch_bound(mbus)),
                   "why": "excluded from ratio verdicts about the models"}
        else:
            verdict, why = ci_verdict(r, lo, hi, lo_c, hi_c)
            if skipped:
                why = "; ".join(w for w in (why, f"judged at batch {int(b)}, the largest whose records are "
                                                 "unflagged: " + "; ".join(skipped[:2])) if w)
            res = {"value": value, "verdict": verdict, "why": why}
        out.append({**res, "basis": "measured", "engine": engine})
    return out or {"value": "no batch size ran for both models", "verdict": untestable("a batch that ran for both models"),
                   "basis": "measured", "why": ""}


def memory_range(claim, ctx):
    rng = claim["range"]
    derived = {m: cm.dense_weight_bytes(load_config(m), 2) for m in MODELS}
    peak = frame.ok(ctx.df, study="latency", metric="peak_memory", quant="none")
    here = "; ".join(f"{m} {dt}: peak {fmt.fmt_gb(g['median'].max())}"
                     for (m, dt), g in peak.groupby(["model", "dtype"]) if m in MODELS)
    ok = all(_inside(derived[m], *rng[r]) for m, r in zip(MODELS, ("small", "large")))
    return {"value": f"16-bit weights: 1B {fmt.fmt_gb(derived[MODELS[0]])}, 3B {fmt.fmt_gb(derived[MODELS[1]])}. "
                     f"Measured peak here: {here or 'no peak-memory records'}",
            "verdict": _verdict(ok), "basis": "derived (16-bit weights, the seed's deployment precision)", "why": ""}


def memory_ratio(claim, ctx):
    peak = frame.ok(ctx.df, metric="peak_memory", quant="none", batch=1)
    lo, hi = claim["range"]
    rows = []
    for key, g in peak.groupby([k for k in ("engine", "dtype", "experiment", "prompt_len", "context_len") if k in peak],
                               dropna=False):
        got = {m: g[g.model == m]["median"].max() for m in MODELS if (g.model == m).any()}
        if len(got) == 2:
            rows.append((got[MODELS[1]] / got[MODELS[0]], key))
    share = {m: describe_model(m)["embedding_share"] for m in MODELS}
    weights = f"weight-bytes ratio {ratios.weight_ratio(*MODELS):.2f} (the 1B spends {share[MODELS[0]]:.0%} of its " \
              f"parameters on the embedding, the 3B {share[MODELS[1]]:.0%})"
    if not rows:
        return {"value": weights, "verdict": untestable("peak memory of both models at one shape"),
                "basis": "derived", "why": ""}
    rs = [x[0] for x in rows]
    return {"value": f"measured 3B/1B peak-memory ratio {min(rs):.2f}–{max(rs):.2f} over {len(rs)} shapes; {weights}",
            "verdict": _verdict(all(_inside(x, lo, hi) for x in rs)), "basis": "measured (peak memory, same shape)",
            "why": ""}


def _speedups(ctx, df=None):
    """Per model and int8/int4 method: TPOT speed-up against the 16-bit and the fp32 baselines, where both
    exist (same model and engine, batch 1, smallest context). Where a quant pair ran (05_pairs, quant none
    versus the method at one dtype) its rounds give the speed-up against that dtype; otherwise the two
    records of the quantization notebook, labelled by ratios.run_source. `<dtype> source` says which."""
    src = ctx.df if df is None else df
    paired = ratios.paired_speedups(src)
    d = frame.ok(src, metric="tpot", batch=1)
    d = d[d.experiment != "pair"] if "experiment" in d else d
    out = []
    for (model, engine), g in d.groupby(["model", "engine"]) if "engine" in d else d.groupby(["model", d.model]):
        base = {dt: g[(g.quant == "none") & (g.dtype == dt)] for dt in ("fp32", *SIXTEEN)}
        for (q, dt), m in g[g.quant != "none"].groupby(["quant", "dtype"]):
            m = m[m.context_len == m.context_len.min()]
            row = {"model": model, "engine": engine, "method": q, "dtype": dt}
            for bdt, b in base.items():
                b = b[b.context_len == m.context_len.iat[0]]
                if len(b):
                    row[bdt] = ratio_of_medians(frame.repeats(m), frame.repeats(b))
                    row[f"{bdt} source"] = ratios.run_source(m, b)
            out.append(row)
    for (model, engine, dt, q), (r, lo, hi, _, source) in paired.items():  # df's pairs have no flagged side
        row = next((x for x in out if (x["model"], x["engine"], x["method"], x["dtype"]) == (model, engine, q, dt)),
                   None)
        if row is None:
            row = {"model": model, "engine": engine, "method": q, "dtype": dt}
            out.append(row)
        row[dt], row[f"{dt} source"] = (r, lo, hi), source
    return out


def quant_speedup(claim, ctx):
    lo, hi = claim["range"]
    rows = _speedups(ctx)
    flagged = _flagged(ctx, frame.ok(_all(ctx), metric="tpot", batch=1))
    if not rows:
        if flagged and _speedups(ctx, _all(ctx)):
            return {"value": "every quantized speed-up rests on a flagged record [flagged: see verdict]",
                    "verdict": not_judged(flagged[0]), "basis": "measured", "why": ""}
        return {"value": "no quantized TPOT measured", "verdict": untestable("a quantized run"), "basis": "measured",
                "why": ""}
    def txt(r):
        parts = [f"{fmt.fmt_ci(*r[b])}x vs {b} ({r[b + ' source']})" for b in ("bf16", "fp16", "fp32") if b in r]
        return f"{r['model']} {r['method']} ({r['engine']}): " + ", ".join(parts)
    value = "; ".join(txt(r) for r in rows) + _excluded(flagged)
    sixteen = [r for r in rows if any(b in r for b in SIXTEEN)]
    if not sixteen:
        if flagged and any(b in r for r in _speedups(ctx, _all(ctx)) for b in SIXTEEN):
            return {"value": value + " [flagged: see verdict]", "verdict": not_judged(flagged[0]),
                    "basis": "measured", "why": "no unflagged record gives a speed-up against 16-bit"}
        return {"value": value, "verdict": untestable("a 16-bit baseline on this device (the seed reasons from FP16; "
                                                       "only fp32 ran here, so the speed-ups above are against fp32)"),
                "basis": "measured", "why": ""}
    r, b = max(((r, b) for r in sixteen for b in SIXTEEN if b in r), key=lambda x: x[0][x[1]][0])
    best = r[b]  # (ratio, ci_low, ci_high)
    verdict, why = ci_verdict(*best, lo, hi)
    return {"value": value, "verdict": verdict, "basis": "measured",
            "why": "; ".join(w for w in (f"best speed-up against 16-bit: {fmt.fmt_ci(*best, fmt=lambda x: f'{x:.2f}')}x "
                                         f"({r['model']} {r['method']}, {r['engine']}; {r[b + ' source']})", why) if w)}


def quant_robustness(claim, ctx):
    d = frame.ok(ctx.df, metric="kl_mean")
    trained = sorted(set(d[d.weights.map(is_real).astype(bool) & ~d.model.isin(MODELS)].model))  # e.g. smollm2-135m
    d = d[d.model.isin(MODELS)]
    if d.empty or not d.weights.map(is_real).astype(bool).all() or set(d.model) != set(MODELS):
        value = "fidelity of Llama 3.2 measured on synthetic weights only" if len(d) else "no Llama 3.2 fidelity records"
        if trained:
            value += f"; the fidelity measurement ran on the trained {', '.join(trained)} (see the trained-model section)"
        return {"value": value,
                "verdict": untestable("real weights of both models (random weights have no outlier channels, which "
                                      "are what quantization errors depend on in real LLMs)"),
                "basis": "measured", "why": ""}
    kl = d.groupby(["quant", "model"])["median"].min().unstack()
    ok = all(kl.loc[q, MODELS[1]] < kl.loc[q, MODELS[0]] for q in kl.index if kl.loc[q].notna().all())
    return {"value": "; ".join(f"{q}: KL 1B {kl.loc[q, MODELS[0]]:.2e}, 3B {kl.loc[q, MODELS[1]]:.2e}" for q in kl.index),
            "verdict": _verdict(ok), "basis": "measured (real weights)", "why": ""}


def utilization(claim, ctx):
    """The best decode MBU and prefill MFU of unflagged records; a flagged record's figure (MBU above 100%)
    is shown only beside its flag."""
    d = frame.ok(ctx.df, study="latency", quant="none")
    a = frame.ok(_all(ctx), study="latency", quant="none")
    flagged = _flagged(ctx, a[a.metric.isin(["tpot", "ttft"])])
    mbu = d[d.metric == "tpot"].mbu.max()
    mfu = d[d.metric == "ttft"].mfu.max()
    pct = [f"{x:.1%}" if np.isfinite(x) else "n/a (no unflagged record)" for x in (mbu, mfu)]
    value = (f"best decode MBU {pct[0]}, best prefill MFU {pct[1]} (against this device's measured ceilings)"
             + _excluded(flagged))
    if ctx.kind != "npu":
        return _not_here(ctx, value)
    best = [x for x in (mbu, mfu) if np.isfinite(x)]
    if not best:
        verdict = not_judged(flagged[0]) if flagged else untestable("a decode or prefill record with MBU/MFU")
        return {"value": value, "verdict": verdict, "basis": "measured", "why": ""}
    return {"value": value, "verdict": _verdict(_inside(max(best), *claim["range"])), "basis": "measured", "why": ""}


def device_peak(claim, ctx):
    spec = load_specs()[claim["spec"]]
    pub = spec["peak_TFLOPS"]["fp16"]
    c = frame.ok(ctx.df, experiment="ceiling", metric="matmul_throughput", dtype="fp16")
    if ctx.kind == "npu" and len(c) and "910a" in str(c.device_name.iat[0]).lower().replace(" ", ""):
        got = c["median"].max() / 1e3
        return {"value": f"measured fp16 matmul {got:.3g} TFLOP/s", "verdict": _verdict(got >= 0.8 * claim["expected_TFLOPS"]),
                "basis": "measured", "why": ""}
    return {"value": f"published spec: {pub} TFLOPS fp16 ({spec['source']})",
            "verdict": untestable(f"an Ascend 910 (910A) to measure on; these runs are on {ctx.kind}"),
            "basis": "published (not measured)", "why": ""}


CHECKS = {f.__name__: f for f in (flops_per_token, latency_range, tpot_ratio, throughput_range, throughput_ratio,
                                  memory_range, memory_ratio, quant_speedup, quant_robustness, utilization,
                                  device_peak)}
