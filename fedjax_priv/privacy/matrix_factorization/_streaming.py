"""Correlated noise as a stream: row t of C^-1 Z, one round at a time.

A matrix mechanism adds w_t = (C^-1 Z)_t to round t's sum, Z with iid
N(0, 1) rows drawn from the round keys. The state keeps only what the next
row needs, as a pytree of arrays (it can live in an aggregator state and be
checkpointed):

- `BandedToeplitz` (bands p): the last p - 1 outputs, and
  c_0 w_t = z_t - sum_{0<l<p} c_l w_(t-l) (Choquette-Choo et al. 2023,
  "(Amplified) banded MF", Alg. 9).
- `InverseBandedToeplitz` (BISR, p bands): the last p draws (z_t
  included), and w_t = sum_{l<p} e_l z_(t-l).
- `BufferedToeplitz` (m buffers): w_t = z_t - sum_i w_i s_i, then
  s_i <- theta_i s_i + w_t (McMahan, Xu & Zhang 2024, Alg. 3): C w = z
  solved through C's own buffers, so no inverse BLT is needed.
- `DenseStrategy`: all n past outputs (O(n d)); a reference, and the binary
  tree's home (`dp_ftrl` is the O(log n) tree stream).

Past rows sit in a ring of `slots` rows written at t mod slots, so a round
writes one row in place (with the state donated) instead of shifting all
of them; the coefficient of each slot is gathered by its lag.

The state is float32 whatever the template's dtype, and so is the noise:
a bfloat16 ring would accumulate rounding through the recursion.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_priv.privacy.matrix_factorization._strategies import (
    BandedToeplitz, BufferedToeplitz, DenseStrategy, InverseBandedToeplitz, Strategy,
    check_strategy)
from fedjax_priv.privacy.noise import gaussian_like


class StreamState(NamedTuple):
  """Where a noise stream stands.

  Attributes:
    step: int32 scalar, rows already produced (t of the next row).
    buffers: pytree like the template with leaves float32 [slots, *leaf.shape]:
      past outputs (BandedToeplitz, DenseStrategy), past draws
      (InverseBandedToeplitz) or the BLT buffers.
  """
  step: jax.Array
  buffers: Any


def stream_slots(strategy: Strategy) -> int:
  """Rows of state per coordinate: bands - 1 (BandMF), bands (BISR), buffers, or n."""
  if isinstance(strategy, BandedToeplitz):
    return len(strategy.coefs) - 1
  if isinstance(strategy, InverseBandedToeplitz):
    return len(strategy.inverse_coefs)
  if isinstance(strategy, BufferedToeplitz):
    return len(strategy.buffer_decay)
  if isinstance(strategy, DenseStrategy):
    return len(strategy.matrix)
  raise TypeError(f"not a matrix-factorization strategy: {type(strategy).__name__}")


def stream_init(strategy: Strategy, template: Any) -> StreamState:
  """A stream at t = 0 for noise shaped like `template`.

  Args:
    strategy: C (checked here, on the host, before anything is traced).
    template: pytree of arrays or jax.ShapeDtypeStruct giving the shapes.

  Returns:
    StreamState with zero buffers of stream_slots(strategy) * size(template)
    float32 values.
  """
  check_strategy(strategy)
  slots = stream_slots(strategy)
  buffers = jax.tree.map(lambda leaf: jnp.zeros((slots, *jnp.shape(leaf)), jnp.float32), template)
  return StreamState(jnp.int32(0), buffers)


def _ring_weights(coefs: jax.Array, t: jax.Array, slots: int) -> jax.Array:
  # Slot s holds the row of lag ((t - 1 - s) mod slots) + 1; lags > t hold zeros.
  lag = (t - 1 - jnp.arange(slots)) % slots + 1
  return coefs[lag]


def _weighted(weights: jax.Array, rows: jax.Array) -> jax.Array:
  return jnp.tensordot(weights, rows, axes=1)


def _write(rows: jax.Array, row: jax.Array, index: jax.Array) -> jax.Array:
  return lax.dynamic_update_index_in_dim(rows, row, index, axis=0)


def stream_next(strategy: Strategy, state: StreamState, key: jax.Array) -> tuple[Any, StreamState]:
  """Row t = state.step of C^-1 Z, with Z's row t drawn as N(0, 1) from `key`.

  Pure and jittable; the strategy may be a traced argument. Stacking the
  rows of n calls with keys k_0..k_(n-1) gives C^-1 Z for Z[t] =
  gaussian_like(k_t, template, 1). A DenseStrategy gives NaN rows past n.

  Args:
    strategy: C, the one the state was made for.
    state: the StreamState after t rows.
    key: PRNG key of round t.

  Returns:
    (noise, new_state): noise a float32 pytree like the template with unit
    scale (multiply by sigma * clip * sens(C)), new_state after t + 1 rows.
  """
  t = state.step
  template = jax.tree.map(lambda rows: jax.ShapeDtypeStruct(rows.shape[1:], jnp.float32),
                          state.buffers)
  draw = gaussian_like(key, template, 1.0)

  if isinstance(strategy, BandedToeplitz):
    coefs = jnp.asarray(strategy.coefs, jnp.float32)
    slots = coefs.shape[0] - 1
    if slots == 0:
      noise = jax.tree.map(lambda z: z / coefs[0], draw)
      return noise, StreamState(t + 1, state.buffers)
    weights = _ring_weights(coefs, t, slots)
    noise = jax.tree.map(lambda z, rows: (z - _weighted(weights, rows)) / coefs[0],
                         draw, state.buffers)
    buffers = jax.tree.map(lambda rows, w: _write(rows, w, t % slots), state.buffers, noise)
  elif isinstance(strategy, InverseBandedToeplitz):
    coefs = jnp.asarray(strategy.inverse_coefs, jnp.float32)
    slots = coefs.shape[0]
    # Write z_t first, then read all `bands` draws: the read then depends on
    # the write, so XLA updates the ring in place (reading first would let it
    # schedule the write before the read and copy the whole ring).
    buffers = jax.tree.map(lambda rows, z: _write(rows, z, t % slots), state.buffers, draw)
    weights = coefs[(t - jnp.arange(slots)) % slots]
    noise = jax.tree.map(lambda rows: _weighted(weights, rows), buffers)
  elif isinstance(strategy, BufferedToeplitz):
    decay = jnp.asarray(strategy.buffer_decay, jnp.float32)
    scale = jnp.asarray(strategy.output_scale, jnp.float32)
    noise = jax.tree.map(lambda z, rows: z - _weighted(scale, rows), draw, state.buffers)
    buffers = jax.tree.map(
        lambda rows, w: decay.reshape((-1,) + (1,) * w.ndim) * rows + w[None],
        state.buffers, noise)
  elif isinstance(strategy, DenseStrategy):
    matrix = jnp.asarray(strategy.matrix, jnp.float32)
    n = matrix.shape[0]
    row = matrix[jnp.minimum(t, n - 1)]
    past = jnp.where(jnp.arange(n) < t, row, 0.0)
    diagonal = jnp.where(t < n, row[jnp.minimum(t, n - 1)], jnp.nan)
    noise = jax.tree.map(lambda z, rows: (z - _weighted(past, rows)) / diagonal,
                         draw, state.buffers)
    buffers = jax.tree.map(lambda rows, w: _write(rows, w, jnp.minimum(t, n - 1)),
                           state.buffers, noise)
  else:
    raise TypeError(f"not a matrix-factorization strategy: {type(strategy).__name__}")
  return noise, StreamState(t + 1, buffers)
