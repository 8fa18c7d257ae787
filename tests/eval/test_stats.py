"""Model-comparison statistics: McNemar against scipy's binomial test and the chi-square computed by hand
(and statsmodels when installed), the z-test and sample sizes against closed forms with scipy.stats.norm
and textbook values, the paired bootstrap against a plain reference loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from llmlab.eval import mcnemar, paired_bootstrap, sample_size_per_arm, two_proportion_test
from llmlab.eval.stats import _norm_ppf


def test_normal_quantile_matches_scipy():
    ps = np.r_[1e-300, 1e-100, 1e-12, 1e-6, np.linspace(0.001, 0.999, 999), 1 - 1e-9]
    assert [_norm_ppf(p) for p in ps] == pytest.approx(sps.norm.ppf(ps), rel=1e-13, abs=1e-13)
    with pytest.raises(ValueError):
        _norm_ppf(1.0)


# ---------------------------------------------------------------------------------------------- McNemar
def outcomes(both: int, only_a: int, only_b: int, neither: int):
    """Right/wrong vectors with the given 2x2 table."""
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return np.array(a, dtype=bool), np.array(b, dtype=bool)


TABLES = [(10, 0, 0, 5), (50, 1, 0, 3), (40, 3, 9, 8), (40, 9, 3, 8), (100, 25, 25, 10), (0, 17, 4, 0),
          (300, 140, 95, 60), (5, 1200, 1130, 5)]


@pytest.mark.parametrize("table", TABLES)
def test_mcnemar_exact_matches_binomtest(table):
    both, b, c, neither = table
    result = mcnemar(*outcomes(*table))
    assert (result.b, result.c) == (b, c)
    expected = 1.0 if b + c == 0 else sps.binomtest(b, b + c, 0.5).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("table", TABLES)
def test_mcnemar_chi2_matches_hand_formula(table):
    _, b, c, _ = table
    result = mcnemar(*outcomes(*table), method="chi2")
    if b + c == 0:
        assert (result.statistic, result.p_value) == (0.0, 1.0)
        return
    stat = (abs(b - c) - 1) ** 2 / (b + c)            # Edwards (1948) continuity correction
    assert result.statistic == pytest.approx(stat, rel=1e-14)
    assert result.p_value == pytest.approx(sps.chi2.sf(stat, df=1), rel=1e-12)


def test_mcnemar_matches_statsmodels():
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    for table in TABLES:
        both, b, c, neither = table
        for method, exact in (("exact", True), ("chi2", False)):
            ours = mcnemar(*outcomes(*table), method=method)
            if b + c == 0 and not exact:  # statsmodels divides 1 by 0 (statistic inf, p 0): no discordant pair
                assert ours.p_value == 1.0  # is no evidence of a difference
                continue
            theirs = sm.mcnemar([[both, b], [c, neither]], exact=exact, correction=True)
            assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-10)


def test_mcnemar_errors():
    with pytest.raises(ValueError, match="equally long"):
        mcnemar([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([1, 2], [1, 0])
    with pytest.raises(ValueError, match="unknown method"):
        mcnemar([1, 0], [1, 0], method="midp")


# ----------------------------------------------------------------------------------- A/B proportion test
@pytest.mark.parametrize("xa,na,xb,nb", [(200, 2000, 250, 2000), (48, 1000, 31, 950), (5, 10, 5, 10),
                                         (0, 40, 3, 40)])
def test_two_proportion_test_matches_hand_formula(xa, na, xb, nb):
    r = two_proportion_test(xa, na, xb, nb)
    pa, pb, pooled = xa / na, xb / nb, (xa + xb) / (na + nb)
    z = (pb - pa) / math.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
    assert r.z == pytest.approx(z, rel=1e-14)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-12)
    half = sps.norm.ppf(0.975) * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    assert (r.low, r.high) == pytest.approx((pb - pa - half, pb - pa + half), rel=1e-12)
    assert r.diff == pytest.approx(pb - pa)


def test_two_proportion_test_errors():
    with pytest.raises(ValueError, match="arm A"):
        two_proportion_test(11, 10, 5, 10)
    with pytest.raises(ValueError, match="arm B"):
        two_proportion_test(1, 10, 5, 0)
    with pytest.raises(ValueError, match="undefined"):
        two_proportion_test(0, 10, 0, 10)


def closed_form_n(p1, p2, alpha=0.05, power=0.8):
    pbar = (p1 + p2) / 2
    za, zb = sps.norm.ppf(1 - alpha / 2), sps.norm.ppf(power)
    return (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / (
        p2 - p1) ** 2


@pytest.mark.parametrize("p1,p2,alpha,power", [(0.1, 0.12, 0.05, 0.8), (0.2, 0.25, 0.05, 0.8),
                                               (0.5, 0.45, 0.01, 0.9), (0.03, 0.033, 0.1, 0.8)])
def test_sample_size_matches_closed_form(p1, p2, alpha, power):
    n = sample_size_per_arm(p1, p2 - p1, alpha=alpha, power=power)
    assert n == math.ceil(closed_form_n(p1, p2, alpha, power))


def test_sample_size_textbook_values():
    # JMP's two-sample proportions example: 0.08 vs 0.06, alpha 0.05, power 0.8 -> 2554 per group.
    assert sample_size_per_arm(0.08, -0.02) == 2554
    # Zar, Biostatistical Analysis (1999), Example 24.26: 0.45 vs 0.25, power 0.9, with Fleiss' continuity
    # correction -> 127.23, so 128 per group (117.4 -> 118 without the correction).
    n = closed_form_n(0.45, 0.25, power=0.9)
    assert n / 4 * (1 + math.sqrt(1 + 4 / (n * 0.2))) ** 2 == pytest.approx(127.2343, abs=1e-4)
    assert sample_size_per_arm(0.45, -0.2, power=0.9, continuity_correction=True) == 128
    assert sample_size_per_arm(0.45, -0.2, power=0.9) == 118
    # A relative MDE of +20 % on 10 % is the absolute 10 % -> 12 %.
    assert sample_size_per_arm(0.10, 0.20, relative=True) == sample_size_per_arm(0.10, 0.02)
    with pytest.raises(ValueError, match="inside"):
        sample_size_per_arm(0.95, 0.1)
    with pytest.raises(ValueError, match="non-zero"):
        sample_size_per_arm(0.5, 0.0)


# ---------------------------------------------------------------------------------------- bootstrap
def reference_bootstrap(a, b, metric, n_resamples, alpha, seed):
    """The textbook loop: one index draw per resample, the same indices for both models."""
    rng = np.random.default_rng(seed)
    n = len(a)
    diffs = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        diffs.append(metric(a[idx]) - metric(b[idx]))
    diffs = np.array(diffs)
    observed = metric(a) - metric(b)
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    p = np.mean(diffs <= 0) if observed > 0 else np.mean(diffs >= 0) if observed < 0 else 1.0
    return observed, low, high, p


def correctness(seed=0, n=200):
    rng = np.random.default_rng(seed)
    return (rng.random(n) < 0.72).astype(float), (rng.random(n) < 0.65).astype(float)


def test_bootstrap_matches_reference_loop():
    a, b = correctness()
    ours = paired_bootstrap(a, b, n_resamples=500, seed=3)
    ref = reference_bootstrap(a, b, np.mean, 500, 0.05, 3)
    assert (ours.diff, ours.low, ours.high, ours.p_value) == pytest.approx(ref, rel=1e-12, abs=1e-12)
    # A corpus-level metric over per-item statistics: micro precision sum(tp) / sum(predicted).
    rng = np.random.default_rng(1)
    pred = rng.integers(1, 6, size=(120, 1))
    sa, sb = np.hstack([rng.binomial(pred, 0.6), pred]), np.hstack([rng.binomial(pred, 0.5), pred])

    def micro_precision(rows):
        return rows[:, 0].sum() / rows[:, 1].sum()
    ours = paired_bootstrap(sa, sb, metric=micro_precision, n_resamples=300, seed=5)
    ref = reference_bootstrap(sa.astype(float), sb.astype(float), micro_precision, 300, 0.05, 5)
    assert (ours.diff, ours.low, ours.high, ours.p_value) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_bootstrap_is_seeded_and_brackets_the_difference():
    a, b = correctness(2)
    first, again = paired_bootstrap(a, b, seed=11), paired_bootstrap(a, b, seed=11)
    assert first == again
    assert paired_bootstrap(a, b, seed=12) != first
    assert first.low <= first.diff <= first.high
    assert first.diff == pytest.approx(a.mean() - b.mean())
    assert 0.0 <= first.p_value <= 1.0
    # Chunked index draws give the same stream as one big draw (n large enough to force several chunks).
    big_a, big_b = correctness(3, n=50_000)
    ours = paired_bootstrap(big_a, big_b, n_resamples=45, seed=4)
    ref = reference_bootstrap(big_a, big_b, np.mean, 45, 0.05, 4)
    assert (ours.diff, ours.low, ours.high, ours.p_value) == pytest.approx(ref, rel=1e-12, abs=1e-12)


def test_bootstrap_p_value_definition():
    ones, zeros = np.ones(30), np.zeros(30)
    always = paired_bootstrap(ones, zeros, n_resamples=200)
    assert (always.diff, always.low, always.high, always.p_value) == (1.0, 1.0, 1.0, 0.0)
    tie = paired_bootstrap(ones, ones, n_resamples=200)
    assert (tie.diff, tie.p_value) == (0.0, 1.0)
    # B better: the p-value counts resamples where A looks at least as good.
    a, b = correctness(4)
    flipped = paired_bootstrap(b, a, n_resamples=400, seed=9)
    straight = paired_bootstrap(a, b, n_resamples=400, seed=9)
    assert flipped.diff == -straight.diff and flipped.p_value == straight.p_value


def test_bootstrap_errors():
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="metric="):
        paired_bootstrap(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap([1, 0], [0, 1], n_resamples=0)
