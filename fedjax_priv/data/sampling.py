"""Cohort samplers with fixed-capacity, masked output.

Each round's cohort is drawn from ``np.random.default_rng([seed, round_index])``,
so it depends on nothing but the seed and the round: a run resumed from a
checkpoint draws exactly the cohorts it would have drawn without stopping.

Samplers return a ``Cohort`` of static length ``capacity`` (real clients
first, then slots with index -1 and mask 0), so the device code compiles once.

``FixedSizeSampler`` draws exactly ``cohort_size`` clients uniformly without
replacement; ``ShuffledEpochSampler``, ``CyclicSampler``,
``CyclicPoissonSampler``, ``BallsInBinsSampler`` and ``MinSeparationSampler``
keep each client's participations apart (their docstrings say how). ``PoissonSampler`` includes each client independently with
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
  # Runs once per round on the host before every block (200 times for a
  # 200-round block): a full cohort skips the fill-then-copy. A copy still, so
  # no caller can write through to a sampler's own partition.
  if len(chosen) == capacity:
    return Cohort(np.array(chosen, np.int32), np.ones(capacity, np.float32), overflow)
  indices = np.full(capacity, -1, dtype=np.int32)
  indices[: len(chosen)] = chosen
  mask = np.zeros(capacity, dtype=np.float32)
  mask[: len(chosen)] = 1.0
  return Cohort(indices=indices, mask=mask, overflow=overflow)


def _round_rng(seed: int, round_index) -> np.random.Generator:
  round_index = check_int("round_index", round_index, 0)
  # The generator `default_rng([seed, round_index])` builds, without its
  # argument dispatch (12 -> 10 us, once per round on the host).
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, round_index])))


def _poisson_subset(rng: np.random.Generator, population: np.ndarray | int, sampling_rate: float,
                    capacity: int) -> tuple[np.ndarray, int]:
  """A Poisson sample of ``population`` truncated to a uniform ``capacity``-subset; (kept, dropped).

  The size is drawn as ``Binomial(n, q)`` and then that many distinct members
  uniformly: the same distribution as one coin per member (a Poisson sample
  is uniform given its size), at a cost proportional to the sample. A
  uniform ``capacity``-subset of a uniform sample is again uniform, so on
  overflow only ``capacity`` members are drawn.
  """
  size = population if isinstance(population, int) else len(population)
  num_sampled = int(rng.binomial(size, sampling_rate))
  num_kept = min(num_sampled, capacity)
  return rng.choice(population, size=num_kept, replace=False), num_sampled - num_kept


def _seeded_permutation(num_clients: int, seed: int) -> np.ndarray:
  # Drawn from (seed,) alone, apart from every (seed, round) stream.
  return np.random.default_rng([seed]).permutation(num_clients)


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

    The cohort size is drawn as ``Binomial(N, q)`` and that many distinct
    clients uniformly at random (`_poisson_subset`); on overflow a uniform
    ``capacity``-subset is kept and the rest counted as dropped.

    Args:
      round_index: Non-negative round number.

    Returns:
      A ``Cohort``: the sampled clients (at most ``capacity``) first, in
      random order, then padding; ``overflow`` = sampled - kept.

    Raises:
      ValueError: If ``round_index`` is negative or not an integer.
    """
    rng = _round_rng(self.seed, round_index)
    chosen, dropped = _poisson_subset(rng, self.num_clients, self.sampling_rate, self.capacity)
    return _padded_cohort(chosen, self.capacity, overflow=dropped)


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
    order = _seeded_permutation(self.num_clients, self.seed)
    self._groups = order[:self.num_groups * self.cohort_size].reshape(self.num_groups, -1)

  def sample(self, round_index: int) -> Cohort:
    group = check_int("round_index", round_index, 0) % self.num_groups
    return _padded_cohort(self._groups[group], self.capacity, overflow=0)


def _check_groups(name: str, value, num_clients: int) -> int:
  value = check_int(name, value, 1)
  if value > num_clients:
    raise ValueError(f"{name} ({value}) must be <= num_clients ({num_clients})")
  return value


