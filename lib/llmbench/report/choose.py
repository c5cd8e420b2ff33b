"""What to choose: which measured configurations meet given latency targets on this device, and what
that choice costs in throughput and memory; and how much KV cache the Ascend memory classes hold.

Targets come from data/published.yaml (MLPerf's interactive and conversational limits, the seed's own
figures), each with its source. Everything else is read from the records. Where serving records exist
(04_serving), an MLPerf target is answered by goodput, the requests/s a server delivered within both of
its limits under load, instead of the batch-1 latencies: that is the deployer's question.
"""
import numpy as np
import pandas as pd

from llmbench.measure import serving_metrics as SM
from llmbench.model import costmodel as cm
from llmbench.model.models import load_config
from llmbench.report import serving as RS
from llmbench.results import fmt, frame

CONTEXTS = (2048, 8192, 32768, 131072)  # tokens per sequence for the memory table (131072: the models' maximum)


def _batch1(df, metric):
    d = frame.ok(df, metric=metric, batch=1)
    return d[d.study.isin(["latency", "quantization"])] if "study" in d else d


def candidates(df) -> pd.DataFrame:
    """One row per configuration (model, engine, dtype, quant, ...): batch-1 TTFT at its longest measured
    prompt, TPOT at its shortest context, and from the batch sweep the decode rate per batch. The choice is
    between the study's two models where both ran (a trained model beside them, e.g. SmolLM2-135M, is there
    for fidelity on real weights, not as a candidate)."""
    p = frame.pair(df)
    df = df[df.model.isin(p)] if p and "model" in df else df
    keys = frame.config_keys(df, drop=("weights_source", "tokens"))
    tt, tp = _batch1(df, "ttft"), _batch1(df, "tpot")
    rows = []
    for k, g in tp.groupby(keys, dropna=False) if len(tp) else []:
        cfg = dict(zip(keys, k))
        r = g.loc[g.context_len.idxmin()]
        t = tt
        for key, v in cfg.items():
            t = t[t[key] == v] if key in t else t
        f = t.loc[t.prompt_len.idxmax()] if len(t) else None
        rows.append({**cfg, "tpot_s": r["median"], "tpot_hi": r.ci_high, "context": int(r.context_len),
                     "ttft_s": f["median"] if f is not None else np.nan,
                     "ttft_hi": f.ci_high if f is not None else np.nan,
                     "prompt": int(f.prompt_len) if f is not None else None})
    return pd.DataFrame(rows)


def _best_batch(df, cfg: dict, tpot_limit: float):
    """Largest swept batch whose per-step time (batch / decode tokens/s) meets the TPOT limit, with its
    decode tokens/s and peak memory. Without a timed decode split, batch 1 only (its TPOT is measured)."""
    d = frame.ok(df, study="batch_sweep")
    for key, v in cfg.items():
        if key in d:
            d = d[d[key] == v]
    dec = d[d.metric == "decode_tokens_per_s"]
    if dec.empty:
        return None
    dec = dec.assign(step=dec.batch / dec["median"])
    fit = dec[dec.step <= tpot_limit]
    if fit.empty:
        return None
    r = fit.loc[fit.batch.idxmax()]
    mem = d[(d.metric == "peak_memory") & (d.batch == r.batch)]
    return {"batch": int(r.batch), "decode_tps": r["median"], "step_s": r.step,
            "peak": mem["median"].max() if len(mem) else np.nan}


def choose(df, targets: list[dict]) -> pd.DataFrame:
    """Per target and configuration: meets TTFT? meets TPOT? and, if both, the throughput and memory."""
    c = candidates(df)
    if c.empty:
        return c
    peak = frame.ok(df, metric="peak_memory", batch=1)
    rows = []
    for t in targets:
        for r in c.to_dict("records"):
            cfg = {k: r[k] for k in frame.config_keys(c)}
            meets_tpot = r["tpot_s"] <= t["tpot_s"]
            meets_ttft = t.get("ttft_s") is None or (np.isfinite(r["ttft_s"]) and r["ttft_s"] <= t["ttft_s"])
            row = {"target": t["name"],
                   "limits": f"TTFT ≤ {fmt.fmt_time(t['ttft_s'])}, " if t.get("ttft_s") else "",
                   **{k: cfg[k] for k in ("model", "engine", "dtype", "quant") if k in cfg},
                   "TTFT": f"{fmt.fmt_time(r['ttft_s'])} ({r['prompt']} tok)" if r["prompt"] else "not measured",
                   "TPOT (batch 1)": fmt.fmt_time(r["tpot_s"]),
                   "meets": "yes" if meets_tpot and meets_ttft else "no"}
            row["limits"] += f"TPOT ≤ {fmt.fmt_time(t['tpot_s'])}"
            if meets_tpot and meets_ttft:
                b = _best_batch(df, cfg, t["tpot_s"])
                pm = peak
                for key, v in cfg.items():
                    pm = pm[pm[key] == v] if key in pm else pm
                if b:
                    row.update({"largest batch within TPOT": b["batch"], "decode tokens/s": f"{b['decode_tps']:.3g}",
                                "peak memory": fmt.fmt_gb(b["peak"])})
                else:
                    row.update({"largest batch within TPOT": "1 (no timed batch sweep)",
                                "decode tokens/s": f"{1 / r['tpot_s']:.3g}",
                                "peak memory": fmt.fmt_gb(pm["median"].max()) if len(pm) else ""})
            rows.append(row)
    return pd.DataFrame(rows)


