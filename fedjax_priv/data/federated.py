"""Ragged per-client datasets stored as one flat array plus offsets (CSR style).

A federated population is a list of clients of different sizes. Storing it as
one contiguous ``x``/``y`` pair and an ``offsets`` vector keeps every client a
zero-copy slice, makes subsetting a single gather, and lets the packing code
turn any cohort into padded device arrays with vectorised numpy indexing.

This module is host-side and depends on numpy only.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
from collections.abc import Sequence

import numpy as np


def _read_only(array: np.ndarray) -> np.ndarray:
  """Returns a read-only view of ``array``; the caller's array stays writable."""
  view = array.view()
  view.flags.writeable = False
  return view


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedDataset:
  """Examples of many clients, concatenated client after client.

  Client ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of ``x`` and ``y``.
  Clients may be empty. The arrays are stored as read-only views so that the
  frozen dataclass is immutable in its contents too. ``eq=False`` makes
  equality identity, because element-wise array comparison has no single
  truth value.

  Attributes:
    x: Features, shape ``[total, *feature_shape]``, any dtype.
    y: Integer labels, shape ``[total]``, stored as int32.
    offsets: Client boundaries, shape ``[num_clients + 1]``, stored as int64;
      starts at 0, never decreases, ends at ``total``.
    client_ids: One unique string per client, length ``num_clients``.

  Raises:
    ValueError: If the shapes, dtypes or offsets are inconsistent; the message
      names the offending field and value.
  """

  x: np.ndarray
  y: np.ndarray
  offsets: np.ndarray
  client_ids: tuple[str, ...]

  def __post_init__(self):
    x = np.asarray(self.x)
    y = np.asarray(self.y)
    offsets = np.asarray(self.offsets)
    client_ids = tuple(self.client_ids)

    if x.ndim < 1:
      raise ValueError(f"x must have a leading example axis, got shape {x.shape}")
    if y.ndim != 1:
      raise ValueError(f"y must be 1-D [total], got shape {y.shape}")
    if len(y) != len(x):
      raise ValueError(f"len(y) must equal len(x), got len(y)={len(y)} and len(x)={len(x)}")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"y must hold integer labels, got dtype {y.dtype}")
    int32 = np.iinfo(np.int32)
    if len(y) and (y.min() < int32.min or y.max() > int32.max):
      raise ValueError(f"y labels must fit in int32, got range [{y.min()}, {y.max()}]")

    if offsets.ndim != 1 or len(offsets) < 1:
      raise ValueError(
          f"offsets must be 1-D with num_clients + 1 >= 1 entries, got shape {offsets.shape}"
      )
    if not np.issubdtype(offsets.dtype, np.integer):
      raise ValueError(f"offsets must be integers, got dtype {offsets.dtype}")
    if offsets[0] != 0:
      raise ValueError(f"offsets must start at 0, got offsets[0]={offsets[0]}")
    if offsets[-1] != len(x):
      raise ValueError(
          f"offsets must end at the number of examples {len(x)}, got offsets[-1]={offsets[-1]}"
      )
    decreasing = np.flatnonzero(np.diff(offsets) < 0)
    if len(decreasing):
      j = int(decreasing[0])
      raise ValueError(
          f"offsets must be non-decreasing, got offsets[{j}]={offsets[j]} > "
          f"offsets[{j + 1}]={offsets[j + 1]}"
      )

    num_clients = len(offsets) - 1
    if len(client_ids) != num_clients:
      raise ValueError(
          f"client_ids must have one entry per client ({num_clients}), got {len(client_ids)}"
      )
    for cid in client_ids:
      if not isinstance(cid, str):
        raise ValueError(f"client_ids must be strings, got {cid!r}")
    repeated = [c for c, n in collections.Counter(client_ids).items() if n > 1]
    if repeated:
      raise ValueError(f"client_ids must be unique, got {repeated[0]!r} repeated")

    # A frozen dataclass can only store its normalised fields via object.
    object.__setattr__(self, "x", _read_only(x))
    object.__setattr__(self, "y", _read_only(y.astype(np.int32, copy=False)))
    object.__setattr__(self, "offsets", _read_only(offsets.astype(np.int64, copy=False)))
    object.__setattr__(self, "client_ids", client_ids)

  @property
  def num_clients(self) -> int:
    """Number of clients ``N``."""
    return len(self.offsets) - 1

  @property
  def num_examples(self) -> int:
    """Total number of examples over all clients."""
    return len(self.x)

  @property
  def client_sizes(self) -> np.ndarray:
    """Examples per client, int64 ``[N]``."""
    return np.diff(self.offsets)

  @property
  def feature_shape(self) -> tuple[int, ...]:
    """Shape of one example's features, ``x.shape[1:]``."""
    return tuple(self.x.shape[1:])

  @property
  def x_dtype(self) -> np.dtype:
    """Dtype of the features (as ``ClientSource.x_dtype``)."""
    return self.x.dtype

  @property
  def max_client_size(self) -> int:
    """Number of examples of the largest client (0 when there are no clients)."""
    return int(self.client_sizes.max(initial=0))

  def client(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the data of client ``i`` as read-only views (no copy).

    Args:
      i: Client index in ``[0, num_clients)``. Negative indices are rejected
        rather than wrapped: -1 marks padded cohort slots, and silently
        reading the last client would hide that bug.

    Returns:
      ``(x_i, y_i)`` with shapes ``[n_i, *feature_shape]`` and ``[n_i]``.

    Raises:
      ValueError: If ``i`` is not an integer in ``[0, num_clients)``.
    """
    if not isinstance(i, numbers.Integral) or isinstance(i, bool):
      raise ValueError(f"i must be an integer client index, got {i!r}")
    if not 0 <= i < self.num_clients:
      raise ValueError(f"i must be in [0, {self.num_clients}), got {i}")
    start, stop = self.offsets[i], self.offsets[i + 1]
    return self.x[start:stop], self.y[start:stop]

  @classmethod
  def from_partition(
      cls,
      x: np.ndarray,
      y: np.ndarray,
      parts: Sequence[np.ndarray],
      client_ids: Sequence[str] | None = None,
  ) -> FederatedDataset:
    """Builds a dataset from the example indices of each client.

    Args:
      x: Features of the pooled examples, shape ``[n, *feature_shape]``.
      y: Integer labels of the pooled examples, shape ``[n]``.
      parts: ``parts[i]`` is a 1-D integer array of indices into ``x``/``y``
        owned by client ``i``; the order inside a part is kept.
      client_ids: Optional names, one per part; defaults to
        ``"client_0000"``, ``"client_0001"``, ...

    Returns:
      A dataset with ``len(parts)`` clients whose ``x``/``y`` are copies.

    Raises:
      ValueError: If ``x`` and ``y`` disagree in length, or a part is not a
        1-D integer array of indices in ``[0, n)``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1 or y.ndim != 1 or len(x) != len(y):
      raise ValueError(
          "x and y must have the same leading length with y 1-D, got "
          f"x.shape={x.shape} and y.shape={y.shape}"
      )
    parts = [np.asarray(p) for p in parts]
    for i, part in enumerate(parts):
      if part.ndim != 1:
        raise ValueError(f"parts[{i}] must be 1-D, got shape {part.shape}")
      if len(part) == 0:
        continue
      if not np.issubdtype(part.dtype, np.integer):
        raise ValueError(f"parts[{i}] must hold integer indices, got dtype {part.dtype}")
      if part.min() < 0 or part.max() >= len(x):
        raise ValueError(
            f"parts[{i}] must index into [0, {len(x)}), got range [{part.min()}, {part.max()}]"
        )
    if client_ids is None:
      client_ids = [f"client_{i:04d}" for i in range(len(parts))]
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    rows = np.concatenate([p.astype(np.int64) for p in parts] + [np.zeros(0, np.int64)])
    return cls(x=x[rows], y=y[rows], offsets=offsets, client_ids=tuple(client_ids))

  def subset(self, client_indices: Sequence[int] | np.ndarray) -> FederatedDataset:
    """Returns a new dataset holding the given clients, in the given order.

    Args:
      client_indices: 1-D integer array ``[k]`` of distinct client indices in
        ``[0, num_clients)``.

    Returns:
      A dataset with ``k`` clients (copies of their data, same ids).

    Raises:
      ValueError: If an index is out of range or repeated (client ids must
        stay unique).
    """
    idx = np.asarray(client_indices)
    if idx.ndim != 1:
      raise ValueError(f"client_indices must be 1-D, got shape {idx.shape}")
    if len(idx) and not np.issubdtype(idx.dtype, np.integer):
      raise ValueError(f"client_indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= self.num_clients):
      raise ValueError(
          f"client_indices must be in [0, {self.num_clients}), got range "
          f"[{idx.min()}, {idx.max()}]"
      )
    num_repeats = len(idx) - len(np.unique(idx))
    if num_repeats:
      raise ValueError(f"client_indices must be distinct, got {num_repeats} repeated entries")

    sizes = self.client_sizes[idx]
    new_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    # Row r of the result lies in the new segment of exactly one client;
    # shifting r by that client's (old start - new start) maps it back.
    shift = np.repeat(self.offsets[idx] - new_offsets[:-1], sizes)
    rows = np.arange(new_offsets[-1], dtype=np.int64) + shift
    return FederatedDataset(
        x=self.x[rows],
        y=self.y[rows],
        offsets=new_offsets,
        client_ids=tuple(self.client_ids[i] for i in idx),
    )
