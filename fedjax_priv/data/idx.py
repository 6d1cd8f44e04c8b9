"""IDX files, the format of MNIST, EMNIST and Fashion-MNIST (gzip-compressed or raw).

An IDX file is a 4-byte magic number ``00 00 TT DD`` (``TT`` the element type
code, ``DD`` the number of dimensions), then ``DD`` big-endian uint32 sizes,
then the elements in C order, big-endian.

EMNIST stores each 28x28 image transposed relative to MNIST (its images were
written column-major), so ``load_idx_images(..., transpose=True)`` turns them
upright.

This module is host-side and depends on numpy and the standard library only.

References:
  LeCun, Cortes & Burges, "The MNIST database of handwritten digits" (format
  description on the dataset's page).
  Cohen, Afshar, Tapson & van Schaik, "EMNIST: an extension of MNIST to
  handwritten letters", IJCNN 2017.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np

# IDX type codes and the big-endian numpy dtypes they denote.
_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dtype.newbyteorder("="): code for code, dtype in _TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
  with open(path, "rb") as f:
    data = f.read()
  # Decide by content, not by name: distributions rename files both ways.
  return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file, gzip-compressed or not.

  Args:
    path: The file.

  Returns:
    The array in native byte order, with the file's dtype (uint8 for the
    image and label files of MNIST-like datasets) and shape.

  Raises:
    ValueError: If the magic number, type code or size is inconsistent; the
      message names the file.
  """
  path = Path(path)
  data = _read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'})")
  code, ndim = data[2], data[3]
  if code not in _TYPES:
    raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"{path}: truncated header ({len(data)} bytes for {ndim} dimensions)")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  dtype = _TYPES[code]
  expected = header + math.prod(shape) * dtype.itemsize  # Python ints: no overflow.
  if len(data) != expected:
    raise ValueError(
        f"{path}: size {len(data)} bytes does not match shape {shape} of {dtype.name} "
        f"({expected} bytes)"
    )
  array = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
  """Writes ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``.

  Args:
    path: Destination file.
    array: uint8, int8, int16, int32, float32 or float64 array, at least 1-D.

  Returns:
    ``path``.

  Raises:
    ValueError: If the dtype has no IDX type code or the array is 0-D.
  """
  path = Path(path)
  array = np.asarray(array)
  dtype = array.dtype.newbyteorder("=")
  if dtype not in _CODES:
    raise ValueError(f"array dtype {array.dtype} has no IDX type code")
  if array.ndim < 1 or array.ndim > 255:
    raise ValueError(f"array must have 1 to 255 dimensions, got shape {array.shape}")
  header = bytes([0, 0, _CODES[dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  data = header + np.ascontiguousarray(array, _TYPES[_CODES[dtype]]).tobytes()
  if path.suffix == ".gz":
    data = gzip.compress(data, mtime=0)
  path.write_bytes(data)
  return path


def load_idx_images(
    images: str | os.PathLike,
    labels: str | os.PathLike,
    transpose: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
  """Loads an image file and its label file (MNIST, Fashion-MNIST, EMNIST).

  Args:
    images: IDX file of uint8 images ``[n, h, w]``.
    labels: IDX file of uint8 labels ``[n]``.
    transpose: Swap each image's axes (EMNIST).

  Returns:
    ``(x, y)``: float32 images ``[n, h, w, 1]`` in ``[0, 1]`` (pixel / 255)
    and int32 labels ``[n]``.

  Raises:
    ValueError: If the files do not hold ``[n, h, w]`` uint8 images and
      ``[n]`` integer labels.
  """
  x = read_idx(images)
  y = read_idx(labels)
  if x.ndim != 3 or x.dtype != np.uint8:
    raise ValueError(f"{images}: images must be uint8 [n, h, w], got {x.dtype} {x.shape}")
  if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(
        f"{labels}: labels must be integers of shape ({len(x)},), got {y.dtype} {y.shape}"
    )
  if transpose:
    x = x.transpose(0, 2, 1)
  return (x / np.float32(255)).astype(np.float32)[..., np.newaxis], y.astype(np.int32)
