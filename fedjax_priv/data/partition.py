"""Partitioners that split a pooled dataset into simulated clients.

Every partitioner takes its randomness from an explicit ``np.random.Generator``
and returns ``list[np.ndarray]``: one sorted int64 array of example indices per
client. The parts are disjoint and together cover every example exactly once,
so ``FederatedDataset.from_partition(x, y, parts)`` loses nothing.

This module is host-side and depends on numpy only.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from fedjax_priv.checks import check_int


def _check_num_clients(num_clients, num_examples: int) -> int:
  num_clients = check_int("num_clients", num_clients, 1)
  # More clients than examples would leave some clients empty, and an empty
  # "real" client silently changes cohort statistics downstream.
  if num_clients > num_examples:
    raise ValueError(
        f"num_clients must be <= the number of examples ({num_examples}), got {num_clients}"
    )
  return num_clients


def _balanced_sizes(num_examples: int, num_clients: int) -> np.ndarray:
  """Client sizes ``[num_clients]`` summing to ``num_examples``, differing by <= 1."""
  base, extra = divmod(num_examples, num_clients)
  return base + (np.arange(num_clients) < extra).astype(np.int64)


def iid_partition(
    num_examples: int, num_clients: int, rng: np.random.Generator
) -> list[np.ndarray]:
  """Splits examples uniformly at random into clients of (almost) equal size.

  Args:
    num_examples: Number of pooled examples ``n``.
    num_clients: Number of clients ``k``, ``1 <= k <= n``.
    rng: Source of randomness.

  Returns:
    ``k`` sorted int64 index arrays; sizes are ``n // k`` or ``n // k + 1``.

  Raises:
    ValueError: If ``num_examples`` or ``num_clients`` is not a valid integer.
  """
  num_examples = check_int("num_examples", num_examples, 1)
  num_clients = _check_num_clients(num_clients, num_examples)
  shuffled = rng.permutation(num_examples).astype(np.int64)
  bounds = np.cumsum(_balanced_sizes(num_examples, num_clients))[:-1]
  return [np.sort(part) for part in np.split(shuffled, bounds)]


def dirichlet_label_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """Splits examples into equal-size clients with Dirichlet label skew.

  Follows Hsu, Qi & Brown (2019): client ``i`` draws label proportions
  ``p_i ~ Dirichlet(alpha * prior)``, where ``prior`` holds the global label
  frequencies, and is filled by drawing labels from ``p_i`` and taking an
  example of that label uniformly at random, without replacement, from the
  pool left by earlier clients. When a label runs out, ``p_i`` is
  renormalised over the labels still available. If every available label has
  zero proportion (which happens at tiny ``alpha``, where Dirichlet draws
  underflow to exact zeros), the client falls back to the label frequencies
  of the remaining pool, i.e. draws uniformly among the remaining examples.

  Draws are made in batches: ``need`` labels are drawn multinomially, each
  label is capped at what is left of it, and only the excess is redrawn from
  the renormalised proportions. This has the same distribution as drawing one
  label at a time and rejecting exhausted labels, with far fewer numpy calls.

  Small ``alpha`` concentrates each client on few labels; large ``alpha``
  approaches the IID split.

  Args:
    labels: Integer (or any sortable) class labels, shape ``[n]``.
    num_clients: Number of clients ``k``, ``1 <= k <= n``.
    alpha: Concentration, a finite float > 0.
    rng: Source of randomness.

  Returns:
    ``k`` sorted int64 index arrays with sizes ``n // k`` or ``n // k + 1``.

  Raises:
    ValueError: If ``labels`` is not 1-D and non-empty, or ``num_clients`` or
      ``alpha`` is out of range.

  References:
    Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", arXiv:1909.06335.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or len(labels) == 0:
    raise ValueError(f"labels must be 1-D and non-empty, got shape {labels.shape}")
  num_examples = len(labels)
  num_clients = _check_num_clients(num_clients, num_examples)
  if (
      not isinstance(alpha, numbers.Real)
      or isinstance(alpha, bool)
      or not math.isfinite(alpha)
      or alpha <= 0
  ):
    raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")

  _, label_index, counts = np.unique(labels, return_inverse=True, return_counts=True)
  prior = counts / num_examples
  # pools[c] lists the examples of label c in random order; remaining[c] of
  # them, from position taken[c] on, are still unassigned.
  by_label = np.argsort(label_index, kind="stable")
  pools = [rng.permutation(p) for p in np.split(by_label, np.cumsum(counts)[:-1])]
  taken = np.zeros(len(counts), dtype=np.int64)
  remaining = counts.astype(np.int64)

  parts = []
  for size in _balanced_sizes(num_examples, num_clients):
    proportions = rng.dirichlet(alpha * prior)
    chosen = []
    need = int(size)
    while need > 0:
      weights = np.where(remaining > 0, proportions, 0.0)
      if weights.sum() <= 0:
        weights = remaining.astype(np.float64)
      draws = rng.multinomial(need, weights / weights.sum())
      take = np.minimum(draws, remaining)
      for c in np.flatnonzero(take):
        chosen.append(pools[c][taken[c] : taken[c] + take[c]])
      taken += take
      remaining -= take
      need -= int(take.sum())
    parts.append(np.sort(np.concatenate(chosen)).astype(np.int64))
  return parts


def partition_by_key(keys: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
  """Makes one client per distinct key (a natural partition, e.g. by writer).

  Args:
    keys: Key of each example, shape ``[n]``; any dtype ``np.unique`` sorts
      (integers, strings).

  Returns:
    ``(parts, unique_keys)``: ``unique_keys`` is the sorted array of distinct
    keys, shape ``[k]``, and ``parts[i]`` the sorted int64 indices of the
    examples whose key is ``unique_keys[i]``.

  Raises:
    ValueError: If ``keys`` is not 1-D and non-empty.
  """
  keys = np.asarray(keys)
  if keys.ndim != 1 or len(keys) == 0:
    raise ValueError(f"keys must be 1-D and non-empty, got shape {keys.shape}")
  unique_keys, key_index, counts = np.unique(keys, return_inverse=True, return_counts=True)
  # A stable sort by key index keeps each client's indices ascending.
  by_key = np.argsort(key_index, kind="stable").astype(np.int64)
  return list(np.split(by_key, np.cumsum(counts)[:-1])), unique_keys
