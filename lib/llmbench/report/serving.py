"""The report's Serving section, from the 04_serving records (serving.py wrote them): a table per run
(model x server x load: p50/p99 TTFT and TPOT, achieved requests/s, goodput), latency against achieved
requests/s with the MLPerf limits drawn, the highest swept rate meeting each limit, and the 1B/3B ratio
of those sustainable rates. Every number is read from the records; nothing here measures.
"""
import numpy as np
import pandas as pd

from llmbench.claims.checks import load_claims
from llmbench.measure import serving_metrics as SM
from llmbench.report import figures as F
from llmbench.results import fmt, frame

CONFIG = ["model", "engine", "dtype", "quant", "device", "prompt_len", "new_tokens"]
RUN = ["run_id", "request_rate", "concurrency"]


def _has(x) -> bool:
    """A value, not None or NaN (a None in a float column of a frame reads back as NaN)."""
    return x is not None and not (isinstance(x, float) and np.isnan(x))


def _serving(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.experiment == "serving"] if "experiment" in df and len(df) else df.iloc[0:0]


def _keys(d: pd.DataFrame, keys) -> list[str]:
    return [k for k in keys if k in d.columns]


def runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per completed serving run (status ok) with its numbers as floats."""
    d = _serving(df)
    d = d[d.status == "ok"]
    if d.empty:
        return pd.DataFrame()
    keys = _keys(d, CONFIG + RUN)
    out = []
    for k, g in d.groupby(keys, dropna=False, sort=True):
        r = dict(zip(keys, k))
        m = {metric: x.iloc[0] for metric, x in g.groupby("metric")}

        def val(metric, col="median"):
            return float(m[metric][col]) if metric in m and m[metric][col] is not None else float("nan")
        r.update(n=int(m["serving_ttft"]["n"]) if "serving_ttft" in m else 0,
                 ttft_p50=val("serving_ttft"), ttft_p99=val("serving_ttft", "p99"),
                 tpot_p50=val("serving_tpot"), tpot_p99=val("serving_tpot", "p99"),
                 e2e_p50=val("serving_e2e"), achieved=val("request_throughput"), out_tps=val("output_throughput"),
                 arrival=val("arrival_rate"), saturated=val("saturated") == 1.0,
                 completed_share=val("completed_share"), incomplete=val("incomplete_requests"),
                 saturated_why=str(m["saturated"]["note"]) if "saturated" in m else "",
                 other_cores=(float(m["serving_ttft"]["other_cores"]) if "serving_ttft" in m
                              and m["serving_ttft"].get("other_cores") is not None else float("nan")))
        for lim in SM.limits():
            r[f"goodput_{SM.slug(lim.name)}"] = val(f"goodput_{SM.slug(lim.name)}")
        out.append(r)
    return pd.DataFrame(out)


def _load_label(r) -> str:
    if r.get("request_rate") is not None and np.isfinite(r["request_rate"]):
        return f"Poisson {r['request_rate']:g} req/s"
    return f"closed loop, {int(r['concurrency'])} in flight"


def _ms(x) -> str:
    return fmt.fmt_time(x)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The serving table: model x server x load. *Offered* is the rate the Poisson schedule actually drew
    for the counted requests (a short run's draw strays from the target); *achieved* the completions/s;
    *others' cores* the CPU that processes other than the study and its server used during the run."""
    t = runs(df)
    if t.empty:
        return t
    rows = []
    for _, r in t.iterrows():
        row = {"model": r["model"], "server": r["engine"], "dtype": r["dtype"],
               "load": _load_label(r),
               "requests done": f"{r['n']}" + ("" if not r["completed_share"] < 1 else f" ({r['completed_share']:.0%} of those ended)")
               + (f", {int(r['incomplete'])} cut by the time limit" if r["incomplete"] > 0 else ""),
               "TTFT p50": _ms(r.ttft_p50), "TTFT p99": _ms(r.ttft_p99),
               "TPOT p50": _ms(r.tpot_p50), "TPOT p99": _ms(r.tpot_p99),
               "offered req/s": f"{r.arrival:.3g}" if np.isfinite(r.arrival) else "",
               "achieved req/s": f"{r.achieved:.3g}", "output tok/s": f"{r.out_tps:.3g}"}
        for lim in SM.limits():
            row[f"goodput {lim.name.removeprefix('MLPerf ')} (req/s)"] = f"{r[f'goodput_{SM.slug(lim.name)}']:.3g}"
        row["saturated"] = "yes" if r.saturated else "no"
        row["others' cores"] = f"{r.other_cores:.2f}" if np.isfinite(r.other_cores) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _as_summary(r) -> dict:
    """A runs() row in the shape serving_metrics.sustainable takes."""
    meets = {}
    for lim in SM.limits():
        meets[lim.name] = bool(r["completed_share"] == 1
                               and (lim.ttft_s is None or r["ttft_p99"] <= lim.ttft_s)
                               and (lim.tpot_s is None or r["tpot_p99"] <= lim.tpot_s))
    rate = r.get("request_rate")
    return {"target_rate": float(rate) if rate is not None and np.isfinite(rate) else None, "meets": meets,
            "saturated": bool(r["saturated"]), "request_throughput": r["achieved"]}


