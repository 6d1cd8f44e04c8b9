"""Tests for fedjax_priv.data.partition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_priv.data import dirichlet_label_partition, iid_partition, partition_by_key


def _assert_exact_cover(parts, num_examples):
  for part in parts:
    assert part.dtype == np.int64
    assert np.all(np.diff(part) > 0), "each part must be sorted and duplicate-free"
  everything = np.concatenate(parts)
  assert len(everything) == num_examples, "parts must be disjoint and complete"
  np.testing.assert_array_equal(np.sort(everything), np.arange(num_examples))


def _assert_balanced(parts, num_examples, num_clients):
  sizes = np.array([len(p) for p in parts])
  assert len(parts) == num_clients
  assert sizes.max() - sizes.min() <= 1
  assert sizes.sum() == num_examples


def _mean_label_entropy(parts, labels):
  entropies = []
  for part in parts:
    p = np.bincount(labels[part], minlength=labels.max() + 1) / len(part)
    p = p[p > 0]
    entropies.append(-(p * np.log(p)).sum())
  return float(np.mean(entropies))


@given(n=st.integers(1, 300), k=st.integers(1, 40), seed=st.integers(0, 2**32))
@settings(max_examples=50, deadline=None, database=None)
def test_iid_partition_is_balanced_exact_cover(n, k, seed):
  k = min(k, n)
  parts = iid_partition(n, k, np.random.default_rng(seed))
  _assert_exact_cover(parts, n)
  _assert_balanced(parts, n, k)


def test_iid_partition_is_shuffled_and_deterministic():
  a = iid_partition(100, 4, np.random.default_rng(0))
  b = iid_partition(100, 4, np.random.default_rng(0))
  c = iid_partition(100, 4, np.random.default_rng(1))
  for pa, pb in zip(a, b):
    np.testing.assert_array_equal(pa, pb)
  assert any(not np.array_equal(pa, pc) for pa, pc in zip(a, c))
  # A contiguous split would give client 0 exactly the examples 0..24.
  assert not np.array_equal(a[0], np.arange(25))


@pytest.mark.parametrize(
    "n, k, match",
    [
        (10, 0, "num_clients must be >= 1, got 0"),
        (10, 11, r"num_clients must be <= the number of examples \(10\), got 11"),
        (0, 1, "num_examples must be >= 1, got 0"),
        (10, 2.0, "num_clients must be an integer, got 2.0"),
    ],
)
def test_iid_partition_validation(n, k, match):
  with pytest.raises(ValueError, match=match):
    iid_partition(n, k, np.random.default_rng(0))


@given(
    n=st.integers(1, 300),
    k=st.integers(1, 30),
    num_labels=st.integers(1, 6),
    alpha=st.sampled_from([1e-6, 0.05, 1.0, 1e3]),
    seed=st.integers(0, 2**32),
)
@settings(max_examples=60, deadline=None, database=None)
def test_dirichlet_partition_is_balanced_exact_cover(n, k, num_labels, alpha, seed):
  k = min(k, n)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_labels, size=n)
  parts = dirichlet_label_partition(labels, k, alpha, rng)
  _assert_exact_cover(parts, n)
  _assert_balanced(parts, n, k)


def test_dirichlet_smaller_alpha_gives_more_label_skew():
  labels = np.random.default_rng(0).integers(0, 10, size=2000)
  entropy = {
      alpha: _mean_label_entropy(
          dirichlet_label_partition(labels, 20, alpha, np.random.default_rng(1)),
          labels,
      )
      for alpha in (0.1, 1.0, 100.0)
  }
  assert entropy[0.1] < entropy[1.0] < entropy[100.0]
  # At alpha=100 clients look almost IID: close to the global entropy log(10)
  # (100-example clients bias the empirical entropy down by about 0.05).
  assert entropy[100.0] > 0.9 * np.log(10)
  assert entropy[0.1] < 0.5 * np.log(10)


def test_dirichlet_prior_is_the_global_label_frequency():
  # 90% of the examples have label 0. With a uniform prior the first client
  # would get about half label 0; with the global prior it gets about 90%.
  labels = np.array([0] * 900 + [1] * 100)
  parts = dirichlet_label_partition(labels, 10, 1000.0, np.random.default_rng(0))
  first_client_share = np.mean(labels[parts[0]] == 0)
  assert abs(first_client_share - 0.9) < 0.1


def test_dirichlet_handles_exhausted_labels():
  # Label 1 is scarce; whichever clients want it exhaust it early and must
  # be refilled from the labels that remain.
  labels = np.array([0] * 95 + [1] * 5)
  parts = dirichlet_label_partition(labels, 10, 0.01, np.random.default_rng(3))
  _assert_exact_cover(parts, 100)
  _assert_balanced(parts, 100, 10)


def test_dirichlet_accepts_non_contiguous_labels():
  labels = np.repeat(np.array([-3, 7, 42]), 10)
  parts = dirichlet_label_partition(labels, 3, 0.5, np.random.default_rng(0))
  _assert_exact_cover(parts, 30)


def test_dirichlet_is_deterministic():
  labels = np.random.default_rng(0).integers(0, 5, size=200)
  a = dirichlet_label_partition(labels, 7, 0.3, np.random.default_rng(9))
  b = dirichlet_label_partition(labels, 7, 0.3, np.random.default_rng(9))
  for pa, pb in zip(a, b):
    np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize(
    "labels, k, alpha, match",
    [
        (np.zeros(10, int), 2, 0.0, "alpha must be a finite number > 0, got 0.0"),
        (np.zeros(10, int), 2, -1.0, "alpha must be a finite number > 0, got -1.0"),
        (np.zeros(10, int), 2, float("inf"), "alpha must be a finite number > 0"),
        (np.zeros(10, int), 2, float("nan"), "alpha must be a finite number > 0"),
        (np.zeros(10, int), 0, 1.0, "num_clients must be >= 1, got 0"),
        (np.zeros(10, int), 11, 1.0, r"num_clients must be <= the number of examples"),
        (np.zeros((2, 5), int), 2, 1.0, r"labels must be 1-D and non-empty"),
        (np.zeros(0, int), 1, 1.0, r"labels must be 1-D and non-empty"),
    ],
)
def test_dirichlet_validation(labels, k, alpha, match):
  with pytest.raises(ValueError, match=match):
    dirichlet_label_partition(labels, k, alpha, np.random.default_rng(0))


def test_partition_by_key_groups_by_sorted_key():
  keys = np.array(["bob", "alice", "bob", "carol", "alice", "bob"])
  parts, unique_keys = partition_by_key(keys)
  np.testing.assert_array_equal(unique_keys, ["alice", "bob", "carol"])
  expected = [[1, 4], [0, 2, 5], [3]]
  assert len(parts) == 3
  for part, want in zip(parts, expected):
    assert part.dtype == np.int64
    np.testing.assert_array_equal(part, want)


@given(keys=st.lists(st.integers(-5, 5), min_size=1, max_size=60))
@settings(max_examples=40, deadline=None, database=None)
def test_partition_by_key_is_exact_cover_with_one_key_per_part(keys):
  keys = np.array(keys)
  parts, unique_keys = partition_by_key(keys)
  _assert_exact_cover(parts, len(keys))
  assert np.all(np.diff(unique_keys) > 0)
  for part, key in zip(parts, unique_keys):
    assert np.all(keys[part] == key)


def test_partition_by_key_validation():
  with pytest.raises(ValueError, match=r"keys must be 1-D and non-empty, got shape \(2, 2\)"):
    partition_by_key(np.zeros((2, 2)))
  with pytest.raises(ValueError, match=r"keys must be 1-D and non-empty, got shape \(0,\)"):
    partition_by_key(np.array([]))