def goodput_choice(df, target: dict) -> pd.DataFrame:
    """Per served configuration (model, server, dtype, quant): its serving run with the highest goodput at
    this target (requests/s within both its TTFT and TPOT limit), among runs that were not saturated and
    completed every request, and where some request met it. Empty when the target is not a serving limit or no such run exists."""
    t = RS.runs(df)
    if t.empty or target["name"] not in {lim.name for lim in SM.limits()}:
        return pd.DataFrame()
    col = f"goodput_{SM.slug(target['name'])}"
    t = t[~t.saturated & (t.completed_share == 1) & np.isfinite(t[col]) & (t[col] > 0)]  # 0: no request met it
    if t.empty:
        return t
    keys = [k for k in ("model", "engine", "dtype", "quant") if k in t]
    best = t.loc[t.groupby(keys, sort=True)[col].idxmax()]
    return best.assign(goodput=best[col]).sort_values("goodput", ascending=False)


def _goodput_line(df, target: dict) -> str | None:
    """The target's line from the serving runs, or None where there are none (today's logic then)."""
    b = goodput_choice(df, target)
    limits = ", ".join(f"{k} ≤ {fmt.fmt_time(target[f'{k.lower()}_s'])}" for k in ("TTFT", "TPOT") if target.get(f"{k.lower()}_s"))
    if b.empty:
        served = target["name"] in {lim.name for lim in SM.limits()} and not RS.runs(df).empty
        return (f"- **{target['name']}** ({limits}), from the serving runs (04_serving): no served configuration had a "
                "request meet both limits in a run that kept up with its load and completed every request."
                if served else None)

    def who(r):
        return f"{r['model']} on {r['engine']} ({r['dtype']}, quant {r['quant']})"
    top = b.iloc[0]
    return (f"- **{target['name']}** ({limits}), from the serving runs (04_serving), by goodput: the requests/s whose "
            f"TTFT and TPOT both met the limit, in runs that kept up with their load and completed every request. "
            f"Highest: {who(top)}, {top.goodput:.3g} req/s ({RS._load_label(top)}, achieved {top.achieved:.3g} req/s)."
            + (" Others: " + "; ".join(f"{who(r)} {r.goodput:.3g} req/s" for _, r in b.iloc[1:].iterrows()) + "."
               if len(b) > 1 else "")
            + " The batch-1 latencies are not used for this target.")


def choose_text(df, targets: list[dict]) -> str:
    t = choose(df, targets)
    served = {x["name"]: _goodput_line(df, x) for x in targets}
    if t.empty and not any(served.values()):
        return "No batch-1 latency records: nothing to choose from."
    out = []
    for x in targets:
        if served[x["name"]]:
            out.append(served[x["name"]])
            continue
        g = t[t.target == x["name"]] if len(t) else t
        if g.empty:
            continue
        name = x["name"]
        yes = g[g.meets == "yes"]
        if yes.empty:
            out.append(f"- **{name}** ({g.limits.iat[0]}): no configuration measured here meets it.")
            continue
        def tps(x):
            try:
                return float(x)
            except (TypeError, ValueError):
                return 0.0
        best = yes.loc[yes["decode tokens/s"].map(tps).idxmax()]
        who = " ".join(str(best[k]) for k in ("model", "engine", "dtype", "quant") if k in best)
        large = [m for m in yes.model.unique() if frame.role(m, frame.pair(df)) == "large"]
        out.append(f"- **{name}** ({g.limits.iat[0]}): {len(yes)} of {len(g)} configurations meet it; highest "
                   f"decode throughput: {who} at batch {best['largest batch within TPOT']}, {best['decode tokens/s']} "
                   f"tokens/s, peak memory {best['peak memory']}."
                   + (f" The larger model ({', '.join(large)}) meets it too." if large else
                      " The larger model does not meet it here."))
    return "\n".join(out)


def memory_classes(models, classes_gb) -> pd.DataFrame:
    """How many tokens of KV cache fit next to the weights in each memory class (16-bit KV)."""
    rows = []
    for m in models:
        cfg = load_config(m)
        kv = cm.kv_cache_bytes(cfg, 1, 1, "bf16")
        for prec, nbytes in (("16-bit", 2), ("int8 weights", 1)):
            wb = cm.dense_weight_bytes(cfg, nbytes)
            row = {"model": m, "weights": prec, "weight bytes": fmt.fmt_gb(wb), "KV per token (16-bit)": f"{kv / 1e3:.1f} kB"}
            for gb in classes_gb:
                free = gb * 1e9 - wb
                tokens = free / kv if free > 0 else 0
                row[f"{gb} GB: KV tokens"] = f"{tokens / 1e3:.0f}k" if tokens else "weights do not fit"
                row[f"{gb} GB: sequences at {CONTEXTS[1] // 1024}k"] = int(tokens // CONTEXTS[1])
            rows.append(row)
    return pd.DataFrame(rows)


def memory_text(classes_gb) -> str:
    return (f"Memory classes of Ascend cards ({', '.join(f'{g} GB' for g in classes_gb)}): tokens of 16-bit KV cache "
            "that fit beside the weights (the rest of the card's memory; activations and the runtime's reserve "
            "come out of it too), and how many sequences of 8k tokens that is. KV per token = 2 (K and V) x "
            "layers x KV heads x head dim x 2 bytes, from the exact configs.")


def choose_matrix(df, targets: list[dict]) -> pd.DataFrame:
    """One row per configuration, one column per target: meets it (yes/no)."""
    t = choose(df, targets)
    if t.empty:
        return t
    idx = [c for c in ("model", "engine", "dtype", "quant", "TTFT", "TPOT (batch 1)") if c in t]
    m = t.pivot_table(index=idx, columns="target", values="meets", aggfunc="first", sort=False)
    m.columns.name = None
    return m.reset_index()[[*idx, *[x["name"] for x in targets]]]
