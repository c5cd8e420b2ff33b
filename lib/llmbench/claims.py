"""Check each quantitative claim of the seed document against measured or derived numbers.

data/claims.yaml holds the claims (short quote, English gloss, the numbers claimed, which device the
claim is about); CHECKS maps its `check` names to the functions below. A verdict is one of:
supported, contradicted, or not testable on this device (with the reason). `basis` says where the
value came from: measured (these runs), derived (cost model on the exact configs), or published.
"""
import yaml

from . import costmodel as cm
from . import paths
from . import report as R
from .models import describe_model, load_config

SUPPORTED, CONTRADICTED, UNTESTABLE = "supported", "contradicted", "not testable on this device"
MODELS = ("llama-3.2-1b", "llama-3.2-3b")


def load_claims() -> list[dict]:
    return yaml.safe_load(paths.CLAIMS.read_text())["claims"]


def _verdict(ok: bool) -> str:
    return SUPPORTED if ok else CONTRADICTED


def _inside(x, lo, hi) -> bool:
    return lo <= x <= hi


def _has_pair(ctx) -> bool:
    return ctx["pair"] == MODELS


def _not_here(claim, ctx, measured_here: str) -> dict:
    return {"value": measured_here, "verdict": UNTESTABLE, "basis": "measured here, for context",
            "why": f"the claim is about an Ascend NPU; these runs are on {ctx['kind']}"}


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


def latency_range(claim, ctx):
    best = _best_tpot(ctx, quantized=True)
    here = ", ".join(f"{m}: {R.fmt_time(v)}" for m, v in best.items()) or "no quantized TPOT measured"
    if ctx["kind"] != "npu":
        return _not_here(claim, ctx, f"best quantized TPOT here: {here}")
    if len(best) < 2:
        return {"value": here, "verdict": UNTESTABLE, "basis": "measured", "why": "no quantized TPOT of both models"}
    rng = claim["range"]
    ok = _inside(best[MODELS[0]], *rng["small"]) and _inside(best[MODELS[1]], *rng["large"])
    return {"value": here, "verdict": _verdict(ok), "basis": "measured",
            "why": "read as per-token decode latency (TPOT), best quantization method, batch 1"}


def tpot_ratio(claim, ctx):
    t = R.ratio_table(ctx["df"])
    t = t[t.metric == "TPOT"] if len(t) else t
    if not _has_pair(ctx) or t.empty:
        return {"value": "no TPOT of both 1B and 3B", "verdict": UNTESTABLE, "basis": "measured",
                "why": "the runs lack one of the models"}
    r = t.iloc[0]
    value = f"3B/1B TPOT = {R.fmt_ci(r.ratio, r.ci_low, r.ci_high)} ({r['dtype']}, context {int(r['tokens'])})"
    if claim["device"] == "npu" and ctx["kind"] != "npu":
        return _not_here(claim, ctx, value)
    return {"value": value, "verdict": _verdict(_inside(r.ratio, *claim["range"])), "basis": "measured",
            "why": f"claimed {claim['range'][0]}-{claim['range'][1]}; weight-bytes ratio {R.weight_ratio(*MODELS):.2f}"}


def _projected_rps(ctx, model, batch) -> str:
    p = ctx["proj"]
    p = p[(p.model == model) & p.device.str.contains("910")]
    col = f"req/s bound, batch {batch}"
    return "; ".join(f"{r.device} {r.precision}: {r[col]:.3g}" for _, r in p.iterrows() if col in p)


def throughput_range(claim, ctx):
    d = R.ok(ctx["df"], notebook="02_batch_sweep", metric="requests_per_s")
    here = ", ".join(f"{m}: {d[d.model == m]['median'].max():.3g} requests/s "
                     f"(batch {int(d.loc[d[d.model == m]['median'].idxmax(), 'batch'])})" for m in MODELS if (d.model == m).any())
    bounds = " | ".join(f"{m} batch {claim['batch'][r]}: {_projected_rps(ctx, m, claim['batch'][r])}"
                        for m, r in zip(MODELS, ("small", "large")))
    value = f"best here: {here or 'none'}. Projected upper bounds for a {R.REQUEST[0]}+{R.REQUEST[1]}-token request: {bounds}"
    if ctx["kind"] != "npu":
        return _not_here(claim, ctx, value)
    ok = all((d.model == m).any() and _inside(d[d.model == m]["median"].max(), *claim["range"][r])
             for m, r in zip(MODELS, ("small", "large")))
    return {"value": value, "verdict": _verdict(ok), "basis": "measured", "why": "requests of the grid's lengths"}


