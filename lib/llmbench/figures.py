"""Report figures: one color per model everywhere, units on every axis, saved as PNG and SVG."""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from . import report as R  # noqa: E402

COLORS = {"llama-3.2-1b": "#1b9e77", "llama-3.2-3b": "#d95f02", "tiny-1b": "#7570b3", "tiny-3b": "#e7298a"}
MARKERS = {"none": "o", "w8a16": "s", "w8a8": "^", "w4a16": "D"}
sns.set_theme(style="whitegrid", context="notebook")


def color(model: str) -> str:
    return COLORS.get(model, "#666666")


def save(fig, figures_dir, name: str) -> Path:
    d = Path(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    fig.savefig(d / f"{name}.svg", bbox_inches="tight")
    fig.savefig(d / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return d / f"{name}.png"


def _errorbar(ax, d, x, label, c, scale=1e3, marker="o", ls="-"):
    d = d.sort_values(x)
    ax.errorbar(d[x], d["median"] * scale, yerr=[(d["median"] - d.ci_low).fillna(0) * scale,
                                                   (d.ci_high - d["median"]).fillna(0) * scale],
                marker=marker, ls=ls, capsize=3, color=c, label=label)


def latency(df, figures_dir):
    t, p = R.latency_rows(df, "ttft"), R.latency_rows(df, "tpot")
    if t.empty and p.empty:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for (model, dtype), g in t.groupby(["model", "dtype"]):
        _errorbar(ax[0], g, "prompt_len", f"{model} {dtype}", color(model), ls="-" if dtype != "fp16" else "--")
    for (model, dtype), g in p.groupby(["model", "dtype"]):
        _errorbar(ax[1], g, "context_len", f"{model} {dtype}", color(model), ls="-" if dtype != "fp16" else "--")
    ax[0].set(xlabel="prompt length (tokens)", ylabel="time to first token (ms)",
              title="Prefill: TTFT, batch 1 (median, 95% CI)")
    ax[1].set(xlabel="tokens in KV cache (context)", ylabel="time per output token (ms)",
              title="Decode: TPOT, batch 1 (median, 95% CI)")
    for a, d, x in ((ax[0], t, "prompt_len"), (ax[1], p, "context_len")):
        a.set_xscale("log", base=2)
        ticks = sorted(d[x].dropna().unique())
        a.set_xticks(ticks, [str(int(v)) for v in ticks])
        a.minorticks_off()
        a.set_ylim(bottom=0)
        a.legend(fontsize=8)
    return save(fig, figures_dir, "latency")


def throughput(df, figures_dir):
    d = df[(df.notebook == "02_batch_sweep") & (df.status == "ok")]
    if d.empty:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for (model, quant), g in d.groupby(["model", "quant"]):
        kw = dict(color=color(model), marker=MARKERS.get(quant, "o"), label=f"{model} {quant}")
        for a, metric, scale in ((ax[0], "tokens_per_s", 1), (ax[1], "generate_latency", 1), (ax[2], "peak_memory", 1e-9)):
            m = g[g.metric == metric].sort_values("batch")
            a.plot(m.batch, m["median"] * scale, **kw)
    oom = df[(df.notebook == "02_batch_sweep") & df.status.str.startswith("oom", na=False)]
    for _, r in oom.iterrows():
        ax[0].axvline(r.batch, color=color(r.model), ls=":", lw=1)
    ax[0].set(ylabel="generated tokens/s", title="Throughput (dotted: out of memory)")
    ax[1].set(ylabel="latency per request (s)", title="Whole-batch generate latency")
    ax[2].set(ylabel="peak memory (GB)", title="Peak memory")
    for a in ax:
        a.set_xlabel("batch size (requests)")
        a.set_xscale("log", base=2)
        a.legend(fontsize=8)
    return save(fig, figures_dir, "throughput_memory")


def quantization(df, figures_dir):
    d = df[(df.notebook == "03_quantization") & (df.status == "ok")]
    sp, kl = d[d.metric == "tpot_speedup_vs_none"], d[d.metric == "kl_mean"]
    if sp.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for _, r in sp.iterrows():
        k = kl[(kl.model == r.model) & (kl.quant == r.quant) & (kl.run_id == r.run_id)]
        if k.empty:
            continue
        ax.errorbar(k["median"].iat[0], r["median"], yerr=[[r["median"] - r.ci_low], [r.ci_high - r["median"]]],
                    marker=MARKERS.get(r.quant, "o"), color=color(r.model), capsize=3, ls="none")
        ax.annotate(f"{r.model} {r.quant}", (k["median"].iat[0], r["median"]), fontsize=8, xytext=(4, 4),
                    textcoords="offset points")
    ax.axhline(1, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="mean KL divergence to the unquantized model (nats)",
           ylabel="decode speed-up over unquantized (x)", title="Quantization: speed against fidelity")
    return save(fig, figures_dir, "quantization")


def roofline(df, figures_dir):
    d = df[(df.status == "ok") & df.flops.notna() & (df.unit == "s") & (df["median"] > 0) & (df.quant == "none")]
    ceil = df[(df.experiment == "ceiling") & (df.status == "ok")]
    if d.empty or ceil.empty:
        return None
    from .ceilings import from_records
    c = from_records(ceil)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ai = np.logspace(-1, 4, 200)
    for dt, peak in c["flops"].items():
        ax.plot(ai, np.minimum(peak, ai * c["bandwidth"]) / 1e9, lw=1.2, label=f"measured ceiling, {dt}")
    for (model, exp), g in d.groupby(["model", "experiment"]):
        ax.scatter(g.flops / g.bytes, g.flops / g["median"] / 1e9, color=color(model),
                   marker={"prefill": "o", "decode": "s", "generate": "^", "batch": "D"}.get(exp, "x"),
                   label=f"{model} {exp}", alpha=0.8, s=25)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte moved)",
           ylabel="achieved GFLOP/s", title="Roofline: unquantized runs against this device's measured ceilings")
    ax.legend(fontsize=7, ncol=2)
    return save(fig, figures_dir, "roofline")


def projection(proj, figures_dir):
    if proj.empty:
        return None
    p = proj[proj.precision == "16-bit"]
    fig, ax = plt.subplots(figsize=(9, 4))
    devices = list(dict.fromkeys(p.device))
    models = list(dict.fromkeys(p.model))
    w = 0.8 / max(len(models), 1)
    for i, m in enumerate(models):
        g = p[p.model == m].set_index("device").reindex(devices)
        ax.bar(np.arange(len(devices)) + i * w, g._tpot_s * 1e3, width=w, color=color(m), label=m)
    ax.set_xticks(np.arange(len(devices)) + w * (len(models) - 1) / 2)
    unconfirmed = set(p[p["unconfirmed inputs"] != "none"].device)
    ax.set_xticklabels([d.replace("Huawei ", "").replace("NVIDIA ", "") + (" *" if d in unconfirmed else "")
                        for d in devices], rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="lower bound on TPOT (ms)",
           title="Projection (bounds, not measurements): 16-bit decode, batch 1\n* spec figures unconfirmed")
    ax.legend()
    return save(fig, figures_dir, "projection_tpot_bound")
