import json
import math
from math import comb

import numpy as np
import pytest
from scipy import stats

from tli import stats as S
from tli.errors import TLIError


@pytest.fixture
def pre_post():
    rng = np.random.default_rng(0)
    pre = rng.normal(0.38, 0.05, 60)
    post = pre + rng.normal(0.02, 0.04, 60)
    return pre, post


def huge_effect():
    """623 differences with mean 0.09 and std 0.001: scipy's p underflows to 0."""
    rng = np.random.default_rng(1)
    pre = rng.normal(0.377, 0.05, 623)
    return pre, pre + rng.normal(0.09, 0.001, 623)


# ---------------------------------------------------------------- t-test


def test_paired_ttest_matches_scipy(pre_post):
    pre, post = pre_post
    got = S.paired_ttest(pre, post)
    ref = stats.ttest_rel(post, pre)
    assert got.t == pytest.approx(ref.statistic, rel=1e-12)
    assert got.df == ref.df == 59
    assert got.p == pytest.approx(ref.pvalue, rel=1e-10)
    assert got.log10_p == pytest.approx(math.log10(ref.pvalue), rel=1e-6)
    assert S.paired_ttest(post, pre).t == pytest.approx(-got.t)


@pytest.mark.parametrize("shift", [0.0, 0.005, 0.01, 0.03, 0.06, 0.1])
@pytest.mark.parametrize("n", [5, 40, 623])
def test_log10_p_matches_scipy_where_finite(shift, n):
    rng = np.random.default_rng(n)
    pre = rng.normal(0.4, 0.05, n)
    post = pre + rng.normal(shift, 0.02, n)
    got = S.paired_ttest(pre, post)
    ref = stats.ttest_rel(post, pre).pvalue
    if ref > 0:
        assert got.log10_p == pytest.approx(math.log10(ref), rel=1e-6, abs=1e-12)
    else:
        assert math.isfinite(got.log10_p) and got.log10_p < -300


def test_log10_p_finite_where_scipy_underflows():
    pre, post = huge_effect()
    assert stats.ttest_rel(post, pre).pvalue == 0.0
    got = S.paired_ttest(pre, post)
    assert got.p == 0.0
    assert math.isfinite(got.log10_p) and got.log10_p < -300
    text = S.format_p(got.p, got.log10_p)
    mantissa, exponent = text.split("e")
    assert 1.0 <= float(mantissa) < 10.0 and int(exponent) < -300
    assert text != "0"


@pytest.mark.parametrize("df", [1, 5, 30, 622, 10_000])
@pytest.mark.parametrize("x", [3.0, 10.0, 30.0])
def test_tail_series_matches_scipy_where_finite(df, x):
    ref = stats.t.logsf(x, df)
    assert np.isfinite(ref)
    assert S._t_logsf_series(x, df) == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("df", [5, 622, 10_000])
@pytest.mark.parametrize("x", [1e6, 1e12, 1e100, 1e300])
def test_tail_matches_asymptotic_expansion(df, x):
    # For large x: sf(x) ~ C_df x^-df, C_df = G((df+1)/2) / (sqrt(df pi) G(df/2)) df^((df-1)/2);
    # the relative error of the expansion is O(df^2 / x^2).
    log_c = (
        math.lgamma((df + 1) / 2)
        - 0.5 * math.log(df * math.pi)
        - math.lgamma(df / 2)
        + (df - 1) / 2 * math.log(df)
    )
    expected = log_c - df * math.log(x)
    assert S._t_logsf(x, df) == pytest.approx(expected, rel=1e-9)


def test_ttest_degenerate_variance():
    pre = np.array([0.25, 0.5, 0.75])  # exact binary fractions: pre + 0.5 - pre is exactly 0.5
    tt = S.paired_ttest(pre, pre)
    assert math.isnan(tt.t) and tt.p == 1.0 and tt.log10_p == 0.0
    tt = S.paired_ttest(pre, pre + 0.5)
    assert tt.t == math.inf and tt.p == 0.0 and tt.log10_p == -math.inf
    assert S.paired_ttest(pre, pre - 0.5).t == -math.inf


def test_input_errors():
    with pytest.raises(TLIError):
        S.paired_ttest([1.0, 2.0], [1.0])
    with pytest.raises(TLIError):
        S.paired_ttest([1.0], [2.0])
    with pytest.raises(TLIError):
        S.paired_ttest([1.0, math.nan], [2.0, 3.0])
    with pytest.raises(TLIError):
        S.bootstrap_mean_ci([])
    with pytest.raises(TLIError):
        S.mcnemar_exact(-1, 2)


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("p", "log10_p", "expected"),
    [
        (1.0, 0.0, "1.000"),
        (0.0321, None, "0.032"),
        (0.001, None, "0.001"),
        (1.2e-5, None, "1.2e-05"),
        (3.4e-250, None, "3.4e-250"),
        (0.0, -411.3, "5.0e-412"),
        (0.0, -411.99999, "1.0e-412"),
        (0.0, -411.00001, "1.0e-411"),  # mantissa rounds up to 10
        (1e-305, -305.0, "1.0e-305"),
        (0.0, None, "<1e-308"),
        (0.0, -math.inf, "<1e-308"),
    ],
)
def test_format_p(p, log10_p, expected):
    assert S.format_p(p, log10_p) == expected


# ---------------------------------------------------------------- other tests and effect sizes


