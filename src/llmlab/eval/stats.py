"""Is model B really better than model A? Paired tests on the same items, and A/B-test arithmetic.

- paired_bootstrap: confidence interval of a metric difference by resampling items (Koehn 2004).
- mcnemar: do two classifiers err on different items? (McNemar 1947; continuity correction Edwards 1948).
- two_proportion_test, sample_size_per_arm: the pooled z-test of two conversion rates and the sample
  size it needs (normal approximation; Fleiss, Levin & Paik, "Statistical Methods for Rates and
  Proportions").

Plain numpy and math: the normal quantile is ours (Newton-Halley on erfc), scipy is only a test oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BootstrapResult", "McNemarResult", "ProportionTestResult", "paired_bootstrap", "mcnemar",
    "two_proportion_test", "sample_size_per_arm",
]


# ------------------------------------------------------------------------------ the normal distribution
def _norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _norm_ppf(p: float) -> float:
    """Standard normal quantile Phi^-1(p), to about machine precision."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a probability strictly between 0 and 1 is needed, got {p}")
    if p > 0.5:
        return -_norm_ppf(1.0 - p)
    # Start from Abramowitz & Stegun 26.2.23 (error < 4.5e-4), then Halley steps on Phi(x) - p.
    t = math.sqrt(-2.0 * math.log(p))
    x = -(t - (2.515517 + 0.802853 * t + 0.010328 * t * t)
          / (1.0 + 1.432788 * t + 0.189269 * t * t + 0.001308 * t ** 3))
    for _ in range(50):
        u = (_norm_cdf(x) - p) * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)  # (Phi - p) / phi
        step = u / (1.0 + 0.5 * x * u)
        x -= step
        if abs(step) <= 1e-15 * max(1.0, abs(x)):
            break
    return x


# ------------------------------------------------------------------------------------ paired bootstrap
@dataclass(frozen=True)
class BootstrapResult:
    """diff = metric(A) - metric(B) on all items; [low, high] its percentile interval; p_value the
    fraction of resamples whose difference is not of the observed sign (0 or opposite)."""

    diff: float
    low: float
    high: float
    p_value: float
    n_resamples: int


def paired_bootstrap(scores_a, scores_b, *, metric: Callable[[np.ndarray], float] | None = None,
                     n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0) -> BootstrapResult:
    """Paired bootstrap of a metric difference between two models scored on the same items (Koehn 2004).

    ``scores_a[i]`` and ``scores_b[i]`` belong to item i (a number such as 0/1 correctness, or a row of
    sufficient statistics when ``metric`` needs them, e.g. BLEU's n-gram counts). Each resample draws n
    item indices with replacement, the same ones for both models, and recomputes
    d* = metric(A[idx]) - metric(B[idx]); ``metric`` defaults to the mean.

    Returns the observed difference d, the percentile interval [q_{alpha/2}, q_{1-alpha/2}] of d*, and
    p_value = #{d* <= 0} / R when d > 0 (#{d* >= 0} / R when d < 0; 1.0 when d == 0): a one-sided
    bootstrap estimate of how often B would look at least as good as A, "A beats B in (1 - p) of the
    resamples". Resamples are drawn with numpy's default_rng(seed), R rows of ``integers(0, n, n)`` in
    order, so the result is reproducible for a seed.
    """
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b must have the same shape, got {a.shape} and {b.shape}")
    if a.ndim == 0 or len(a) == 0:
        raise ValueError("scores are empty: pass one score (or row of statistics) per item")
    if metric is None and a.ndim != 1:
        raise ValueError("rows of statistics need a metric= that turns them into one number")
    if n_resamples < 1 or not 0.0 < alpha < 1.0:
        raise ValueError(f"need n_resamples >= 1 and 0 < alpha < 1, got {n_resamples}, {alpha}")
    n = len(a)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    chunk = max(1, 1_000_000 // n)   # bound the index matrix; drawing it in chunks keeps the same stream
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        if metric is None:
            diffs[start:start + len(idx)] = a[idx].mean(axis=1) - b[idx].mean(axis=1)
        else:
            diffs[start:start + len(idx)] = [metric(a[i]) - metric(b[i]) for i in idx]
    observed = float(a.mean() - b.mean()) if metric is None else float(metric(a) - metric(b))
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    if observed > 0:
        p = float(np.mean(diffs <= 0))
    elif observed < 0:
        p = float(np.mean(diffs >= 0))
    else:
        p = 1.0
    return BootstrapResult(observed, float(low), float(high), p, n_resamples)


# ---------------------------------------------------------------------------------------------- McNemar
@dataclass(frozen=True)
class McNemarResult:
    """b: items only A got right; c: items only B got right. statistic: min(b, c) for the exact test,
    the corrected chi-square for method="chi2"."""

    statistic: float
    p_value: float
    b: int
    c: int
    method: str


def _binom_half_cdf(k: int, n: int) -> float:
    """P[X <= k] for X ~ Binomial(n, 1/2), summed in log space (exact to ~1e-13 relative)."""
    log_half_n = n * math.log(0.5)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n
            for i in range(k + 1)]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(v - top) for v in logs)


