"""The study's tables and sentences, computed from the records they are given (never typed in).

Each function takes the tidy frame of all finished runs (records.read_all) and returns a DataFrame
or Markdown; with no matching data it says so instead of failing.
"""

import numpy as np
import pandas as pd

from llmbench.core.stats import ratio_of_medians
from llmbench.measure.ceilings import from_records, load_specs
from llmbench.model import costmodel as cm
from llmbench.model.inputs import tokens_per_char
from llmbench.model.models import load_config, load_tokenizer
from llmbench.results.decode_fit import fits, implied_ratio
from llmbench.results.fmt import fmt_ci, fmt_gb, fmt_mbu, fmt_time
from llmbench.results.frame import (LONG_PROMPT, REQUEST, config_keys, device_kind, latency_rows, ok, pair,
                                    published_ratios, repeats, trend, weights_used)
from llmbench.results.ratios import CROSS_POINT, paired_speedups as speedups_from_pairs, ratio_table, run_source, weight_ratio
from llmbench.results.anomalies import DISPATCH_WHY, record_flags
from llmbench.system.canary import PREFIX as CANARY_PREFIX


# --- provenance ---------------------------------------------------------------------------------------

def provenance(df: pd.DataFrame, runs: list[dict], results_dir) -> pd.DataFrame:
    rows = []
    for r in runs:
        d = r.get("device", {})
        rows.append({"run": r["run_id"], "notebook": r["notebook"], "grid": r.get("grid"),
                     "device": f"{d.get('device')}: {d.get('device_name')} x{d.get('device_count')}",
                     "torch": r.get("versions", {}).get("torch"), "transformers": r.get("versions", {}).get("transformers"),
                     "commit": (r.get("git_commit") or "")[:12] + ("+dirty" if "dirty" in (r.get("git_commit") or "") else ""),
                     "start": r.get("start"), "duration": fmt_time(r.get("duration_s") or float("nan"))})
    return pd.DataFrame(rows)


def provenance_text(df, runs, results_dir) -> str:
    if not runs:
        return f"No finished runs were found under `{results_dir}`: every section below is empty."
    d = runs[0].get("device", {})
    weights = sorted(set(df.weights.dropna()))
    synth = ("All model weights were **synthetic**: the exact published architectures with seeded random "
             "values. Timing and memory do not depend on weight values; fidelity numbers do, and are not those "
             "of the real models.") if weights == ["synthetic"] else \
        f"Weights used: {', '.join(weights)} (each record's `weights_source` names the files)."
    commits = sorted({r.get("git_commit", "unknown") for r in runs})
    total = sum(r.get("duration_s") or 0 for r in runs)
    return (f"{len(runs)} finished runs from `{results_dir}`, {fmt_time(total)} of run time, on "
            f"**{d.get('device_name')}** ({d.get('device')}, {d.get('cpu_threads')} CPU threads, "
            f"{d.get('host_memory_bytes', 0) / 2**30:.0f} GiB host memory), torch {d.get('torch')}, "
            f"transformers {d.get('transformers')}. Engines: {', '.join(sorted(df.engine.dropna().unique())) or 'none'}"
            + (f"; {device_fields(runs)}" if device_fields(runs) else "") + ". "
            + (noise_text(df) + " " if noise_text(df) else "")
            + f"Code: commit {', '.join(c[:12] + ('+dirty' if 'dirty' in c else '') for c in commits)}. "
            + synth)


NOISE_COLUMNS = ("quiet", "attempts", "disturbance", "ci_method")


