"""The report's engine section: the same models run eagerly and compiled (and through llama.cpp), side by
side, so a reader sees what plain transformers gives and what the device can do with the model.

Records carry `engine` (eager | compiled | llamacpp). Compile time is experiment "load", metric
"compile_time" (s); recompilations during timed steps are metric "recompiles" (or named in a note).
"""
import numpy as np
import pandas as pd

from llmbench.core.keys import STUDIES
from llmbench.core.stats import ratio_of_medians
from llmbench.results import anomalies, fmt, frame, ratios

RECOMPILED = "compilation(s) during the timed calls"  # latency.recompile_status


def engines(df) -> list[str]:
    return sorted(df.engine.dropna().unique()) if "engine" in df else []


def _sel(d, cfg: dict):
    for k, v in cfg.items():
        if k in d:
            d = d[d[k] == v]
    return d


def engine_table(df) -> pd.DataFrame:
    """Per model, dtype, quant and engine: batch-1 TPOT and its MBU, TTFT, decode tokens/s per batch,
    compile time and recompilations; a `note` where the decode MBU is below anomalies.DISPATCH_MBU (dispatch-bound)."""
    keys = [k for k in ("model", "dtype", "quant", "engine", "device") if k in df]
    tp = frame.ok(df, metric="tpot", batch=1)
    if tp.empty:
        return pd.DataFrame()
    rows = []
    for k, g in tp.groupby(keys, dropna=False):
        cfg = dict(zip(keys, k))
        r = g.loc[g.context_len.idxmin()]
        row = {**{c: cfg[c] for c in keys if c != "device"},
               "TPOT": fmt.fmt_ci(r["median"], r.ci_low, r.ci_high, fmt.fmt_time) + f" (context {int(r.context_len)})",
               "decode MBU": fmt.fmt_mbu(r.mbu, r.get("mbu_window"))}
        tt = _sel(frame.ok(df, metric="ttft", batch=1), cfg)
        if len(tt):
            f = tt.loc[tt.prompt_len.idxmax()]
            row["TTFT"] = fmt.fmt_ci(f["median"], f.ci_low, f.ci_high, fmt.fmt_time) + f" ({int(f.prompt_len)} tok)"
        sweep = _sel(frame.ok(df, study="batch_sweep"), cfg) if "study" in df else df.iloc[0:0]
        metric = "decode_tokens_per_s" if (sweep.metric == "decode_tokens_per_s").any() else "tokens_per_s"
        per_b = sweep[sweep.metric == metric].sort_values("batch")
        if len(per_b):
            row[f"{metric.replace('_per_s', '/s').replace('_', ' ')} by batch"] = ", ".join(
                f"{int(b)}: {m:.3g}" for b, m in zip(per_b.batch, per_b["median"]))
        ct = _sel(frame.ok(df, metric="compile_time"), cfg)
        row["compile time"] = (f"{fmt.fmt_time(ct['median'].sum())} ({len(ct)} shapes)" if len(ct) else
                               "none" if cfg.get("engine") == "eager" else "")
        # a compilation inside timed calls makes the record an error (its samples timed a compiler): count them
        rc = _sel(df[df.status.fillna("").str.contains(RECOMPILED, regex=False)], cfg)
        row["records that compiled while timed"] = len(rc) if cfg.get("engine") != "eager" else ""
        if fmt.is_finite(r.mbu) and r.mbu < anomalies.DISPATCH_MBU:  # the claims' rule (claims/checks), one threshold
            row["note"] = (f"{anomalies.DISPATCH_LABEL}: decode reaches {r.mbu:.0%} of bandwidth (below {anomalies.DISPATCH_MBU:.0%}); "
                           f"host dispatch dominates, so this engine's 3B/1B ratios are left out of the verdicts "
                           f"about the models")
        rows.append(row)
    return pd.DataFrame(rows)


