"""Monte-Carlo epsilon of balls-in-bins participation (Chua et al. 2025)."""

import dp_accounting
import pytest

from fedjax_priv.privacy.accountant import compute_epsilon
from fedjax_priv.privacy.balls_in_bins import monte_carlo_epsilon

DELTA = 1e-2


def _pld(event, count):
  return compute_epsilon(dp_accounting.SelfComposedDpEvent(event, count), DELTA, "pld")


def test_one_bin_is_full_participation_and_the_estimate_finds_its_exact_epsilon():
  # b = 1: every user every round, so the pair is the Gaussian's and PLD is exact.
  exact = _pld(dp_accounting.GaussianDpEvent(1.5), 3)
  result = monte_carlo_epsilon(1.5, 1, 3, DELTA, num_samples=50_000, seed=1)
  assert result.estimate == pytest.approx(exact, rel=0.03)
  assert result.lower <= exact <= result.upper  # The confidence interval covers the truth.
  assert result.lower <= result.estimate <= result.upper
  assert result.bound_used == pytest.approx(exact, rel=1e-12)


def test_bins_amplify_below_the_charged_bound_near_poisson():
  result = monte_carlo_epsilon(1.0, 10, 5, DELTA, num_samples=50_000, seed=2)
  assert result.lower <= result.estimate <= result.upper < result.bound_used
  assert result.bound_used == pytest.approx(_pld(dp_accounting.GaussianDpEvent(1.0), 5), rel=1e-12)
  # Chua et al. 2025 find balls in bins close to Poisson sampling at q = 1 / b.
  poisson = _pld(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 50)
  assert 0.6 * poisson < result.estimate < 1.2 * poisson


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="num_bins"):
    monte_carlo_epsilon(1.0, 0, 1, DELTA)
  with pytest.raises(ValueError, match="delta"):
    monte_carlo_epsilon(1.0, 2, 1, 1.5)
  with pytest.raises(ValueError, match="confidence"):
    monte_carlo_epsilon(1.0, 2, 1, DELTA, confidence=1.0)
