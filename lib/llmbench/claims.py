"""Check each quantitative claim of the seed document against measured, derived or bounded numbers.

data/claims.yaml holds the claims (short quote, English gloss, the numbers claimed, which device the
claim is about) and each claim's rule: what is compared, with which tolerance, and why. The rule is
shown in the report's table. CHECKS maps a claim's `check` name to a function below. Verdicts:
- supported / contradicted: the rule applied to measured (or derived) numbers;
- contradicted by a physical bound: the claimed speed exceeds what the device's published peak
  allows under the most generous reading of the claim, so no measurement is needed;
- not testable: needs <input>: the missing input is named (an Ascend 910, real weights, a 16-bit run).
`basis` says where the value came from: measured (these runs), derived (cost model on the exact
configs), bound (cost model on a published spec), or published.
"""
import numpy as np
import yaml

from . import costmodel as cm
from . import paths
from . import report as R
from .models import describe_model, is_real, load_config
from .stats import ratio_of_medians

SUPPORTED, CONTRADICTED = "supported", "contradicted"
BOUND = "contradicted by a physical bound"
UNTESTABLE = "not testable"
MODELS = ("llama-3.2-1b", "llama-3.2-3b")
SIXTEEN = ("bf16", "fp16")


def untestable(needs: str) -> str:
    return f"{UNTESTABLE}: needs {needs}"


def load_claims(path=None) -> list[dict]:
    return yaml.safe_load((path or paths.CLAIMS).read_text())["claims"]


def _verdict(ok: bool) -> str:
    return SUPPORTED if ok else CONTRADICTED


def _inside(x, lo, hi) -> bool:
    return lo <= x <= hi


def _ci_inside(r, lo_ci, hi_ci, lo, hi) -> str:
    """A ratio with a CI against a claimed range: supported if the CI overlaps it, else contradicted."""
    lo_ci = lo_ci if np.isfinite(lo_ci) else r
    hi_ci = hi_ci if np.isfinite(hi_ci) else r
    return _verdict(hi_ci >= lo and lo_ci <= hi)


def _has_pair(ctx) -> bool:
    return ctx["pair"] == MODELS


def _npu_needed(ctx) -> str:
    return untestable(f"an Ascend NPU (the claim is about one; these runs are on {ctx['kind']})")


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


def _best_tpot(ctx, quantized: bool) -> dict:
    d = R.ok(ctx["df"], metric="tpot", batch=1)
    d = d[d.quant != "none"] if quantized else d
    return {m: d[d.model == m]["median"].min() for m in MODELS if (d.model == m).any()}


def _bound_tpot(ctx, model) -> float:
    p = ctx["proj"]
    p = p[(p.model == model) & (p._key == ctx.get("spec", "ascend-910a"))] if len(p) else p
    return float(p._tpot_s.min()) if len(p) else float("nan")


def latency_range(claim, ctx):
    best = _best_tpot(ctx, quantized=True)
    here = ", ".join(f"{m}: {R.fmt_time(v)}" for m, v in best.items()) or "no quantized TPOT measured"
    rng = claim["range"]
    bounds = {m: _bound_tpot(ctx, m) for m in MODELS}
    bound_txt = ", ".join(f"{m} {R.fmt_time(b)}" for m, b in bounds.items())
    # a claimed latency below the projection's lower bound (the fastest it can be) is impossible
    below = [m for m, r in zip(MODELS, ("small", "large")) if np.isfinite(bounds[m]) and rng[r][1] < bounds[m]]
    value = f"best quantized TPOT here: {here}; lower bounds on an Ascend 910 (int8 weights): {bound_txt}"
    if below:
        return {"value": value, "verdict": BOUND, "basis": "bound (published spec)",
                "why": f"the whole claimed range lies below the lower bound for {', '.join(below)}"}
    if ctx["kind"] != "npu":
        return _not_here(ctx, value, "the claimed range is above the lower bound, so only a measurement can judge it")
    if len(best) < 2:
        return {"value": here, "verdict": untestable("a quantized TPOT of both models"), "basis": "measured", "why": ""}
    ok = _inside(best[MODELS[0]], *rng["small"]) and _inside(best[MODELS[1]], *rng["large"])
    return {"value": value, "verdict": _verdict(ok), "basis": "measured", "why": ""}