def ratio_by_engine(df) -> pd.DataFrame:
    """The 3B/1B decode ratio per engine with its CI, next to the weight-bytes ratio; `dispatch` labels an
    engine whose decode is dispatch-bound there (results/anomalies.dispatch_bound: the claims do not judge it)."""
    t = ratios.ratio_table(df)
    p = frame.pair(df)
    if t.empty or not p:
        return pd.DataFrame()
    t = t[t.metric == "TPOT"]
    rows = []
    for k, g in t.groupby([c for c in ("engine", "dtype", "quant") if c in t], dropna=False):
        r = g.loc[g.tokens.idxmin()]
        rows.append({**dict(zip([c for c in ("engine", "dtype", "quant") if c in t], k)), "context": int(r.tokens),
                     f"{p[1]}/{p[0]} TPOT": fmt.fmt_ci(r.ratio, r.ci_low, r.ci_high),
                     "weight-bytes ratio": f"{ratios.weight_ratio(*p):.2f}", "bytes-per-step ratio": f"{r['work ratio']:.2f}",
                     "dispatch": r.get("dispatch", "")})
    return pd.DataFrame(rows)


def _not_paired(d):
    """The batch-1 TPOT records of the other notebooks (a pair's sides are read through ratios.pair_ratios)."""
    return d[d.experiment != "pair"] if "experiment" in d else d


def _cross_flag(*sides) -> str:
    """The anomaly flags of the records behind a cross-point ratio ('' for none)."""
    d = pd.concat(sides).reset_index(drop=True)
    return "; ".join(anomalies.flagged_labels(d, anomalies.record_flags(d)))


def peer_ratio(df) -> pd.DataFrame:
    """llama.cpp's batch-1 TPOT over our best path's (the faster of eager and compiled) at the same device,
    model, dtype and quantization: above 1, ours is faster. From the engine-pair records (05_pairs, engine
    compiled or eager, versus llamacpp: one ratio per round of both sides measured side by side, CI from
    the rounds) where they exist; otherwise from the latency notebook (else the quantization notebook,
    whose unquantized and int8 runs pair the engines at fp32 and int8), measured in different processes
    and labelled ratios.CROSS_POINT: its CI covers the records' own repeats, not drift between grid points
    run minutes apart. `flag` names flagged records behind a ratio; a flagged ratio gets no verdict."""
    pr = ratios.pair_ratios(df, "engine")
    pr = pr[(pr.versus == "llamacpp") & pr.engine.isin(["compiled", "eager"])] if len(pr) else pr
    keys = [k for k in ("device", "model", "dtype", "quant") if k in df]
    rows, done = [], set()
    for k, g in pr.groupby([k for k in keys if k in pr]) if len(pr) else []:
        r = g.sort_values(["tokens", "A TPOT"]).iloc[0]  # smallest context, then our faster engine there
        done.add(tuple(str(x) for x in k))
        rows.append(_peer_row(dict(zip(keys, k)), int(r.tokens), r.engine, r["A TPOT"], r["B TPOT"],
                              (r.ratio, r.ci_low, r.ci_high), r.flag, r.source))
    tp = _not_paired(frame.ok(df, metric="tpot", batch=1))
    if "engine" not in tp or "llamacpp" not in set(tp.engine):
        return pd.DataFrame(rows)
    for k, g in tp.groupby(keys):
        if tuple(str(x) for x in k) in done:
            continue  # measured side by side: the pair record gives this comparison
        if "study" in g:  # one study per comparison: the latency study's, else the first other in STUDIES order
            order = list(STUDIES.values())
            g = g[g.study == min(g.study.dropna().unique(), key=order.index, default=None)]
        peer, ours = g[g.engine == "llamacpp"], g[g.engine != "llamacpp"]
        common = sorted(set(peer.context_len) & set(ours.context_len))
        if not common:
            continue
        peer, ours = peer[peer.context_len == common[0]], ours[ours.context_len == common[0]]
        best = min(ours.engine.unique(), key=lambda e: np.median(frame.pooled(ours[ours.engine == e])))
        o = ours[ours.engine == best]
        rows.append(_peer_row(dict(zip(keys, k)), int(common[0]), best, np.median(frame.pooled(o)),
                              np.median(frame.pooled(peer)), ratio_of_medians(frame.repeats(o), frame.repeats(peer)),
                              _cross_flag(o, peer), ratios.CROSS_POINT))
    return pd.DataFrame(rows)


