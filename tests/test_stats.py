import numpy as np

from llmbench.core import stats


def test_summary_matches_numpy():
    x = np.random.default_rng(0).exponential(1.0, 500)
    s = stats.summarize(x)
    assert s["n"] == 500 and s["median"] == np.median(x) and s["mean"] == x.mean()
    assert s["std"] == x.std(ddof=1) and s["p90"] == np.percentile(x, 90) and s["p99"] == np.percentile(x, 99)


def test_median_ci_covers_the_true_median_of_a_known_distribution():
    # Exponential(1) has median ln 2: the 95% CI should cover it in about 95% of samples.
    rng = np.random.default_rng(1)
    covered = 0
    for _ in range(60):
        lo, hi = stats.bootstrap_ci(rng.exponential(1.0, 200))
        covered += lo <= np.log(2) <= hi
    assert covered >= 50


def test_ci_narrows_with_more_samples_and_is_nan_for_one():
    rng = np.random.default_rng(2)
    w = [np.subtract(*stats.bootstrap_ci(rng.normal(0, 1, n))[::-1]) for n in (20, 2000)]
    assert w[1] < w[0] / 4
    assert all(np.isnan(stats.bootstrap_ci([1.0])))


def test_ratio_of_medians_with_ci():
    rng = np.random.default_rng(3)
    a = rng.normal(10, 0.5, 50)
    b = rng.normal(26, 1.0, 50)
    r, lo, hi = stats.ratio_of_medians(a, b)
    assert r == np.median(b) / np.median(a)
    assert lo < 2.6 < hi and hi - lo < 0.2


# --- repeats of correlated samples: the block bootstrap -----------------------------------------

def _repeats(rng, trials, repeats, steps, between=1.0, within=0.5):
    """trials x repeats x steps: a per-repeat offset (shared by its steps) plus step noise; median 0."""
    return rng.normal(0, between, (trials, repeats, 1)) + rng.normal(0, within, (trials, repeats, steps))


def test_repeat_unit_cis_are_wider_than_the_naive_one_on_correlated_repeats():
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    for repeats, method, ci in ((12, "block bootstrap over 12 repeats", stats.block_bootstrap_ci),
                                (5, "t over 5 repeat medians", stats.repeat_t_ci)):
        x = _repeats(np.random.default_rng(4), 1, repeats, 16)[0]
        s = stats.summarize(list(x))
        assert s["ci_method"] == method and s["n"] == repeats * 16 and s["median"] == np.median(x)
        assert (s["ci_low"], s["ci_high"]) == ci(list(x))
        assert width(ci(list(x))) > 2 * width(stats.bootstrap_ci(x.ravel()))
        assert stats.summarize(x.ravel())["ci_method"] == "bootstrap"


def test_repeat_t_interval_covers_the_true_median_at_the_stated_rate_with_three_repeats():
    # 1000 simulated decode measurements of 3 repeats x 8 correlated steps, as the grids run them
    data = _repeats(np.random.default_rng(9), 1000, 3, 8)
    cis = np.array([stats.repeat_t_ci(list(x)) for x in data])
    covered = np.mean((cis[:, 0] <= 0) & (0 <= cis[:, 1]))
    assert 0.93 <= covered <= 0.985, covered
    # times are positive: around a true median of 10 the interval is taken on the log scale, stays positive
    cis = np.array([stats.repeat_t_ci(list(10 * np.exp(0.05 * x))) for x in data])
    assert (cis[:, 0] > 0).all() and 0.93 <= np.mean((cis[:, 0] <= 10) & (10 <= cis[:, 1])) <= 0.985
    block = np.array([stats.block_bootstrap_ci(list(x), n_resamples=500, seed=i) for i, x in enumerate(data[:300])])
    assert np.mean((block[:, 0] <= 0) & (0 <= block[:, 1])) < 0.85  # why 3 repeats do not get the bootstrap


def test_block_bootstrap_covers_the_true_median_at_the_stated_rate():
    # 400 simulated measurements of 20 repeats x 10 correlated steps; the true median is 0.
    rng = np.random.default_rng(7)
    data = _repeats(rng, 400, 20, 10)
    block = naive = 0
    for i, x in enumerate(data):
        lo, hi = stats.block_bootstrap_ci(list(x), n_resamples=1000, seed=i)
        block += lo <= 0 <= hi
        lo, hi = stats.block_bootstrap_ci([[v] for v in x.ravel()], n_resamples=1000, seed=i)  # = iid bootstrap
        naive += lo <= 0 <= hi
    assert 0.90 <= block / len(data) <= 0.99, block / len(data)
    assert naive / len(data) < 0.75, naive / len(data)  # steps resampled one by one: far too narrow


def test_blocks_survive_a_record_and_one_repeat_has_no_ci():
    from llmbench.measure.records import record
    x = [[1.0, 1.1, 1.2], [2.0, 2.1], [1.5, 1.4, 1.6, 1.5]]
    r = record(samples=x, metric="tpot", unit="s")
    assert r["samples"] == [v for b in x for v in b] and r["sample_blocks"] == [3, 2, 4]
    assert stats.regroup(r["samples"], r["sample_blocks"]) == x
    assert stats.regroup(r["samples"], None) == r["samples"] == stats.regroup(r["samples"], float("nan"))
    assert stats.samples_of(r) == x and stats.samples_of({"samples": [1.0, 2.0]}) == [1.0, 2.0]
    assert stats.regroup(None, None) == [] and stats.regroup(float("nan"), float("nan")) == []  # parquet gaps
    assert r["ci_method"] == "t over 3 repeat medians (log scale)" and 0 < r["ci_low"] < r["median"] < r["ci_high"]
    one = record(samples=[[1.0, 1.1, 1.2]], metric="tpot", unit="s")
    assert np.isnan(one["ci_low"]) and one["ci_method"].startswith("none")
    flat = record(samples=[1.0, 1.2, 1.1], metric="ttft", unit="s")
    assert flat["sample_blocks"] is None and flat["ci_method"] == "bootstrap"


def test_ratio_of_blocked_medians_is_wider_and_flat_ratio_unchanged():
    rng = np.random.default_rng(8)
    for repeats in (12, 4):  # block bootstrap, then the t interval on log repeat medians
        a, b = _repeats(rng, 1, repeats, 12)[0] + 10, 2.6 * (_repeats(rng, 1, repeats, 12)[0] + 10)
        r, lo, hi = stats.ratio_of_medians(list(a), list(b))
        r0, lo0, hi0 = stats.ratio_of_medians(a.ravel(), b.ravel())
        assert r == r0 == np.median(b) / np.median(a)
        assert lo < 2.6 < hi and hi - lo > 1.5 * (hi0 - lo0)
        # a flat side counts as one-sample repeats: mixing shapes works and stays between the two
        rm, lom, him = stats.ratio_of_medians(a.ravel(), list(b))
        assert rm == r and hi0 - lo0 < him - lom < hi - lo


def test_ratio_t_interval_covers_the_true_ratio_with_three_repeats():
    rng = np.random.default_rng(10)
    a, b = 10 + _repeats(rng, 400, 3, 8, 0.3, 0.2), 26 + _repeats(rng, 400, 3, 8, 0.6, 0.4)
    cis = np.array([stats.ratio_of_medians(list(x), list(y))[1:] for x, y in zip(a, b)])
    assert 0.92 <= np.mean((cis[:, 0] <= 2.6) & (2.6 <= cis[:, 1])) <= 0.995