def noise_text(df) -> str:
    """Counts from the noise columns, where the runs have them."""
    parts = []
    if "quiet" in df and df.quiet.notna().any():
        q = df.quiet.dropna().astype(bool)
        parts.append(f"{(~q).sum()} of {len(q)} records measured in a window that was not quiet")
    if "attempts" in df and df.attempts.notna().any():
        a = df.attempts.dropna()
        parts.append(f"{(a > 1).sum()} records needed more than one attempt (at most {int(a.max())})")
    if "disturbance" in df and df.disturbance.notna().any():
        d = df.disturbance.dropna().astype(str).str.strip()
        d = d[~d.str.lower().isin(["", "none", "0", "0.0", "false"])]
        parts.append(f"{len(d)} records carry a disturbance note")
        c = d[d.str.contains(CANARY_PREFIX, regex=False)]
        if len(c):  # a redone window's reasons stay in its record's note, so these count redone and kept windows
            windows = sum(seg.count(CANARY_PREFIX) > 0 for note in c for seg in note.split(" | "))
            parts.append(f"{windows} windows of {len(c)} records were disturbed by the memory canary "
                         "(memory read below the run's ceiling or moving within the window, or a throttled device)")
    if "canary_before_gbs" in df and df.canary_before_gbs.notna().any():
        reads = df[["canary_before_gbs", "canary_after_gbs"]].stack()
        parts.append(f"the memory canary read {reads.min():.1f}-{reads.max():.1f} GB/s in "
                     f"{df.canary_before_gbs.notna().sum()} records' windows")
    if "ci_method" in df and df.ci_method.notna().any():
        parts.append("CI methods: " + ", ".join(f"{m} ({n})" for m, n in df.ci_method.value_counts().items()))
    return ("Measurement noise: " + "; ".join(parts) + ".") if parts else ""


DEVICE_FIELDS = ("task_queue", "cann", "compile_backend", "backend", "thp")


def device_fields(runs) -> str:
    """Dispatch and compiler settings the runs recorded (e.g. TASK_QUEUE_ENABLE, CANN version, compile backend)."""
    seen = {}
    for r in runs:
        for k, v in (r.get("device") or {}).items():
            if v not in (None, "") and any(f in k.lower() for f in DEVICE_FIELDS):
                seen.setdefault(k, set()).add(str(v))
    return "; ".join(f"{k} = {', '.join(sorted(v))}" for k, v in sorted(seen.items()))


# --- latency ------------------------------------------------------------------------------------------


def _dispatch_note(r) -> str:
    """' [dispatch-bound (...): ...; not judged]' for a ratio row (ratio_table) whose side is dispatch-bound."""
    d = r.get("dispatch")
    return f" [{d}: {DISPATCH_WHY}; the claims do not judge the models by it]" if isinstance(d, str) and d else ""


def latency_text(df) -> str:
    p, t = pair(df), ratio_table(df)
    if not p or t.empty:
        return "No batch-1 latency records of both models: nothing to compare."
    lines = []
    for engine, te in t.groupby("engine") if "engine" in t else [("", t)]:
        tp, tt = te[te.metric == "TPOT"], te[te.metric == "TTFT"]
        on = f" ({engine} engine)" if engine else ""
        for dtype, g in tp.groupby("dtype"):
            lines.append(f"Per-token decode latency (TPOT) of {p[1]}{on}, {dtype}, is "
                         f"{fmt_ci(*g.iloc[0][['ratio', 'ci_low', 'ci_high']])} times that of {p[0]} at a context of "
                         f"{int(g.iloc[0]['tokens'])} tokens ({g.iloc[0].get('source') or CROSS_POINT})"
                         + (f", and {fmt_ci(*g.iloc[-1][['ratio', 'ci_low', 'ci_high']])} at {int(g.iloc[-1]['tokens'])}"
                            if len(g) > 1 else "") + _dispatch_note(g.iloc[0]) + ".")
        for dtype, g in tt.groupby("dtype"):
            if len(g) < 2:
                continue
            words = []
            for m in p:
                r = latency_rows(df, "ttft")
                r = r[(r.model == m) & (r.dtype == dtype) & ((r.engine == engine) if engine else True)]
                r = r.groupby("prompt_len").agg(median=("median", "median"), lo=("ci_low", "min"), hi=("ci_high", "max"))
                words.append(f"for {m} it {trend(r['median'].values, r.lo.values, r.hi.values)} from "
                             f"{fmt_time(r['median'].iat[0])} at {int(r.index[0])} prompt tokens to "
                             f"{fmt_time(r['median'].iat[-1])} at {int(r.index[-1])}")
            lines.append(f"Time to first token{on}, {dtype}: " + "; ".join(words) + f". The {p[1]}/{p[0]} ratio at "
                         f"{int(g.iloc[-1]['tokens'])} tokens is {fmt_ci(*g.iloc[-1][['ratio', 'ci_low', 'ci_high']])}.")
    lines.append(f"For comparison, the ratio of weight bytes is {weight_ratio(*p):.2f}: the ratio a purely "
                 "bandwidth-bound decode would show. A fixed per-step cost (dispatch, synchronization, small "
                 "kernels) pulls the measured ratio below it, towards 1; see the fit under *Efficiency*.")
    return " ".join(lines)


