"""The seed's serving claims, judged from the 04_serving records (experiments/serving.py wrote them):
requests/s under dynamic batching ("1000-2000 请求/秒 at batch 32") and "dynamic batching raises
throughput but may add latency". Both are about an Ascend 910: on another device the measured numbers
are shown "measured here, for context" and nothing is judged. Pure functions of the records: only
unflagged records with status ok (ctx.df) decide; failed and flagged runs are named beside the value.
"""
import numpy as np
import pandas as pd

from llmbench.claims.checks import (MODELS, _all, _excluded, _flagged, _inside, _not_here, _verdict, ci_verdict,
                                    not_judged, untestable, INCONCLUSIVE, SUPPORTED)
from llmbench.core.stats import ratio_of_medians
from llmbench.model.quant.methods import METHODS
from llmbench.results import fmt, frame

QUANTIZED = [m for m in METHODS if m != "none"]
# one serving run: a rate or a concurrency of one grid point (run_id) of one model on one server
RUN_KEYS = ["run_id", "model", "engine", "dtype", "quant", "prompt_len", "new_tokens", "request_rate", "concurrency"]


def _serving(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.experiment == "serving"] if len(df) and "experiment" in df else df.iloc[0:0]


def serving_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per serving run with status ok: achieved requests/s, saturated, completed share, and the raw
    per-request TTFT, TPOT and E2E samples (s). A run whose records df lacks has NaN / empty lists there."""
    d = _serving(frame.ok(df) if len(df) else df)
    keys = [k for k in RUN_KEYS if k in d]
    rows = []
    for k, g in d.groupby(keys, dropna=False, sort=True) if len(d) else []:
        m = {metric: x.iloc[0] for metric, x in g.groupby("metric")}

        def one(metric):
            v = m[metric]["median"] if metric in m else None
            return float(v) if v is not None else float("nan")

        def samples(metric):
            s = m[metric]["samples"] if metric in m else None
            return [float(x) for x in s] if s is not None else []
        rows.append({**dict(zip(keys, k)), "achieved": one("request_throughput"), "saturated": one("saturated") == 1.0,
                     "completed_share": one("completed_share"), "ttft": samples("serving_ttft"),
                     "tpot": samples("serving_tpot"), "e2e": samples("serving_e2e")})
    return pd.DataFrame(rows)


def _finite(x) -> bool:
    return x is not None and bool(np.isfinite(x))


def _load(r) -> str:
    if _finite(r.get("request_rate")):
        return f"Poisson {r['request_rate']:g} req/s"
    return f"closed loop, {int(r['concurrency'])} in flight" if _finite(r.get("concurrency")) else "its run"


def _not_counted(ctx) -> str:
    """'; not counted: ...' for flagged serving records and serving runs that did not end ok."""
    a = _serving(_all(ctx))
    labels = _flagged(ctx, frame.ok(a)) if len(a) else []
    bad = a[a.status != "ok"].drop_duplicates(subset=[k for k in RUN_KEYS if k in a]) if len(a) else a
    labels += [f"{r['model']} on {r['engine']}, {_load(r)}: {r['status']}" for _, r in bad.iterrows()]
    return _excluded(labels)


def _best(t: pd.DataFrame) -> dict:
    """Per model, its serving run with the highest achieved requests/s."""
    t = t[np.isfinite(t.achieved)] if len(t) else t
    return {m: t.loc[t[t.model == m].achieved.idxmax()] for m in MODELS if len(t) and (t.model == m).any()}


def _best_text(best: dict) -> str:
    return "; ".join(f"{m}: {r['achieved']:.3g} req/s ({r['engine']}, {r['dtype']}, quant {r['quant']}, {_load(r)})"
                     for m, r in best.items())


def serving_throughput(claim, ctx):
    """The best achieved requests/s of each model over its quantized serving runs of the claim's request
    (prompt and generated tokens), any load: the server batches dynamically up to its slots. On an Ascend
    NPU it must lie in the claimed range; elsewhere it is shown for context."""
    req = claim["request"]
    t = serving_runs(ctx.df)
    shape = t[(t.prompt_len == req["prompt"]) & (t.new_tokens == req["new"])] if len(t) else t
    # a quantization method the study names; an endpoint's "as served" is of unknown precision, so not counted
    quantized = shape[shape.quant.isin(QUANTIZED)] if len(shape) else shape
    unquantized = shape[~shape.index.isin(quantized.index)] if len(shape) else shape
    other = t[~t.index.isin(shape.index)] if len(t) else t
    parts = []
    if len(quantized):
        parts.append(f"best achieved in quantized serving runs of {req['prompt']}-token prompts and {req['new']} "
                     "generated tokens (what is judged): " + _best_text(_best(quantized)))
    if len(unquantized):
        parts.append("not quantized or of unknown precision, not judged: " + _best_text(_best(unquantized)))
    if len(other):
        lengths = sorted({f"{p:g}+{n:g}" for p, n in zip(other.prompt_len, other.new_tokens)})
        parts.append(f"with other request lengths ({', '.join(lengths)} tokens), not judged: " + _best_text(_best(other)))
    claimed = "; ".join(f"claimed {m} {claim['range'][r][0]:g}-{claim['range'][r][1]:g} req/s at batch {claim['batch'][r]}"
                        for m, r in zip(MODELS, ("small", "large")))
    value = (("; ".join(parts) if parts else "no serving run (04_serving) measured") + f" ({claimed})"
             + _not_counted(ctx))
    if claim.get("device") == "npu" and ctx.kind != "npu":
        return _not_here(ctx, value, "the claim is about an Ascend 910; a serving run elsewhere says nothing of it")
    if t.empty:
        flagged = _not_counted(ctx)
        return {"value": value, "verdict": not_judged("every serving record is flagged or failed") if flagged
                else untestable("a serving run of both models (04_serving)"), "basis": "measured", "why": ""}
    best = _best(quantized)
    if len(best) < 2:
        return {"value": value, "verdict": untestable(f"quantized serving runs of both models with {req['prompt']}-token "
                                                      f"prompts and {req['new']} generated tokens"),
                "basis": "measured", "why": ""}
    ok = all(_inside(best[m].achieved, *claim["range"][r]) for m, r in zip(MODELS, ("small", "large")))
    return {"value": value, "verdict": _verdict(ok), "basis": "measured (serving, best achieved requests/s)", "why": ""}


def _ms(x) -> str:
    return fmt.fmt_time(x) if np.isfinite(x) else "n/a"


def _pcts(x) -> str:
    """p50 / p99 of samples (s)."""
    return f"p50 {_ms(np.percentile(x, 50))}, p99 {_ms(np.percentile(x, 99))}" if len(x) else "no samples"


def batching_gain(one: dict, many: dict) -> dict:
    """Closed loop at 1 and at N requests in flight (serving_runs rows of one run): the throughput gain
    N x median E2E(1) / median E2E(N) (Little's law: a closed loop of N completes N / E2E requests per s),
    and the TPOT and TTFT ratios N / 1, each (ratio, ci_low, ci_high) by stats.ratio_of_medians."""
    n = int(many["concurrency"])
    return {"n": n,
            # ratio_of_medians(a, b) = median(b) / median(a): E2E(1) over E2E(N)/N
            "gain": ratio_of_medians(np.asarray(many["e2e"]) / n, np.asarray(one["e2e"])),
            "tpot": ratio_of_medians(np.asarray(one["tpot"]), np.asarray(many["tpot"])) if len(one["tpot"]) and len(many["tpot"]) else None,
            "ttft": ratio_of_medians(np.asarray(one["ttft"]), np.asarray(many["ttft"])) if len(one["ttft"]) and len(many["ttft"]) else None}


def dynamic_batching(claim, ctx):
    """Per serving run (model, server): closed loop at 1 request in flight against the largest concurrency
    of the same run, both unsaturated with every request completed. The claim holds if the throughput gain's
    CI lies above 1 and the achieved requests/s rose with it; 'may add latency' allows either, so the TPOT
    and TTFT changes are shown and do not decide."""
    t = serving_runs(ctx.df)
    closed = t[t.concurrency.notna()] if len(t) and "concurrency" in t else t.iloc[0:0]
    out = []
    for (model, engine, run_id), g in closed.groupby(["model", "engine", "run_id"], sort=True) if len(closed) else []:
        usable = g[~g.saturated & (g.completed_share == 1) & (g.e2e.map(len) >= 2)]
        left = [f"closed loop {int(r.concurrency)} in flight ("
                + ("saturated" if r.saturated else "not every request completed" if r.completed_share != 1
                   else "its E2E record is missing, flagged or failed") + ")"
                for r in g[~g.index.isin(usable.index)].itertuples()]
        one, many = usable[usable.concurrency == 1], usable[usable.concurrency > 1]
        name = f"{model} on {engine}"
        if one.empty or many.empty:
            out.append({"value": f"{name}: closed-loop runs at {', '.join(str(int(c)) for c in sorted(g.concurrency))} in flight"
                                 + (f"; not counted: {'; '.join(left)}" if left else "") + _not_counted(ctx),
                        "verdict": untestable("closed-loop runs at 1 and at more than 1 request in flight, unsaturated, "
                                              "in one serving run"), "basis": "measured", "why": "", "engine": engine})
            continue
        a, b = one.iloc[0], many.loc[many.concurrency.idxmax()]
        r = batching_gain(a, b)
        g_ci = r["gain"]
        value = (f"{name}, 1 vs {r['n']} requests in flight: achieved {a.achieved:.3g} vs {b.achieved:.3g} req/s; "
                 f"throughput gain ({r['n']} x median E2E at 1 / median E2E at {r['n']}) {fmt.fmt_ci(*g_ci)}x; "
                 f"TPOT {_pcts(a.tpot)} vs {_pcts(b.tpot)}"
                 + (f" (p50 ratio {fmt.fmt_ci(*r['tpot'])}x)" if r["tpot"] else "")
                 + f"; TTFT {_pcts(a.ttft)} vs {_pcts(b.ttft)}"
                 + (f" (p50 ratio {fmt.fmt_ci(*r['ttft'])}x)" if r["ttft"] else "")
                 + (f"; not counted: {'; '.join(left)}" if left else ""))
        if claim.get("device") == "npu" and ctx.kind != "npu":
            out.append({**_not_here(ctx, value), "engine": engine})
            continue
        verdict, why = ci_verdict(*g_ci, 1.0)
        if verdict == SUPPORTED and not b.achieved > a.achieved:
            verdict = (f"{INCONCLUSIVE}: the achieved requests/s did not rise ({a.achieved:.3g} to {b.achieved:.3g}) "
                       "although the E2E-based gain did")
        lat = [f"{k.upper()} p50 x{r[k][0]:.3g}" for k in ("tpot", "ttft") if r[k]]
        notes = [w for w in (why, "'may add latency' allows either outcome; measured: " + ", ".join(lat)) if w]
        out.append({"value": value, "verdict": verdict, "basis": "measured (serving, closed loop)",
                    "why": "; ".join(notes), "engine": engine})
    if out:
        return out
    flagged = _not_counted(ctx)
    return {"value": "no closed-loop serving run" + flagged,
            "verdict": not_judged("every closed-loop serving record is flagged or failed") if flagged and
            len(serving_runs(_all(ctx))) else untestable("closed-loop serving runs at 1 and more requests in flight "
                                                         "(04_serving concurrencies)"),
            "basis": "measured", "why": ""}


CLAIM_CHECKS = {f.__name__: f for f in (serving_throughput, dynamic_batching)}
