import numpy as np

from llmbench import stats


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