def test_wilcoxon_matches_scipy(pre_post):
    pre, post = pre_post
    post = post.copy()
    post[:3] = pre[:3]  # some zero differences
    got = S.wilcoxon(pre, post)
    ref = stats.wilcoxon(post - pre, zero_method="wilcox")
    assert got == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert S.wilcoxon(pre, pre) == (0.0, 1.0)


def test_cohens_dz(pre_post):
    pre, post = pre_post
    d = post - pre
    assert S.cohens_dz(pre, post) == pytest.approx(d.mean() / d.std(ddof=1))
    assert math.isnan(S.cohens_dz(pre, pre))
    assert S.cohens_dz([0.5, 1.0], [1.5, 2.0]) == math.inf


def test_bootstrap_mean_ci():
    x = np.random.default_rng(2).normal(1.0, 1.0, 200)
    a = S.bootstrap_mean_ci(x, n_boot=2000, seed=5)
    assert a == S.bootstrap_mean_ci(x, n_boot=2000, seed=5)
    assert a != S.bootstrap_mean_ci(x, n_boot=2000, seed=6)
    lo, hi = a
    assert lo < x.mean() < hi
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert S.bootstrap_mean_ci([3.0], n_boot=10) == (3.0, 3.0)


def test_bootstrap_mean_ci_matches_loop():
    x = np.arange(7.0) ** 2
    rng = np.random.default_rng(9)
    means = [x[rng.integers(0, x.size, size=x.size)].mean() for _ in range(300)]
    assert S.bootstrap_mean_ci(x, n_boot=300, seed=9, level=0.9) == pytest.approx(
        tuple(np.percentile(means, [5, 95]))
    )


def test_summarize_change(pre_post):
    pre, post = pre_post
    out = S.summarize_change(pre, post, n_boot=500, seed=0)
    assert set(out) == {
        "n", "pre_mean", "pre_std", "post_mean", "post_std", "abs_change", "pct_change", "t", "df",
        "p", "log10_p", "p_str", "wilcoxon_stat", "wilcoxon_p", "ci_lo", "ci_hi", "d_z",
    }  # fmt: skip
    assert out["n"] == 60
    assert out["pre_std"] == pytest.approx(np.std(pre, ddof=1))
    assert out["abs_change"] == pytest.approx(post.mean() - pre.mean())
    assert out["pct_change"] == pytest.approx(100 * (post.mean() - pre.mean()) / pre.mean())
    assert out["p"] == pytest.approx(stats.ttest_rel(post, pre).pvalue)
    assert out["ci_lo"] < out["abs_change"] < out["ci_hi"]
    assert out["p_str"] == S.format_p(out["p"], out["log10_p"])
    assert all(type(v) in (int, float, str) for v in out.values())
    json.dumps(out)
    degenerate = S.summarize_change([0.5, 1.0], [1.5, 2.0], n_boot=10, seed=0)
    assert json.loads(json.dumps(degenerate))["t"] == math.inf
    huge = S.summarize_change(*huge_effect(), n_boot=10, seed=0)
    assert huge["p"] == 0.0 and int(huge["p_str"].split("e")[1]) < -300


# ---------------------------------------------------------------- McNemar


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        (0, 5, 0.0625),
        (5, 0, 0.0625),
        (3, 3, 1.0),
        (0, 0, 1.0),
        (1, 9, 2 * (comb(10, 0) + comb(10, 1)) / 1024),
        (9, 1, 0.021484375),
        (4, 5, 1.0),
    ],
)
def test_mcnemar_exact(b, c, expected):
    assert S.mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_matches_binomial_formula():
    for b, c in [(2, 11), (17, 30), (40, 41)]:
        ref = min(1.0, 2 * stats.binom.cdf(min(b, c), b + c, 0.5))
        assert S.mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-12)


def test_discordant_counts():
    pre = [True, True, False, False, True]
    post = [True, False, True, True, False]
    assert S.discordant_counts(pre, post) == (2, 2)
    assert S.discordant_counts(pre, pre) == (0, 0)


def test_wilson_interval_against_newcombe():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med.
    # 17:857-872: its worked examples, method 3 (Wilson score, no continuity correction).
    from tli.stats import wilson_interval

    for (k, n), (lo, hi) in {
        (81, 263): (0.2553, 0.3662),
        (15, 148): (0.0624, 0.1605),
        (0, 20): (0.0, 0.1611),
        (1, 29): (0.0061, 0.1718),
    }.items():
        got = wilson_interval(k, n)
        assert got == pytest.approx((lo, hi), abs=5e-5), (k, n)
    # the closed form, at another level
    k, n, z = 7, 40, 2.5758293035489004  # 99%
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert wilson_interval(k, n, 0.99) == pytest.approx((centre - half, centre + half))
    with pytest.raises(TLIError, match="0 <= k <= n"):
        wilson_interval(5, 4)


def test_mcnemar_min_gain_is_the_fewest_gains_that_reach_alpha():
    from tli.stats import mcnemar_min_gain

    for alpha in (0.05, 0.01, 0.2):
        c = mcnemar_min_gain(alpha)
        assert S.mcnemar_exact(0, c) < alpha <= S.mcnemar_exact(0, c - 1)
    assert mcnemar_min_gain(0.05) == 6 and mcnemar_min_gain(0.01) == 8
    assert mcnemar_min_gain(0.05, n=6) == 6 and mcnemar_min_gain(0.05, n=5) is None
