"""From a cohort to a finished round, and many rounds in one `lax.scan`.

`round_from_cohort` draws the cohort's local batches on the device and runs one
round; `rounds_on_device` gathers each round's cohort from a population kept on
the device as padded arrays and scans over rounds, so R rounds cost one
dispatch. Cohort indices are sampled on the host (data-independent, resumable)
and passed in as a [R, K] array.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_priv.data.device import gather_cohort, sample_client_batches
from fedjax_priv.data.packing import CohortData
from fedjax_priv.simulation.round import RoundFn


class Batching(NamedTuple):
  """How each client's local batches are drawn (see `sample_client_batches`).

  `overflow_probability` bounds P[a Poisson batch exceeds `batch_size`] in one
  step (0 for shuffled batches); the accountant charges it to delta.
  """
  num_steps: int
  batch_size: int
  mode: str = "shuffle"
  expected_batch_size: float | None = None
  overflow_probability: float = 0.0


def cohort_to_batch(batching: Batching):
  """`(cohort, key) -> (ClientBatch, batch_overflow, round_key)`, jittable."""

  def make(cohort: CohortData, key: jax.Array):
    batch_key, round_key = jax.random.split(key)
    slots = cohort.client_mask.shape[0]
    keys = jax.vmap(lambda k: jax.random.fold_in(batch_key, k))(jnp.arange(slots))
    batch, overflow = sample_client_batches(cohort, keys, batching.num_steps,
                                            batching.batch_size, batching.mode,
                                            batching.expected_batch_size)
    return batch, overflow, round_key

  return make


def round_from_cohort(round_fn: RoundFn, batching: Batching):
  """`(state, cohort, key) -> (state, metrics)` for a traceable round_fn."""
  make_batch = cohort_to_batch(batching)

  def run(state, cohort: CohortData, key: jax.Array):
    batch, overflow, round_key = make_batch(cohort, key)
    state, metrics = round_fn(state, batch, round_key)
    return state, {**metrics, "batch_overflow": overflow.astype(jnp.float32)}

  return run


def _pack_scalars(metrics: dict) -> tuple[jax.Array | None, dict]:
  """The float32 scalars of `metrics` as one vector (sorted by name), and the other entries."""
  names = sorted(name for name, value in metrics.items()
                 if jnp.ndim(value) == 0 and jnp.result_type(value) == jnp.float32)
  packed = jnp.stack([metrics[name] for name in names]) if names else None
  return packed, {name: value for name, value in metrics.items() if name not in names}


def rounds_on_device(round_fn: RoundFn, batching: Batching):
  """`(state, population, indices [R, K], masks [R, K], keys [R]) -> (state, metrics [R])`.

  The round's float32 scalar metrics leave the scan as one [R, M] array and are
  split by name afterwards: one write per round instead of one per metric
  (XLA:CPU ran each as its own small kernel, ~10 of a W1 round's ~90).
  """
  one_round = round_from_cohort(round_fn, batching)

  def run(state, population: CohortData, indices, masks, keys):
    names = []

    def body(state, inputs):
      round_indices, round_mask, key = inputs
      state, metrics = one_round(state, gather_cohort(population, round_indices, round_mask),
                                 key)
      packed, rest = _pack_scalars(metrics)
      names[:] = sorted(set(metrics) - set(rest))  # Static: fixed at trace time.
      return state, (packed, rest)

    state, (packed, rest) = jax.lax.scan(body, state, (indices, masks, keys))
    return state, {**rest, **{name: packed[:, i] for i, name in enumerate(names)}}

  return run
