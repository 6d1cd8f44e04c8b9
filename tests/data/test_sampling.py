"""Tests for fedjax_priv.data.sampling."""

import numpy as np
import pytest
import scipy.stats

from fedjax_priv.data import sampling

from fedjax_priv.data import (
    FixedSizeSampler,
    PoissonSampler,
    poisson_batch_buckets,
    poisson_capacity,
    poisson_overflow_probability,
)


def _assert_well_formed(cohort, capacity, num_clients):
  assert cohort.indices.shape == (capacity,)
  assert cohort.indices.dtype == np.int32
  assert cohort.mask.shape == (capacity,)
  assert cohort.mask.dtype == np.float32
  n = int(cohort.mask.sum())
  # Real clients first, then padding.
  np.testing.assert_array_equal(cohort.mask, np.arange(capacity) < n)
  real = cohort.indices[:n]
  assert np.all((real >= 0) & (real < num_clients))
  assert len(np.unique(real)) == n, "clients are sampled without replacement"
  np.testing.assert_array_equal(cohort.indices[n:], -1)


def _same(a, b):
  return (
      np.array_equal(a.indices, b.indices)
      and np.array_equal(a.mask, b.mask)
      and a.overflow == b.overflow
  )


# --- FixedSizeSampler ---------------------------------------------------------


def test_fixed_attributes():
  s = FixedSizeSampler(num_clients=50, cohort_size=10, seed=0)
  assert s.name == "fixed"
  assert s.capacity == 10
  assert s.expected_cohort_size == 10.0
  assert isinstance(s.expected_cohort_size, float)
  assert s.sampling_rate == 0.2


def test_fixed_draws_exactly_cohort_size_distinct_clients():
  s = FixedSizeSampler(num_clients=30, cohort_size=7, seed=1)
  for r in range(50):
    cohort = s.sample(r)
    _assert_well_formed(cohort, 7, 30)
    assert cohort.mask.sum() == 7
    assert cohort.overflow == 0


def test_fixed_is_deterministic_per_seed_and_round():
  a = FixedSizeSampler(100, 10, seed=5)
  b = FixedSizeSampler(100, 10, seed=5)
  # Any call order gives the same cohort for a round: a resumed run agrees.
  assert _same(a.sample(7), b.sample(7))
  b.sample(3)
  assert _same(a.sample(7), b.sample(7))
  assert not _same(a.sample(7), a.sample(8))
  assert not _same(a.sample(7), FixedSizeSampler(100, 10, seed=6).sample(7))


def test_fixed_is_uniform_over_clients():
  num_clients, cohort_size, rounds = 20, 5, 2000
  s = FixedSizeSampler(num_clients, cohort_size, seed=0)
  counts = np.bincount(
      np.concatenate([s.sample(r).indices for r in range(rounds)]), minlength=num_clients
  )
  q = cohort_size / num_clients
  sd = np.sqrt(rounds * q * (1 - q))
  assert np.all(np.abs(counts - rounds * q) < 5 * sd)


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 0, 0), "cohort_size must be >= 1, got 0"),
        ((10, 11, 0), r"cohort_size must be <= num_clients \(10\), got 11"),
        ((0, 1, 0), "num_clients must be >= 1, got 0"),
        ((10, 2, -1), "seed must be >= 0, got -1"),
        ((10, 2.5, 0), "cohort_size must be an integer, got 2.5"),
    ],
)
def test_fixed_validation(args, match):
  with pytest.raises(ValueError, match=match):
    FixedSizeSampler(*args)


def test_round_index_validation():
  with pytest.raises(ValueError, match="round_index must be >= 0, got -1"):
    FixedSizeSampler(10, 2, 0).sample(-1)
  with pytest.raises(ValueError, match="round_index must be >= 0, got -1"):
    PoissonSampler(10, 0.5, 0).sample(-1)


# --- PoissonSampler -----------------------------------------------------------


