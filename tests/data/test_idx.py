"""Tests for fedjax_priv.data.idx: the IDX format, gz or raw, and image loading."""

import gzip

import numpy as np
import pytest

from fedjax_priv.data import load_idx_images, read_idx, write_idx


def test_reads_a_hand_written_big_endian_file(tmp_path):
  # Magic 00 00 0B (int16) 02 (two dims), sizes 2 and 1, then 258 and -2 big-endian.
  data = bytes([0, 0, 0x0B, 2]) + (2).to_bytes(4, "big") + (1).to_bytes(4, "big")
  data += (258).to_bytes(2, "big") + (-2).to_bytes(2, "big", signed=True)
  (tmp_path / "f").write_bytes(data)
  array = read_idx(tmp_path / "f")
  assert array.dtype == np.int16 and array.dtype.isnative
  np.testing.assert_array_equal(array, [[258], [-2]])


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_write_then_read_round_trips(tmp_path, dtype, name):
  array = (np.arange(24).reshape(2, 3, 4) * 3 - 20).astype(dtype)
  if dtype == "uint8":
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  path = write_idx(tmp_path / name, array)
  assert (path.read_bytes()[:2] == b"\x1f\x8b") == name.endswith(".gz")
  out = read_idx(path)
  assert out.dtype == array.dtype and out.shape == array.shape
  np.testing.assert_array_equal(out, array)


def test_gzip_is_detected_by_content_not_name(tmp_path):
  array = np.arange(5, dtype=np.uint8)
  raw = write_idx(tmp_path / "raw", array).read_bytes()
  (tmp_path / "disguised").write_bytes(gzip.compress(raw))
  np.testing.assert_array_equal(read_idx(tmp_path / "disguised"), array)


@pytest.mark.parametrize("data, match", [
    (b"\x01\x00\x08\x01" + (1).to_bytes(4, "big") + b"\x00", "not an IDX file"),
    (b"\x00\x00\x07\x01" + (1).to_bytes(4, "big") + b"\x00", "type code 0x07"),
    (b"\x00\x00\x08\x02" + (1).to_bytes(4, "big"), "truncated header"),
    (b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"\x00\x00", "does not match shape"),
])
def test_malformed_files_are_rejected(tmp_path, data, match):
  (tmp_path / "bad").write_bytes(data)
  with pytest.raises(ValueError, match=match):
    read_idx(tmp_path / "bad")


def test_load_images_scales_and_transposes(tmp_path):
  images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
  labels = np.array([7, 1], np.uint8)
  write_idx(tmp_path / "x.gz", images)
  write_idx(tmp_path / "y", labels)
  x, y = load_idx_images(tmp_path / "x.gz", tmp_path / "y")
  assert x.shape == (2, 3, 4, 1) and x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(y, [7, 1])
  xt, _ = load_idx_images(tmp_path / "x.gz", tmp_path / "y", transpose=True)
  np.testing.assert_array_equal(xt[1, :, :, 0], x[1, :, :, 0].T)


def test_load_images_checks_layout(tmp_path):
  write_idx(tmp_path / "x", np.zeros((2, 3, 4), np.uint8))
  write_idx(tmp_path / "y", np.zeros(3, np.uint8))
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    load_idx_images(tmp_path / "x", tmp_path / "y")
  write_idx(tmp_path / "flat", np.zeros((2, 12), np.uint8))
  with pytest.raises(ValueError, match=r"uint8 \[n, h, w\]"):
    load_idx_images(tmp_path / "flat", tmp_path / "y")