def generate_gap(df) -> pd.DataFrame:
    g = ok(df, study="latency", experiment="generate")
    if g.empty:
        return g
    lat, gap = g[g.metric == "generate_latency"], g[g.metric == "generate_gap"]
    out = lat[["model", "dtype", "prompt_len", "new_tokens", "median"]].rename(columns={"median": "generate"})
    out["TTFT + (n-1) x TPOT"] = lat["predicted_s"].astype(float).values
    out["gap"] = gap["median"].values
    out["gap share"] = out["gap"] / out["generate"]
    for c in ("generate", "TTFT + (n-1) x TPOT", "gap"):
        out[c] = out[c].map(fmt_time)
    out["gap share"] = out["gap share"].map(lambda x: f"{x:+.1%}")
    return out


def decode_fit_table(df) -> pd.DataFrame:
    bw_meas = from_records(df).get("bandwidth", float("nan"))
    p, t = pair(df), ratio_table(df)
    rows = []
    for key, f in fits(df).items():
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip([k for k in ("engine", "dtype", "device") if k in df], key))
        row.update({"fixed cost per step": fmt_ci(f.fixed_s, *f.fixed_ci, fmt=fmt_time),
                    "effective bandwidth": fmt_ci(f.bandwidth / 1e9, *(x / 1e9 for x in f.bandwidth_ci)) + " GB/s",
                    "share of measured read bandwidth": f"{f.bandwidth / bw_meas:.0%}" if np.isfinite(bw_meas) else "",
                    "points": f.points, "R²": f"{f.r2:.3f}"})
        if p:
            tp = latency_rows(df, "tpot")
            sel = tp[(tp.dtype == row.get("dtype")) & ((tp.engine == row["engine"]) if "engine" in row else True)]
            b = {m: sel[sel.model == m].bytes.median() for m in p}
            if all(np.isfinite(v) for v in b.values()):
                row["3B/1B ratio the fit implies"] = f"{implied_ratio(f, b[p[0]], b[p[1]]):.2f}"
                row["bytes ratio"] = f"{b[p[1]] / b[p[0]]:.2f}"
            m = t[(t.metric == "TPOT") & (t.dtype == row.get("dtype"))
                  & ((t.engine == row["engine"]) if "engine" in row and "engine" in t else True)] if len(t) else t
            if len(m):
                r = m.loc[m.tokens.idxmin()]
                row["measured 3B/1B ratio"] = fmt_ci(r.ratio, r.ci_low, r.ci_high)
        rows.append(row)
    return pd.DataFrame(rows)


def decode_fit_text(df) -> str:
    t = decode_fit_table(df)
    pub = published_ratios()
    lo, hi = pub["3B/1B time ratio"].min(), pub["3B/1B time ratio"].max()
    tail = (f" Published 3B/1B decode ratios (tokens/s of 1B over 3B) lie between {lo:.2f} and {hi:.2f}: "
            "they come from runtimes with little per-step overhead, so they sit close to the bytes ratio.")
    if t.empty:
        return ("No fit of TPOT against bytes streamed: it needs batch-1 decode records of models of different "
                "sizes (the bytes of one model barely change with context)." + tail)
    out = []
    for r in t.to_dict("records"):
        who = " ".join(str(r[k]) for k in ("engine", "dtype", "device") if k in r)
        s = (f"{who}: TPOT = {r['fixed cost per step']} + bytes / {r['effective bandwidth']} "
             f"(R² {r['R²']}, {r['points']} records)")
        if "3B/1B ratio the fit implies" in r:
            s += (f"; this fixed cost makes the 3B/1B ratio {r['3B/1B ratio the fit implies']} instead of the bytes "
                  f"ratio {r['bytes ratio']}" + (f" (measured {r['measured 3B/1B ratio']})" if r.get("measured 3B/1B ratio") else ""))
        out.append(s + ".")
    return " ".join(out) + tail


# --- throughput and memory ----------------------------------------------------------------------------

BATCH_METRICS = {  # metric -> column; the timed split first (llama-bench's pp/tg), then the generate-based one
    "prefill_tokens_per_s": "prefill tokens/s", "decode_tokens_per_s": "decode tokens/s",
    "tokens_per_s": "generate tokens/s (prefill and decode mixed)", "requests_per_s": "requests/s",
    "generate_latency": "latency per request", "peak_memory": "peak memory"}