def test_poisson_attributes():
  s = PoissonSampler(num_clients=1000, sampling_rate=0.01, seed=0)
  assert s.name == "poisson"
  assert s.expected_cohort_size == pytest.approx(10.0)
  assert s.capacity == poisson_capacity(1000, 0.01, 1e-12)
  assert s.overflow_probability_per_round == pytest.approx(
      scipy.stats.binom.sf(s.capacity, 1000, 0.01), rel=1e-12
  )
  assert 0 < s.overflow_probability_per_round <= 1e-12


def test_poisson_inclusion_rate_and_cohort_size_distribution():
  num_clients, q, rounds = 100, 0.1, 2000
  s = PoissonSampler(num_clients, q, seed=0)
  cohorts = [s.sample(r) for r in range(rounds)]
  for cohort in cohorts[:50]:
    _assert_well_formed(cohort, s.capacity, num_clients)
  assert all(c.overflow == 0 for c in cohorts)

  counts = np.zeros(num_clients)
  for c in cohorts:
    counts[c.indices[c.mask == 1]] += 1
  total_sd = np.sqrt(rounds * num_clients * q * (1 - q))
  assert abs(counts.sum() - rounds * num_clients * q) < 3 * total_sd
  per_client_sd = np.sqrt(rounds * q * (1 - q))
  assert np.all(np.abs(counts - rounds * q) < 5 * per_client_sd)

  # Independent inclusion: the cohort size is Binomial(N, q), not fixed.
  sizes = np.array([c.mask.sum() for c in cohorts])
  assert sizes.var() == pytest.approx(num_clients * q * (1 - q), rel=0.15)


def test_poisson_is_deterministic_per_seed_and_round():
  a = PoissonSampler(200, 0.05, seed=11)
  b = PoissonSampler(200, 0.05, seed=11)
  assert _same(a.sample(4), b.sample(4))
  b.sample(0)
  assert _same(a.sample(4), b.sample(4))
  assert not _same(a.sample(4), a.sample(5))
  assert not _same(a.sample(4), PoissonSampler(200, 0.05, seed=12).sample(4))


def test_poisson_pads_unused_slots():
  s = PoissonSampler(50, 0.1, seed=0, capacity=40)
  cohort = s.sample(0)
  _assert_well_formed(cohort, 40, 50)
  assert cohort.mask.sum() < 40


def test_poisson_overflow_truncates_to_capacity():
  num_clients, q, capacity = 100, 0.5, 3
  tiny = PoissonSampler(num_clients, q, seed=2, capacity=capacity)
  full = PoissonSampler(num_clients, q, seed=2, capacity=num_clients)
  assert full.overflow_probability_per_round == 0.0
  kept = np.zeros(num_clients)
  for r in range(300):
    cohort = tiny.sample(r)
    _assert_well_formed(cohort, capacity, num_clients)
    assert cohort.mask.sum() == capacity
    # Both samplers draw the same number of clients for a (seed, round);
    # the truncated one keeps `capacity` of them and reports the rest.
    sampled = int(full.sample(r).mask.sum())
    assert cohort.overflow == sampled - capacity
    kept[cohort.indices] += 1
  # The kept subset is uniform over clients: each is kept 300 * 3 / 100 = 9
  # times on average.
  assert kept.sum() == 900
  assert kept.max() < 25


