"""Tests for fedjax_priv.data.digits."""

import numpy as np
import pytest

from fedjax_priv.data import FederatedDataset, federated_digits, load_digits


@pytest.fixture(scope="module")
def split():
  return load_digits()


def _sorted_rows(x):
  flat = x.reshape(len(x), -1)
  return flat[np.lexsort(flat.T[::-1])]


def test_default_split_shapes_and_dtypes(split):
  assert split.x_train.shape == (1437, 8, 8, 1)
  assert split.y_train.shape == (1437,)
  assert split.x_test.shape == (360, 8, 8, 1)
  assert split.y_test.shape == (360,)
  assert split.x_train.dtype == split.x_test.dtype == np.float32
  assert split.y_train.dtype == split.y_test.dtype == np.int32


def test_pixels_scaled_to_unit_interval(split):
  for x in (split.x_train, split.x_test):
    assert x.min() == 0.0
    assert x.max() == 1.0
  # Pixel / 16 of integer pixels: every value is a multiple of 1/16.
  np.testing.assert_array_equal(split.x_train * 16, np.round(split.x_train * 16))


def test_split_is_stratified(split):
  train_counts = np.bincount(split.y_train, minlength=10)
  test_counts = np.bincount(split.y_test, minlength=10)
  assert len(train_counts) == len(test_counts) == 10
  total = train_counts + test_counts
  np.testing.assert_array_less(np.abs(test_counts - 0.2 * total), 1.0 + 1e-9)


def test_split_is_deterministic_and_seeded(split):
  again = load_digits()
  for a, b in zip(split, again):
    np.testing.assert_array_equal(a, b)
  other = load_digits(seed=1)
  assert not np.array_equal(split.y_test, other.y_test)
  # Different splits of the same data: the union is the same.
  np.testing.assert_array_equal(
      _sorted_rows(np.concatenate([split.x_train, split.x_test])),
      _sorted_rows(np.concatenate([other.x_train, other.x_test])),
  )


def test_test_fraction():
  small = load_digits(test_fraction=0.1)
  assert len(small.y_test) == 180
  assert len(small.y_train) == 1617


@pytest.mark.parametrize("test_fraction", [0.0, 1.0, -0.1])
def test_test_fraction_validation(test_fraction):
  with pytest.raises(ValueError, match="test_fraction must be in"):
    load_digits(test_fraction=test_fraction)


def test_seed_validation():
  with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
    load_digits(seed=-1)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_federated_digits_partitions_the_training_set(split, partition):
  train, x_test, y_test = federated_digits(10, partition=partition)
  assert isinstance(train, FederatedDataset)
  assert train.num_clients == 10
  assert train.feature_shape == (8, 8, 1)
  assert train.num_examples == 1437
  sizes = train.client_sizes
  assert sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(x_test, split.x_test)
  np.testing.assert_array_equal(y_test, split.y_test)
  np.testing.assert_array_equal(_sorted_rows(train.x), _sorted_rows(split.x_train))
  np.testing.assert_array_equal(np.sort(train.y), np.sort(split.y_train))


def test_federated_digits_is_deterministic():
  a, _, _ = federated_digits(5, alpha=0.2, seed=3)
  b, _, _ = federated_digits(5, alpha=0.2, seed=3)
  np.testing.assert_array_equal(a.x, b.x)
  np.testing.assert_array_equal(a.offsets, b.offsets)


def test_federated_digits_unknown_partition():
  with pytest.raises(ValueError, match=r"one of \('dirichlet', 'iid'\), got 'pathological'"):
    federated_digits(10, partition="pathological")