class CyclicPoissonSampler:
  """Cyclic Poisson: a fixed seeded partition into b groups; round r Poisson-samples group r mod b.

  The N // b * b clients of a seeded permutation are cut into b equal groups
  (the N mod b left over never take part); in round r each client of group
  r mod b joins independently with probability ``sampling_rate``, truncated
  to ``capacity`` like `PoissonSampler`. Each client is eligible once every
  b rounds, so any two of its participations are at least b apart, and in
  its eligible rounds it is Poisson-sampled: the sampling of amplified
  BandMF (Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu
  2023, "(Amplified) Banded Matrix Factorization"). Deterministic per
  (seed, round).

  Attributes:
    name: ``"cyclic_poisson"``.
    num_groups: b.
    group_size: N // b.
    sampling_rate: q, per eligible round.
    expected_cohort_size: q * N // b.
    capacity: cohort slots; default: P[Binomial(N // b, q) > capacity] <= overflow_probability.
    overflow_probability_per_round: exact P[Binomial(N // b, q) > capacity].
  """
  name = "cyclic_poisson"

  def __init__(self, num_clients: int, num_groups: int, sampling_rate: float, seed: int,
               capacity: int | None = None, overflow_probability: float = 1e-12):
    self.num_clients = check_int("num_clients", num_clients, 1)
    self.num_groups = _check_groups("num_groups", num_groups, self.num_clients)
    self.sampling_rate = _check_sampling_rate(sampling_rate)
    self.seed = check_int("seed", seed, 0)
    self.group_size = self.num_clients // self.num_groups
    order = _seeded_permutation(self.num_clients, self.seed)
    self._groups = order[:self.num_groups * self.group_size].reshape(self.num_groups, -1)
    if capacity is None:
      capacity = max(1, poisson_capacity(self.group_size, self.sampling_rate,
                                         overflow_probability))
    self.capacity = check_int("capacity", capacity, 1)
    self.expected_cohort_size = self.sampling_rate * self.group_size
    self.overflow_probability_per_round = poisson_overflow_probability(
        self.group_size, self.sampling_rate, self.capacity)

  def __repr__(self) -> str:
    return (f"CyclicPoissonSampler(num_clients={self.num_clients}, num_groups={self.num_groups}, "
            f"sampling_rate={self.sampling_rate}, seed={self.seed}, capacity={self.capacity})")

  def sample(self, round_index: int) -> Cohort:
    rng = _round_rng(self.seed, round_index)
    group = self._groups[round_index % self.num_groups]
    chosen, dropped = _poisson_subset(rng, group, self.sampling_rate, self.capacity)
    return _padded_cohort(chosen, self.capacity, overflow=dropped)


class BallsInBinsSampler:
  """Balls in bins: each client gets one of b bins uniformly at random, once; round r uses bin r mod b.

  The bins are drawn from the seed alone, so every client takes part exactly
  every b rounds and cohort sizes vary (Binomial(N, 1 / b)); the capacity is
  the largest bin, so nothing is ever truncated. Chua, Ghazi, Harrison,
  Leeman, Kamath, Kumar, Manurangsi, Sinha & Zhang 2025, "Balls-and-Bins
  Sampling for DP-SGD" (AISTATS); Feldman & Shenfeld 2025, "Privacy
  Amplification by Random Allocation". Deterministic per (seed, round).

  Attributes:
    name: ``"balls_in_bins"``.
    num_bins: b.
    capacity: the largest bin's size.
    expected_cohort_size: N / b.
  """
  name = "balls_in_bins"
  overflow_probability_per_round = 0.0

  def __init__(self, num_clients: int, num_bins: int, seed: int):
    self.num_clients = check_int("num_clients", num_clients, 1)
    self.num_bins = _check_groups("num_bins", num_bins, self.num_clients)
    self.seed = check_int("seed", seed, 0)
    bins = np.random.default_rng([self.seed]).integers(self.num_bins, size=self.num_clients)
    self._members = [np.flatnonzero(bins == b) for b in range(self.num_bins)]
    self.capacity = max(1, max(len(m) for m in self._members))
    self.expected_cohort_size = self.num_clients / self.num_bins
    self.sampling_rate = 1 / self.num_bins

  def __repr__(self) -> str:
    return (f"BallsInBinsSampler(num_clients={self.num_clients}, num_bins={self.num_bins}, "
            f"seed={self.seed})")

  def sample(self, round_index: int) -> Cohort:
    members = self._members[check_int("round_index", round_index, 0) % self.num_bins]
    return _padded_cohort(members, self.capacity, overflow=0)