def batch_table(df) -> pd.DataFrame:
    d = df[(df.study == "batch_sweep") & (df.experiment == "batch")]
    if d.empty:
        return d
    keys = [*config_keys(d, drop=("weights_source", "tokens")), "batch"]
    tried = d[d.metric == "generate_latency"][[*keys, "status"]].drop_duplicates(keys)  # every batch, OOM ones too
    out = tried[keys].copy()
    for metric, col in BATCH_METRICS.items():
        m = d[(d.metric == metric) & (d.status == "ok")]
        if m.empty:
            continue
        fmt = fmt_time if metric == "generate_latency" else fmt_gb if metric == "peak_memory" else (lambda x: f"{x:.3g}")
        m = m.assign(**{col: [fmt_ci(r["median"], r["ci_low"], r["ci_high"], fmt) if metric != "peak_memory" else fmt(r["median"])
                              for r in m.to_dict("records")]})
        out = out.merge(m[[*keys, col]].drop_duplicates(keys), on=keys, how="left")
    out["status"] = tried.status.values
    out["batch"] = out.batch.astype(int)
    return out.drop(columns=[k for k in ("device", "weights") if k in out and out[k].nunique() <= 1])


def largest_batch(df) -> dict:
    """Per configuration: the largest batch that ran, the first that did not fit (tried or predicted), and
    whether the limit was found (an out-of-memory) or is just the grid's largest batch."""
    d = df[(df.study == "batch_sweep") & (df.metric == "generate_latency")]
    out = {}
    keys = config_keys(d, drop=("weights_source", "tokens", "weights", "device"))
    for k, g in d.groupby(keys, dropna=False) if len(d) else []:
        okb = g[g.status == "ok"].batch
        oom = g[g.status.str.startswith("oom")]
        first = oom.loc[oom.batch.idxmin()] if len(oom) else None
        found = {}
        for metric in ("largest_batch_predicted", "largest_batch_tried"):  # the search past the grid (02)
            f = df[(df.study == "batch_sweep") & (df.metric == metric) & (df.status == "ok")]
            for key, v in zip(keys, k if isinstance(k, tuple) else (k,)):
                f = f[f[key] == v] if key in f else f
            if len(f):
                found[metric] = int(f["median"].max())
        out[k if isinstance(k, tuple) else (k,)] = {
            "keys": keys, "largest_ok": int(okb.max()) if len(okb) else None,
            "first_oom": int(first.batch) if first is not None else None,
            "predicted": first is not None and "predicted" in first.status, "tried": int(g.batch.max()),
            "search_predicted": found.get("largest_batch_predicted"), "search_tried": found.get("largest_batch_tried")}
    return out


def batch_text(df) -> str:
    lb = largest_batch(df)
    if not lb:
        return "No batch-sweep records."
    parts = []
    split = (df.metric == "decode_tokens_per_s").any()
    for k, v in lb.items():
        sel = ok(df, study="batch_sweep", **dict(zip(v["keys"], k)))
        name = " ".join(map(str, k))
        if v["search_tried"]:
            s = (f"{name}: batches up to {v['tried']} measured; doubling past them, batch {v['search_tried']} still ran "
                 "(prefill and a decode step)")
        elif v["search_predicted"]:
            s = (f"{name}: batches up to {v['tried']} measured; the largest batch predicted to fit the memory is "
                 f"{v['search_predicted']} (cost model; not run: on a CPU a real out-of-memory kills the process)")
        elif v["first_oom"]:
            how = "predicted from the memory model (not run: on a CPU a real out-of-memory kills the process)" \
                if v["predicted"] else "out of memory when tried"
            s = f"{name}: largest batch that fits {v['largest_ok']}; batch {v['first_oom']} does not ({how})"
        else:
            s = (f"{name}: every batch up to {v['tried']} ran; that is the grid's largest batch, not a memory limit "
                 "(raise max_batch to find it)")
        metric = "decode_tokens_per_s" if split else "tokens_per_s"
        t = sel[sel.metric == metric]
        if len(t):
            best = t.loc[t["median"].idxmax()]
            s += (f"; best {metric.replace('_', ' ').replace(' per s', '/s')} "
                  f"{fmt_ci(best['median'], best.ci_low, best.ci_high)} at batch {int(best['batch'])}")
        parts.append(s + ".")
    if not split:
        parts.append("These runs have no timed prefill/decode split: generate tokens/s divides generated tokens by the "
                     "whole generate time, which with few new tokens is mostly prefill.")
    return " ".join(parts)


