"""Power of the paired t-test (verl_eopd/math/stats.py): the noncentral t tail against the central t, known
values and textbook seed counts, and the numbers docs/preregistration.md takes from the pilot."""

from __future__ import annotations

import math

import pytest

from verl_eopd.math.stats import (
    minimal_detectable_effect,
    nct_sf,
    paired_t_power,
    seeds_for_power,
    t_two_sided_p,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("df", [1, 4, 17, 25, 200])
@pytest.mark.parametrize("t", [0.0, 0.7, 2.25, 5.0])
def test_noncentral_tail_at_ncp_zero_is_the_central_t_tail(df, t):
    assert nct_sf(t, df, 0.0) == pytest.approx(t_two_sided_p(t, df) / 2, abs=1e-10)
    assert nct_sf(-t, df, 0.0) == pytest.approx(1 - t_two_sided_p(t, df) / 2, abs=1e-10)


@pytest.mark.parametrize("t, df, ncp, expected", [
    # scipy.stats.nct.sf(t, df, ncp), scipy 1.17.1
    (2.3, 17, 1.0, 0.11902583828542145),
    (2.3, 17, 2.0, 0.4025471220828432),
    (2.3, 25, 4.0, 0.9492891054133413),
    (2.3, 25, 6.0, 0.9997953148930807),
])
def test_noncentral_tail_matches_known_values(t, df, ncp, expected):
    assert nct_sf(t, df, ncp) == pytest.approx(expected, abs=1e-9)


def test_noncentral_tail_tends_to_the_shifted_normal():
    for t, ncp in ((1.0, 0.5), (2.0, 3.0), (-1.0, 1.0)):
        assert nct_sf(t, 100_000, ncp) == pytest.approx(0.5 * math.erfc((t - ncp) / math.sqrt(2)), abs=1e-4)


@pytest.mark.parametrize("n", [2, 5, 26])
@pytest.mark.parametrize("alpha", [0.05, 0.05 / 3])
def test_power_at_no_effect_is_alpha(n, alpha):
    assert paired_t_power(0.0, n, alpha) == pytest.approx(alpha, abs=1e-9)
    assert paired_t_power(0.0, n, alpha, one_sided=False) == pytest.approx(alpha, abs=1e-9)


def test_textbook_seed_counts():
    """G*Power, matched pairs, d_z = 0.5, alpha 0.05, power 0.8: one-tailed n = 27 (actual power 0.8118),
    two-tailed n = 34 (actual power 0.8078)."""
    assert seeds_for_power(0.5, 0.05) == 27
    assert paired_t_power(0.5, 27, 0.05) == pytest.approx(0.8118, abs=1e-4)
    assert seeds_for_power(0.5, 0.05, one_sided=False) == 34
    assert paired_t_power(0.5, 34, 0.05, one_sided=False) == pytest.approx(0.8078, abs=1e-4)


def test_power_rises_with_seeds_and_effect_and_falls_with_alpha():
    by_n = [paired_t_power(0.6, n, 0.05 / 3) for n in (5, 10, 18, 26, 40)]
    assert by_n == sorted(by_n) and by_n[-1] > 0.9
    by_d = [paired_t_power(d, 18, 0.05 / 3) for d in (0.0, 0.2, 0.5, 0.8, 1.2)]
    assert by_d == sorted(by_d)
    assert paired_t_power(0.6, 18, 0.05 / 7) < paired_t_power(0.6, 18, 0.05 / 3) < paired_t_power(0.6, 18, 0.05)
    assert paired_t_power(-0.5, 18, 0.05) < 0.05  # one-sided: an effect the wrong way is not detected


def test_minimal_detectable_effect_inverts_the_power():
    for n, alpha, one_sided in ((18, 0.05 / 3, True), (26, 0.05 / 7, False)):
        d = minimal_detectable_effect(n, alpha, one_sided=one_sided)
        assert paired_t_power(d, n, alpha, one_sided) == pytest.approx(0.8, abs=1e-6)
        assert seeds_for_power(d * 1.0001, alpha, one_sided=one_sided) == n


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n >= 2"):
        paired_t_power(0.5, 1)
    with pytest.raises(ValueError, match="alpha"):
        paired_t_power(0.5, 10, alpha=0.7)
    with pytest.raises(ValueError, match="needs d > 0"):
        seeds_for_power(-0.3)
    with pytest.raises(ValueError, match="more than 50"):
        seeds_for_power(0.05, n_max=50)


def test_the_preregistrations_seed_count_from_the_pilot():
    """docs/preregistration.md: per-seed Pass@4 of the multiples pilot (docs/mini_repro/eopd_tiny_multiple,
    EOPD minus OPD, seeds 0..4) -> d_z 0.611 -> 26 seeds for 80% power, one-sided, alpha 0.05/3 (Holm's
    smallest threshold over the 3 primaries); 34 for 90%. The stand-in for H2/H3 (all-token student entropy)
    needs 6."""
    diffs = [6.293, 6.971, -4.191, 3.130, 1.482]  # percentage points (results.json, rounded to 3 decimals)
    m = sum(diffs) / 5
    sd = math.sqrt(sum((x - m) ** 2 for x in diffs) / 4)
    dz = m / sd
    assert (round(m, 2), round(sd, 2), round(dz, 3)) == (2.74, 4.48, 0.611)
    alpha = 0.05 / 3
    assert seeds_for_power(dz, alpha) == 26
    assert paired_t_power(dz, 25, alpha) < 0.8 < paired_t_power(dz, 26, alpha) < 0.81
    assert seeds_for_power(dz, alpha, power=0.9) == 34
    entropy = [0.069, 0.205, 0.108, 0.093, 0.061]
    me = sum(entropy) / 5
    dz_entropy = me / math.sqrt(sum((x - me) ** 2 for x in entropy) / 4)
    assert seeds_for_power(dz_entropy, alpha) == 6
    assert minimal_detectable_effect(26, alpha) == pytest.approx(0.610, abs=1e-3)
