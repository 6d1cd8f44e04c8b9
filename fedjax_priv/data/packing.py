"""Packing of ragged client data into fixed-shape, masked cohort arrays.

The device code wants static shapes: a cohort of ``K`` client slots, each with
room for ``M`` examples. Real clients are copied in front of their slot and the
rest is zero padding, described by ``num_examples`` and ``client_mask`` so the
device side can make padding contribute exactly zero. ``M`` is rounded up to a
bucket from a short geometric ladder, so a whole run compiles for few shapes.

The population is either a ``FederatedDataset`` in memory (the cohort is one
vectorised gather) or any ``ClientSource`` (a SQLite store, a generated
population) that hands out the cohort's clients on request, so a round's host
memory is the cohort's, whatever the population size.

This module is host-side and depends on numpy only.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.population import ClientSource

_SMALLEST_BUCKET = 8


class CohortData(NamedTuple):
  """A cohort's examples, padded to fixed shapes (leading axis K = cohort capacity).

  Attributes:
    x: Features ``[K, M, *feature_shape]``, zero in padding. Floating features
      are float32; other dtypes (e.g. integer token ids, which index
      embeddings) are kept as they are in the dataset.
    y: Labels ``[K, M]`` int32, 0 in padding.
    num_examples: Real examples per slot ``[K]`` int32, 0 for padded slots.
    client_mask: ``[K]`` float32, 1.0 for a real client, 0.0 for a padded slot.
  """

  x: np.ndarray
  y: np.ndarray
  num_examples: np.ndarray
  client_mask: np.ndarray


def bucket_size(n: int, buckets: Sequence[int] | None = None) -> int:
  """Rounds an example count up to a bucket, so compiled shapes stay few.

  Args:
    n: Number of examples, ``n >= 0``.
    buckets: Allowed sizes (positive integers, any order). Defaults to the
      unbounded ladder 8, 16, 32, ... (powers of two from 8).

  Returns:
    The smallest bucket ``>= n`` (8 for ``n == 0`` with the default ladder).

  Raises:
    ValueError: If ``n`` is negative or not an integer, ``buckets`` is empty or
      holds a non-positive entry, or ``n`` exceeds the largest bucket.
  """
  if not isinstance(n, numbers.Integral) or isinstance(n, bool):
    raise ValueError(f"n must be an integer, got {n!r}")
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  if buckets is None:
    return max(_SMALLEST_BUCKET, 1 << max(int(n) - 1, 0).bit_length())
  buckets = sorted(int(b) for b in buckets)
  if not buckets or buckets[0] < 1:
    raise ValueError(f"buckets must be non-empty positive sizes, got {buckets}")
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"n={n} exceeds the largest bucket {buckets[-1]}")


def _float32_if_floating(dtype: np.dtype) -> np.dtype:
  return np.dtype(np.float32) if np.issubdtype(dtype, np.floating) else dtype


def _cohort_rows(dataset: FederatedDataset | ClientSource, indices: np.ndarray,
                 sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The examples of clients ``indices`` (sizes ``sizes``), concatenated in order."""
  if isinstance(dataset, FederatedDataset):
    first = np.cumsum(sizes) - sizes
    rows = np.repeat(dataset.offsets[indices] - first, sizes) + np.arange(int(sizes.sum()))
    return dataset.x[rows], dataset.y[rows]
  clients = dataset.clients(indices)
  for i, n, (x, y) in zip(indices, sizes, clients):
    if len(x) != n or len(y) != n:
      raise ValueError(f"client {i} of the source returned {len(x)} examples and {len(y)} "
                       f"labels, but client_sizes says {n}")
  empty_x = np.zeros((0, *dataset.feature_shape), dataset.x_dtype)
  return (np.concatenate([x for x, _ in clients] + [empty_x]),
          np.concatenate([y for _, y in clients] + [np.zeros(0, np.int32)]))