def throughput_ratio(claim, ctx):
    d = R.ok(ctx["df"], notebook="02_batch_sweep", metric="tokens_per_s", quant="none")
    if not _has_pair(ctx) or d.empty:
        return {"value": "no batch sweep of both models", "verdict": UNTESTABLE, "basis": "measured", "why": "no data"}
    common = set(d[d.model == MODELS[0]].batch) & set(d[d.model == MODELS[1]].batch)
    if not common:
        return {"value": "no batch size ran for both models", "verdict": UNTESTABLE, "basis": "measured", "why": "no data"}
    b = max(common)
    s, l = (d[(d.model == m) & (d.batch == b)].iloc[0] for m in MODELS)
    from .stats import ratio_of_medians
    r, lo, hi = ratio_of_medians(l["samples"], s["samples"])
    return {"value": f"1B/3B generated tokens/s at batch {int(b)}: {R.fmt_ci(r, lo, hi)}",
            "verdict": _verdict(_inside(r, *claim["range"])), "basis": "measured", "why": f"{s['dtype']}, unquantized"}


def memory_range(claim, ctx):
    rng = claim["range"]
    derived = {m: cm.dense_weight_bytes(load_config(m), 2) for m in MODELS}
    peak = R.ok(ctx["df"], notebook="01_latency", metric="peak_memory", quant="none")
    here = "; ".join(f"{m} {g.dtype.iat[0]}: peak {R.fmt_gb(g['median'].max())} ({g.note.iat[0]})"
                     for m, g in peak.groupby("model") if m in MODELS)
    ok = all(_inside(derived[m], *rng[r]) for m, r in zip(MODELS, ("small", "large")))
    return {"value": f"16-bit weights: 1B {R.fmt_gb(derived[MODELS[0]])}, 3B {R.fmt_gb(derived[MODELS[1]])}. "
                     f"Measured here: {here or 'no peak-memory records'}",
            "verdict": _verdict(ok), "basis": "derived (16-bit weights, the seed's deployment precision)",
            "why": "KV cache and activations add to this; fp32 doubles the weights"}


def memory_ratio(claim, ctx):
    wb = R.ok(ctx["df"], metric="weight_bytes", quant="none")
    got = {m: wb[wb.model == m]["median"].iat[0] for m in MODELS if (wb.model == m).any()}
    if len(got) < 2:
        return {"value": "no weight bytes of both models", "verdict": UNTESTABLE, "basis": "measured", "why": "no data"}
    r = got[MODELS[1]] / got[MODELS[0]]
    ok = abs(r / claim["expected"] - 1) <= claim["tolerance"]
    share = {m: describe_model(m)["embedding_share"] for m in MODELS}
    return {"value": f"3B/1B weight bytes = {r:.2f} ({R.fmt_gb(got[MODELS[1]])} / {R.fmt_gb(got[MODELS[0]])})",
            "verdict": _verdict(ok), "basis": "measured (bytes of the loaded weights)",
            "why": f"'about 3x' read as within {claim['tolerance']:.0%}; the parameter ratio is "
                   f"{R.weight_ratio(*MODELS):.2f}, not 3, because the 1B spends "
                   f"{share[MODELS[0]]:.0%} of its parameters on the embedding, the 3B {share[MODELS[1]]:.0%}"}