def _ratio_rows(ctx, metric="TPOT"):
    t = R.ratio_table(ctx["df"])
    return t[t.metric == metric] if len(t) else t


def tpot_ratio(claim, ctx):
    """One verdict per engine (and dtype): the ratio depends on how much of a step is fixed cost."""
    t = _ratio_rows(ctx)
    if not _has_pair(ctx) or t.empty:
        return {"value": "no TPOT of both 1B and 3B", "verdict": untestable("batch-1 TPOT of both models"),
                "basis": "measured", "why": ""}
    lo, hi = claim["range"]
    out = []
    for _, g in t.groupby([k for k in ("engine", "dtype", "quant") if k in t], dropna=False):
        r = g.loc[g.tokens.idxmin()]
        value = (f"3B/1B TPOT = {R.fmt_ci(r.ratio, r.ci_low, r.ci_high)} ({r.get('engine', 'eager')}, {r['dtype']}, "
                 f"context {int(r['tokens'])}); weight-bytes ratio {R.weight_ratio(*MODELS):.2f}")
        if claim["device"] == "npu" and ctx["kind"] != "npu":
            res = _not_here(ctx, value)
        else:
            res = {"value": value, "verdict": _ci_inside(r.ratio, r.ci_low, r.ci_high, lo, hi), "basis": "measured",
                   "why": ""}
        out.append({**res, "engine": r.get("engine")})
    return out


def _request_bounds(model, spec_key, prompt, new, batch) -> dict:
    """Upper bounds on requests/s on one published device spec at the claim's batch, int8 weights at the
    int8 peak (the claims are about quantized models), for two readings of "request"."""
    from .ceilings import load_specs
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
    d = R.ok(ctx["df"], notebook="02_batch_sweep", metric="requests_per_s")
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
    from .ceilings import load_specs
    value = (f"Upper bounds on the {load_specs()[spec]['name']} (int8 peak and int8 weights): " + "; ".join(parts)
             + f". Best here: {here or 'none'}.")
    if impossible:
        return {"value": value, "verdict": BOUND, "basis": "bound (published spec)",
                "why": f"the claimed range's low end exceeds the '{reading}' bound for {', '.join(impossible)}"}
    if ctx["kind"] != "npu":
        return _not_here(ctx, value, "the claimed range is within the bound, so only a measurement can judge it")
    ok = all((d.model == m).any() and _inside(d[d.model == m]["median"].max(), *claim["range"][r])
             for m, r in zip(MODELS, ("small", "large")))
    return {"value": value, "verdict": _verdict(ok), "basis": "measured", "why": ""}


def throughput_ratio(claim, ctx):
    d = R.ok(ctx["df"], notebook="02_batch_sweep", quant="none")
    metric = "decode_tokens_per_s" if (d.metric == "decode_tokens_per_s").any() else "tokens_per_s"
    d = d[d.metric == metric]
    if not _has_pair(ctx) or d.empty:
        return {"value": "no batch sweep of both models", "verdict": untestable("a batch sweep of both models"),
                "basis": "measured", "why": ""}
    out = []
    for key, g in d.groupby([k for k in ("engine", "dtype") if k in d], dropna=False):
        common = set(g[g.model == MODELS[0]].batch) & set(g[g.model == MODELS[1]].batch)
        if not common:
            continue
        b = max(common)
        s, l = (R.repeats(g[(g.model == m) & (g.batch == b)]) for m in MODELS)
        r, lo, hi = ratio_of_medians(l, s)
        lo_c, hi_c = claim["range"]
        out.append({"value": f"1B/3B {metric.replace('_', ' ')} at batch {int(b)}: {R.fmt_ci(r, lo, hi)} "
                             f"({' '.join(map(str, key if isinstance(key, tuple) else (key,)))})",
                    "verdict": _ci_inside(r, lo, hi, lo_c, hi_c), "basis": "measured", "why": "",
                    "engine": g.engine.iat[0] if "engine" in g else None})
    return out or {"value": "no batch size ran for both models", "verdict": untestable("a batch that ran for both models"),
                   "basis": "measured", "why": ""}


