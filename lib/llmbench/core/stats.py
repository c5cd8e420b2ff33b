"""Summaries of repeated measurements: median and spread, with a bootstrap 95% CI of the median.

Samples come in two shapes, and the CI respects which:
  a flat list  [t1, t2, ...]          independent draws (the repeats of one TTFT): the plain
                                      percentile bootstrap resamples single samples ("bootstrap");
  a list of lists [[s11, s12, ...], ...]  one inner list per repeat (the decode steps of one repeat
                                      share a cache, a clock state, a neighbour's load: correlated):
                                      the repeat is the unit. From MIN_BOOTSTRAP_REPEATS repeats on,
                                      the block bootstrap resamples whole repeats ("block bootstrap");
                                      with fewer, a Student-t interval over the repeat medians ("t over
                                      repeat medians"): 3 repeats allow only 10 distinct block resamples,
                                      too few for a percentile interval to reach its stated coverage
                                      (tests/test_stats.py simulates both).
Resampling correlated steps one by one would treat 3 x 8 steps as 24 independent draws and give an
interval far too narrow. A record keeps the flat `samples`
and the repeat lengths `sample_blocks`, so `regroup` gives back the repeats and a ratio between two
records follows the same rule (`ratio_of_medians`).
"""
import numpy as np
from scipy import stats as sps

N_RESAMPLES = 2000
MIN_BOOTSTRAP_REPEATS = 10  # fewer repeats: t interval over repeat medians (see above)


def is_blocked(samples) -> bool:
    """True for a list of lists (one inner list per repeat)."""
    return samples is not None and len(samples) > 0 and all(np.ndim(s) == 1 for s in samples)


def flatten(samples) -> np.ndarray:
    if is_blocked(samples):
        return np.concatenate([np.asarray(s, dtype=float) for s in samples])
    return np.asarray(samples, dtype=float)


def block_lengths(samples) -> list[int] | None:
    """Lengths of the repeats of blocked samples, None for a flat list (the record's `sample_blocks`)."""
    return [len(s) for s in samples] if is_blocked(samples) else None


def regroup(samples, blocks) -> list:
    """A record's flat `samples` cut back into its repeats by `sample_blocks` (flat when blocks is None)."""
    x = [] if samples is None or np.ndim(samples) == 0 else [float(v) for v in samples]  # None/NaN: no samples
    if blocks is None or np.ndim(blocks) == 0 or len(blocks) == 0:  # None, or NaN from a parquet column
        return x
    ends = np.cumsum([int(b) for b in blocks])
    if ends[-1] != len(x):
        raise ValueError(f"sample_blocks {list(blocks)} do not add up to {len(x)} samples")
    return [x[e - int(b):e] for e, b in zip(ends, blocks)]


def samples_of(row) -> list:
    """A record's samples as it was measured: cut into repeats when it has `sample_blocks`.
    Pass these to ratio_of_medians so that a ratio resamples as each record's own CI did."""
    return regroup(row["samples"], row.get("sample_blocks"))


def ci_method(samples) -> str:
    """How summarize() computes the CI of these samples: what a record's `ci_method` says."""
    if is_blocked(samples):
        r = sum(1 for s in samples if len(s))
        if r < 2:
            return "none: one repeat of correlated samples"
        if r >= MIN_BOOTSTRAP_REPEATS:
            return f"block bootstrap over {r} repeats"
        return f"t over {r} repeat medians" + (" (log scale)" if (flatten(samples) > 0).all() else "")
    return "bootstrap" if np.size(samples) >= 2 else "none: one sample"


def _blocks_array(blocks) -> np.ndarray:
    """[repeats, longest] with NaN padding (equal repeats need none)."""
    blocks = [np.asarray(b, dtype=float) for b in blocks if len(b)]
    out = np.full((len(blocks), max(len(b) for b in blocks)), np.nan)
    for i, b in enumerate(blocks):
        out[i, :len(b)] = b
    return out


def _resampled_medians(blocks, n: int, rng) -> np.ndarray:
    """Median of each of n resamples that draw len(blocks) whole repeats with replacement."""
    arr = _blocks_array(blocks)
    pick = arr[rng.integers(0, len(arr), (n, len(arr)))].reshape(n, -1)
    return np.nanmedian(pick, axis=1) if np.isnan(arr).any() else np.median(pick, axis=1)