# --- quantization -------------------------------------------------------------------------------------

def quant_table(df) -> pd.DataFrame:
    """One row per model, engine, dtype and method of the quantization notebook, with its shapes in the row.
    Stored bytes are what the weights occupy; streamed bytes what one decode step reads (the cost model's
    count for the kernels that ran: a quantized layer's int8/int4 weights and scales, the LM head and any
    layer left unquantized). Speed-ups are TPOT ratios against the unquantized run of each baseline dtype
    present for the same model and engine."""
    d = df[df.study == "quantization"]
    if d.empty:
        return d
    okd = d[d.status == "ok"]
    paired = speedups_from_pairs(df)
    keys = config_keys(d, drop=("quant", "weights_source", "tokens"))
    rows = []
    for k, g in d.groupby([*keys, "quant"], sort=False, dropna=False):
        cfg = dict(zip([*keys, "quant"], k))
        head = {"model": cfg["model"], "engine": cfg.get("engine", ""), "dtype": cfg["dtype"], "method": cfg["quant"]}
        unsupported = g[g.status.str.startswith("unsupported")]
        if len(unsupported):
            rows.append({**head, "status": unsupported.iloc[0]["status"]})
            continue

        def med(metric):
            r = g[(g.metric == metric) & (g.status == "ok")]
            return r.iloc[0] if len(r) else None
        wb, tp, tt, tok = med("weight_bytes"), med("tpot"), med("ttft"), med("tokens_per_s")
        row = {**head,
               "TTFT/TPOT shape": f"batch 1, prompt {int(tt['prompt_len'])}" if tt is not None else "",
               "stored weights": fmt_gb(wb["median"]) if wb is not None else "",
               "streamed per decode step": fmt_gb(tp["bytes"]) if tp is not None else "",
               "TTFT": fmt_time(tt["median"]) if tt is not None else "",
               "TPOT": fmt_time(tp["median"]) if tp is not None else "",
               "decode MBU": fmt_mbu(tp["mbu"], tp.get("mbu_window")) if tp is not None else ""}
        base = okd[(okd.metric == "tpot") & (okd.quant == "none") & (okd.model == cfg["model"])
                   & ((okd.engine == cfg["engine"]) if "engine" in cfg else True)]
        sources = []
        for bdt in ("bf16", "fp16", "fp32"):
            b = base[base.dtype == bdt]
            p = paired.get((cfg["model"], cfg.get("engine"), bdt, cfg["quant"])) if bdt == cfg["dtype"] else None
            if p is not None:  # measured side by side (05_pairs): the rounds' ratio, not this notebook's
                row[f"speed-up vs {bdt}"] = fmt_ci(*p[:3]) + " x" + (f" [flagged: {p[3]}]" if p[3] else "")
                sources.append(f"vs {bdt}: {p[4]}")
            elif tp is not None and len(b) and cfg["quant"] != "none":
                m = g[(g.metric == "tpot") & (g.status == "ok")].iloc[:1]
                row[f"speed-up vs {bdt}"] = fmt_ci(*ratio_of_medians(repeats(m), repeats(b))) + " x"
                sources.append(f"vs {bdt}: {run_source(m, b)}")
        if sources:
            row["speed-up source"] = "; ".join(sources)
        row["tokens/s"] = f"{tok['median']:.3g} (batch {int(tok['batch'])}, {int(tok['new_tokens'])} new)" \
            if tok is not None else ""
        for metric, label, f in (("kl_mean", "mean KL (nats)", "{:.2e}"), ("top1_agreement", "top-1 agreement", "{:.3f}"),
                                 ("rel_logit_error", "rel. logit error", "{:.3g}")):
            r = med(metric)
            row[label] = f.format(r["median"]) if r is not None else ""
        row["fidelity on"] = f"{cfg.get('weights', '')} weights" if cfg["quant"] != "none" else ""
        row["status"] = "ok"
        rows.append(row)
    return pd.DataFrame(rows)


