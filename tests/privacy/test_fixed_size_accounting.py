"""Fixed-size cohorts under PLD: the tight dominating pair of sampling without replacement.

The sampler draws K of N users uniformly without replacement; each user's
contribution is clipped to norm C and the sum gets N(0, (sigma C)^2) noise.
Under replace-one the accountant composes `PoissonSampled(K/N,
Gaussian(sigma/2))` by add/remove PLD (Balle, Barthe & Gaboardi 2018,
Thm. 10; Zhu, Dong & Wang 2022). These tests check that claim against the
mechanism itself: on small populations the exact output density of every
dataset is a mixture over the C(N, K) cohorts, and the hockey-stick
divergence of every replace-one pair is integrated numerically.
"""

import itertools
import math

import dp_accounting
import numpy as np
import pytest

from fedjax_priv.privacy import accounting
from fedjax_priv.simulation.participation import FixedSize
from fedjax_priv.privacy.aggregation import gaussian_sum_privacy

GRID = np.linspace(-14.0, 14.0, 56_001)


def _density(values, cohort_size, std):
  """Output density on GRID of sum(cohort) + N(0, std^2), cohort uniform without replacement."""
  sums = np.array([sum(c) for c in itertools.combinations(values, cohort_size)])
  z = (GRID[None, :] - sums[:, None]) / std
  return np.mean(np.exp(-0.5 * z * z), axis=0) / (std * math.sqrt(2 * math.pi))


def _hockey_stick(p, q, epsilon):
  return float(np.trapezoid(np.maximum(p - math.exp(epsilon) * q, 0.0), GRID))


def _worst_delta(num_clients, cohort_size, std, epsilon, levels):
  """max over replace-one pairs with contributions in `levels` (|value| <= C = 1)."""
  worst = 0.0
  for values in itertools.product(levels, repeat=num_clients - 1):
    for x, x_new in itertools.product(levels, repeat=2):
      if x == x_new:
        continue
      p = _density((x,) + values, cohort_size, std)
      q = _density((x_new,) + values, cohort_size, std)
      worst = max(worst, _hockey_stick(p, q, epsilon))
  return worst


@pytest.mark.parametrize("num_clients,cohort_size,sigma,epsilon", [(4, 2, 1.0, 1.0),
                                                                    (3, 1, 0.7, 0.5)])
def test_pld_delta_bounds_every_pair_and_is_attained(num_clients, cohort_size, sigma, epsilon):
  # Sensitivity: one contribution in [-1, 1] replaced by another moves the sum by <= 2 = 2C.
  event = dp_accounting.SampledWithoutReplacementDpEvent(
      num_clients, cohort_size, dp_accounting.GaussianDpEvent(sigma / 2))
  claimed = accounting.compute_delta(event, epsilon, "pld")
  exact = _worst_delta(num_clients, cohort_size, sigma, epsilon, levels=(-1.0, 0.0, 1.0))
  # Equal to the integration's accuracy: an upper bound for every pair, and attained
  # (by the pair with every other user at the replacing value).
  assert exact == pytest.approx(claimed, rel=1e-6)


def test_pld_epsilon_equals_dp_accountings_poisson_pair_and_beats_rdp():
  # The ledger's event for K = 20 of N = 100, sigma = 1 (replace-one multiplier 1/2), 200 rounds.
  fixed = dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(100, 20, dp_accounting.GaussianDpEvent(0.5)),
      200)
  pair = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(0.5)), 200)
  reference = dp_accounting.pld.PLDAccountant(
      dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3)
  reference.compose(pair)
  pld = accounting.compute_epsilon(fixed, 1e-5, "pld")
  assert pld == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
  rdp = accounting.compute_epsilon(fixed, 1e-5, "rdp")
  assert pld < rdp / 3  # 88.2 vs 346
  # Replacing moves the sum twice as far as adding: still above Poisson add/remove at sigma.
  poisson = accounting.compute_epsilon(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0)), 200),
      1e-5, "pld")
  assert poisson < pld


def test_fixed_size_participation_is_accounted_with_the_tight_pair_under_pld():
  participation = FixedSize(100, 20)
  privacy = gaussian_sum_privacy(1.0, "dp_mean")
  event = participation.round_event(privacy, 0, "pld")
  assert isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent)
  pld = accounting.compute_epsilon(dp_accounting.SelfComposedDpEvent(event, 50), 1e-5, "pld")
  direct = accounting.compute_epsilon(dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(0.5)), 50),
      1e-5, "pld")
  assert pld == pytest.approx(direct, rel=1e-9)


def test_pld_refuses_a_fixed_size_laplace_naming_rdp():
  event = dp_accounting.SampledWithoutReplacementDpEvent(10, 2, dp_accounting.LaplaceDpEvent(1.0))
  with pytest.raises(ValueError, match="SampledWithoutReplacementDpEvent"):
    accounting.compute_epsilon(event, 1e-5, "pld")
