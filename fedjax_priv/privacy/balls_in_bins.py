"""Monte-Carlo privacy estimate of balls-in-bins participation with independent Gaussian noise.

Balls in bins (`simulation.participation.BallsInBins`): each user is put in
one of b bins uniformly at random, and bin j's users take part in rounds
j, j + b, j + 2b, ... Over one cycle of b rounds the Gaussian mechanism of
multiplier sigma on the users' clipped sum releases, for the pair of
datasets with and without one user (add/remove), outputs dominated by the pair

    P = (1/b) sum_t N(e_t, sigma^2 I_b),    Q = N(0, sigma^2 I_b)

(Chua, Ghazi, Harrison, Leeman, Kamath, Kumar, Manurangsi, Sinha & Zhang
2025, "Balls-and-Bins Sampling for DP-SGD", AISTATS; the "remove" order is
(P, Q) and the "add" order (Q, P)). Its privacy loss,
L(x) = logsumexp_t((x_t - 1/2) / sigma^2) - log b, has no closed-form
distribution, so delta(eps) = E[(1 - e^(eps - L))_+] is estimated by
sampling, composed over the cycles by summing independent losses.

The estimate is reported with a confidence interval (the relative entropy
Chernoff bound for a mean of [0, 1]-valued samples, per order and side,
union-bounded), never as a guarantee: the runner's ledger
charges balls in bins the proven bound without amplification (the
mechanism's event once per cycle), and `BallsInBins`' docstring says so.
Feldman & Shenfeld 2025 ("Privacy Amplification by Random Allocation")
prove an upper bound on the same quantity; it is not implemented here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import dp_accounting
import numpy as np
from scipy import special

from fedjax_priv.checks import check_int, check_positive
from fedjax_priv.privacy.accountant import compute_epsilon


class MonteCarloEpsilon(NamedTuple):
  """Balls-in-bins epsilon at one delta, estimated by Monte Carlo.

  Attributes:
    estimate: the smallest eps whose estimated delta(eps) <= delta.
    lower, upper: the smallest eps whose delta's lower (upper) confidence
      bound is <= delta: [lower, upper] holds the true epsilon with
      probability >= `confidence` over the sampling, not with certainty.
    confidence: of the interval, in (0, 1).
    num_samples: per order (remove and add).
    bound_used: the epsilon of what the runner charges, the Gaussian
      mechanism once per cycle without amplification (a proven bound),
      under the PLD accountant.
  """
  estimate: float
  lower: float
  upper: float
  confidence: float
  num_samples: int
  bound_used: float


def _losses(noise_multiplier: float, num_bins: int, cycles: int, num_samples: int,
            rng: np.random.Generator, from_p: bool) -> np.ndarray:
  """[num_samples] total privacy loss L summed over `cycles`, x drawn from P (or Q)."""
  total = np.zeros(num_samples)
  chunk = max(1, 2_000_000 // num_bins)
  s2 = noise_multiplier ** 2
  for start in range(0, num_samples, chunk):
    size = min(chunk, num_samples - start)
    for _ in range(cycles):
      x = noise_multiplier * rng.standard_normal((size, num_bins))
      if from_p:
        x[np.arange(size), rng.integers(num_bins, size=size)] += 1.0
      total[start:start + size] += special.logsumexp((x - 0.5) / s2, axis=1) - math.log(num_bins)
  return total


def _kl(a: float, b: float) -> float:
  """kl(a || b) between Bernoulli(a) and Bernoulli(b)."""
  out = 0.0
  if a > 0:
    out += a * math.log(a / b)
  if a < 1:
    out += (1 - a) * math.log((1 - a) / (1 - b))
  return out


def _confidence_bound(mean: float, num_samples: int, alpha: float, upper: bool) -> float:
  """The farthest mu on one side of mean with num_samples kl(mean || mu) <= log(1 / alpha).

  For the mean of n independent [0, 1]-valued samples with expectation mu,
  P[mean <= mu - t] <= exp(-n kl(mu - t || mu)) and likewise above
  (Hoeffding 1963, Thm. 1), so mu lies within this bound with probability
  >= 1 - alpha.
  """
  target = math.log(1 / alpha) / num_samples
  edge = 1.0 if upper else 0.0
  if _kl(mean, min(max(edge, 1e-300), 1 - 1e-15)) <= target:
    return edge
  inside, outside = mean, edge
  for _ in range(100):
    mid = (inside + outside) / 2
    if _kl(mean, mid) > target:
      outside = mid
    else:
      inside = mid
  return outside if upper else inside


def _delta_means(losses_p: np.ndarray, losses_q: np.ndarray, epsilon: float
                 ) -> tuple[float, float]:
  remove = float(np.mean(-np.expm1(np.minimum(epsilon - losses_p, 0.0))))
  add = float(np.mean(-np.expm1(np.minimum(epsilon + losses_q, 0.0))))
  return remove, add


def monte_carlo_epsilon(noise_multiplier: float, num_bins: int, cycles: int, delta: float,
                        num_samples: int = 200_000, seed: int = 0, confidence: float = 0.99
                        ) -> MonteCarloEpsilon:
  """Estimate the epsilon of `cycles` cycles of balls in bins with the Gaussian mechanism.

  Args:
    noise_multiplier: sigma > 0, noise std over the add/remove sensitivity
      of one round's sum (C).
    num_bins: b >= 1, rounds per cycle; b = 1 is full participation.
    cycles: E >= 1, cycles of b rounds (each user takes part once a cycle).
    delta: target delta in (0, 1).
    num_samples: losses drawn per order; the confidence interval narrows
      as 1 / sqrt(num_samples) (for delta near 1e-5, 10^6 or more are
      needed for an upper bound near the estimate).
    seed: numpy seed of the samples.
    confidence: of the upper bound, in (0, 1).

  Returns:
    `MonteCarloEpsilon`: the estimate, its upper confidence bound, and the
    bound the runner charges (E compositions of the Gaussian mechanism).

  Raises:
    ValueError: an argument out of range, named.
  """
  noise_multiplier = check_positive("noise_multiplier", noise_multiplier)
  num_bins = check_int("num_bins", num_bins, 1)
  cycles = check_int("cycles", cycles, 1)
  num_samples = check_int("num_samples", num_samples, 100)
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
  bound_used = compute_epsilon(dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(noise_multiplier), cycles), delta, "pld")
  rng = np.random.default_rng(seed)
  losses_p = _losses(noise_multiplier, num_bins, cycles, num_samples, rng, from_p=True)
  losses_q = _losses(noise_multiplier, num_bins, cycles, num_samples, rng, from_p=False)
  alpha = (1 - confidence) / 4  # Union bound over two orders and two sides.

  def estimated(epsilon):
    return max(_delta_means(losses_p, losses_q, epsilon))

  def bound(upper):
    return lambda epsilon: max(_confidence_bound(m, num_samples, alpha, upper)
                               for m in _delta_means(losses_p, losses_q, epsilon))

  def smallest_epsilon(delta_of):
    low, high = 0.0, max(1.0, 2 * bound_used)
    if delta_of(high) > delta:
      return math.inf
    for _ in range(60):
      mid = (low + high) / 2
      if delta_of(mid) > delta:
        low = mid
      else:
        high = mid
    return high

  return MonteCarloEpsilon(smallest_epsilon(estimated), smallest_epsilon(bound(False)),
                           smallest_epsilon(bound(True)), confidence, num_samples, bound_used)


__all__ = ["MonteCarloEpsilon", "monte_carlo_epsilon"]