def quant_speedup(claim, ctx):
    d = R.ok(ctx["df"], metric="tpot_speedup_vs_none")
    d = d[d.quant.isin(["w8a8", "w8a16"])]
    if d.empty:
        return {"value": "no int8 speed-up measured", "verdict": UNTESTABLE, "basis": "measured", "why": "no data"}
    best = d.loc[d.groupby("model")["median"].idxmax()]
    value = "; ".join(f"{r.model} {r.quant}: {R.fmt_ci(r['median'], r.ci_low, r.ci_high)}x decode speed-up over "
                      f"unquantized {r['dtype']}" for _, r in best.iterrows())
    lo, hi = claim["range"]
    ok = all(_inside(v, lo, hi) for v in best["median"])
    where = "inside" if ok else "above" if (best["median"] > hi).all() else "below" if (best["median"] < lo).all() \
        else "partly outside"
    return {"value": value, "verdict": _verdict(ok), "basis": "measured",
            "why": f"claimed {lo:g}-{hi:g}x, measured {where} that range; the baseline is the run's dtype: from fp32, "
                   "int8 weights are 4x fewer bytes (2x from 16-bit)"}


def quant_robustness(claim, ctx):
    d = R.ok(ctx["df"], metric="kl_mean")
    if d.empty or set(d.weights) != {"real"}:
        return {"value": "fidelity measured on synthetic weights only" if len(d) else "no fidelity records",
                "verdict": UNTESTABLE, "basis": "measured",
                "why": "needs real weights: random weights have no outlier channels, which are what quantization "
                       "errors depend on in real LLMs"}
    kl = d.groupby(["quant", "model"])["median"].min().unstack()
    ok = all(kl.loc[q, MODELS[1]] < kl.loc[q, MODELS[0]] for q in kl.index if kl.loc[q].notna().all())
    return {"value": "; ".join(f"{q}: KL 1B {kl.loc[q, MODELS[0]]:.2e}, 3B {kl.loc[q, MODELS[1]]:.2e}" for q in kl.index),
            "verdict": _verdict(ok), "basis": "measured (real weights)", "why": "mean KL to the unquantized model"}


def utilization(claim, ctx):
    d = R.ok(ctx["df"], notebook="01_latency", quant="none")
    mbu = d[d.metric == "tpot"].mbu.max()
    mfu = d[d.metric == "ttft"].mfu.max()
    value = f"best decode MBU {mbu:.1%}, best prefill MFU {mfu:.1%} (against this device's measured ceilings)"
    if ctx["kind"] != "npu":
        return _not_here(claim, ctx, value)
    return {"value": value, "verdict": _verdict(_inside(max(mbu, mfu), *claim["range"])), "basis": "measured",
            "why": "utilization read as the better of MBU (decode) and MFU (prefill)"}


def device_peak(claim, ctx):
    from .ceilings import load_specs
    spec = load_specs()[claim["spec"]]
    pub = spec["peak_TFLOPS"]["fp16"]
    c = R.ok(ctx["df"], experiment="ceiling", metric="matmul_throughput", dtype="fp16")
    if ctx["kind"] == "npu" and len(c) and "910a" in str(c.device_name.iat[0]).lower().replace(" ", ""):
        got = c["median"].max() / 1e3
        return {"value": f"measured fp16 matmul {got:.3g} TFLOP/s", "verdict": _verdict(got >= 0.8 * claim["expected_TFLOPS"]),
                "basis": "measured", "why": "a measured matmul within 80% of the claimed peak counts as reaching it"}
    return {"value": f"published spec: {pub} TFLOPS fp16 ({spec['source']})", "verdict": UNTESTABLE,
            "basis": "published (not measured)", "why": f"no Ascend 910 in these runs (device: {ctx['kind']})"}


CHECKS = {f.__name__: f for f in (flops_per_token, latency_range, tpot_ratio, throughput_range, throughput_ratio,
                                  memory_range, memory_ratio, quant_speedup, quant_robustness, utilization,
                                  device_peak)}


def check_all(df, proj) -> list[dict]:
    ctx = {"df": df, "kind": R.device_kind(df), "pair": R.pair(df), "proj": proj}
    out = []
    for claim in load_claims():
        res = CHECKS[claim["check"]](claim, ctx)
        out.append({"claim": claim["quote"], "gloss": claim["gloss"], **res})
    return out