def sustainable_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per model, server and limit: the highest swept rate that met it (p99 TTFT and TPOT within the
    limit, every request done, not saturated), its achieved req/s, and the next rate up that did not."""
    t = runs(df)
    if t.empty:
        return t
    t = t[t.request_rate.notna()]
    keys = _keys(t, ["model", "engine", "dtype", "quant", "device", "prompt_len", "new_tokens"])
    rows = []
    for k, g in t.groupby(keys, sort=True):
        cfg = {key: int(v) if key in ("prompt_len", "new_tokens") else v for key, v in zip(keys, k)}
        summaries = [_as_summary(r) for _, r in g.iterrows()]
        for lim in SM.limits():
            s = SM.sustainable(summaries, lim)
            rows.append({**cfg, "limit": lim.name, "TTFT limit": _ms(lim.ttft_s), "TPOT limit": _ms(lim.tpot_s),
                         "rates swept": ", ".join(f"{x:g}" for x in sorted(g.request_rate)),
                         "highest rate met (req/s)": f"{s.rate:g}" if s.rate is not None else "none",
                         "achieved there (req/s)": f"{s.achieved:.3g}" if s.achieved is not None else "",
                         "next rate, not met": f"{s.next_rate:g}" if s.next_rate is not None else "",
                         "_achieved": s.achieved, "_rate": s.rate})
    return pd.DataFrame(rows)


def ratio_table(df: pd.DataFrame) -> pd.DataFrame:
    """1B/3B of the sustainable achieved requests/s at each limit, per server, dtype and quant."""
    st = sustainable_table(df)
    p = frame.pair(df) if len(df) else None
    if st.empty or not p:
        return pd.DataFrame()
    keys = [k for k in ("engine", "dtype", "quant", "device", "limit") if k in st]
    rows = []
    for k, g in st.groupby(keys, sort=True):
        small, large = g[g.model == p[0]], g[g.model == p[1]]
        if small.empty or large.empty:
            continue
        a, b = small.iloc[0], large.iloc[0]
        row = dict(zip(keys, k))
        row.update({f"{p[0]} req/s": a["achieved there (req/s)"] or "none met",
                    f"{p[1]} req/s": b["achieved there (req/s)"] or "none met"})
        if _has(a._achieved) and _has(b._achieved) and b._achieved > 0:
            row[f"{p[0]}/{p[1]}"] = f"{a._achieved / b._achieved:.3g}"
        elif _has(a._achieved):
            row[f"{p[0]}/{p[1]}"] = f"n/a: {p[1]} met the limit at no swept rate"
        else:
            row[f"{p[0]}/{p[1]}"] = "n/a: neither met it" if not _has(b._achieved) else f"n/a: {p[0]} met it at no swept rate"
        rows.append(row)
    return pd.DataFrame(rows)


def failures_text(df: pd.DataFrame) -> str:
    """Every serving or server-start record that is not ok, one line each (empty when none)."""
    if "experiment" not in df or df.empty:
        return ""
    d = df[((df.experiment == "serving") | (df.metric == "server_startup_time")) & (df.status != "ok")]
    if d.empty:
        return ""
    keep = d.drop_duplicates(subset=_keys(d, ["model", "engine", "request_rate", "concurrency", "status"]))
    lines = []
    for _, r in keep.iterrows():
        where = (_load_label(r) if (r.get("request_rate") is not None and np.isfinite(r.get("request_rate") or np.nan))
                 or (r.get("concurrency") is not None and np.isfinite(r.get("concurrency") or np.nan)) else "server start")
        lines.append(f"- {r['model']} on {r['engine']}, {where}: {r['status']}")
    return "Runs that did not measure:\n" + "\n".join(lines)


def text(df: pd.DataFrame) -> str:
    t = runs(df)
    fails = failures_text(df)
    if t.empty:
        return ("No serving records (notebook 04_serving)." + ("\n\n" + fails if fails else ""))
    n_min = int(t.n.min())
    out = [f"{len(t)} serving runs of {t.model.nunique()} model(s) on {', '.join(sorted(t.engine.unique()))}, "
           f"{int(t.prompt_len.iloc[0])}-token prompts and {int(t.new_tokens.iloc[0])} output tokens per request. "
           "Latencies are counted from each request's scheduled send time (open loop: a request waiting in the "
           "client counts); output tokens are the server's reported usage. A rate *meets* a limit when p99 TTFT "
           "and p99 TPOT are within it, every request completed and the server kept up (MLPerf's Server rule); "
           f"goodput counts the requests within both bounds, per second. Runs counted {n_min} to {int(t.n.max())} "
           "requests after warm-up: p99 is interpolated between the slowest requests, so it is a coarse tail."]
    busy = t[t.other_cores > 0.25] if "other_cores" in t else t.iloc[0:0]
    if len(busy):
        out.append(f"**{len(busy)} of {len(t)} runs shared the machine**: other processes used "
                   f"{busy.other_cores.min():.2f} to {busy.other_cores.max():.2f} cores during them (column *others' "
                   "cores*); their latencies include that contention.")
    st = sustainable_table(df)
    for lim in SM.limits():
        s = st[st.limit == lim.name]
        parts = [f"{r.model} on {r.engine}: " + (f"{r['highest rate met (req/s)']} req/s (achieved {r['achieved there (req/s)']})"
                                                 + (f", not at {r['next rate, not met']}" if r["next rate, not met"] else "")
                                                 if _has(r._rate) else "no swept rate") for _, r in s.iterrows()]
        if parts:
            out.append(f"Highest swept rate meeting {lim.name} (TTFT {_ms(lim.ttft_s)}, TPOT {_ms(lim.tpot_s)}): "
                       + "; ".join(parts) + ".")
    out.append(_context(df, t))
    return "\n\n".join(out + ([fails] if fails else []))


def _context(df: pd.DataFrame, t: pd.DataFrame) -> str:
    """The seed's requests/s claims are about an Ascend 910: judged only on one; elsewhere, context."""
    kind = frame.device_kind(df)
    best = t.groupby("model").achieved.max()
    measured = ", ".join(f"{m} {v:.3g} req/s" for m, v in best.items())
    c = next(c for c in load_claims() if c["id"] == "serving_throughput")
    claimed = ", ".join(f"{m} {c['range'][r][0]:g}-{c['range'][r][1]:g} at batch {c['batch'][r]}"
                        for m, r in (("1B", "small"), ("3B", "large")))
    s = (f"The seed's requests/s claims ({claimed}, quantized; data/claims.yaml) are about an "
         "Ascend 910; " + ("these runs are on one, so *Claims check* judges them. " if kind == "npu" else
                            f"these runs are on {kind}: measured here, for context, the highest achieved rate was {measured}. "))
    closed = t[t.concurrency.notna()] if "concurrency" in t else t.iloc[0:0]
    dyn = []
    for (m, e), g in closed.groupby(["model", "engine"]):
        g = g.sort_values("concurrency")
        if len(g) >= 2:
            lo, hi = g.iloc[0], g.iloc[-1]
            dyn.append(f"{m} on {e}, {int(lo.concurrency)} to {int(hi.concurrency)} requests in flight: "
                       f"{hi.achieved / lo.achieved:.2g}x the requests/s, {hi.tpot_p50 / lo.tpot_p50:.2g}x the p50 TPOT")
    if dyn:
        s += ("The seed's dynamic-batching claim (more throughput, possibly more latency), measured with the "
              "closed-loop runs: " + "; ".join(dyn) + ".")
    return s


