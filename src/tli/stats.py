"""Small pure statistics on 1-D arrays: paired tests, bootstrap intervals, effect sizes.

All functions take array-likes of per-pair values (e.g. cosines before and after training) and
return plain Python floats. P-values that underflow double precision are also given in log space
(``log10_p``), since a paired t-test over hundreds of pairs easily yields p < 1e-308.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import special, stats

from tli.errors import TLIError

_LN10 = math.log(10.0)


class TTest(NamedTuple):
    """Result of :func:`paired_ttest`."""

    t: float
    df: int
    p: float
    log10_p: float


class Wilcoxon(NamedTuple):
    """Result of :func:`wilcoxon`."""

    statistic: float
    p: float


def _diff(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """Paired differences ``post - pre`` as float64, after checking the inputs."""
    pre = np.asarray(pre, dtype=np.float64)
    post = np.asarray(post, dtype=np.float64)
    if pre.ndim != 1 or pre.shape != post.shape:
        raise TLIError(
            f"paired values must be two 1-D arrays of one length, got {pre.shape}, {post.shape}"
        )
    if pre.size < 2:
        raise TLIError(f"paired statistics need at least 2 pairs, got {pre.size}")
    if not (np.isfinite(pre).all() and np.isfinite(post).all()):
        raise TLIError("paired values contain NaN or infinity")
    return post - pre


def _t_logsf_series(x: float, df: float) -> float:
    """Natural log of the Student-t survival function for large x, by a convergent series.

    ``sf(x) = I_z(df/2, 1/2) / 2`` with ``z = df / (df + x^2)`` (regularised incomplete beta), and
    ``I_z(a, b) = z^a (1 - z)^b / (a B(a, b)) * 2F1(a + b, 1; a + 1; z)`` (DLMF 8.17.8), whose
    series ``sum_n (a + b)_n / (a + 1)_n z^n`` has positive terms shrinking at least like ``z^n``.
    Everything is summed in log space, so it stays finite where ``sf`` underflows. It needs about
    ``40 / (1 - z)`` terms, which is few whenever ``sf`` underflows for realistic df.
    """
    a, b = df / 2.0, 0.5
    # log z and log(1 - z), stable for huge x (x^2 may overflow).
    log_z = math.log(df) - 2.0 * math.log(x) - math.log1p(df / x / x)
    log_1mz = -math.log1p(df / x / x)
    n_terms = int(min(1e7, math.ceil(50.0 / max(-math.expm1(log_z), 1e-300)))) + 1
    n = np.arange(n_terms, dtype=np.float64)
    log_terms = (
        n * log_z
        + special.gammaln(a + b + n)
        - special.gammaln(a + b)
        - special.gammaln(a + 1.0 + n)
        + special.gammaln(a + 1.0)
    )
    log_series = special.logsumexp(log_terms)
    log_i = a * log_z + b * log_1mz - math.log(a) - special.betaln(a, b) + log_series
    return float(math.log(0.5) + log_i)


def _t_logsf(x: float, df: float) -> float:
    """Natural log of the Student-t survival function, finite for every finite x."""
    value = float(stats.t.logsf(x, df))
    if math.isfinite(value) or x <= 0:
        return value
    return _t_logsf_series(x, df)


def paired_ttest(pre: np.ndarray, post: np.ndarray) -> TTest:
    """Two-sided paired t-test of ``post - pre`` (as ``scipy.stats.ttest_rel(post, pre)``).

    ``log10_p`` is computed in log space, ``log10(2) + log10(sf(|t|))``, from scipy's ``t.logsf``
    where that is finite and from an exact convergent series of the t tail where it underflows, so
    it is finite for every finite t; ``p`` is the ordinary float (0.0 below ~1e-308).

    Degenerate cases (zero variance of the differences): all differences equal and nonzero gives
    ``t = +-inf``, ``p = 0.0``, ``log10_p = -inf``; all differences zero gives ``t = nan``,
    ``p = 1.0``, ``log10_p = 0.0``.

    Args:
        pre: Values before, shape (n,).
        post: Values after, shape (n,), paired with ``pre``.

    Returns:
        ``TTest(t, df, p, log10_p)`` with ``df = n - 1``.
    """
    d = _diff(pre, post)
    n, df = d.size, d.size - 1
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        if mean == 0.0:
            return TTest(math.nan, df, 1.0, 0.0)
        return TTest(math.copysign(math.inf, mean), df, 0.0, -math.inf)
    t = mean / (sd / math.sqrt(n))
    p = min(1.0, 2.0 * float(stats.t.sf(abs(t), df)))
    log10_p = min(0.0, (math.log(2.0) + _t_logsf(abs(t), df)) / _LN10)
    return TTest(t, df, p, log10_p)


def format_p(p: float, log10_p: float | None = None) -> str:
    """Format a p-value for a report; never prints a bare "0".

    ``p >= 0.001``: three decimals ("0.032"); down to 1e-300: two significant digits in scientific
    notation ("1.2e-05"); below that (or when ``p`` underflowed to 0) the mantissa and exponent come
    from ``log10_p`` ("5.0e-412"). An underflowed p without a finite ``log10_p`` prints "<1e-308".

    Args:
        p: The p-value.
        log10_p: Its base-10 logarithm, used when ``p`` is too small to be represented.

    Returns:
        The formatted p-value.
    """
    if math.isnan(p):
        return "nan"
    if p >= 0.001:
        return f"{p:.3f}"
    if p >= 1e-300:
        return f"{p:.1e}"
    if log10_p is None or not math.isfinite(log10_p):
        return "<1e-308"
    exponent = math.floor(log10_p)
    mantissa = round(10.0 ** (log10_p - exponent), 1)
    if mantissa >= 10.0:
        mantissa, exponent = 1.0, exponent + 1
    return f"{mantissa:.1f}e{exponent:d}"


def wilcoxon(pre: np.ndarray, post: np.ndarray) -> Wilcoxon:
    """Wilcoxon signed-rank test of ``post - pre`` (``scipy.stats.wilcoxon``, two-sided).

    Zero differences are dropped (``zero_method="wilcox"``); scipy picks the exact distribution for
    small samples and the normal approximation otherwise. If every difference is zero the result is
    ``(0.0, 1.0)`` instead of an error.

    Args:
        pre: Values before, shape (n,).
        post: Values after, shape (n,).

    Returns:
        ``Wilcoxon(statistic, p)``; the statistic is the smaller of the positive and negative rank
        sums.
    """
    d = _diff(pre, post)
    if not np.any(d):
        return Wilcoxon(0.0, 1.0)
    res = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
    return Wilcoxon(float(res.statistic), float(res.pvalue))


def bootstrap_mean_ci(
    x: np.ndarray, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Args:
        x: Values, shape (n,).
        n_boot: Number of resamples (with replacement, n values each).
        seed: Seed of the ``numpy.random.Generator``; same seed, same interval.
        level: Coverage, in (0, 1).

    Returns:
        ``(lo, hi)``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise TLIError(f"bootstrap needs a non-empty 1-D array, got shape {x.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise TLIError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    rng = np.random.default_rng(seed)
    chunk = max(1, 2_000_000 // x.size)  # bound memory: ~16 MB of indices at a time
    means = np.concatenate(
        [
            x[rng.integers(0, x.size, size=(min(chunk, n_boot - start), x.size))].mean(axis=1)
            for start in range(0, n_boot, chunk)
        ]
    )
    alpha = (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return float(lo), float(hi)


def cohens_dz(pre: np.ndarray, post: np.ndarray) -> float:
    """Cohen's d_z, the paired effect size: ``mean(d) / std(d, ddof=1)`` with ``d = post - pre``.

    Args:
        pre: Values before, shape (n,).
        post: Values after, shape (n,).

    Returns:
        d_z; ``+-inf`` for constant nonzero differences, NaN for all-zero differences.
    """
    d = _diff(pre, post)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:
        return math.nan if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


def summarize_change(
    pre: np.ndarray, post: np.ndarray, *, n_boot: int = 10000, seed: int = 0, level: float = 0.95
) -> dict[str, float | int | str]:
    """All statistics of a before/after comparison on paired values, as one flat dict.

    Standard deviations use ddof=1 (sample std), as in the paper's table of mean (std) per set.

    Args:
        pre: Values before, shape (n,).
        post: Values after, shape (n,).
        n_boot: Bootstrap resamples of the CI of the mean change.
        seed: Seed of the bootstrap.
        level: Coverage of the CI.

    Returns:
        ``n``, ``pre_mean``, ``pre_std``, ``post_mean``, ``post_std``, ``abs_change``
        (post_mean - pre_mean), ``pct_change`` (100 * abs_change / |pre_mean|, NaN if pre_mean is
        0), ``t``, ``df``, ``p``, ``log10_p``, ``p_str`` (:func:`format_p`), ``wilcoxon_stat``,
        ``wilcoxon_p``, ``ci_lo`` / ``ci_hi`` (bootstrap CI of the mean of post - pre) and ``d_z``.
        Values are plain Python numbers; degenerate inputs can give inf or NaN, which
        ``json.dump`` writes with its default ``allow_nan=True`` (as ``Infinity`` / ``NaN``).
    """
    d = _diff(pre, post)
    pre = np.asarray(pre, dtype=np.float64)
    post = np.asarray(post, dtype=np.float64)
    tt = paired_ttest(pre, post)
    wx = wilcoxon(pre, post)
    lo, hi = bootstrap_mean_ci(d, n_boot=n_boot, seed=seed, level=level)
    pre_mean, post_mean = float(pre.mean()), float(post.mean())
    abs_change = post_mean - pre_mean
    return {
        "n": int(d.size),
        "pre_mean": pre_mean,
        "pre_std": float(pre.std(ddof=1)),
        "post_mean": post_mean,
        "post_std": float(post.std(ddof=1)),
        "abs_change": abs_change,
        "pct_change": 100.0 * abs_change / abs(pre_mean) if pre_mean != 0.0 else math.nan,
        "t": tt.t,
        "df": tt.df,
        "p": tt.p,
        "log10_p": tt.log10_p,
        "p_str": format_p(tt.p, tt.log10_p),
        "wilcoxon_stat": wx.statistic,
        "wilcoxon_p": wx.p,
        "ci_lo": lo,
        "ci_hi": hi,
        "d_z": cohens_dz(pre, post),
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar test from the discordant counts.

    ``p = min(1, 2 P(X <= min(b, c)))`` with ``X ~ Binomial(b + c, 1/2)``; ``b + c = 0`` gives 1.
    Use it to compare per-query retrieval hits before and after training (see
    :func:`discordant_counts`).

    Args:
        b: Pairs right before and wrong after.
        c: Pairs wrong before and right after.

    Returns:
        The p-value.
    """
    if int(b) != b or int(c) != c or b < 0 or c < 0:
        raise TLIError(f"McNemar counts must be non-negative integers, got {b}, {c}")
    b, c = int(b), int(c)
    if b + c == 0:
        return 1.0
    lower = stats.binomtest(min(b, c), b + c, 0.5, alternative="less").pvalue
    return min(1.0, 2.0 * float(lower))


