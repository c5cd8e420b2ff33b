"""Why decode misses its bandwidth bound: fit TPOT = fixed cost + bytes streamed / effective bandwidth.

Every batch-1 decode record of one engine, dtype and device (both models, every context) is one point
(bytes the step streams, as the cost model counts them; median TPOT). A straight line through them
gives the fixed per-step cost (dispatch, synchronization, small kernels: paid whatever the model's
size) and the effective bandwidth (the slope). With a fixed cost c > 0 the 3B/1B TPOT ratio is
(c + B3/bw) / (c + B1/bw), below the weight-bytes ratio B3/B1: the fit says how much below.
CIs come from a bootstrap over each record's raw samples.
"""
from dataclasses import dataclass

import numpy as np
import pandas as pd

N_BOOT = 300


@dataclass
class Fit:
    fixed_s: float
    fixed_ci: tuple
    bandwidth: float          # bytes/s
    bandwidth_ci: tuple
    points: int
    r2: float


def _line(x, y) -> tuple[float, float]:
    slope, icpt = np.polyfit(x, y, 1)
    return icpt, slope


def fit(points: pd.DataFrame, seed: int = 0) -> Fit | None:
    """points: rows with `bytes`, `median` (s) and `samples`. None when the bytes do not vary enough."""
    p = points[points.bytes.notna() & points["median"].notna()]
    x = p.bytes.to_numpy(float)
    if len(p) < 3 or x.max() < 1.2 * x.min():  # one model alone: its KV bytes barely move the x axis
        return None
    y = p["median"].to_numpy(float)
    c, s = _line(x, y)
    if s <= 0:
        return None
    rng = np.random.default_rng(seed)
    samples = [np.asarray(v if isinstance(v, (list, tuple, np.ndarray)) and len(v) else [m], float)
               for v, m in zip(p.samples, y)]
    boot = []
    for _ in range(N_BOOT):
        yb = np.array([np.median(rng.choice(v, v.size)) for v in samples])
        cb, sb = _line(x, yb)
        if sb > 0:
            boot.append((cb, 1 / sb))
    boot = np.array(boot) if boot else np.array([[c, 1 / s]])
    pred = c + s * x
    r2 = 1 - ((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30)
    return Fit(fixed_s=c, fixed_ci=tuple(np.percentile(boot[:, 0], [2.5, 97.5])), bandwidth=1 / s,
               bandwidth_ci=tuple(np.percentile(boot[:, 1], [2.5, 97.5])), points=len(p), r2=float(r2))


def implied_ratio(f: Fit, small_bytes: float, large_bytes: float) -> float:
    return (f.fixed_s + large_bytes / f.bandwidth) / (f.fixed_s + small_bytes / f.bandwidth)


def fits(df: pd.DataFrame) -> dict:
    """One fit per (engine, dtype, device) over the unquantized batch-1 decode records of all models."""
    d = df[(df.status == "ok") & (df.metric == "tpot") & (df.batch == 1) & (df.quant == "none")]
    keys = [k for k in ("engine", "dtype", "device") if k in d]
    out = {}
    for key, g in d.groupby(keys) if len(d) else []:
        f = fit(g)
        if f is not None:
            out[key] = f
    return out
