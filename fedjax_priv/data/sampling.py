"""Cohort samplers with fixed-capacity, masked output.

Each round's cohort is drawn from ``np.random.default_rng([seed, round_index])``,
so it depends on nothing but the seed and the round: a run resumed from a
checkpoint draws exactly the cohorts it would have drawn without stopping.

Samplers return a ``Cohort`` of static length ``capacity`` (real clients
first, then slots with index -1 and mask 0), so the device code compiles once.

``FixedSizeSampler`` draws exactly ``cohort_size`` clients uniformly without
replacement. ``PoissonSampler`` includes each client independently with
probability ``q``, which is the sampling scheme that privacy amplification by
Poisson subsampling analyses. Its realised cohort size is random, so it is
truncated to ``capacity`` slots: when more than ``capacity`` clients are drawn
(the *overflow* event), a uniformly random ``capacity`` of them are kept.

Truncation breaks the pure Poisson analysis only on the overflow event. Couple
the truncated mechanism ``M'`` with the untruncated ``M`` so that they agree
unless some round overflows; over ``T`` rounds that happens with probability at
most ``T * p``, where ``p`` bounds the per-round overflow probability. If ``M``
is ``(eps, delta)``-DP then for every event ``S`` and neighbours ``D, D'``::

    P[M'(D) in S] <= P[M(D) in S] + T p
                  <= e^eps P[M(D') in S] + delta + T p
                  <= e^eps P[M'(D') in S] + delta + (1 + e^eps) T p,

so ``M'`` is ``(eps, delta + (1 + e^eps) * T * p)``-DP; the accountant adds
this term to delta. Under add/remove adjacency the neighbour may have one more
client, so ``p`` should be evaluated at ``num_clients + 1`` with
``poisson_overflow_probability``. The default ``capacity`` makes ``p`` at most
1e-12 (the sampler's ``overflow_probability_per_round`` reports the exact value
at ``num_clients``), which is negligible next to any useful delta.

This module is host-side and depends on numpy and scipy.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np
import scipy.stats

from fedjax_priv.checks import check_int


class Cohort(NamedTuple):
  """One round's cohort, padded to the sampler's capacity.

  Attributes:
    indices: ``[capacity]`` int32 client indices; -1 in padded slots.
    mask: ``[capacity]`` float32, 1.0 for a real client, 0.0 for padding.
    overflow: Clients sampled beyond capacity and dropped this round (always
      0 for the fixed-size sampler).
  """

  indices: np.ndarray
  mask: np.ndarray
  overflow: int


def _check_sampling_rate(sampling_rate) -> float:
  if (
      not isinstance(sampling_rate, numbers.Real)
      or isinstance(sampling_rate, bool)
      or not 0 < sampling_rate <= 1
  ):
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
  return float(sampling_rate)


def _padded_cohort(chosen: np.ndarray, capacity: int, overflow: int) -> Cohort:
  """Puts ``chosen`` client indices first in a ``[capacity]`` cohort."""
  indices = np.full(capacity, -1, dtype=np.int32)
  indices[: len(chosen)] = chosen
  mask = np.zeros(capacity, dtype=np.float32)
  mask[: len(chosen)] = 1.0
  return Cohort(indices=indices, mask=mask, overflow=overflow)


def _round_rng(seed: int, round_index) -> np.random.Generator:
  round_index = check_int("round_index", round_index, 0)
  return np.random.default_rng([seed, round_index])


def poisson_overflow_probability(num_clients: int, sampling_rate: float, capacity: int) -> float:
  """Probability that a Poisson cohort exceeds ``capacity`` clients.

  Args:
    num_clients: Population size ``N >= 1``.
    sampling_rate: Inclusion probability ``q`` in ``(0, 1]``.
    capacity: Cohort slots ``c >= 0``.

  Returns:
    ``P[Binomial(N, q) > c]``, exactly 0.0 when ``c >= N``.

  Raises:
    ValueError: If an argument is out of range.
  """
  num_clients = check_int("num_clients", num_clients, 1)
  sampling_rate = _check_sampling_rate(sampling_rate)
  capacity = check_int("capacity", capacity, 0)
  if capacity >= num_clients:
    return 0.0
  return float(scipy.stats.binom.sf(capacity, num_clients, sampling_rate))


def poisson_capacity(num_clients: int, sampling_rate: float, overflow_probability: float) -> int:
  """Smallest cohort capacity whose per-round overflow probability is small enough.

  Args:
    num_clients: Population size ``N >= 1``.
    sampling_rate: Inclusion probability ``q`` in ``(0, 1]``.
    overflow_probability: Tolerated ``P[overflow]`` per round, in ``[0, 1)``.

  Returns:
    The smallest ``c`` in ``[0, N]`` with ``P[Binomial(N, q) > c] <=
    overflow_probability``; ``N`` always qualifies since it cannot overflow.

  Raises:
    ValueError: If an argument is out of range.
  """
  num_clients = check_int("num_clients", num_clients, 1)
  sampling_rate = _check_sampling_rate(sampling_rate)
  if (
      not isinstance(overflow_probability, numbers.Real)
      or isinstance(overflow_probability, bool)
      or not 0 <= overflow_probability < 1
  ):
    raise ValueError(f"overflow_probability must be in [0, 1), got {overflow_probability!r}")
  # The survival function is non-increasing in c, so bisect on it. Using sf
  # directly (not 1 - cdf) keeps tail probabilities like 1e-12 accurate.
  low, high = 0, num_clients
  while low < high:
    mid = (low + high) // 2
    tail = poisson_overflow_probability(num_clients, sampling_rate, mid)
    if tail <= overflow_probability:
      high = mid
    else:
      low = mid + 1
  return low


def poisson_batch_buckets(num_examples: int, sampling_rate: float, capacity: int,
                          quantiles: tuple[float, ...] = (0.6, 0.85, 0.97, 0.997)
                          ) -> tuple[int, ...]:
  """Batch sizes below ``capacity`` at quantiles of a Poisson batch's size.

  For `ExampleDP.batch_buckets`: a DP-SGD step then runs at the smallest of
  these sizes that holds its realised batch, Binomial(n, q), instead of at the
  capacity. With n = 4000, q = 1/16 and capacity 365 the defaults give
  (254, 266, 279, 293) and an expected step size of about 261 slots.

  Args:
    num_examples: the client's dataset size ``n >= 1``.
    sampling_rate: per-example inclusion probability ``q`` in ``(0, 1]``.
    capacity: the static batch capacity; sizes ``>= capacity`` are dropped.
    quantiles: increasing probabilities in ``(0, 1)``.

  Returns:
    Strictly increasing sizes, each below ``capacity`` (possibly none).
  """
  num_examples = check_int("num_examples", num_examples, 1)
  sampling_rate = _check_sampling_rate(sampling_rate)
  capacity = check_int("capacity", capacity, 1)
  if not quantiles or any(not 0 < p < 1 for p in quantiles) or list(quantiles) != sorted(quantiles):
    raise ValueError(f"quantiles must be increasing values in (0, 1), got {quantiles!r}")
  sizes = {max(1, int(scipy.stats.binom.ppf(p, num_examples, sampling_rate))) for p in quantiles}
  return tuple(sorted(size for size in sizes if size < capacity))


class _ExactCohortSampler:
  """Fields of the samplers that take exactly ``cohort_size`` of ``num_clients`` clients per round."""

  def __init__(self, num_clients: int, cohort_size: int, seed: int):
    """Initialises the sampler.

    Args:
      num_clients: Population size ``N >= 1``.
      cohort_size: Clients per round, ``1 <= cohort_size <= N``.
      seed: Non-negative integer seed.

    Raises:
      ValueError: If an argument is out of range.
    """
    self.num_clients = check_int("num_clients", num_clients, 1)
    self.cohort_size = check_int("cohort_size", cohort_size, 1)
    if self.cohort_size > self.num_clients:
      raise ValueError(
          f"cohort_size must be <= num_clients ({self.num_clients}), got {self.cohort_size}"
      )
    self.seed = check_int("seed", seed, 0)
    self.capacity = self.cohort_size
    self.expected_cohort_size = float(self.cohort_size)
    self.sampling_rate = self.cohort_size / self.num_clients

  def __repr__(self) -> str:
    return (f"{type(self).__name__}(num_clients={self.num_clients}, "
            f"cohort_size={self.cohort_size}, seed={self.seed})")


class FixedSizeSampler(_ExactCohortSampler):
  """Draws exactly ``cohort_size`` clients per round, uniformly without replacement.

  Attributes:
    name: ``"fixed"``.
    num_clients: Population size ``N``.
    cohort_size: Clients per round.
    capacity: Cohort slots, equal to ``cohort_size``.
    expected_cohort_size: ``float(cohort_size)``.
    sampling_rate: ``cohort_size / num_clients``.
    seed: Base seed; round ``r`` uses ``default_rng([seed, r])``.
  """

  name = "fixed"

  def sample(self, round_index: int) -> Cohort:
    """Draws the cohort of one round.

    Args:
      round_index: Non-negative round number.

    Returns:
      A ``Cohort`` of ``cohort_size`` distinct clients in random order, all
      with mask 1 and ``overflow == 0``.

    Raises:
      ValueError: If ``round_index`` is negative or not an integer.
    """
    rng = _round_rng(self.seed, round_index)
    chosen = rng.choice(self.num_clients, size=self.cohort_size, replace=False)
    return _padded_cohort(chosen, self.capacity, overflow=0)


class PoissonSampler:
  """Includes each client independently with probability ``sampling_rate``.

  The cohort is truncated to ``capacity`` slots; see the module docstring for
  why that costs only ``(1 + e^eps) * T * overflow_probability_per_round`` of
  delta.

  Attributes:
    name: ``"poisson"``.
    num_clients: Population size ``N``.
    sampling_rate: Inclusion probability ``q``.
    expected_cohort_size: ``q * N``; the public denominator in DP mode.
    capacity: Cohort slots.
    overflow_probability_per_round: Exact ``P[Binomial(N, q) > capacity]``
      (0.0 if ``capacity >= N``).
    seed: Base seed; round ``r`` uses ``default_rng([seed, r])``.
  """

  name = "poisson"

  def __init__(
      self,
      num_clients: int,
      sampling_rate: float,
      seed: int,
      capacity: int | None = None,
      overflow_probability: float = 1e-12,
  ):
    """Initialises the sampler.

    Args:
      num_clients: Population size ``N >= 1``.
      sampling_rate: Inclusion probability ``q`` in ``(0, 1]``.
      seed: Non-negative integer seed.
      capacity: Cohort slots in ``[1, N + 1]``. Defaults to
        ``poisson_capacity(N + 1, q, overflow_probability)`` (at least 1):
        sized for the add/remove neighbour with one more client, so the
        overflow term the accountant charges stays negligible even when
        ``q`` is close to 1.
      overflow_probability: Target per-round overflow probability used for
        the default capacity, in ``[0, 1)``.

    Raises:
      ValueError: If an argument is out of range.
    """
    self.num_clients = check_int("num_clients", num_clients, 1)
    self.sampling_rate = _check_sampling_rate(sampling_rate)
    self.seed = check_int("seed", seed, 0)
    if capacity is None:
      # A zero-slot cohort would compile a degenerate round; one slot
      # only lowers the overflow probability further.
      capacity = max(
          1,
          poisson_capacity(self.num_clients + 1, self.sampling_rate, overflow_probability),
      )
    else:
      capacity = check_int("capacity", capacity, 1)
      if capacity > self.num_clients + 1:
        raise ValueError(
            f"capacity must be <= num_clients + 1 ({self.num_clients + 1}), got {capacity}")
    self.capacity = capacity
    self.expected_cohort_size = self.sampling_rate * self.num_clients
    self.overflow_probability_per_round = poisson_overflow_probability(
        self.num_clients, self.sampling_rate, self.capacity
    )

  def __repr__(self) -> str:
    return (
        f"PoissonSampler(num_clients={self.num_clients}, "
        f"sampling_rate={self.sampling_rate}, seed={self.seed}, "
        f"capacity={self.capacity})"
    )

  def sample(self, round_index: int) -> Cohort:
    """Draws the cohort of one round.

    Instead of one coin per client, the cohort size is drawn as
    ``Binomial(N, q)`` and that many distinct clients uniformly at random:
    the same distribution (a Poisson sample is uniform given its size), at a
    cost proportional to the cohort instead of the population. On overflow
    a uniform ``capacity``-subset of a uniform sample is again uniform, so
    only ``capacity`` clients are drawn and the rest counted as dropped.

    Args:
      round_index: Non-negative round number.

    Returns:
      A ``Cohort``: the sampled clients (at most ``capacity``) first, in
      random order, then padding; ``overflow`` = sampled - kept.

    Raises:
      ValueError: If ``round_index`` is negative or not an integer.
    """
    rng = _round_rng(self.seed, round_index)
    num_sampled = int(rng.binomial(self.num_clients, self.sampling_rate))
    num_kept = min(num_sampled, self.capacity)
    chosen = rng.choice(self.num_clients, size=num_kept, replace=False)
    return _padded_cohort(chosen, self.capacity, overflow=num_sampled - num_kept)


class ShuffledEpochSampler(_ExactCohortSampler):
  """Epoch e is a permutation of the clients (seeded by (seed, e)) cut into cohorts of K.

  An epoch has N // K rounds; the N mod K clients left over sit the epoch out.
  Deterministic per (seed, round), so a resumed run draws the same cohorts.
  """
  name = "shuffled_epochs"

  def __init__(self, num_clients: int, cohort_size: int, seed: int):
    super().__init__(num_clients, cohort_size, seed)
    self.rounds_per_epoch = self.num_clients // self.cohort_size

  def sample(self, round_index: int) -> Cohort:
    epoch, position = divmod(check_int("round_index", round_index, 0), self.rounds_per_epoch)
    order = _round_rng(self.seed, epoch).permutation(self.num_clients)
    chosen = order[position * self.cohort_size:(position + 1) * self.cohort_size]
    return _padded_cohort(chosen, self.capacity, overflow=0)


class CyclicSampler(_ExactCohortSampler):
  """A fixed seeded partition of the clients into N // K groups of K; round r uses group r mod (N // K).

  Each client is in one group, so it takes part exactly every N // K rounds
  (the N mod K clients left over never take part): the (k, b)-participation
  of matrix-factorization mechanisms with b = N // K (Choquette-Choo et al.
  2023, "Multi-Epoch Matrix Factorization Mechanisms"). The partition is
  drawn once from ``default_rng([seed])`` and the cohort depends on nothing
  but (seed, round), so a resumed run draws the same cohorts.
  """
  name = "cyclic"

  def __init__(self, num_clients: int, cohort_size: int, seed: int):
    super().__init__(num_clients, cohort_size, seed)
    self.num_groups = self.num_clients // self.cohort_size
    order = np.random.default_rng([self.seed]).permutation(self.num_clients)
    self._groups = order[:self.num_groups * self.cohort_size].reshape(self.num_groups, -1)

  def sample(self, round_index: int) -> Cohort:
    group = check_int("round_index", round_index, 0) % self.num_groups
    return _padded_cohort(self._groups[group], self.capacity, overflow=0)