def test_poisson_rate_one_takes_everyone():
  s = PoissonSampler(12, 1.0, seed=0)
  # One slot more than the population: the add/remove neighbour has 13 clients.
  assert s.capacity == 13
  assert s.overflow_probability_per_round == 0.0
  cohort = s.sample(0)
  real = cohort.indices[cohort.mask > 0]
  np.testing.assert_array_equal(np.sort(real), np.arange(12))
  assert cohort.mask.sum() == 12 and cohort.indices[cohort.mask == 0].tolist() == [-1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampling_rate=0.0), r"sampling_rate must be in \(0, 1\], got 0.0"),
        (dict(sampling_rate=1.5), r"sampling_rate must be in \(0, 1\], got 1.5"),
        (dict(capacity=0), "capacity must be >= 1, got 0"),
        (dict(capacity=12), r"capacity must be <= num_clients \+ 1 \(11\), got 12"),
        (dict(overflow_probability=1.0), r"overflow_probability must be in \[0, 1\)"),
        (dict(seed=-3), "seed must be >= 0, got -3"),
    ],
)
def test_poisson_validation(kwargs, match):
  args = dict(num_clients=10, sampling_rate=0.5, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    PoissonSampler(**args)


# --- capacity helpers ---------------------------------------------------------


@pytest.mark.parametrize(
    "num_clients, q, p",
    [
        (100, 0.1, 1e-12),
        (1000, 0.01, 1e-6),
        (3383, 0.003, 1e-12),
        (50, 0.5, 0.1),
        (10**6, 1e-3, 1e-12),
    ],
)
def test_poisson_capacity_is_the_smallest_safe_capacity(num_clients, q, p):
  c = poisson_capacity(num_clients, q, p)
  assert 0 < c < num_clients
  assert scipy.stats.binom.sf(c, num_clients, q) <= p
  assert scipy.stats.binom.sf(c - 1, num_clients, q) > p


def test_poisson_capacity_edge_cases():
  assert poisson_capacity(10, 0.5, 0.0) == 10
  assert poisson_capacity(10, 1.0, 1e-12) == 10
  assert poisson_capacity(1000, 0.1, 0.5) == 100  # The median of Binomial(1000, 0.1).


def test_poisson_overflow_probability():
  assert poisson_overflow_probability(10, 0.5, 10) == 0.0
  assert poisson_overflow_probability(10, 0.5, 9) == pytest.approx(0.5**10)
  assert poisson_overflow_probability(10, 0.5, 0) == pytest.approx(1 - 0.5**10)
  with pytest.raises(ValueError, match="capacity must be >= 0, got -1"):
    poisson_overflow_probability(10, 0.5, -1)


def test_poisson_batch_buckets_are_binomial_quantiles_below_capacity():
  n, q, capacity = 4000, 1 / 16, 365
  buckets = poisson_batch_buckets(n, q, capacity)
  assert buckets == (254, 266, 279, 293)  # As the docstring says.
  for p, size in zip((0.6, 0.85, 0.97, 0.997), buckets):
    assert scipy.stats.binom.cdf(size, n, q) >= p > scipy.stats.binom.cdf(size - 1, n, q)
  assert poisson_batch_buckets(n, q, 260) == (254,)  # Sizes at or above the capacity drop out.
  with pytest.raises(ValueError, match="quantiles"):
    poisson_batch_buckets(n, q, capacity, (0.9, 0.5))


def test_cyclic_sampler_is_a_fixed_partition_taken_in_turn():
  sampler = sampling.CyclicSampler(num_clients=14, cohort_size=3, seed=5)
  b = 14 // 3
  cohorts = [sampler.sample(r).indices for r in range(3 * b)]
  first = np.concatenate(cohorts[:b])
  assert len(set(first.tolist())) == b * 3  # The groups are disjoint.
  for r in range(b, 3 * b):
    np.testing.assert_array_equal(cohorts[r], cohorts[r - b])  # Every client every b rounds.
  # Deterministic per (seed, round); another seed, another partition.
  np.testing.assert_array_equal(sampling.CyclicSampler(14, 3, 5).sample(7).indices, cohorts[7])
  assert not np.array_equal(sampling.CyclicSampler(14, 3, 6).sample(0).indices, cohorts[0])
  assert all(np.all(sampler.sample(r).mask == 1) for r in range(b))
  with pytest.raises(ValueError, match="cohort_size"):
    sampling.CyclicSampler(3, 4, 0)
