"""Report figures: one color per model everywhere, one line style per ceiling, units on every axis,
legends outside the data (never over a marker), saved as PNG and SVG, each with alt text that says what
it shows (computed from the same data)."""
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402

from llmbench.measure.ceilings import from_records
from llmbench.results import frame

COLORS = {"llama-3.2-1b": "#1b9e77", "llama-3.2-3b": "#d95f02", "tiny-1b": "#7570b3", "tiny-3b": "#e7298a"}
MARKERS = {"none": "o", "w8a16": "s", "w8a8": "^", "w4a16": "D"}
ENGINE_LS = {"eager": "-", "compiled": "--", "llamacpp": ":"}
CEILING_LS = ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]  # ceilings are black, told apart by line style
sns.set_theme(style="whitegrid", context="notebook")
# CJK glyphs, should a label carry any: the first installed of these (fonts-noto-cjk on Debian)
plt.rcParams["font.sans-serif"] = ["DejaVu Sans", "Noto Sans CJK SC", "Noto Sans CJK JP", "Source Han Sans SC",
                                   *plt.rcParams["font.sans-serif"]]


@dataclass
class Fig:
    path: Path
    alt: str


def color(model: str) -> str:
    return COLORS.get(model, "#666666")


def save(fig, figures_dir, name: str, alt: str) -> Fig:
    d = Path(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    fig.savefig(d / f"{name}.svg", bbox_inches="tight")
    fig.savefig(d / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    (d / f"{name}.txt").write_text(alt + "\n")  # the alt text beside the image, for reuse outside the report
    return Fig(d / f"{name}.png", alt)


def legend_below(fig, axes, ncol=4):
    """One legend for the figure, under the axes: it never covers data."""
    handles, labels = {}, []
    for a in np.atleast_1d(axes):
        for h, lab in zip(*a.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if handles:  # top of the legend just under the lowest tick label of any axes
        r = fig.canvas.get_renderer()
        y0 = min(a.get_tightbbox(r).transformed(fig.transFigure.inverted()).y0 for a in np.atleast_1d(axes))
        fig.legend([handles[lab] for lab in labels], labels, loc="upper center", bbox_to_anchor=(0.5, y0 - 0.01),
                   ncol=min(ncol, len(labels)), fontsize=8, frameon=False)


def fit_whiskers(a, d, scale=1.0) -> bool:
    """Y from 0 to 2.5x the largest median when some CI whisker reaches beyond it (a CI over three
    repeats can span orders of magnitude and flatten every median); True when whiskers were cut."""
    if d.empty:
        return False
    top = float(np.nanmax(d["median"])) * scale * 2.5
    if np.isfinite(top) and top > 0 and float(np.nanmax(d.ci_high.fillna(0))) * scale > top:
        a.set_ylim(0, top)
        return True
    a.set_ylim(bottom=0)
    return False


def pow2_ticks(a, values):
    v = sorted({int(x) for x in values if np.isfinite(x)})
    a.set_xscale("log", base=2)
    a.set_xticks(v, [str(x) for x in v])
    a.minorticks_off()


def _errorbar(ax, d, x, label, c, scale=1e3, marker="o", ls="-"):
    d = d.sort_values(x)
    ax.errorbar(d[x], d["median"] * scale, yerr=[(d["median"] - d.ci_low).clip(lower=0).fillna(0) * scale,
                                                   (d.ci_high - d["median"]).clip(lower=0).fillna(0) * scale],
                marker=marker, ls=ls, capsize=3, color=c, label=label)


def _span(d, col, scale=1e3, unit="ms"):
    return f"{d[col].min() * scale:.3g}–{d[col].max() * scale:.3g} {unit}" if len(d) else "none"


def latency(df, figures_dir):
    t, p = frame.latency_rows(df, "ttft"), frame.latency_rows(df, "tpot")
    if t.empty and p.empty:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    eng = "engine" if "engine" in df else None
    for a, d, x in ((ax[0], t, "prompt_len"), (ax[1], p, "context_len")):
        for k, g in d.groupby(["model", "dtype", *([eng] if eng else [])]):
            ls = ENGINE_LS.get(k[2], "-") if eng else "-"
            _errorbar(a, g, x, " ".join(map(str, k)), color(k[0]), ls=ls)
    ax[0].set(xlabel="prompt length (tokens)", ylabel="time to first token (ms)",
              title="Prefill: TTFT, batch 1 (median, 95% CI)")
    ax[1].set(xlabel="tokens in KV cache (context)", ylabel="time per output token (ms)",
              title="Decode: TPOT, batch 1 (median, 95% CI)")
    for a, d, x in ((ax[0], t, "prompt_len"), (ax[1], p, "context_len")):
        pow2_ticks(a, d[x].dropna())
        if fit_whiskers(a, d, 1e3):
            a.set_title(a.get_title() + "\nwhiskers cut at the axis top: the tables give every CI", fontsize=10)
    fig.tight_layout()
    legend_below(fig, ax)
    models = ", ".join(sorted(set(t.model) | set(p.model)))
    alt = (f"Two line charts with 95% confidence bars, one color per model ({models}). Left: time to first token "
           f"against prompt length ({_span(t, 'median')} over {int(t.prompt_len.min()) if len(t) else 0}–"
           f"{int(t.prompt_len.max()) if len(t) else 0} tokens). Right: time per output token against tokens in the "
           f"KV cache ({_span(p, 'median')}).")
    return save(fig, figures_dir, "latency", alt)


def throughput(df, figures_dir):
    d = df[(df.study == "batch_sweep") & (df.status == "ok")]
    if d.empty:
        return None
    split = (d.metric == "decode_tokens_per_s").any()
    panels = ([("decode_tokens_per_s", "decode tokens/s (timed steps)", 1),
               ("prefill_tokens_per_s", "prefill tokens/s (timed)", 1)] if split else
              [("tokens_per_s", "generated tokens/s (whole generate)", 1),
               ("generate_latency", "latency per request (s)", 1)]) + [("peak_memory", "peak memory (GB)", 1e-9)]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    keys = ["model", "quant", *(["engine"] if "engine" in d else [])]
    for k, g in d.groupby(keys):
        kw = dict(color=color(k[0]), marker=MARKERS.get(k[1], "o"), ls=ENGINE_LS.get(k[2], "-") if len(k) > 2 else "-",
                  label=" ".join(map(str, k)))
        for a, (metric, _, scale) in zip(ax, panels):
            m = g[g.metric == metric].sort_values("batch")
            if len(m):
                a.errorbar(m.batch, m["median"] * scale,
                           yerr=[(m["median"] - m.ci_low).clip(lower=0).fillna(0) * scale,
                                 (m.ci_high - m["median"]).clip(lower=0).fillna(0) * scale], capsize=2, **kw)
    oom = df[(df.study == "batch_sweep") & df.status.str.startswith("oom", na=False)]
    for _, r in oom.iterrows():
        ax[0].axvline(r.batch, color=color(r.model), ls=":", lw=1)
    cut = False
    for a, (metric, label, scale) in zip(ax, panels):
        a.set(xlabel="batch size (requests)", ylabel=label)
        pow2_ticks(a, df[df.study == "batch_sweep"].batch.dropna())
        cut |= fit_whiskers(a, d[d.metric == metric], scale)
    ax[0].set_title("Throughput per batch (dotted: out of memory)" + ("; whiskers cut at the axis top" if cut else ""),
                    fontsize=10)
    fig.tight_layout()
    legend_below(fig, ax)
    batches = sorted({int(b) for b in d.batch.dropna()})
    alt = (f"Three line charts against batch size {', '.join(map(str, batches))}: {panels[0][1]}, {panels[1][1]} and "
           f"{panels[2][1]}, one color per model and one marker per quantization method"
           + (f"; dotted vertical lines mark {len(oom)} batch sizes that ran out of memory." if len(oom) else "."))
    return save(fig, figures_dir, "throughput_memory", alt)


def quantization(df, figures_dir):
    d = df[(df.study == "quantization") & (df.status == "ok")]
    sp, kl = d[d.metric == "tpot_speedup_vs_none"], d[d.metric == "kl_mean"]
    if sp.empty:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    n = 0
    for _, r in sp.iterrows():
        k = kl[(kl.model == r.model) & (kl.quant == r.quant) & (kl.run_id == r.run_id)]
        if k.empty:
            continue
        n += 1
        ax.errorbar(k["median"].iat[0], r["median"], yerr=[[max(r["median"] - r.ci_low, 0)], [max(r.ci_high - r["median"], 0)]],
                    marker=MARKERS.get(r.quant, "o"), color=color(r.model), capsize=3, ls="none",
                    label=f"{r.model} {r.quant}")
    ax.axhline(1, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="mean KL divergence to the unquantized model (nats)",
           ylabel="decode speed-up over unquantized (x)", title="Quantization: speed against fidelity")
    legend_below(fig, ax, ncol=3)
    alt = (f"Scatter of {n} quantized configurations: decode speed-up over the unquantized model (with 95% CI, a "
           f"horizontal line at 1x) against mean KL divergence (log scale); speed-ups span "
           f"{sp['median'].min():.2g}x to {sp['median'].max():.2g}x. Color is the model, marker the method.")
    return save(fig, figures_dir, "quantization", alt)


def roofline(df, figures_dir):
    d = df[(df.status == "ok") & df.flops.notna() & (df.unit == "s") & (df["median"] > 0) & (df.quant == "none")]
    ceil = df[(df.experiment == "ceiling") & (df.status == "ok")]
    if d.empty or ceil.empty:
        return None
    c = from_records(ceil)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ai = np.logspace(-1, 4, 200)
    for (dt, peak), ls in zip(sorted(c["flops"].items()), CEILING_LS):
        unit = "GOP/s" if dt == "int8" else "GFLOP/s"
        ax.plot(ai, np.minimum(peak, ai * c["bandwidth"]) / 1e9, lw=1.2, color="black", ls=ls,
                label=f"measured ceiling, {dt} ({peak / 1e9:.3g} {unit})")
    for (model, exp), g in d.groupby(["model", "experiment"]):
        ax.scatter(g.flops / g.bytes, g.flops / g["median"] / 1e9, color=color(model),
                   marker={"prefill": "o", "decode": "s", "generate": "^", "batch": "D"}.get(exp, "x"),
                   label=f"{model} {exp}", alpha=0.8, s=25)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP per byte moved)",
           ylabel="achieved GFLOP/s (int8 ceiling in GOP/s)",
           title="Roofline: unquantized runs against this device's measured ceilings")
    legend_below(fig, ax, ncol=2)
    alt = (f"Log-log roofline: black ceiling lines (one line style per dtype: {', '.join(sorted(c['flops']))}; "
           f"bandwidth {c['bandwidth'] / 1e9:.3g} GB/s) and {len(d)} measured points colored by model, achieved "
           f"GFLOP/s against FLOP per byte.")
    return save(fig, figures_dir, "roofline", alt)


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
    legend_below(fig, ax)
    alt = (f"Bar chart of lower bounds (not measurements) on 16-bit batch-1 TPOT for {', '.join(models)} on "
           f"{len(devices)} published device specs, from {p._tpot_s.min() * 1e3:.2g} to {p._tpot_s.max() * 1e3:.2g} ms; "
           "a star marks devices whose spec figures are unconfirmed.")
    return save(fig, figures_dir, "projection_tpot_bound", alt)


def engines(df, figures_dir):
    """Batch-1 TPOT per model and engine, bars side by side (with 95% CIs)."""
    if "engine" not in df:
        return None
    tp = frame.ok(df, metric="tpot", batch=1, quant="none")
    tp = tp[tp.study == "latency"] if "study" in tp else tp
    if tp.empty or tp.engine.nunique() < 2:
        return None
    rows = tp.loc[tp.groupby(["model", "dtype", "engine"]).context_len.idxmin()]
    labels = [f"{m}\n{dt}" for m, dt in dict.fromkeys(zip(rows.model, rows.dtype))]
    engs = sorted(rows.engine.unique())
    fig, ax = plt.subplots(figsize=(8, 4))
    w = 0.8 / len(engs)
    for i, e in enumerate(engs):
        g = rows[rows.engine == e].set_index(["model", "dtype"]).reindex(list(dict.fromkeys(zip(rows.model, rows.dtype))))
        ax.bar(np.arange(len(labels)) + i * w, g["median"] * 1e3, width=w, label=e, hatch=["", "//", ".."][i % 3],
               color=[color(m) for m, _ in g.index], edgecolor="black",
               yerr=[(g["median"] - g.ci_low).clip(lower=0).fillna(0) * 1e3, (g.ci_high - g["median"]).clip(lower=0).fillna(0) * 1e3])
    ax.set_xticks(np.arange(len(labels)) + w * (len(engs) - 1) / 2, labels, fontsize=8)
    cut = fit_whiskers(ax, rows, 1e3)
    ax.set(ylabel="time per output token (ms)", title="Decode TPOT per engine, batch 1 (hatching: engine)"
           + ("\nwhiskers cut at the axis top: the engine table gives every CI" if cut else ""))
    legend_below(fig, ax)
    alt = (f"Grouped bar chart of batch-1 TPOT in ms for {len(labels)} model/dtype pairs, one bar per engine "
           f"({', '.join(engs)}), with 95% confidence bars.")
    return save(fig, figures_dir, "engines_tpot", alt)