class MinSeparationSampler:
  """b-min-sep: each round Poisson-samples the clients that took no part in the last b - 1 rounds.

  A client sampled in round r is ineligible in rounds r + 1 ... r + b - 1,
  so any two of its participations are at least b apart; an eligible client
  joins with probability p. With ``warm_start`` the history before round 0
  is drawn from the process's steady state (each client sat in one of the
  b - 1 previous rounds with probability (b - 1) p / (1 + (b - 1) p)), so
  the expected cohort is N / (b - 1 + 1 / p) from round 0 on. The cohort is
  truncated to ``capacity`` slots; a truncated client still counts as
  sampled, so eligibility never depends on truncation (as jax_privacy's
  ``BMinSepSampling``, arXiv:2602.09338, does).

  Round r's coins come from ``default_rng([seed, r])`` and depend on the
  rounds before it, so `sample` replays rounds from the start when asked
  for an earlier round than the last (a resumed run replays once: O(r N)
  host work); consecutive rounds cost O(N) each.

  Attributes:
    name: ``"min_separation"``.
    min_separation: b.
    sampling_rate: p, per eligible round.
    expected_cohort_size: N / (b - 1 + 1 / p) (warm start).
    capacity: default: the 1 - 1e-9 quantile of Binomial(N, expected / N).
  """
  name = "min_separation"

  def __init__(self, num_clients: int, min_separation: int, sampling_rate: float, seed: int,
               capacity: int | None = None, warm_start: bool = True):
    self.num_clients = check_int("num_clients", num_clients, 1)
    self.min_separation = check_int("min_separation", min_separation, 1)
    self.sampling_rate = _check_sampling_rate(sampling_rate)
    self.seed = check_int("seed", seed, 0)
    self.warm_start = bool(warm_start)
    self.expected_cohort_size = self.num_clients / (self.min_separation - 1
                                                    + 1 / self.sampling_rate)
    if capacity is None:
      capacity = max(1, poisson_capacity(self.num_clients,
                                         self.expected_cohort_size / self.num_clients, 1e-9))
    self.capacity = check_int("capacity", capacity, 1)
    self._reset()

  def __repr__(self) -> str:
    return (f"MinSeparationSampler(num_clients={self.num_clients}, "
            f"min_separation={self.min_separation}, sampling_rate={self.sampling_rate}, "
            f"seed={self.seed}, capacity={self.capacity})")

  def _reset(self) -> None:
    b, p = self.min_separation, self.sampling_rate
    # last[i]: the last round client i was sampled in; eligible in r when last[i] <= r - b.
    self._last = np.full(self.num_clients, -b, dtype=np.int64)
    if self.warm_start and b > 1:
      rng = np.random.default_rng([self.seed])
      seated = rng.random(self.num_clients) < (b - 1) * p / (1 + (b - 1) * p)
      self._last[seated] = -rng.integers(1, b, size=int(seated.sum()))
    self._next_round = 0

  def sample(self, round_index: int) -> Cohort:
    round_index = check_int("round_index", round_index, 0)
    if round_index < self._next_round:
      self._reset()
    while True:
      r = self._next_round
      rng = _round_rng(self.seed, r)
      eligible = np.flatnonzero(self._last <= r - self.min_separation)
      sampled = eligible[rng.random(len(eligible)) < self.sampling_rate]
      self._last[sampled] = r
      self._next_round = r + 1
      if r == round_index:
        break
    dropped = max(0, len(sampled) - self.capacity)
    if dropped:
      sampled = rng.choice(sampled, size=self.capacity, replace=False)
    else:
      sampled = rng.permutation(sampled)
    return _padded_cohort(sampled, self.capacity, overflow=dropped)
