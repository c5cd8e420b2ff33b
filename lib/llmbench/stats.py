"""Summaries of repeated measurements: median and spread, with a bootstrap 95% CI of the median."""
import numpy as np
from scipy import stats as sps

N_RESAMPLES = 2000


def bootstrap_ci(samples, statistic=np.median, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI (scipy). NaN for fewer than two samples: one draw has no spread."""
    x = np.asarray(samples, dtype=float)
    if x.size < 2:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = sps.bootstrap((x,), statistic, confidence_level=level, n_resamples=N_RESAMPLES,
                        method="percentile", rng=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(samples) -> dict:
    x = np.asarray(samples, dtype=float)
    if x.size == 0:
        nan = float("nan")
        return dict(n=0, median=nan, mean=nan, std=nan, p90=nan, p99=nan, ci_low=nan, ci_high=nan)
    lo, hi = bootstrap_ci(x)
    return dict(n=int(x.size), median=float(np.median(x)), mean=float(x.mean()),
                std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
                p90=float(np.percentile(x, 90)), p99=float(np.percentile(x, 99)), ci_low=lo, ci_high=hi)


def ratio_of_medians(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """median(b) / median(a) with a bootstrap CI over both independent samples."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ratio = float(np.median(b) / np.median(a))
    if a.size < 2 or b.size < 2:
        return ratio, float("nan"), float("nan")
    res = sps.bootstrap((a, b), lambda x, y, axis=-1: np.median(y, axis=axis) / np.median(x, axis=axis),
                        confidence_level=level, n_resamples=N_RESAMPLES, method="percentile",
                        paired=False, vectorized=True, rng=np.random.default_rng(0))
    return ratio, float(res.confidence_interval.low), float(res.confidence_interval.high)
