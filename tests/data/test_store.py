"""Tests for fedjax_priv.data.store: round trips, lookups, errors, 100k clients."""

import os
import sqlite3
import time

import numpy as np
import pytest

from fedjax_priv.data import FederatedDataset, FederatedStore, StoreWriter, write_store


def _dataset():
  rng = np.random.default_rng(0)
  sizes = [3, 0, 5, 1]
  x = rng.normal(size=(sum(sizes), 2, 3)).astype(np.float32)
  y = rng.integers(0, 7, sum(sizes))
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return FederatedDataset(x=x, y=y, offsets=offsets, client_ids=("b", "empty", "a", "c"))


@pytest.mark.parametrize("compression", ["none", "zlib"])
def test_round_trip_keeps_ids_order_and_values(tmp_path, compression):
  dataset = _dataset()
  path = write_store(tmp_path / "s.sqlite", dataset, name="toy", source="here", license="MIT",
                     compression=compression, extra={"seed": 3})
  with FederatedStore(path) as store:
    assert store.num_clients == 4 and len(store) == 4
    assert store.client_ids() == ["b", "empty", "a", "c"]
    np.testing.assert_array_equal(store.client_sizes(), [3, 0, 5, 1])
    info = store.info
    assert (info.name, info.split, info.source, info.license) == ("toy", "train", "here", "MIT")
    assert info.x_shape == (2, 3) and info.x_dtype == np.float32 and info.y_dtype == np.int32
    assert info.compression == compression and info.extra == {"seed": 3}
    loaded = store.to_federated()
  np.testing.assert_array_equal(loaded.x, dataset.x)
  np.testing.assert_array_equal(loaded.y, dataset.y)
  np.testing.assert_array_equal(loaded.offsets, dataset.offsets)
  assert loaded.client_ids == dataset.client_ids


def test_lookup_by_id_and_position_and_iteration(tmp_path):
  dataset = _dataset()
  path = write_store(tmp_path / "s.sqlite", dataset, name="toy")
  with FederatedStore(path) as store:
    x, y = store.get("a")
    np.testing.assert_array_equal(x, dataset.client(2)[0])
    np.testing.assert_array_equal(y, dataset.client(2)[1])
    cid, x, y = store.client(3)
    assert cid == "c" and x.shape == (1, 2, 3)
    assert store.get("empty")[0].shape == (0, 2, 3)
    assert "a" in store and "zz" not in store
    assert [cid for cid, _, _ in store] == list(dataset.client_ids)
    with pytest.raises(KeyError, match="zz"):
      store.get("zz")
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
      store.client(4)


def test_store_is_read_only(tmp_path):
  path = write_store(tmp_path / "s.sqlite", _dataset(), name="toy")
  with FederatedStore(path) as store:
    with pytest.raises(sqlite3.OperationalError):
      store._db.execute("DELETE FROM clients")


def test_duplicate_id_fails_naming_it_and_leaves_nothing(tmp_path):
  path = tmp_path / "s.sqlite"
  with pytest.raises(ValueError, match="'a' is repeated"):
    with StoreWriter(path, name="toy") as writer:
      writer.add("a", np.zeros((1, 2)), [0])
      writer.add("b", np.zeros((1, 2)), [0])
      writer.add("a", np.zeros((1, 2)), [0])
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((2, 3), np.float32), [0, 1], r"shape \[n, \*\(2,\)\]"),
    (np.zeros((2, 2), np.float32), [0], r"y must have shape \(2,\)"),
    (np.zeros((1, 2), np.float32), [0.5], "integers"),
    (np.zeros((1, 2), np.float32), [2**40], "fit in int32"),
    (np.zeros((1, 2), np.float64), [0], "cannot be stored safely"),
])
def test_bad_client_is_rejected_naming_the_client(tmp_path, x, y, match):
  with StoreWriter(tmp_path / "s.sqlite", name="toy") as writer:
    writer.add("first", np.zeros((1, 2), np.float32), [0])
    with pytest.raises(ValueError, match=match) as error:
      writer.add("bad", x, y)
    assert "'bad'" in str(error.value)


def test_exception_inside_writer_leaves_no_file(tmp_path):
  with pytest.raises(RuntimeError):
    with StoreWriter(tmp_path / "s.sqlite", name="toy") as writer:
      writer.add("a", np.zeros((1, 2)), [0])
      raise RuntimeError
  assert os.listdir(tmp_path) == []


def test_existing_path_needs_overwrite(tmp_path):
  path = write_store(tmp_path / "s.sqlite", _dataset(), name="toy")
  with pytest.raises(ValueError, match="exists"):
    StoreWriter(path, name="toy")
  write_store(path, _dataset().subset([0]), name="toy", overwrite=True)
  with FederatedStore(path) as store:
    assert store.client_ids() == ["b"]


def test_empty_store_needs_its_layout(tmp_path):
  with pytest.raises(ValueError, match="x_dtype and x_shape"):
    with StoreWriter(tmp_path / "s.sqlite", name="toy"):
      pass
  with StoreWriter(tmp_path / "t.sqlite", name="toy", x_dtype="uint8", x_shape=(4,)):
    pass
  with FederatedStore(tmp_path / "t.sqlite") as store:
    assert store.num_clients == 0 and store.to_federated().feature_shape == (4,)


def test_opening_something_else_fails_clearly(tmp_path):
  with pytest.raises(FileNotFoundError, match="no store"):
    FederatedStore(tmp_path / "missing.sqlite")
  (tmp_path / "junk").write_bytes(b"not a database at all" * 100)
  with pytest.raises(ValueError, match="not a federated store"):
    FederatedStore(tmp_path / "junk")


def test_100k_tiny_clients_stream_in_and_out(tmp_path):
  """One example of 4 uint8 per client; measures the per-row overhead."""
  n = 100_000
  path = tmp_path / "big.sqlite"
  start = time.perf_counter()
  with StoreWriter(path, name="tiny", x_dtype="uint8", x_shape=(4,)) as writer:
    for i in range(n):
      writer.add(f"u{i:06d}", np.full((1, 4), i % 256, np.uint8), np.array([i % 10]))
  write_s = time.perf_counter() - start
  payload = n * (4 + 4)  # x and y blobs.
  id_bytes = n * 7
  overhead = (path.stat().st_size - payload - 2 * id_bytes) / n
  print(f"100k clients written in {write_s:.2f} s; {path.stat().st_size / n:.1f} bytes/row, "
        f"overhead {overhead:.1f} bytes/row beyond payload and 2x the id")
  assert overhead < 60
  with FederatedStore(path) as store:
    assert store.num_clients == n
    x, y = store.get("u054321")
    np.testing.assert_array_equal(x, np.full((1, 4), 54321 % 256))
    np.testing.assert_array_equal(y, [1])
    assert store.client(99_999)[0] == "u099999"
    total = sum(len(y) for _, _, y in store)
  assert total == n