def discordant_counts(pre_hits: np.ndarray, post_hits: np.ndarray) -> tuple[int, int]:
    """Discordant counts of two paired boolean outcomes (e.g. P@1 hits per query).

    Args:
        pre_hits: Outcome before, shape (n,), bool.
        post_hits: Outcome after, shape (n,), bool.

    Returns:
        ``(b, c)``: hits lost (True before, False after) and hits gained (False before, True after).
    """
    pre_hits = np.asarray(pre_hits, dtype=bool)
    post_hits = np.asarray(post_hits, dtype=bool)
    if pre_hits.ndim != 1 or pre_hits.shape != post_hits.shape:
        raise TLIError(
            f"hit vectors must be 1-D of one length, got {pre_hits.shape}, {post_hits.shape}"
        )
    return int(np.sum(pre_hits & ~post_hits)), int(np.sum(~pre_hits & post_hits))


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (e.g. a P@1 of k hits among n queries).

    Unlike the normal ("Wald") interval it stays inside [0, 1] and keeps its coverage near 0,
    where retrieval P@1 of a small model usually lies (Newcombe 1998, method 3; Wilson 1927).
    Computed by ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``.

    Args:
        k: Successes (hits), ``0 <= k <= n``.
        n: Trials (queries), ``n >= 1``.
        level: Coverage, in (0, 1).

    Returns:
        ``(lo, hi)``.
    """
    if int(k) != k or int(n) != n or n < 1 or not 0 <= k <= n:
        raise TLIError(f"a Wilson interval needs integers 0 <= k <= n, n >= 1; got {k}, {n}")
    if not 0 < level < 1:
        raise TLIError(f"level must be in (0, 1), got {level}")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_min_gain(alpha: float, n: int | None = None) -> int | None:
    """The fewest hits gained, with none lost, that McNemar's exact test finds at p < alpha.

    With b = 0 lost and c gained, ``p = 2 * 0.5 ** c`` (:func:`mcnemar_exact`), so the answer
    does not depend on the number of queries, only on whether there are that many: 6 at
    alpha = 0.05, 8 at 0.01. Any hit lost raises it (one lost needs 8 gained at 0.05).

    Args:
        alpha: Significance level, in (0, 1).
        n: The number of queries; None for no limit.

    Returns:
        The count, or None when it exceeds ``n`` (no change among n queries can be detected).
    """
    if not 0 < alpha < 1:
        raise TLIError(f"alpha must be in (0, 1), got {alpha}")
    c = 1
    while mcnemar_exact(0, c) >= alpha:
        c += 1
    return None if n is not None and c > n else c