def block_bootstrap_ci(blocks, level: float = 0.95, n_resamples: int = N_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile CI of the pooled median, resampling whole repeats. NaN with fewer than two repeats."""
    blocks = [b for b in blocks if len(b)]
    if len(blocks) < 2:
        return float("nan"), float("nan")
    med = _resampled_medians(blocks, n_resamples, np.random.default_rng(seed))
    lo, hi = np.quantile(med, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def repeat_t_ci(blocks, level: float = 0.95) -> tuple[float, float]:
    """Pooled median +- t(level, R-1) x standard error of the R repeat medians. NaN for one repeat.
    Positive quantities (times, rates) are treated on a log scale, so the interval stays positive and
    a slow repeat widens it upwards: m x / exp(t x SE of the log repeat medians)."""
    meds = np.array([np.median(b) for b in blocks if len(b)])
    if meds.size < 2:
        return float("nan"), float("nan")
    m = float(np.median(flatten([b for b in blocks if len(b)])))
    t = float(sps.t.ppf((1 + level) / 2, meds.size - 1))
    if (flatten([b for b in blocks if len(b)]) > 0).all():  # a positive quantity (a time, a rate)
        h = t * np.log(meds).std(ddof=1) / np.sqrt(meds.size)
        return float(m * np.exp(-h)), float(m * np.exp(h))
    h = t * meds.std(ddof=1) / np.sqrt(meds.size)
    return m - h, m + h


def median_ci(samples, level: float = 0.95) -> tuple[float, float]:
    """The CI of the median that ci_method(samples) names."""
    if is_blocked(samples) and sum(1 for s in samples if len(s)) < MIN_BOOTSTRAP_REPEATS:
        return repeat_t_ci(samples, level)
    return bootstrap_ci(samples, level=level)


def bootstrap_ci(samples, statistic=np.median, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI (scipy). NaN for fewer than two samples: one draw has no spread.
    Blocked samples (a list of lists) get the block bootstrap of the median."""
    if is_blocked(samples):
        return block_bootstrap_ci(samples, level)
    x = np.asarray(samples, dtype=float)
    if x.size < 2:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = sps.bootstrap((x,), statistic, confidence_level=level, n_resamples=N_RESAMPLES,
                        method="percentile", rng=np.random.default_rng(0))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def summarize(samples) -> dict:
    x = flatten(samples)
    method = ci_method(samples) if x.size else "none: no samples"
    if x.size == 0:
        nan = float("nan")
        return dict(n=0, median=nan, mean=nan, std=nan, p90=nan, p99=nan, ci_low=nan, ci_high=nan, ci_method=method)
    lo, hi = median_ci(samples)
    return dict(n=int(x.size), median=float(np.median(x)), mean=float(x.mean()),
                std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
                p90=float(np.percentile(x, 90)), p99=float(np.percentile(x, 99)), ci_low=lo, ci_high=hi,
                ci_method=method)


def ratio_of_medians(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """median(b) / median(a) with a CI over both independent samples, by the rule of their CIs.

    Two flat lists: the percentile bootstrap over single samples. Otherwise the repeat is the unit (a
    flat list counts as one-sample repeats): the block bootstrap when both sides have at least
    MIN_BOOTSTRAP_REPEATS repeats, else a Welch t interval on the log of the repeat medians."""
    ratio = float(np.median(flatten(b)) / np.median(flatten(a)))
    if not (is_blocked(a) or is_blocked(b)):
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if a.size < 2 or b.size < 2:
            return ratio, float("nan"), float("nan")
        res = sps.bootstrap((a, b), lambda x, y, axis=-1: np.median(y, axis=axis) / np.median(x, axis=axis),
                            confidence_level=level, n_resamples=N_RESAMPLES, method="percentile",
                            paired=False, vectorized=True, rng=np.random.default_rng(0))
        return ratio, float(res.confidence_interval.low), float(res.confidence_interval.high)
    units = [[s for s in x if len(s)] if is_blocked(x) else [[v] for v in np.asarray(x, dtype=float)] for x in (a, b)]
    if min(len(u) for u in units) < 2:
        return ratio, float("nan"), float("nan")
    if min(len(u) for u in units) < MIN_BOOTSTRAP_REPEATS:
        return (ratio, *_log_ratio_t_ci(ratio, *units, level))
    rng = np.random.default_rng(0)
    ma, mb = (_resampled_medians(u, N_RESAMPLES, rng) for u in units)
    lo, hi = np.quantile(mb / ma, [(1 - level) / 2, (1 + level) / 2])
    return ratio, float(lo), float(hi)


def _log_ratio_t_ci(ratio: float, a_blocks, b_blocks, level: float) -> tuple[float, float]:
    """ratio x exp(+-t x se) with se, df from the log repeat medians of each side (Welch)."""
    logs = [np.log([np.median(u) for u in blocks]) for blocks in (a_blocks, b_blocks)]
    if not (ratio > 0 and all(np.isfinite(x).all() for x in logs)):
        return float("nan"), float("nan")  # a ratio CI on the log scale needs positive values
    v = [x.var(ddof=1) / x.size for x in logs]
    if v[0] + v[1] == 0:
        return ratio, ratio
    df = (v[0] + v[1]) ** 2 / sum(vi ** 2 / (x.size - 1) for vi, x in zip(v, logs))
    h = float(sps.t.ppf((1 + level) / 2, df) * np.sqrt(v[0] + v[1]))
    return ratio * float(np.exp(-h)), ratio * float(np.exp(h))
