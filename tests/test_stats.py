"""Seed statistics (verl_eopd/math/stats.py) against closed forms and hand-computed cases."""

from __future__ import annotations

import math

import pytest

from verl_eopd.math.stats import betainc, holm, paired_t, t_quantile, t_two_sided_p

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, 40.0])
def test_t_tail_matches_closed_forms_for_one_and_two_degrees_of_freedom(t):
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)  # Cauchy
    assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-12)


def test_t_tail_and_quantile_match_tabulated_values():
    assert t_two_sided_p(2.776445105, 4) == pytest.approx(0.05, abs=1e-8)
    assert t_two_sided_p(2.570581836, 5) == pytest.approx(0.05, abs=1e-8)
    assert t_two_sided_p(1.959963985, 10**7) == pytest.approx(0.05, abs=1e-6)  # the normal limit
    assert t_quantile(0.975, 4) == pytest.approx(2.776445105, abs=1e-7)
    assert t_quantile(0.995, 9) == pytest.approx(3.249835542, abs=1e-7)


def test_betainc_symmetry_and_uniform_case():
    for x in (0.1, 0.37, 0.8):
        assert betainc(1.0, 1.0, x) == pytest.approx(x, abs=1e-12)
        assert betainc(2.5, 0.5, x) == pytest.approx(1 - betainc(0.5, 2.5, 1 - x), abs=1e-12)


def test_paired_t_by_hand():
    # differences 0.5, 0.1, 0.8, 0.9, 0.2: mean 0.5, sd sqrt(0.125), se sqrt(0.025)
    r = paired_t([1, 2, 3, 4, 5], [0.5, 1.9, 2.2, 3.1, 4.8])
    se = math.sqrt(0.125) / math.sqrt(5)
    assert (r.n, r.df) == (5, 4) and r.mean_diff == pytest.approx(0.5)
    assert r.t == pytest.approx(0.5 / se)
    assert r.ci95[0] == pytest.approx(0.5 - 2.776445105 * se, abs=1e-7)
    assert r.p == pytest.approx(t_two_sided_p(0.5 / se, 4))
    with pytest.raises(ValueError, match="pairs"):
        paired_t([1.0], [2.0])


def test_holm_by_hand():
    # sorted p: 0.01 (x4) = 0.04, 0.03 (x3) = 0.09, 0.04 (x2) = 0.08 -> 0.09 (monotone), 0.5 (x1)
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.9, 0.6]) == pytest.approx([1.0, 1.0])