def quant_text(df) -> str:
    q = quant_table(df)
    if q.empty:
        return "No quantization records."
    text = ("Speed and fidelity come from the same run, on the same inputs; a speed-up is the unquantized median "
            "TPOT over the method's (bootstrap 95% CI), against every baseline dtype that ran. Where a quant pair "
            "ran (05_pairs: both loaded in one process, alternating rounds) the speed-up against its dtype is the "
            "pair's, one ratio per round with the CI from the rounds; `speed-up source` says which each is. *Stored* bytes are "
            "what the weights occupy; *streamed* bytes what one decode step reads, which is what decode time "
            "follows: a method can store more than it streams (for instance when a tied embedding is kept for "
            "the lookup beside a quantized LM head). Decode MBU is the streamed bytes per second over the "
            "measured read bandwidth: the kernel's own efficiency.")
    d = df[df.study == "quantization"]
    if not (d.dtype.isin(["bf16", "fp16"])).any():
        text += (" No 16-bit baseline ran on this device, so speed-ups are against fp32 only; the seed reasons "
                 "from 16-bit, where int8 weights halve the bytes (fp32: a quarter).")
    if (d.weights == "synthetic").any():  # rows on trained weights (e.g. smollm2-135m) say so in "fidelity on"
        text += (" **The fidelity columns of rows on synthetic weights do not predict real-model quality.** "
                 "Random weights have no outlier channels (which make real weights hard to quantize), and their "
                 "logits are nearly flat, so a small error flips the top-1 token often: a low top-1 agreement here "
                 "is expected and is not an alarm.")
    return text


def kernels_used(df) -> list[str]:
    d = df[(df.study == "quantization") & (df.metric == "weight_bytes") & (df.quant != "none")]
    return sorted({f"`{q}`: {n.split(': ', 1)[-1]}" for q, n in zip(d.quant, d.note) if n})


# --- efficiency against the limits --------------------------------------------------------------------

def ceilings_table(df) -> pd.DataFrame:
    d = df[(df.experiment == "ceiling")]
    return pd.DataFrame({"device": d.device_name, "measure": d.metric, "dtype": d.dtype,
                         "median": d["median"].map(lambda x: f"{x:.4g}" if np.isfinite(x) else ""),
                         "95% CI": [f"{lo:.4g}–{hi:.4g}" if np.isfinite(lo) else "" for lo, hi in zip(d.ci_low, d.ci_high)],
                         "unit": d.unit.where(d.dtype != "int8", "GOP/s"),  # int8 rates are operations, not FLOPs
                         "how": d.note, "status": d.status})


def efficiency_table(df) -> pd.DataFrame:
    """Decode MBU at batch 1 and prefill MFU at the longest prompt, per model (latency notebook)."""
    rows = []
    for model, g in ok(df, study="latency", quant="none").groupby("model"):
        dec, pre = g[g.metric == "tpot"], g[g.metric == "ttft"]
        if len(dec):
            r = dec.loc[dec.context_len.idxmin()]
            rows.append({"model": model, "measure": f"decode, batch 1, context {int(r.context_len)}",
                         "time": fmt_time(r["median"]), "lower bound": fmt_time(r.bound_s),
                         "MBU": fmt_mbu(r.mbu, r.get("mbu_window"), ".1%"), "MFU": f"{r.mfu:.1%}"})
        if len(pre):
            r = pre.loc[pre.prompt_len.idxmax()]
            rows.append({"model": model, "measure": f"prefill, {int(r.prompt_len)} tokens",
                         "time": fmt_time(r["median"]), "lower bound": fmt_time(r.bound_s),
                         "MBU": fmt_mbu(r.mbu, r.get("mbu_window"), ".1%"), "MFU": f"{r.mfu:.1%}"})
    return pd.DataFrame(rows)


# --- projection to other devices (bounds, not measurements) ------------------------------------------