def pack_cohort(
    dataset: FederatedDataset | ClientSource,
    client_indices: np.ndarray,
    client_mask: np.ndarray,
    max_examples: int | None = None,
) -> CohortData:
  """Copies the cohort's clients into zero-padded ``[K, M, ...]`` arrays.

  Args:
    dataset: The population: in memory, or a ``ClientSource`` asked once for
      the cohort's real clients.
    client_indices: Integer array ``[K]`` of client indices. Entries where
      ``client_mask`` is 0 are ignored (e.g. -1 for padded slots).
    client_mask: Array ``[K]`` of 0/1 (bool, int or float); 1 marks a real
      client.
    max_examples: Examples per slot ``M``. Defaults to
      ``bucket_size(largest real client)``.

  Returns:
    The packed cohort; slot ``k``'s first ``num_examples[k]`` rows hold client
    ``client_indices[k]``'s data in order, everything else is zero.

  Raises:
    ValueError: If the inputs disagree in shape, the mask is not 0/1, a real
      index is out of range, or a real client has more than ``M`` examples
      (truncating it would silently change the data).
  """
  indices = np.asarray(client_indices)
  mask = np.asarray(client_mask)
  if indices.ndim != 1:
    raise ValueError(f"client_indices must be 1-D [K], got shape {indices.shape}")
  if mask.shape != indices.shape:
    raise ValueError(
        f"client_mask must have the shape of client_indices {indices.shape}, got {mask.shape}"
    )
  if len(indices) and not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"client_indices must be integers, got dtype {indices.dtype}")
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError(f"client_mask must hold only 0 and 1, got {np.unique(mask)}")
  real = mask == 1
  real_indices = indices[real].astype(np.int64)
  if len(real_indices) and (real_indices.min() < 0 or real_indices.max() >= dataset.num_clients):
    raise ValueError(
        f"client_indices of real clients must be in [0, {dataset.num_clients}), "
        f"got range [{real_indices.min()}, {real_indices.max()}]"
    )

  # Padded slots point at client 0 with size 0, so they gather nothing.
  safe_indices = np.where(real, indices, 0).astype(np.int64)
  sizes = np.where(real, dataset.client_sizes[safe_indices], 0)
  if max_examples is None:
    max_examples = bucket_size(int(sizes.max(initial=0)))
  elif (
      not isinstance(max_examples, numbers.Integral)
      or isinstance(max_examples, bool)
      or max_examples < 1
  ):
    raise ValueError(f"max_examples must be an integer >= 1, got {max_examples!r}")
  too_big = np.flatnonzero(sizes > max_examples)
  if len(too_big):
    k = int(too_big[0])
    i = int(safe_indices[k])
    who = repr(dataset.client_ids[i]) if isinstance(dataset, FederatedDataset) else f"#{i}"
    raise ValueError(
        f"client {who} has {sizes[k]} examples, "
        f"more than max_examples={max_examples}; raise max_examples rather than "
        "truncating the client's data"
    )

  num_slots = len(indices)
  x = np.zeros(
      (num_slots, max_examples, *dataset.feature_shape),
      dtype=_float32_if_floating(np.dtype(dataset.x_dtype)),
  )
  y = np.zeros((num_slots, max_examples), dtype=np.int32)
  x_rows, y_rows = _cohort_rows(dataset, safe_indices[real], sizes[real])
  # One (slot, position) pair per real example, so the copy is a single
  # scatter instead of a Python loop over clients.
  slot = np.repeat(np.arange(num_slots), sizes)
  first_flat = np.cumsum(sizes) - sizes
  position = np.arange(len(slot)) - np.repeat(first_flat, sizes)
  x[slot, position] = x_rows
  y[slot, position] = y_rows
  return CohortData(
      x=x,
      y=y,
      num_examples=sizes.astype(np.int32),
      client_mask=real.astype(np.float32),
  )


def pad_population(dataset: FederatedDataset | ClientSource,
                   max_examples: int | None = None) -> CohortData:
  """Packs every client, in order, as one cohort with ``K = num_clients``.

  This is the layout kept on the device when the population fits there; the
  device-side gather of a cohort indexes its leading axis.

  Args:
    dataset: The population.
    max_examples: Examples per slot ``M``; defaults to
      ``bucket_size(dataset.max_client_size)``.

  Returns:
    ``CohortData`` with ``x`` of shape ``[N, M, *feature_shape]`` and
    ``client_mask`` all ones.

  Raises:
    ValueError: If a client has more than ``max_examples`` examples.
  """
  num_clients = dataset.num_clients
  return pack_cohort(
      dataset,
      np.arange(num_clients),
      np.ones(num_clients, dtype=np.float32),
      max_examples,
  )