def memory_range(claim, ctx):
    rng = claim["range"]
    derived = {m: cm.dense_weight_bytes(load_config(m), 2) for m in MODELS}
    peak = R.ok(ctx["df"], notebook="01_latency", metric="peak_memory", quant="none")
    here = "; ".join(f"{m} {dt}: peak {R.fmt_gb(g['median'].max())}"
                     for (m, dt), g in peak.groupby(["model", "dtype"]) if m in MODELS)
    ok = all(_inside(derived[m], *rng[r]) for m, r in zip(MODELS, ("small", "large")))
    return {"value": f"16-bit weights: 1B {R.fmt_gb(derived[MODELS[0]])}, 3B {R.fmt_gb(derived[MODELS[1]])}. "
                     f"Measured peak here: {here or 'no peak-memory records'}",
            "verdict": _verdict(ok), "basis": "derived (16-bit weights, the seed's deployment precision)", "why": ""}


def memory_ratio(claim, ctx):
    peak = R.ok(ctx["df"], metric="peak_memory", quant="none", batch=1)
    lo, hi = claim["range"]
    rows = []
    for key, g in peak.groupby([k for k in ("engine", "dtype", "experiment", "prompt_len", "context_len") if k in peak],
                               dropna=False):
        got = {m: g[g.model == m]["median"].max() for m in MODELS if (g.model == m).any()}
        if len(got) == 2:
            rows.append((got[MODELS[1]] / got[MODELS[0]], key))
    share = {m: describe_model(m)["embedding_share"] for m in MODELS}
    weights = f"weight-bytes ratio {R.weight_ratio(*MODELS):.2f} (the 1B spends {share[MODELS[0]]:.0%} of its " \
              f"parameters on the embedding, the 3B {share[MODELS[1]]:.0%})"
    if not rows:
        return {"value": weights, "verdict": untestable("peak memory of both models at one shape"),
                "basis": "derived", "why": ""}
    rs = [x[0] for x in rows]
    return {"value": f"measured 3B/1B peak-memory ratio {min(rs):.2f}–{max(rs):.2f} over {len(rs)} shapes; {weights}",
            "verdict": _verdict(all(_inside(x, lo, hi) for x in rs)), "basis": "measured (peak memory, same shape)",
            "why": ""}


def _speedups(ctx):
    """Per model and int8/int4 method: TPOT speed-up against the 16-bit and the fp32 baselines, where both
    exist (same model and engine, batch 1, smallest context)."""
    d = R.ok(ctx["df"], metric="tpot", batch=1)
    out = []
    for (model, engine), g in d.groupby(["model", "engine"]) if "engine" in d else d.groupby(["model", d.model]):
        base = {dt: g[(g.quant == "none") & (g.dtype == dt)] for dt in ("fp32", *SIXTEEN)}
        for (q, dt), m in g[g.quant != "none"].groupby(["quant", "dtype"]):
            m = m[m.context_len == m.context_len.min()]
            row = {"model": model, "engine": engine, "method": q, "dtype": dt}
            for bdt, b in base.items():
                b = b[b.context_len == m.context_len.iat[0]]
                if len(b):
                    row[bdt] = ratio_of_medians(R.repeats(m), R.repeats(b))
            out.append(row)
    return out


