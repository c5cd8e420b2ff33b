"""The seed's energy claims checked against the energy records (J/request, TOPS/W, quantization's energy gap)."""
import numpy as np

from llmbench.claims import checks as C
from llmbench.core.stats import ratio_of_medians
from llmbench.model import costmodel as cm
from llmbench.model.models import load_config
from llmbench.results import fmt, frame
from llmbench.results.energy import SHAPE, _pairs, _stat, not_readable, rows


def _no_energy(df) -> str:
    bad = sorted(set(not_readable(df).status))
    return f"a readable energy meter (here: {bad[0]})" if bad else "energy records of both models"


def energy_per_request(claim, ctx):
    """1B uses less energy per request: 3B/1B J/request above 1 at every matched configuration and batch."""
    found = []
    for key, s, l in _pairs(ctx.df, "energy_per_request"):
        found.append((key, *ratio_of_medians(frame.pooled(s), frame.pooled(l))))
    if not found:
        return {"value": "no energy per request of both models", "verdict": C.untestable(_no_energy(ctx.df)),
                "basis": "measured", "why": ""}
    out = []
    for eng in sorted({str(k.get("engine")) for k, *_ in found}):
        mine = [(k, r, lo, hi) for k, r, lo, hi in found if str(k.get("engine")) == eng]
        # every CI above 1 supports, one wholly below 1 contradicts, one holding 1 leaves it open
        verdict, why = C.all_of([C.ci_verdict(r, lo, hi, 1.0) for _, r, lo, hi in mine])
        value = "; ".join(f"{k.get('dtype')} {k.get('quant')} batch {int(k['batch'])}: 3B/1B J/request "
                          f"{fmt.fmt_ci(r, lo, hi)}" for k, r, lo, hi in mine)
        out.append({"engine": eng, "value": value, "verdict": verdict, "basis": "measured",
                    "why": "; ".join(w for w in ("a ratio above 1 (its whole CI, where there is one) means the 1B "
                                                 "used less energy", why) if w)})
    return out


def tops_per_watt(claim, ctx):
    """On the NPU, 3B achieves a higher TOPS/W than 1B (its bigger matmuls keep the device busier)."""
    d, p = rows(ctx.df, "tokens_per_joule"), frame.pair(ctx.df)
    if d.empty or not p or not set(p) <= set(d.model):
        return {"value": "no tokens per joule of both models", "verdict": C.untestable(_no_energy(ctx.df)),
                "basis": "measured", "why": ""}
    best = {m: max(_stat(g)["median"] for _, g in d[d.model == m].groupby(frame.config_keys(d) + SHAPE, dropna=False))
            * cm.flops_per_token(load_config(m)) / 1e12 for m in p}
    value = ", ".join(f"{m}: best {v:.3g} TOPS/W (2N FLOPs per generated token x tokens/J)" for m, v in best.items())
    if ctx.kind != "npu":
        return C._not_here(ctx, value, "achieved TOPS/W here, for context")
    return {"value": value, "verdict": C._verdict(best[p[1]] > best[p[0]]), "basis": "measured",
            "why": "prefill and attention FLOPs are left out, the same way for both models"}


def quant_energy_gap(claim, ctx):
    """Quantization narrows the energy gap: the 3B/1B J/token ratio is smaller quantized than not."""
    ratios = {}
    for key, s, l in _pairs(ctx.df, "energy_per_token"):
        ratios[tuple((k, v) for k, v in key.items() if k != "quant"), key.get("quant")] = \
            ratio_of_medians(frame.pooled(s), frame.pooled(l))
    base = {k: v for (k, q), v in ratios.items() if q == "none"}
    pairs = [(dict(k), q, v, base[k]) for (k, q), v in ratios.items() if q != "none" and k in base]
    if not pairs:
        why = _no_energy(ctx.df) if not ratios else "energy of both models with and without quantization"
        return {"value": "no matched quantized and unquantized energy records", "verdict": C.untestable(why),
                "basis": "measured", "why": ""}
    value = "; ".join(f"{k.get('dtype')} {k.get('engine')} batch {int(k['batch'])}: 3B/1B J/token {qn} "
                      f"{fmt.fmt_ci(*q)} vs none {fmt.fmt_ci(*n)}" for k, qn, q, n in pairs)
    verdict, why = C.all_of([_narrower(q, n) for _, _, q, n in pairs])
    return {"value": value, "verdict": verdict, "basis": "measured",
            "why": "; ".join(w for w in ("the two ratios' CIs compared at the same dtype, engine and batch", why) if w)}


def _narrower(q, n) -> tuple[str, str]:
    """Quantized ratio q against unquantized n, each (ratio, ci_low, ci_high): smaller only if q's CI lies
    wholly below n's, larger only if wholly above; overlapping CIs cannot tell."""
    (qr, qlo, qhi), (nr, nlo, nhi) = q, n
    if not all(np.isfinite(x) for x in (qlo, qhi, nlo, nhi)):
        return C._verdict(qr < nr), "no CI (too few samples): medians compared"
    if qhi < nlo:
        return C.SUPPORTED, ""
    if qlo > nhi:
        return C.CONTRADICTED, ""
    return (f"{C.INCONCLUSIVE}: CI {qlo:.3g}-{qhi:.3g} (quantized) overlaps CI {nlo:.3g}-{nhi:.3g} (none)",
            "overlapping CIs support neither a narrower nor a wider gap")


CLAIM_CHECKS = {f.__name__: f for f in (energy_per_request, tops_per_watt, quant_energy_gap)}
