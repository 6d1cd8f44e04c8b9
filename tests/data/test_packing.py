"""Tests for fedjax_priv.data.packing."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_priv.data import FederatedDataset, bucket_size, pack_cohort, pad_population


def _dataset(sizes, features=(2, 3), dtype=np.float64):
  total = sum(sizes)
  x = (np.arange(total * int(np.prod(features))) + 1).astype(dtype)
  x = x.reshape(total, *features)
  y = np.arange(total) % 7 + 1  # Non-zero, so label padding is detectable.
  parts = np.split(np.arange(total), np.cumsum(sizes)[:-1])
  return FederatedDataset.from_partition(x, y, parts)


def _assert_packed_correctly(packed, dataset, indices, mask):
  m = packed.x.shape[1]
  for k, (i, real) in enumerate(zip(indices, mask)):
    if real:
      xi, yi = dataset.client(int(i))
      n = len(yi)
      assert packed.num_examples[k] == n
      assert packed.client_mask[k] == 1.0
      np.testing.assert_array_equal(packed.x[k, :n], xi.astype(np.float32))
      np.testing.assert_array_equal(packed.y[k, :n], yi)
    else:
      n = 0
      assert packed.num_examples[k] == 0
      assert packed.client_mask[k] == 0.0
    assert n <= m
    assert not packed.x[k, n:].any(), "padding rows must be zero"
    assert not packed.y[k, n:].any(), "padding labels must be zero"


@pytest.mark.parametrize(
    "n, want", [(0, 8), (1, 8), (7, 8), (8, 8), (9, 16), (16, 16), (17, 32), (1000, 1024)]
)
def test_bucket_size_default_ladder(n, want):
  assert bucket_size(n) == want


def test_bucket_size_custom_buckets():
  assert bucket_size(5, buckets=[50, 10, 20]) == 10
  assert bucket_size(10, buckets=[50, 10, 20]) == 10
  assert bucket_size(11, buckets=[50, 10, 20]) == 20
  with pytest.raises(ValueError, match="n=51 exceeds the largest bucket 50"):
    bucket_size(51, buckets=[10, 50])
  with pytest.raises(ValueError, match="buckets must be non-empty positive"):
    bucket_size(1, buckets=[0, 8])
  with pytest.raises(ValueError, match="buckets must be non-empty positive"):
    bucket_size(1, buckets=[])


def test_bucket_size_validation():
  with pytest.raises(ValueError, match="n must be >= 0, got -1"):
    bucket_size(-1)
  with pytest.raises(ValueError, match="n must be an integer, got 2.5"):
    bucket_size(2.5)


def test_pack_cohort_round_trip_with_padded_slots():
  ds = _dataset([3, 0, 10, 5])
  indices = np.array([2, -1, 0, 1, -1], dtype=np.int32)
  mask = np.array([1, 0, 1, 1, 0], dtype=np.float32)
  packed = pack_cohort(ds, indices, mask)
  assert packed.x.shape == (5, 16, 2, 3)  # Largest real client 10 -> bucket 16.
  assert packed.x.dtype == np.float32
  assert packed.y.shape == (5, 16)
  assert packed.y.dtype == np.int32
  assert packed.num_examples.dtype == np.int32
  assert packed.client_mask.dtype == np.float32
  np.testing.assert_array_equal(packed.num_examples, [10, 0, 3, 0, 0])
  np.testing.assert_array_equal(packed.client_mask, [1, 0, 1, 1, 0])
  _assert_packed_correctly(packed, ds, indices, mask)


def test_pack_cohort_ignores_indices_of_padded_slots():
  ds = _dataset([3, 4])
  a = pack_cohort(ds, np.array([1, -1]), np.array([1, 0]))
  b = pack_cohort(ds, np.array([1, 0]), np.array([1, 0]))
  for fa, fb in zip(a, b):
    np.testing.assert_array_equal(fa, fb)


def test_pack_cohort_explicit_max_examples_and_bool_mask():
  ds = _dataset([3, 4])
  packed = pack_cohort(ds, np.array([0, 1]), np.array([True, True]), max_examples=4)
  assert packed.x.shape == (2, 4, 2, 3)
  _assert_packed_correctly(packed, ds, [0, 1], [1, 1])


def test_pack_cohort_keeps_integer_features():
  ds = _dataset([2, 3], features=(5,), dtype=np.int32)
  packed = pack_cohort(ds, np.array([1, 0]), np.array([1, 1]))
  assert packed.x.dtype == np.int32
  _assert_packed_correctly(packed, ds, [1, 0], [1, 1])


def test_pack_cohort_rejects_client_larger_than_max_examples():
  ds = _dataset([3, 9])
  with pytest.raises(
      ValueError, match=r"client 'client_0001' has 9 examples, more than max_examples=8"
  ):
    pack_cohort(ds, np.array([0, 1]), np.array([1, 1]), max_examples=8)


def test_pack_cohort_too_large_padded_slot_is_ignored():
  ds = _dataset([3, 9])
  packed = pack_cohort(ds, np.array([0, 1]), np.array([1, 0]), max_examples=8)
  np.testing.assert_array_equal(packed.num_examples, [3, 0])


def test_pack_cohort_all_padding():
  ds = _dataset([3])
  packed = pack_cohort(ds, np.array([-1, -1]), np.zeros(2))
  assert packed.x.shape == (2, 8, 2, 3)
  assert not packed.x.any() and not packed.client_mask.any()


@pytest.mark.parametrize(
    "indices, mask, kwargs, match",
    [
        (
            [0, 5],
            [1, 1],
            {},
            r"client_indices of real clients must be in \[0, 2\), got range \[0, 5\]",
        ),
        ([0, -1], [1, 1], {}, r"must be in \[0, 2\), got range \[-1, 0\]"),
        ([0, 1], [1, 0.5], {}, r"client_mask must hold only 0 and 1"),
        ([0, 1], [1], {}, r"client_mask must have the shape of client_indices \(2,\)"),
        ([[0, 1]], [[1, 1]], {}, r"client_indices must be 1-D \[K\]"),
        ([0.0, 1.0], [1, 1], {}, r"client_indices must be integers"),
        ([0, 1], [1, 1], dict(max_examples=0), r"max_examples must be an integer >= 1, got 0"),
    ],
)
def test_pack_cohort_validation(indices, mask, kwargs, match):
  ds = _dataset([3, 4])
  with pytest.raises(ValueError, match=match):
    pack_cohort(ds, np.array(indices), np.array(mask), **kwargs)


@given(
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=6),
    data=st.data(),
)
@settings(max_examples=40, deadline=None, database=None)
def test_pack_cohort_round_trip_property(sizes, data):
  ds = _dataset(sizes, features=(3,))
  num_slots = data.draw(st.integers(0, 8))
  mask = np.array(
      data.draw(st.lists(st.booleans(), min_size=num_slots, max_size=num_slots)),
      dtype=bool,
  )
  indices = np.array(
      data.draw(st.lists(st.integers(0, len(sizes) - 1), min_size=num_slots, max_size=num_slots)),
      dtype=np.int64,
  ).reshape(num_slots)
  indices = np.where(mask, indices, -1)
  packed = pack_cohort(ds, indices, mask)
  real_sizes = ds.client_sizes[indices[mask]]
  assert packed.x.shape[1] == bucket_size(int(real_sizes.max(initial=0)))
  _assert_packed_correctly(packed, ds, indices, mask)
  assert packed.num_examples.sum() == real_sizes.sum()


def test_pad_population():
  ds = _dataset([3, 0, 12, 5])
  packed = pad_population(ds)
  assert packed.x.shape == (4, 16, 2, 3)
  np.testing.assert_array_equal(packed.client_mask, np.ones(4))
  np.testing.assert_array_equal(packed.num_examples, ds.client_sizes)
  _assert_packed_correctly(packed, ds, range(4), [1] * 4)
  assert pad_population(ds, max_examples=12).x.shape == (4, 12, 2, 3)
  with pytest.raises(ValueError, match="'client_0002' has 12 examples"):
    pad_population(ds, max_examples=11)