def _peer_row(cfg: dict, context: int, best: str, ours_s: float, peer_s: float, ci, flag: str, source: str) -> dict:
    r, lo, hi = ci
    within = "within these rounds" if source != ratios.CROSS_POINT else "within these records"
    verdict = (f"not judged: {flag}" if flag else
               f"ours faster {within}" if lo > 1 else f"llama.cpp faster {within}" if hi < 1
               else "no difference beyond the CI")
    if source == ratios.CROSS_POINT and not flag:
        verdict += " (benchmarks/peer.py and 05_pairs alternate the two sides)"
    return {**cfg, "context": context, "our best path": f"{best}, {fmt.fmt_time(ours_s)}",
            "llama.cpp": fmt.fmt_time(peer_s), "llama.cpp / ours": fmt.fmt_ci(r, lo, hi), "verdict": verdict,
            "source": source}


def overhead(df) -> pd.DataFrame:
    """eager/compiled batch-1 TPOT per model and dtype, unquantized (same context): the share of eager's
    time that is overhead the compiled engine removes. From the engine-pair records (05_pairs, engine
    compiled, versus eager: one ratio per round, CI from the rounds) where one exists for the model and
    dtype, else from two records measured in different processes (`source`: ratios.CROSS_POINT).
    `flag` names the flagged records behind a ratio ('' for none)."""
    pr = ratios.pair_ratios(df, "engine")
    if len(pr):
        pr = pr[(pr.engine == "compiled") & (pr.versus == "eager") & (pr.quant == "none")]
    rows = []
    for (model, dtype), g in pr.groupby(["model", "dtype"]) if len(pr) else []:
        r = g.loc[g.tokens.idxmin()]
        rows.append({"model": model, "dtype": dtype, "context": int(r.tokens), "eager TPOT": fmt.fmt_time(r["B TPOT"]),
                     "compiled TPOT": fmt.fmt_time(r["A TPOT"]), "eager/compiled": r.ratio, "ci_low": r.ci_low,
                     "ci_high": r.ci_high, "flag": r.flag, "source": r.source})
    done = {(r["model"], r["dtype"]) for r in rows}
    tp = _not_paired(frame.ok(df, metric="tpot", batch=1, quant="none"))
    if "engine" not in tp or not {"eager", "compiled"} <= set(tp.engine):
        return pd.DataFrame(rows)
    for (model, dtype), g in tp.groupby(["model", "dtype"]):
        e, c = g[g.engine == "eager"], g[g.engine == "compiled"]
        common = sorted(set(e.context_len) & set(c.context_len))
        if not common or (model, dtype) in done:
            continue
        e, c = e[e.context_len == common[0]], c[c.context_len == common[0]]
        r, lo, hi = ratio_of_medians(frame.repeats(c), frame.repeats(e))
        rows.append({"model": model, "dtype": dtype, "context": int(common[0]),
                     "eager TPOT": fmt.fmt_time(np.median(frame.pooled(e))), "compiled TPOT": fmt.fmt_time(np.median(frame.pooled(c))),
                     "eager/compiled": r, "ci_low": lo, "ci_high": hi, "flag": _cross_flag(e, c),
                     "source": ratios.CROSS_POINT})
    return pd.DataFrame(rows)