def quant_speedup(claim, ctx):
    lo, hi = claim["range"]
    rows = _speedups(ctx)
    if not rows:
        return {"value": "no quantized TPOT measured", "verdict": untestable("a quantized run"), "basis": "measured",
                "why": ""}
    def txt(r):
        parts = [f"{R.fmt_ci(*r[b])}x vs {b}" for b in ("bf16", "fp16", "fp32") if b in r]
        return f"{r['model']} {r['method']} ({r['engine']}): " + ", ".join(parts)
    value = "; ".join(txt(r) for r in rows)
    sixteen = [r for r in rows if any(b in r for b in SIXTEEN)]
    if not sixteen:
        return {"value": value, "verdict": untestable("a 16-bit baseline on this device (the seed reasons from FP16; "
                                                       "only fp32 ran here, so the speed-ups above are against fp32)"),
                "basis": "measured", "why": ""}
    best = max(max(r[b][0] for b in SIXTEEN if b in r) for r in sixteen)
    return {"value": value, "verdict": _verdict(_inside(best, lo, hi)), "basis": "measured",
            "why": f"best speed-up against 16-bit: {best:.2f}x"}


def quant_robustness(claim, ctx):
    d = R.ok(ctx["df"], metric="kl_mean")
    trained = sorted(set(d[d.weights.map(is_real) & ~d.model.isin(MODELS)].model))  # e.g. smollm2-135m
    d = d[d.model.isin(MODELS)]
    if d.empty or not d.weights.map(is_real).all() or set(d.model) != set(MODELS):
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
    d = R.ok(ctx["df"], notebook="01_latency", quant="none")
    mbu = d[d.metric == "tpot"].mbu.max()
    mfu = d[d.metric == "ttft"].mfu.max()
    value = f"best decode MBU {mbu:.1%}, best prefill MFU {mfu:.1%} (against this device's measured ceilings)"
    if ctx["kind"] != "npu":
        return _not_here(ctx, value)
    return {"value": value, "verdict": _verdict(_inside(max(mbu, mfu), *claim["range"])), "basis": "measured", "why": ""}


def device_peak(claim, ctx):
    from .ceilings import load_specs
    spec = load_specs()[claim["spec"]]
    pub = spec["peak_TFLOPS"]["fp16"]
    c = R.ok(ctx["df"], experiment="ceiling", metric="matmul_throughput", dtype="fp16")
    if ctx["kind"] == "npu" and len(c) and "910a" in str(c.device_name.iat[0]).lower().replace(" ", ""):
        got = c["median"].max() / 1e3
        return {"value": f"measured fp16 matmul {got:.3g} TFLOP/s", "verdict": _verdict(got >= 0.8 * claim["expected_TFLOPS"]),
                "basis": "measured", "why": ""}
    return {"value": f"published spec: {pub} TFLOPS fp16 ({spec['source']})",
            "verdict": untestable(f"an Ascend 910 (910A) to measure on; these runs are on {ctx['kind']}"),
            "basis": "published (not measured)", "why": ""}


CHECKS = {f.__name__: f for f in (flops_per_token, latency_range, tpot_ratio, throughput_range, throughput_ratio,
                                  memory_range, memory_ratio, quant_speedup, quant_robustness, utilization,
                                  device_peak)}


def check_all(df, proj, claims=None) -> list[dict]:
    """One row per claim (per engine for the ratio claims): claim, rule, value, verdict, basis, why."""
    ctx = {"df": df, "kind": R.device_kind(df), "pair": R.pair(df), "proj": proj}
    out = []
    for claim in claims or load_claims():
        res = CHECKS[claim["check"]](claim, ctx)
        for r in res if isinstance(res, list) else [res]:
            out.append({"claim": claim["quote"], "gloss": claim["gloss"], "rule": claim.get("rule", ""),
                        "engine": r.pop("engine", None) or "", **r})
    return out


def verdict_counts(checks) -> dict:
    counts = {}
    for c in checks:
        v = c["verdict"].split(":")[0]
        counts[v] = counts.get(v, 0) + 1
    return counts


# The energy claims are checked beside the energy section (lib/llmbench/report_energy.py).
from .report_energy import CLAIM_CHECKS as _ENERGY_CHECKS  # noqa: E402

CHECKS.update(_ENERGY_CHECKS)


# The vocabulary claim is checked beside the tokenizer measurements (lib/llmbench/workload.py).
from .workload import vocabulary_claim  # noqa: E402

CHECKS["vocabulary_claim"] = vocabulary_claim
