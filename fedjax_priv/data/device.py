"""Device side of the data path: gather a cohort and draw its local batches.

The host packs clients into `CohortData` ([K, M, ...] padded examples); when the
whole population fits on the device it is packed once and cohorts are gathered
from it by index inside the jitted multi-round program. Either way
`sample_client_batches` turns the cohort into the fixed-shape `ClientBatch`
([K, S, B, ...]) that one round consumes, so shapes stay static and one compile
serves every round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_priv.data.packing import CohortData
from fedjax_priv.types import ClientBatch  # Re-exported: users import it from here.

BATCHING_MODES = ("shuffle", "poisson")


def gather_cohort(population: CohortData, indices: jax.Array, mask: jax.Array) -> CohortData:
  """Gathers the cohort `indices` [K] (-1 where `mask` [K] is 0) from a padded population."""
  safe = jnp.where(mask > 0, indices, 0)
  return CohortData(
      x=population.x[safe],
      y=population.y[safe],
      num_examples=jnp.where(mask > 0, population.num_examples[safe], 0),
      client_mask=mask.astype(jnp.float32),
  )


def _shuffled_batches(num_examples, key, num_steps, batch_size, max_examples):
  """Cycles through a random permutation of the client's examples.

  A client with fewer than S*B examples sees its data several times (local
  epochs); a client with none gets an all-zero mask.
  """
  valid = jnp.arange(max_examples) < num_examples
  order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0))
  positions = jnp.arange(num_steps * batch_size) % jnp.maximum(num_examples, 1)
  indices = order[positions].reshape(num_steps, batch_size)
  mask = jnp.broadcast_to(num_examples > 0, indices.shape).astype(jnp.float32)
  return indices, mask, jnp.int32(0)


def _poisson_batches(num_examples, key, num_steps, capacity, expected_batch_size, max_examples):
  """Each step includes each example independently with q = b / n (Poisson).

  The realised batch is truncated to `capacity` slots; the number of truncated
  steps is returned so the run can report it (its probability is accounted as
  an additive delta term, see `privacy.accounting.overflow_delta`).
  """
  q = jnp.minimum(1.0, expected_batch_size / jnp.maximum(num_examples, 1))
  valid = jnp.arange(max_examples) < num_examples

  def one_step(step_key):
    u = jax.random.uniform(step_key, (max_examples,))
    selected = valid & (u < q)
    # Conditioned on selection the u's are i.i.d. uniform, so the `capacity`
    # smallest form a uniformly random subset of the selected examples.
    _, idx = jax.lax.top_k(-jnp.where(selected, u, 2.0), capacity)
    return idx, selected[idx].astype(jnp.float32), jnp.sum(selected) > capacity

  indices, mask, overflowed = jax.vmap(one_step)(jax.random.split(key, num_steps))
  return indices, mask, jnp.sum(overflowed).astype(jnp.int32)


def sample_client_batches(cohort: CohortData, keys: jax.Array, num_steps: int,
                          batch_size: int, mode: str = "shuffle",
                          expected_batch_size: float | None = None
                          ) -> tuple[ClientBatch, jax.Array]:
  """Draws S local batches of B slots for every client of the cohort.

  Args:
    cohort: CohortData with x [K, M, ...], y [K, M], num_examples [K].
    keys: [K] PRNG keys, one per client slot.
    num_steps: S, local steps per client.
    batch_size: B, slots per step (the fixed batch for "shuffle", the static
      capacity of the Poisson batch for "poisson").
    mode: "shuffle" (epochs over a random permutation) or "poisson" (DP-SGD
      sampling with rate q_i = expected_batch_size / n_i per step).
    expected_batch_size: b, required for "poisson".

  Returns:
    (ClientBatch, number of (client, step) Poisson batches truncated to B).
  """
  if mode not in BATCHING_MODES:
    raise ValueError(f"batching mode must be one of {BATCHING_MODES}, got {mode!r}")
  max_examples = cohort.x.shape[1]
  if mode == "poisson":
    if expected_batch_size is None or expected_batch_size <= 0:
      raise ValueError(f"poisson batching needs expected_batch_size > 0, got {expected_batch_size}")
    capacity = min(batch_size, max_examples)

    def per_client(n, key):
      return _poisson_batches(n, key, num_steps, capacity, expected_batch_size, max_examples)
  else:
    def per_client(n, key):
      return _shuffled_batches(n, key, num_steps, batch_size, max_examples)

  indices, mask, overflow = jax.vmap(per_client)(cohort.num_examples, keys)
  take = jax.vmap(lambda data, idx: data[idx])
  mask = mask * cohort.client_mask[:, None, None]
  batch = ClientBatch(
      x=take(cohort.x, indices),
      y=take(cohort.y, indices),
      example_mask=mask,
      num_examples=cohort.num_examples.astype(jnp.int32),
      client_mask=cohort.client_mask.astype(jnp.float32),
  )
  return batch, jnp.sum(overflow)