def mcnemar(correct_a, correct_b, *, method: str = "exact") -> McNemarResult:
    """McNemar's test that two models, scored right/wrong on the same items, have the same error rate.

    Only discordant items count: b = #(A right, B wrong), c = #(A wrong, B right).
    "exact": two-sided binomial test, p = min(1, 2 P[X <= min(b, c)]) with X ~ Binomial(b + c, 1/2).
    "chi2": Edwards' continuity-corrected statistic (|b - c| - 1)^2 / (b + c) against chi-square with
    one degree of freedom, p = erfc(sqrt(stat / 2)). With no discordant items p = 1.
    """
    if method not in ("exact", "chi2"):
        raise ValueError(f"unknown method={method!r}: use 'exact' or 'chi2'")
    a, b_ = np.asarray(correct_a), np.asarray(correct_b)
    if a.shape != b_.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"correct_a and correct_b must be equally long, non-empty 1-D arrays, got shapes "
                         f"{a.shape} and {b_.shape}")
    for name, x in (("correct_a", a), ("correct_b", b_)):
        if not np.isin(x, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans or 0/1 (right/wrong per item)")
    a, b_ = a.astype(bool), b_.astype(bool)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    n = b + c
    if method == "exact":
        p = 1.0 if n == 0 else min(1.0, 2.0 * _binom_half_cdf(min(b, c), n))
        return McNemarResult(float(min(b, c)), p, b, c, method)
    if n == 0:
        return McNemarResult(0.0, 1.0, b, c, method)
    stat = (abs(b - c) - 1) ** 2 / n
    return McNemarResult(stat, math.erfc(math.sqrt(stat / 2.0)), b, c, method)


# ------------------------------------------------------------------------------------------- A/B tests
@dataclass(frozen=True)
class ProportionTestResult:
    """diff = rate_b - rate_a; z its pooled z statistic; [low, high] the Wald interval of diff."""

    rate_a: float
    rate_b: float
    diff: float
    z: float
    p_value: float
    low: float
    high: float


def two_proportion_test(successes_a: int, n_a: int, successes_b: int, n_b: int, *,
                        alpha: float = 0.05) -> ProportionTestResult:
    """Two-sided z-test that arms A and B convert at the same rate.

    z = (p_b - p_a) / sqrt(p (1 - p) (1/n_a + 1/n_b)) with the pooled rate p = (x_a + x_b) / (n_a + n_b);
    p_value = 2 (1 - Phi(|z|)). The (1 - alpha) interval of p_b - p_a uses the unpooled standard error
    sqrt(p_a q_a / n_a + p_b q_b / n_b).
    """
    for x, n, arm in ((successes_a, n_a, "A"), (successes_b, n_b, "B")):
        if int(x) != x or int(n) != n or n <= 0 or not 0 <= x <= n:
            raise ValueError(f"arm {arm}: need whole numbers 0 <= successes <= n and n > 0, got {x} of {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    pa, pb = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    if pooled in (0.0, 1.0):
        raise ValueError("every item in both arms has the same outcome: the z-test is undefined")
    z = (pb - pa) / math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    half = _norm_ppf(1 - alpha / 2) * math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    return ProportionTestResult(pa, pb, pb - pa, z, math.erfc(abs(z) / math.sqrt(2.0)),
                                pb - pa - half, pb - pa + half)


def sample_size_per_arm(baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8,
                        relative: bool = False, continuity_correction: bool = False) -> int:
    """Items per arm for the two-sided two-proportion z-test to detect baseline -> baseline + mde.

    n = [z_{1-alpha/2} sqrt(2 pbar qbar) + z_{power} sqrt(p1 q1 + p2 q2)]^2 / (p2 - p1)^2, pbar = (p1 + p2)/2
    (Fleiss, Levin & Paik, ch. 4). ``relative``: mde is a fraction of the baseline (0.1 = +10 %).
    ``continuity_correction``: n' = n/4 (1 + sqrt(1 + 4 / (n |p2 - p1|)))^2 (Fleiss, Tytun & Ury 1980).
    """
    p1 = float(baseline)
    p2 = p1 * (1 + mde) if relative else p1 + mde
    if not 0.0 < p1 < 1.0 or not 0.0 < p2 < 1.0 or p1 == p2:
        raise ValueError(f"need baseline and baseline + effect strictly inside (0, 1) and a non-zero effect, "
                         f"got {p1} -> {p2}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha}, {power}")
    pbar, delta = (p1 + p2) / 2, abs(p2 - p1)
    n = (_norm_ppf(1 - alpha / 2) * math.sqrt(2 * pbar * (1 - pbar))
         + _norm_ppf(power) * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / delta ** 2
    if continuity_correction:
        n = n / 4 * (1 + math.sqrt(1 + 4 / (n * delta))) ** 2
    return math.ceil(n - 1e-9)   # absorb rounding noise when n is a whole number
