"""The study's tables and sentences, computed from the records they are given (never typed in).

Each function takes the tidy frame of all finished runs (records.read_all) and returns a DataFrame
or Markdown; with no matching data it says so instead of failing.
"""
import math

import numpy as np
import pandas as pd

from . import costmodel as cm
from .ceilings import load_specs
from .models import load_config
from .records import ok_runs, read_all, read_json
from .stats import ratio_of_medians

PAIRS = [("llama-3.2-1b", "llama-3.2-3b"), ("tiny-1b", "tiny-3b")]
REQUEST = (128, 128)  # prompt and new tokens of one "request" in projections (the seed's 128-token input)
LONG_PROMPT = 1024  # a long-document prompt, for the projected TTFT


def load(results_dir) -> tuple[pd.DataFrame, list[dict]]:
    runs = [read_json(r / "run.json") for r in ok_runs(results_dir)]
    df = read_all(results_dir)
    by_id = {r["run_id"]: r["notebook"] for r in runs}
    df["notebook"] = df["run_id"].map(by_id)
    return df, runs


def ok(df: pd.DataFrame, **eq) -> pd.DataFrame:
    sel = df[df.status == "ok"]
    for k, v in eq.items():
        sel = sel[sel[k].isin(v) if isinstance(v, (list, tuple, set)) else sel[k] == v]
    return sel


def pair(df: pd.DataFrame):
    """(small, large) model names present in the data, e.g. the 1B and the 3B."""
    present = set(df.model.dropna())
    return next(((s, l) for s, l in PAIRS if s in present and l in present), None)


def role(model: str, p) -> str | None:
    return None if not p else {p[0]: "small", p[1]: "large"}.get(model)


def fmt_time(s: float) -> str:
    if s is None or not np.isfinite(s):
        return "n/a"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def fmt_gb(b: float) -> str:
    return "n/a" if b is None or not np.isfinite(b) else f"{b / 1e9:.3g} GB"


def fmt_ci(m, lo, hi, fmt=lambda x: f"{x:.3g}") -> str:
    if lo is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return fmt(m)
    return f"{fmt(m)} (95% CI {fmt(lo)}–{fmt(hi)})"


def device_kind(df: pd.DataFrame) -> str:
    kinds = df.device.dropna()
    return kinds.mode().iat[0] if len(kinds) else "none"


def weights_used(df: pd.DataFrame) -> str:
    w = sorted(set(df.weights.dropna()))
    return " and ".join(w) if w else "no"


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
            f"transformers {d.get('transformers')}. Code: commit {', '.join(c[:12] + ('+dirty' if 'dirty' in c else '') for c in commits)}. "
            + synth)


# --- latency ------------------------------------------------------------------------------------------