def figure(df: pd.DataFrame, figures_dir):
    """p50 and p99 TTFT and TPOT against achieved requests/s, one color per model, one marker per server,
    the MLPerf limits as horizontal lines; None without completed runs."""
    plt = F.plt
    t = runs(df)
    t = t[t.n > 0] if len(t) else t  # a run that completed nothing has no point to draw
    if t.empty:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    fig.subplots_adjust(wspace=0.35)
    markers = dict(zip(sorted(t.engine.unique()), ["o", "s", "^", "D"]))
    labels = []
    for (model, server), g in t.groupby(["model", "engine"], sort=True):
        g = g.sort_values("achieved")
        open_loop = g[g.request_rate.notna()]
        for a, key in ((ax[0], "ttft"), (ax[1], "tpot")):
            for q, ls in (("p50", "-"), ("p99", "--")):
                a.plot(open_loop.achieved, open_loop[f"{key}_{q}"], ls=ls, marker=markers[server],
                       color=F.color(model), label=f"{model} {server} {q} (Poisson)")
            closed = g[g.request_rate.isna()]
            if len(closed):
                a.scatter(closed.achieved, closed[f"{key}_p50"], marker=markers[server], facecolors="none",
                          edgecolors=F.color(model), label=f"{model} {server} p50 (closed loop)")
        labels.append(f"{model} on {server}")
    for i, lim in enumerate(SM.limits()):
        for a, v in ((ax[0], lim.ttft_s), (ax[1], lim.tpot_s)):
            if v is not None:
                a.axhline(v, color="black", lw=1, ls=F.CEILING_LS[i + 1], label=f"{lim.name} limit")
    ax[0].set(xlabel="achieved requests/s", ylabel="time to first token (s)", yscale="log",
              title="TTFT under load (from scheduled send)")
    ax[1].set(xlabel="achieved requests/s", ylabel="time per output token (s)", yscale="log",
              title="TPOT under load")
    F.legend_below(fig, ax, ncol=3)
    return F.save(fig, figures_dir, "serving_latency", _alt(t, labels))


def _alt(t: pd.DataFrame, labels) -> str:
    parts = []
    for (model, server), g in t[t.request_rate.notna()].groupby(["model", "engine"], sort=True):
        g = g.sort_values("achieved")
        parts.append(f"{model} on {server}: achieved {g.achieved.min():.3g} to {g.achieved.max():.3g} req/s, "
                     f"p99 TTFT {g.ttft_p99.min():.3g} to {g.ttft_p99.max():.3g} s, "
                     f"p99 TPOT {g.tpot_p99.min():.3g} to {g.tpot_p99.max():.3g} s")
    lims = "; ".join(f"{lim.name}: TTFT {lim.ttft_s} s, TPOT {lim.tpot_s} s" for lim in SM.limits())
    return (f"Two line charts against achieved requests/s, log latency axes: left TTFT, right TPOT; solid p50, dashed "
            f"p99, one color per model ({'; '.join(labels)}); hollow markers are closed-loop runs; horizontal lines "
            f"are the limits ({lims}). " + ". ".join(parts) + ".")