def overhead_text(df) -> str:
    o = overhead(df)
    if o.empty:
        have = ", ".join(engines(df)) or "none"
        return (f"Engines in these runs: {have}. The eager-overhead comparison needs batch-1 decode records of "
                "both the eager and the compiled engine for the same model and dtype.")
    parts = []
    for r in o.to_dict("records"):
        share = 1 - 1 / r["eager/compiled"]
        what = (f"not judged: {r['flag']}" if r["flag"] else
                f"about {share:.0%} of eager's time per token is overhead the compiled engine removes"
                if r["ci_low"] > 1 else "the compiled engine is not faster beyond the CI" if r["ci_low"] <= 1 <= r["ci_high"]
                else "the compiled engine is slower")
        parts.append(f"{r['model']} {r['dtype']}: eager TPOT is {fmt.fmt_ci(r['eager/compiled'], r['ci_low'], r['ci_high'])} "
                     f"times compiled ({r['eager TPOT']} vs {r['compiled TPOT']} at context {r['context']}; "
                     f"{r['source']}): {what}.")
    return " ".join(parts)


def agreement(df) -> pd.DataFrame:
    """Compiled (or llama.cpp) against eager on the same weights and inputs: leading greedy tokens equal and
    the max relative logit error (experiment "agreement")."""
    d = frame.ok(df, experiment="agreement") if "experiment" in df else df.iloc[0:0]
    if d.empty:
        return pd.DataFrame()
    keys = [k for k in ("model", "dtype", "quant", "engine") if k in d]
    rows = []
    for k, g in d.groupby(keys, dropna=False):
        same, err = g[g.metric == "greedy_steps_equal"], g[g.metric == "graph_rel_logit_error"]
        rows.append({**dict(zip(keys, k)),
                     "greedy tokens equal to eager": (f"{int(same['median'].min())} of {int(same.new_tokens.max())}"
                                                      if len(same) else ""),
                     "max relative logit error": f"{err['median'].max():.2e}" if len(err) else "",
                     "where tokens diverge": _divergence(g)})
    return pd.DataFrame(rows)


def _divergence(g) -> str:
    """Why greedy tokens diverged, for the record with the fewest equal steps: eager's top-2 gap at the
    first differing step against the graph's logit error at that same step (both recorded together by
    latency.agreement). Each of the two logits may be off by the error in opposite directions, so the
    order can flip by rounding alone whenever the gap is below twice the error."""
    same = g[g.metric == "greedy_steps_equal"]
    if same.empty:
        return ""
    worst = same.loc[same["median"].idxmin()]
    at = g
    for k in ("run_id", "prompt_len"):  # the gap and error that were recorded with that count
        if k in at and pd.notna(worst[k]):
            at = at[at[k] == worst[k]]
    gap, err = at[at.metric == "top2_gap_at_divergence"], at[at.metric == "logit_error_at_divergence"]
    if gap.empty or err.empty:
        return ""
    a, e = float(gap["median"].iloc[0]), float(err["median"].iloc[0])
    verdict = ("a near-tie: the gap is below twice the logit error there, so rounding can decide the token"
               if a < 2 * e else "NOT a near-tie: the gap exceeds twice the logit error there; check the compiled path")
    return f"eager's top two logits {a:.1e} apart, graph error {e:.1e}: {verdict}"


def compile_text(df) -> str:
    ct = frame.ok(df, metric="compile_time")
    if ct.empty:
        return "No compile-time records (no compiled engine ran)."
    keys = [k for k in ("model", "dtype", "quant", "engine") if k in ct]
    g = ct.groupby(keys)["median"].agg(["sum", "count", "max"])
    return ("Compile (or graph capture) time, paid once per shape and never part of warm-up or timing: "
            + "; ".join(f"{' '.join(map(str, k))}: {fmt.fmt_time(v['sum'])} over {int(v['count'])} shapes "
                        f"(longest {fmt.fmt_time(v['max'])})" for k, v in g.iterrows()) + ".")