def latency_rows(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Batch-1 TTFT or TPOT of unquantized models from the latency notebook."""
    return ok(df, notebook="01_latency", metric=metric, quant="none", batch=1)


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """large/small ratio of TTFT per prompt length and TPOT per context (`tokens`), with bootstrap CIs."""
    p = pair(df)
    if not p:
        return pd.DataFrame()
    rows = []
    for metric, x in (("ttft", "prompt_len"), ("tpot", "context_len")):
        d = latency_rows(df, metric)
        for (dtype, length), g in d.groupby(["dtype", x]):
            s, l = g[g.model == p[0]], g[g.model == p[1]]
            if len(s) and len(l):
                r, lo, hi = ratio_of_medians(s.iloc[0]["samples"], l.iloc[0]["samples"])
                rows.append({"metric": metric.upper(), "dtype": dtype, "tokens": int(length),
                             p[0]: fmt_time(s.iloc[0]["median"]), p[1]: fmt_time(l.iloc[0]["median"]),
                             "ratio": r, "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows)


def weight_ratio(small: str, large: str) -> float:
    """large/small weight bytes at any one dtype (= parameter ratio): the ratio of memory-bound decode times."""
    return cm.count_params(load_config(large))["total"] / cm.count_params(load_config(small))["total"]


def latency_text(df) -> str:
    p, t = pair(df), ratio_table(df)
    if not p or t.empty:
        return "No batch-1 latency records of both models: nothing to compare."
    tp = t[t.metric == "TPOT"]
    tt = t[t.metric == "TTFT"]
    lines = []
    if len(tp):
        lines.append(f"Per-token decode latency (TPOT) of {p[1]} is {fmt_ci(*tp.iloc[0][['ratio', 'ci_low', 'ci_high']])}"
                     f" times that of {p[0]} at a context of {int(tp.iloc[0]['tokens'])} tokens"
                     + (f", and {fmt_ci(*tp.iloc[-1][['ratio', 'ci_low', 'ci_high']])} at {int(tp.iloc[-1]['tokens'])}."
                        if len(tp) > 1 else "."))
    if len(tt):
        lines.append(f"Time to first token grows from {tt.iloc[0][p[0]]} ({p[0]}) and {tt.iloc[0][p[1]]} ({p[1]}) at "
                     f"{int(tt.iloc[0]['tokens'])} prompt tokens to {tt.iloc[-1][p[0]]} and {tt.iloc[-1][p[1]]} at "
                     f"{int(tt.iloc[-1]['tokens'])}; the {p[1]}/{p[0]} ratio there is "
                     f"{fmt_ci(*tt.iloc[-1][['ratio', 'ci_low', 'ci_high']])}.")
    lines.append(f"For comparison, the ratio of weight bytes is {weight_ratio(*p):.2f}: the bound for memory-bound "
                 "decoding.")
    return " ".join(lines)


def generate_gap(df) -> pd.DataFrame:
    g = ok(df, notebook="01_latency", experiment="generate")
    if g.empty:
        return g
    lat, gap = g[g.metric == "generate_latency"], g[g.metric == "generate_gap"]
    out = lat[["model", "dtype", "prompt_len", "new_tokens", "median"]].rename(columns={"median": "generate"})
    out["TTFT + (n-1) x TPOT"] = lat.note.str.extract(r"= ([\d.e+-]+) s")[0].astype(float).values
    out["gap"] = gap["median"].values
    out["gap share"] = out["gap"] / out["generate"]
    for c in ("generate", "TTFT + (n-1) x TPOT", "gap"):
        out[c] = out[c].map(fmt_time)
    out["gap share"] = out["gap share"].map(lambda x: f"{x:+.1%}")
    return out


# --- throughput and memory ----------------------------------------------------------------------------

def batch_table(df) -> pd.DataFrame:
    d = df[(df.notebook == "02_batch_sweep") & (df.experiment == "batch")]
    if d.empty:
        return d
    keys = ["model", "dtype", "quant", "batch"]
    piv = d[d.metric == "generate_latency"][keys + ["status"]]  # every batch tried, out-of-memory ones too
    for metric in ("tokens_per_s", "requests_per_s", "generate_latency", "peak_memory"):
        piv = piv.merge(d[d.metric == metric][keys + ["median"]].rename(columns={"median": metric}), on=keys, how="left")
    piv = piv.astype({m: float for m in ("tokens_per_s", "requests_per_s", "generate_latency", "peak_memory")})

    def num(fmt):
        return lambda x: fmt(x) if np.isfinite(x) else ""
    out = pd.DataFrame({"model": piv.model, "dtype": piv.dtype, "quant": piv.quant, "batch": piv.batch.astype(int),
                        "tokens/s": piv.tokens_per_s.map(num(lambda x: f"{x:.3g}")),
                        "requests/s": piv.requests_per_s.map(num(lambda x: f"{x:.3g}")),
                        "latency per request": piv.generate_latency.map(num(fmt_time)),
                        "peak memory": piv.peak_memory.map(num(fmt_gb)), "status": piv.status})
    return out


def largest_batch(df) -> dict:
    d = df[(df.notebook == "02_batch_sweep") & (df.metric == "generate_latency")]
    out = {}
    for (model, quant), g in d.groupby(["model", "quant"]):
        okb = g[g.status == "ok"].batch
        out[(model, quant)] = {"largest_ok": int(okb.max()) if len(okb) else None,
                               "first_oom": int(g[g.status.str.startswith("oom")].batch.min())
                               if g.status.str.startswith("oom").any() else None,
                               "tried": int(g.batch.max())}
    return out


def batch_text(df) -> str:
    lb = largest_batch(df)
    if not lb:
        return "No batch-sweep records."
    parts = []
    for (model, quant), v in lb.items():
        t = ok(df, notebook="02_batch_sweep", model=model, quant=quant, metric="tokens_per_s")
        best = t.loc[t["median"].idxmax()] if len(t) else None
        s = f"{model} ({quant}): largest batch that ran {v['largest_ok']} of {v['tried']} tried"
        s += f", first out-of-memory at batch {v['first_oom']}" if v["first_oom"] else ", no out-of-memory"
        if best is not None:
            s += f"; best {best['median']:.3g} generated tokens/s at batch {int(best['batch'])}"
        parts.append(s + ".")
    return " ".join(parts)


# --- quantization -------------------------------------------------------------------------------------

def quant_table(df) -> pd.DataFrame:
    d = df[df.notebook == "03_quantization"]
    if d.empty:
        return d
    rows = []
    for (run, model, quant), g in d.groupby(["run_id", "model", "quant"], sort=False):
        def med(metric, exp=None):
            r = g[(g.metric == metric) & (g.status == "ok") & ((g.experiment == exp) if exp else True)]
            return r.iloc[0] if len(r) else None
        unsupported = g[g.status.str.startswith("unsupported")]
        if len(unsupported):
            rows.append({"model": model, "method": quant, "status": unsupported.iloc[0]["status"]})
            continue
        sp, wb, tp, tt = med("tpot_speedup_vs_none"), med("weight_bytes"), med("tpot"), med("ttft")
        tok = med("tokens_per_s")
        rows.append({"model": model, "method": quant, "prompt": int(tt["prompt_len"]) if tt is not None else "",
                     "weights": fmt_gb(wb["median"]) if wb is not None else "",
                     "TTFT": fmt_time(tt["median"]) if tt is not None else "",
                     "TPOT": fmt_time(tp["median"]) if tp is not None else "",
                     "decode speed-up": fmt_ci(sp["median"], sp["ci_low"], sp["ci_high"]) + " x" if sp is not None else "baseline",
                     "tokens/s": f"{tok['median']:.3g} (batch {int(tok['batch'])})" if tok is not None else "",
                     "mean KL (nats)": f"{med('kl_mean')['median']:.2e}" if med("kl_mean") is not None else "",
                     "top-1 agreement": f"{med('top1_agreement')['median']:.3f}" if med("top1_agreement") is not None else "",
                     "rel. logit error": f"{med('rel_logit_error')['median']:.3g}" if med("rel_logit_error") is not None else "",
                     "weights from": g.weights.dropna().iloc[0] if g.weights.notna().any() else "",
                     "status": "ok"})
    return pd.DataFrame(rows)


def kernels_used(df) -> list[str]:
    d = df[(df.notebook == "03_quantization") & (df.metric == "weight_bytes") & (df.quant != "none")]
    return sorted({f"`{q}`: {n.split(': ', 1)[-1]}" for q, n in zip(d.quant, d.note) if n})


# --- efficiency against the limits --------------------------------------------------------------------

def ceilings_table(df) -> pd.DataFrame:
    d = df[(df.experiment == "ceiling")]
    return pd.DataFrame({"device": d.device_name, "measure": d.metric, "dtype": d.dtype,
                         "median": d["median"].map(lambda x: f"{x:.4g}" if np.isfinite(x) else ""),
                         "95% CI": [f"{lo:.4g}–{hi:.4g}" if np.isfinite(lo) else "" for lo, hi in zip(d.ci_low, d.ci_high)],
                         "unit": d.unit, "how": d.note, "status": d.status})


def efficiency_table(df) -> pd.DataFrame:
    """Decode MBU at batch 1 and prefill MFU at the longest prompt, per model (latency notebook)."""
    rows = []
    for model, g in ok(df, notebook="01_latency", quant="none").groupby("model"):
        dec, pre = g[g.metric == "tpot"], g[g.metric == "ttft"]
        if len(dec):
            r = dec.loc[dec.context_len.idxmin()]
            rows.append({"model": model, "measure": f"decode, batch 1, context {int(r.context_len)}",
                         "time": fmt_time(r["median"]), "lower bound": fmt_time(r.bound_s),
                         "MBU": f"{r.mbu:.1%}", "MFU": f"{r.mfu:.1%}"})
        if len(pre):
            r = pre.loc[pre.prompt_len.idxmax()]
            rows.append({"model": model, "measure": f"prefill, {int(r.prompt_len)} tokens",
                         "time": fmt_time(r["median"]), "lower bound": fmt_time(r.bound_s),
                         "MBU": f"{r.mbu:.1%}", "MFU": f"{r.mfu:.1%}"})
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
                row["_tpot_s"], row["_key"] = tpot, key
                rows.append(row)
    return pd.DataFrame(rows)


# --- Chinese tokenization -----------------------------------------------------------------------------

def tokenization(df) -> tuple[str, pd.DataFrame]:
    from .models import load_tokenizer
    from .workload import tokens_per_char
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


def table_html(t: pd.DataFrame) -> str:
    return t.to_html(index=False, escape=True, na_rep="", float_format=lambda x: f"{x:.3g}") if len(t) else ""


def is_finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


# --- summary and limitations --------------------------------------------------------------------------

def summary_text(df, runs, checks) -> str:
    if df.empty:
        return "No finished runs: nothing was measured. Run a grid (see the README), then rebuild this report."
    d = runs[0].get("device", {}) if runs else {}
    out = [f"- Measured on **{d.get('device_name')}** ({device_kind(df)}), with {weights_used(df)} weights."]
    p, t = pair(df), ratio_table(df)
    for m in (p or ()):
        tp, tt = latency_rows(df, "tpot"), latency_rows(df, "ttft")
        tp, tt = tp[tp.model == m], tt[tt.model == m]
        if len(tp):
            r = tp.loc[tp.context_len.idxmin()]
            first = ""
            if len(tt):
                f = tt.loc[tt.prompt_len.idxmax()]
                first = f"; first token after {fmt_time(f['median'])} for a {int(f.prompt_len)}-token prompt"
            out.append(f"- {m}: {fmt_time(r['median'])} per output token at batch 1 ({r['dtype']}, context "
                       f"{int(r.context_len)}), {r.mbu:.0%} of measured memory bandwidth{first}.")
    if p and len(t[t.metric == "TPOT"]):
        r = t[t.metric == "TPOT"].iloc[0]
        out.append(f"- 3B/1B decode latency ratio: {fmt_ci(r.ratio, r.ci_low, r.ci_high)}.")
    for (model, quant), v in largest_batch(df).items():
        tok = ok(df, notebook="02_batch_sweep", model=model, quant=quant, metric="tokens_per_s")
        if len(tok):
            out.append(f"- {model} ({quant}): up to {tok['median'].max():.3g} generated tokens/s; largest batch that ran: "
                       f"{v['largest_ok']}" + (f", out of memory from batch {v['first_oom']}." if v["first_oom"] else
                                               " (no out-of-memory)."))
    sp = ok(df, metric="tpot_speedup_vs_none")
    for _, r in sp.loc[sp.groupby("model")["median"].idxmax()].iterrows() if len(sp) else []:
        out.append(f"- Fastest quantization for {r.model}: {r.quant}, decode {fmt_ci(r['median'], r.ci_low, r.ci_high)}x "
                   f"faster than {r['dtype']}.")
    counts = {}
    for c in checks:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    out.append("- Seed claims: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + ".")
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
                     + ("On this CPU, bf16 and fp16 have no fast kernel, so 16-bit figures are derived, not measured. "
                        if kind == "cpu" else ""))
    items.append("Inference is Hugging Face transformers in eager mode with a dynamic KV cache: no static cache, "
                 "graph capture or fused kernels, so the gap to the lower bounds is partly software.")
    if kind == "cpu":
        items.append("CPU peak memory is the process's peak resident set (it includes Python and the libraries), "
                     "reset before each measurement. The CPU `w8a8` path (fbgemm) quantizes activations per tensor "
                     "with a 7-bit range, not per token.")
    items.append("Ceilings come from simple kernels (a sum, a copy, a square matmul): they are what this software "
                 "reaches, not the hardware's absolute peak. Each ratio comes from one run; the shared machine is "
                 "noisy, which the confidence intervals reflect only within that run.")
    return "\n".join(f"- {i}" for i in items)