def projection(models) -> pd.DataFrame:
    """Lower-bound TTFT, TPOT and upper-bound throughput of each model on each published device spec."""
    rows = []
    prompt, new = REQUEST
    for key, spec in load_specs().items():
        for model in models:
            cfg = load_config(model)
            for precision in ("16-bit", "int8"):
                peak_key = "int8" if precision == "int8" else ("bf16" if spec.get("bf16") else "fp16")
                peak = (spec.get("peak_TFLOPS") or {}).get(peak_key)
                if peak is None:
                    continue
                peak, bw = peak * 1e12, spec["bandwidth_GBps"] * 1e9
                wb = cm.dense_weight_bytes(cfg, 1 if precision == "int8" else 2)
                ttft = cm.bound_s(cm.prefill_flops(cfg, 1, prompt), cm.prefill_bytes(cfg, wb, 1, prompt, "bf16"), peak, bw)
                tpot = cm.bound_s(cm.decode_flops(cfg, 1, prompt), cm.decode_bytes(cfg, wb, 1, prompt, "bf16"), peak, bw)
                long_ttft = cm.bound_s(cm.prefill_flops(cfg, 1, LONG_PROMPT),
                                       cm.prefill_bytes(cfg, wb, 1, LONG_PROMPT, "bf16"), peak, bw)
                row = {"device": spec["name"], "model": model, "precision": precision,
                       f"TTFT bound ({prompt} tok)": fmt_time(ttft), f"TTFT bound ({LONG_PROMPT} tok)": fmt_time(long_ttft),
                       "TPOT bound (batch 1)": fmt_time(tpot)}
                for b in (1, 16, 32):
                    step = cm.bound_s(cm.decode_flops(cfg, b, prompt + new // 2),
                                      cm.decode_bytes(cfg, wb, b, prompt + new // 2, "bf16"), peak, bw)
                    pre = cm.bound_s(cm.prefill_flops(cfg, b, prompt), cm.prefill_bytes(cfg, wb, b, prompt, "bf16"), peak, bw)
                    row[f"req/s bound, batch {b}"] = b / (pre + new * step)
                row["unconfirmed inputs"] = ", ".join(spec.get("unconfirmed") or []) or "none"
                row["_tpot_s"], row["_ttft_s"], row["_long_ttft_s"], row["_key"] = tpot, ttft, long_ttft, key
                rows.append(row)
    return pd.DataFrame(rows)


def projection_text(proj) -> str:
    """Why a short prompt's TTFT bound can equal the TPOT bound: both are the time to read the weights once."""
    if proj.empty:
        return "No published device spec to project onto."
    prompt = REQUEST[0]
    same = proj[(proj._ttft_s / proj._tpot_s - 1).abs() < 0.05]
    text = f"A request here is a {prompt}-token prompt and {REQUEST[1]} new tokens."
    if len(same):
        text += (f" In {len(same)} of {len(proj)} rows the TTFT bound at {prompt} tokens equals the TPOT bound (within "
                 f"5%): a {prompt}-token prefill is still bandwidth bound on those devices, because reading the weights "
                 f"once takes longer than its 2N x {prompt} FLOPs at the peak rate; both bounds are then the weight-read "
                 f"time.")
        longer = (proj._long_ttft_s > 1.05 * proj._tpot_s).sum()
        text += f" At {LONG_PROMPT} tokens the compute term exceeds the weight-read time in {longer} of {len(proj)} rows."
    return text


# --- Chinese tokenization -----------------------------------------------------------------------------

def tokenization(df) -> tuple[str, pd.DataFrame]:
    real = sorted(set(df[(df.weights == "real")].weights_source.dropna()))
    for src in real:
        tok = load_tokenizer(src)
        if tok is not None:
            t = tokens_per_char(tok)
            table = pd.DataFrame({"task": list(t), "tokens per character": [f"{v:.3f}" for v in t.values()]})
            return (f"Tokenizer of `{src}` on the project's Chinese prompt corpus: {t['all']:.3f} tokens per "
                    f"character overall ({1 / t['all']:.2f} characters per token).", table)
    return ("No real tokenizer was available to these runs (synthetic weights carry none, and none can be "
            "downloaded here), so tokens per Chinese character were not measured; inputs were random token "
            "ids of exact lengths. With real weights (`weights=<dir>`), this section reports it from "
            "`data/prompts/zh.jsonl`.", pd.DataFrame())


# --- summary and limitations --------------------------------------------------------------------------

def summary_text(df, runs, checks, anomalies=None) -> str:
    if df.empty:
        return "No finished runs: nothing was measured. Run a grid (see the README), then rebuild this report."
    d = runs[0].get("device", {}) if runs else {}
    out = [f"- Measured on **{d.get('device_name')}** ({device_kind(df)}), with {weights_used(df)} weights."]
    p, t = pair(df), ratio_table(df)
    tp_all, tt_all = latency_rows(df, "tpot").reset_index(drop=True), latency_rows(df, "ttft")
    flagged = record_flags(tp_all)
    for (m, engine, dtype), tp in tp_all.groupby(["model", "engine", "dtype"]) if len(tp_all) else []:
        r = tp.loc[tp.context_len.idxmin()]
        flag = " [flagged: see *Anomalies*]" if flagged[r.name] else ""
        tt = tt_all[(tt_all.model == m) & (tt_all.engine == engine) & (tt_all.dtype == dtype)]
        first = ""
        if len(tt):
            f = tt.loc[tt.prompt_len.idxmax()]
            first = f"; first token after {fmt_time(f['median'])} for a {int(f.prompt_len)}-token prompt"
        out.append(f"- {m} ({engine}, {dtype}): {fmt_time(r['median'])} per output token at batch 1 (context "
                   f"{int(r.context_len)}), {fmt_mbu(r.mbu, r.get('mbu_window')) or 'n/a'} of measured memory "
                   f"bandwidth{flag}{first}.")
    if p and len(t[t.metric == "TPOT"]):
        for k, g in t[t.metric == "TPOT"].groupby(["engine", "dtype"]):
            r = g.loc[g.tokens.idxmin()]
            out.append(f"- {p[1]}/{p[0]} decode latency ratio ({' '.join(k)}): {fmt_ci(r.ratio, r.ci_low, r.ci_high)} "
                       f"(weight bytes: {weight_ratio(*p):.2f}; {r.get('source') or CROSS_POINT})"
                       + _dispatch_note(r) + (" [rests on a flagged record: see *Anomalies*]." if r.get("flag") else "."))
    for k, v in largest_batch(df).items():
        name = " ".join(map(str, k))
        out.append(f"- {name}: " + (f"largest batch that fits {v['largest_ok']} (batch {v['first_oom']} does not"
                                     + (", predicted)." if v["predicted"] else ", tried).")
                                     if v["first_oom"] else f"every batch up to the grid's {v['tried']} ran."))
    sp = ok(df, metric="tpot_speedup_vs_none")
    for _, r in sp.loc[sp.groupby("model")["median"].idxmax()].iterrows() if len(sp) else []:
        out.append(f"- Fastest quantization for {r.model}: {r.quant}, decode at {fmt_ci(r['median'], r.ci_low, r.ci_high)}x "
                   f"the speed of unquantized {r['dtype']}.")
    counts = {}
    for c in checks:
        v = c["verdict"].split(":")[0]
        counts[v] = counts.get(v, 0) + 1
    out.append("- Seed claims: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".")
    if anomalies is not None and len(anomalies):
        out.append(f"- {len(anomalies)} anomalies flagged in the records ("
                   + ", ".join(f"{n} {c}" for c, n in anomalies.check.value_counts().items())
                   + "): see *Anomalies* before trusting the numbers they name.")
    return "\n".join(out)


def limitations_text(df) -> str:
    kind = device_kind(df)
    items = []
    if kind != "npu":
        items.append(f"These runs are on **{kind}**, not an Ascend NPU: no NPU number appears in this report except "
                     "as a labelled bound from published specs. The NPU code paths are tested against a fake "
                     "`torch_npu` only.")
    if set(df.weights.dropna()) <= {"synthetic"}:
        items.append("Weights are synthetic. Timing and memory are those of the real architectures; fidelity and "
                     "perplexity are not those of the real models, and no task quality is measured.")
    dtypes = sorted(set(df.dtype.dropna()))
    if dtypes:
        items.append(f"Precision measured: {', '.join(dtypes)}. "
                     + ("No 16-bit run here: 16-bit figures (the seed's precision) are derived, not measured. "
                        if not set(dtypes) & {"bf16", "fp16"} else ""))
    engines = sorted(df.engine.dropna().unique()) if "engine" in df else []
    if engines == ["eager"]:
        items.append("Inference is Hugging Face transformers in eager mode with a dynamic KV cache: no static cache, "
                     "graph capture or fused kernels, so the gap to the lower bounds is partly software.")
    else:
        items.append(f"Engines measured: {', '.join(engines)}. Eager numbers include Python dispatch; compiled ones "
                     "pay a compile time once per shape (see *Engines*).")
    if kind == "cpu":
        items.append("CPU peak memory is the process's peak resident set (it includes Python and the libraries), "
                     "reset before each measurement. The CPU `w8a8` path (fbgemm) quantizes activations per tensor "
                     "with a 7-bit range, not per token.")
    items.append("Ceilings come from simple kernels (a sum, a copy, a square matmul): they are what this software "
                 "reaches, not the hardware's absolute peak. Each ratio comes from one run; the shared machine is "
                 "noisy, which the confidence intervals reflect only within that run.")
    return "\n".join(f"- {i}" for i in items)
