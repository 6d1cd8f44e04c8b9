"""Truncated (static-capacity) Poisson sampling: the δ paid for a rare overflow.

The engine needs static shapes, so a Poisson cohort (or batch) larger than
its compiled capacity is truncated; `overflow_delta` charges the difference
to δ. This holds for any mechanism and accountant, but (1 + e^ε) makes it
useless at large ε. For a Gaussian mechanism on a sum, the PLD accountant
accounts the truncated sampler exactly instead, with no δ term
(`dp_accounting.TruncatedSubsampledGaussianDpEvent`, arXiv:2508.15089;
chosen by `simulation.participation.Poisson.truncation_event`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from dp_accounting import dp_event

from fedjax_priv.checks import check_int, check_probability
from fedjax_priv.privacy.accountant import DEFAULT_PLD_DISCRETIZATION, compute_epsilon



def overflow_term(epsilon: float, total_overflow_probability: float) -> float:
  """(1 + e^ε)·P[some round overflows], capped at 1 (δ ≥ 1 is vacuous)."""
  if total_overflow_probability == 0:
    return 0.0
  # Beyond this, (1 + e^ε)·p >= 1 for any p >= 1e-300 and exp would overflow.
  if epsilon > 700:
    return 1.0
  return min(1.0, (1 + math.exp(epsilon)) * total_overflow_probability)


def overflow_delta(
    epsilon: float, rounds: int, overflow_probability_per_round: float
) -> float:
  """Extra δ paid for truncating Poisson cohorts (or batches) to a capacity.

  The engine needs static shapes, so a Poisson-sampled cohort larger than the
  compiled capacity is truncated. Let M be the ideal (untruncated) mechanism,
  (ε, δ)-DP, and M' the truncated one. Run both on the same randomness: they
  differ only on the event F that some round overflows, and by a union bound
  P[F] <= rounds·p =: β, where p bounds the per-round overflow probability
  on *both* datasets of a neighbouring pair (under add/remove, compute it for
  the larger population, num_clients + 1). For every output set S:

    P[M'(D) ∈ S] <= P[M(D) ∈ S] + β <= e^ε P[M(D') ∈ S] + δ + β
                 <= e^ε (P[M'(D') ∈ S] + β) + δ + β,

  so M' is (ε, δ + (1 + e^ε)·β)-DP. This function returns (1 + e^ε)·β.

  Args:
    epsilon: ε of the ideal mechanism, >= 0 (``math.inf`` allowed).
    rounds: number of rounds (or steps), >= 0.
    overflow_probability_per_round: p in [0, 1], an upper bound on
      P[cohort size > capacity] in one round.

  Returns:
    (1 + e^ε)·rounds·p, capped at 1.

  Raises:
    ValueError: an argument is out of range, naming it and its value.
  """
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (
      epsilon >= 0
  ):
    raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}.")
  rounds = check_int("rounds", rounds, 0)
  p = check_probability(
      "overflow_probability_per_round",
      overflow_probability_per_round,
      allow_zero=True,
  )
  return overflow_term(float(epsilon), rounds * p)


def epsilon_with_overflow(
    event: dp_event.DpEvent,
    delta: float,
    rounds: int,
    overflow_probability_per_round: float,
    accountant: str = "rdp",
    *,
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
) -> tuple[float, float]:
  """(ε, δ_total) of `event` run with truncated Poisson sampling.

  ε is `compute_epsilon(event, delta)` of the ideal mechanism and
  δ_total = delta + overflow_delta(ε, rounds, overflow_probability_per_round).

  Args:
    event: DpEvent of the ideal (untruncated) mechanism.
    delta: δ at which ε is computed, in (0, 1).
    rounds: rounds (or steps) whose cohort could overflow, >= 0.
    overflow_probability_per_round: per-round overflow probability bound.
    accountant, orders, value_discretization_interval: as `compute_epsilon`.

  Returns:
    (ε, δ_total): the truncated mechanism is (ε, δ_total)-DP.
  """
  epsilon = compute_epsilon(
      event,
      delta,
      accountant,
      orders=orders,
      value_discretization_interval=value_discretization_interval,
  )
  extra = overflow_delta(epsilon, rounds, overflow_probability_per_round)
  return epsilon, min(1.0, delta + extra)

