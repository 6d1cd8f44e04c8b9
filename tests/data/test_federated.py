"""Tests for fedjax_priv.data.federated."""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_priv.data import FederatedDataset


def _pool(n=10, features=(3,)):
  x = np.arange(n * int(np.prod(features)), dtype=np.float32).reshape(n, *features)
  y = np.arange(n) % 3
  return x, y


PARTS = [
    np.array([4, 0]),
    np.array([1, 2, 3]),
    np.array([], dtype=np.int64),
    np.array([9, 5, 6, 7, 8]),
]


@pytest.fixture
def dataset():
  x, y = _pool()
  return FederatedDataset.from_partition(x, y, PARTS)


def test_from_partition_keeps_each_clients_examples_in_order(dataset):
  x, y = _pool()
  assert dataset.num_clients == 4
  assert dataset.num_examples == 10
  for i, part in enumerate(PARTS):
    xi, yi = dataset.client(i)
    np.testing.assert_array_equal(xi, x[part])
    np.testing.assert_array_equal(yi, y[part])


def test_properties(dataset):
  np.testing.assert_array_equal(dataset.client_sizes, [2, 3, 0, 5])
  assert dataset.client_sizes.dtype == np.int64
  np.testing.assert_array_equal(dataset.offsets, [0, 2, 5, 5, 10])
  assert dataset.offsets.dtype == np.int64
  assert dataset.y.dtype == np.int32
  assert dataset.feature_shape == (3,)
  assert dataset.max_client_size == 5
  assert dataset.client_ids == ("client_0000", "client_0001", "client_0002", "client_0003")


def test_custom_client_ids_and_multi_dim_features():
  x, y = _pool(n=4, features=(2, 2, 1))
  ds = FederatedDataset.from_partition(
      x, y, [np.array([0, 1]), np.array([2, 3])], client_ids=["alice", "bob"]
  )
  assert ds.client_ids == ("alice", "bob")
  assert ds.feature_shape == (2, 2, 1)
  np.testing.assert_array_equal(ds.client(1)[0], x[2:])


def test_client_returns_read_only_views(dataset):
  xi, yi = dataset.client(3)
  assert np.shares_memory(xi, dataset.x)
  with pytest.raises(ValueError, match="read-only"):
    xi[0] = 0.0
  with pytest.raises(ValueError, match="read-only"):
    dataset.y[0] = 1


def test_is_frozen(dataset):
  with pytest.raises(dataclasses.FrozenInstanceError):
    dataset.x = np.zeros(3)


def test_constructor_does_not_freeze_callers_arrays():
  x, y = _pool()
  FederatedDataset(x=x, y=y, offsets=np.array([0, 10]), client_ids=("a",))
  x[0, 0] = -1.0  # Must not raise.


def test_subset_reorders_clients_and_keeps_ids(dataset):
  sub = dataset.subset([3, 0, 2])
  assert sub.client_ids == ("client_0003", "client_0000", "client_0002")
  np.testing.assert_array_equal(sub.client_sizes, [5, 2, 0])
  for new, old in enumerate([3, 0, 2]):
    for a, b in zip(sub.client(new), dataset.client(old)):
      np.testing.assert_array_equal(a, b)


def test_subset_empty(dataset):
  sub = dataset.subset(np.array([], dtype=np.int64))
  assert sub.num_clients == 0
  assert sub.max_client_size == 0
  assert sub.x.shape == (0, 3)


@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=8),
    data=st.data(),
)
@settings(max_examples=40, deadline=None, database=None)
def test_partition_and_subset_round_trip(sizes, data):
  n = sum(sizes)
  x, y = _pool(n=n, features=(2,))
  perm = np.random.default_rng(data.draw(st.integers(0, 100))).permutation(n)
  parts = np.split(perm, np.cumsum(sizes)[:-1])
  ds = FederatedDataset.from_partition(x, y, parts)
  np.testing.assert_array_equal(ds.client_sizes, sizes)
  order = data.draw(st.permutations(range(len(sizes))))
  sub = ds.subset(order)
  for new, old in enumerate(order):
    np.testing.assert_array_equal(sub.client(new)[0], x[parts[old]])
    np.testing.assert_array_equal(sub.client(new)[1], y[parts[old]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(offsets=[1, 10]), r"offsets must start at 0, got offsets\[0\]=1"),
        (dict(offsets=[0, 9]), r"must end at the number of examples 10"),
        (
            dict(offsets=[0, 6, 4, 10], client_ids=("a", "b", "c")),
            r"non-decreasing, got offsets\[1\]=6 > offsets\[2\]=4",
        ),
        (dict(offsets=[0.0, 10.0]), r"offsets must be integers"),
        (dict(y=np.zeros(9, np.int32)), r"len\(y\) must equal len\(x\)"),
        (dict(y=np.zeros(10, np.float32)), r"y must hold integer labels"),
        (dict(client_ids=("a", "b")), r"one entry per client \(1\), got 2"),
        (dict(offsets=[0, 5, 10], client_ids=("a", "a")), r"unique, got 'a'"),
        (dict(client_ids=(7,)), r"client_ids must be strings, got 7"),
    ],
)
def test_constructor_validation(kwargs, match):
  x, y = _pool()
  fields = dict(x=x, y=y, offsets=np.array([0, 10]), client_ids=("a",))
  fields.update({k: np.asarray(v) if k == "offsets" else v for k, v in kwargs.items()})
  with pytest.raises(ValueError, match=match):
    FederatedDataset(**fields)


def test_client_index_validation(dataset):
  with pytest.raises(ValueError, match=r"i must be in \[0, 4\), got -1"):
    dataset.client(-1)
  with pytest.raises(ValueError, match=r"i must be in \[0, 4\), got 4"):
    dataset.client(4)
  with pytest.raises(ValueError, match="i must be an integer"):
    dataset.client(1.0)


def test_subset_validation(dataset):
  with pytest.raises(ValueError, match=r"client_indices must be in \[0, 4\)"):
    dataset.subset([0, 4])
  with pytest.raises(ValueError, match=r"client_indices must be in \[0, 4\)"):
    dataset.subset([-1])
  with pytest.raises(ValueError, match="distinct, got 1 repeated"):
    dataset.subset([1, 1])


def test_from_partition_validation():
  x, y = _pool()
  with pytest.raises(ValueError, match=r"parts\[1\] must index into \[0, 10\)"):
    FederatedDataset.from_partition(x, y, [np.array([0]), np.array([10])])
  with pytest.raises(ValueError, match=r"parts\[0\] must hold integer indices"):
    FederatedDataset.from_partition(x, y, [np.array([0.0])])
  with pytest.raises(ValueError, match="same leading length"):
    FederatedDataset.from_partition(x, y[:5], [np.array([0])])
