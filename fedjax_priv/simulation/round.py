"""The round builder: one federated round under the `vmap`, `chunked` or `loop` backend.

A round takes the server state, a `ClientBatch` for the cohort ([K, S, B, ...])
and a PRNG key, and returns the new server state and a dict of scalar metrics:

  1. every client trains locally from the server params (client_update);
  2. a client whose delta is not finite is zeroed and counted, never averaged in;
  3. the aggregator prepares each delta (e.g. clips it) and gives it a weight;
     padded client slots get weight 0;
  4. the weighted deltas are summed over the cohort as a dot product;
  5. the aggregator finalizes the sum once (e.g. adds noise, divides by the
     public expected cohort size) and the server optimizer applies it.

Backends compute exactly the same thing:
  vmap     all K clients in one vmap (fastest for small cohorts);
  chunked  vmap inside chunks of `client_chunk_size` clients, lax.scan over
           chunks, so memory and throughput stay flat as K grows;
  loop     a Python loop with one jitted local-training call per client: the
           readable reference the tests hold the fast backends to.

Client slot k always gets the key fold_in(client_key, k) and the aggregator the
same noise key, so the three backends agree to float rounding, noise included.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import ClientUpdate
from fedjax_priv.algorithms.server import ServerState, server_update
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.privacy.aggregation import Aggregator

BACKENDS = ("vmap", "chunked", "loop")

RoundFn = Callable[[ServerState, ClientBatch, jax.Array], tuple[ServerState, dict]]


def _per_client_fn(client_update: ClientUpdate, aggregator: Aggregator):
  """One client's contribution: (delta', weight, per-client scalars)."""

  def per_client(params, x, y, mask, num_examples, client_mask, key):
    delta, metrics = client_update(params, x, y, mask, key)
    finite = tree_util.all_finite(delta)
    delta = tree_util.select(finite, delta, tree_util.zeros_like(delta))
    prepared, weight, stats = aggregator.prepare(delta, num_examples)
    keep = client_mask * finite.astype(jnp.float32)
    # jnp.where, not a product: 0 * NaN is NaN and would poison the sums.
    scalars = {name: jnp.where(keep > 0, value, 0.0) for name, value in
               {"loss_sum": metrics.loss_sum, "examples_seen": metrics.examples_seen,
                **stats}.items()}
    scalars.update(clients=keep, nonfinite_clients=client_mask * (1.0 - finite),
                   weight=weight * keep)
    return prepared, scalars

  return per_client


def _sum_group(per_client, params, batch: ClientBatch, keys):
  """Vmaps `per_client` over a group of clients and sums their contributions."""
  prepared, scalars = jax.vmap(per_client, in_axes=(None, 0, 0, 0, 0, 0, 0))(
      params, batch.x, batch.y, batch.example_mask, batch.num_examples, batch.client_mask, keys)
  return (tree_util.weighted_sum(scalars["weight"], prepared),
          {name: jnp.sum(value) for name, value in scalars.items()})


def check_batch(batch: ClientBatch) -> None:
  """Raises ValueError naming the field whose shape disagrees with [K, S, B, ...].

  Shapes are static, so this runs at trace time: before anything compiles.
  """
  if batch.x.ndim < 3:
    raise ValueError(f"ClientBatch.x must be [K, S, B, ...], got shape {batch.x.shape}")
  k, s, b = batch.x.shape[:3]
  if k == 0:
    raise ValueError("ClientBatch has no client slots (K = 0)")
  expected = {"y": (k, s, b), "example_mask": (k, s, b), "num_examples": (k,),
              "client_mask": (k,)}
  for name, shape in expected.items():
    got = tuple(getattr(batch, name).shape)
    if got != shape:
      raise ValueError(f"ClientBatch.{name} must have shape {shape} to match x "
                       f"{tuple(batch.x.shape)}, got {got}")


def _pad_clients(batch: ClientBatch, multiple: int) -> ClientBatch:
  """Pads the client axis with empty slots (client_mask 0) to a multiple of `multiple`."""
  extra = -batch.client_mask.shape[0] % multiple
  if extra == 0:
    return batch
  return jax.tree.map(lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)), batch)


def _finish(state, summed, totals, noise_key, aggregator, server_optimizer):
  update = aggregator.finalize(summed, totals.pop("weight"), noise_key)
  new_state = server_update(state, update, server_optimizer)
  clients = jnp.maximum(totals["clients"], 1.0)
  examples = totals.pop("examples_seen")
  metrics = {
      "clients": totals.pop("clients"),
      "nonfinite_clients": totals.pop("nonfinite_clients"),
      "examples_seen": examples,
      "train_loss": totals.pop("loss_sum") / jnp.maximum(examples, 1.0),
      "update_norm": tree_util.l2_norm(update),
  }
  metrics.update({name: value / clients for name, value in totals.items()})
  return new_state, metrics


def build_round(client_update: ClientUpdate, aggregator: Aggregator,
                server_optimizer: optax.GradientTransformation, backend: str = "chunked",
                client_chunk_size: int = 64) -> RoundFn:
  """Builds `round_fn(state, batch, key) -> (new_state, metrics)`.

  Args:
    client_update: single-client local training, from `make_client_update`.
    aggregator: e.g. `weighted_mean()` or `dp_mean(...)`.
    server_optimizer: optax optimizer applied to -mean_delta.
    backend: "vmap", "chunked" or "loop" (see module docstring).
    client_chunk_size: the most clients per chunk for "chunked"; the cohort is
      split into ceil(K / client_chunk_size) equal chunks, padded with empty
      slots to a multiple of the chunk.

  Returns:
    For "vmap" and "chunked" a pure function to be jitted (or scanned over
    rounds) by the caller; for "loop" a host function that jits per client and
    must not itself be traced.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if not (isinstance(client_chunk_size, int) and client_chunk_size >= 1):
    raise ValueError(f"client_chunk_size must be an int >= 1, got {client_chunk_size!r}")
  per_client = _per_client_fn(client_update, aggregator)

  def split_keys(key, num_slots):
    client_key, noise_key = jax.random.split(key)
    slot_keys = jax.vmap(lambda k: jax.random.fold_in(client_key, k))(jnp.arange(num_slots))
    return slot_keys, noise_key

  def vmap_round(state, batch, key):
    check_batch(batch)
    keys, noise_key = split_keys(key, batch.client_mask.shape[0])
    summed, totals = _sum_group(per_client, state.params, batch, keys)
    return _finish(state, summed, totals, noise_key, aggregator, server_optimizer)

  def chunked_round(state, batch, key):
    check_batch(batch)
    num_slots = batch.client_mask.shape[0]
    # Equal chunks of at most client_chunk_size: padding stays below one slot
    # per chunk instead of up to a whole chunk (K = 16 at chunk 64 would
    # otherwise train 48 empty slots).
    num_chunks = -(-num_slots // client_chunk_size)
    chunk = -(-num_slots // num_chunks)
    batch = _pad_clients(batch, chunk)
    keys, noise_key = split_keys(key, batch.client_mask.shape[0])
    chunks = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), (batch, keys))

    def body(carry, chunk):
      summed, totals = _sum_group(per_client, state.params, *chunk)
      return jax.tree.map(jnp.add, carry, (summed, totals)), None

    first = jax.tree.map(lambda a: a[0], chunks)
    rest = jax.tree.map(lambda a: a[1:], chunks)
    # The first chunk seeds the carry, which fixes its structure and dtypes.
    carry, _ = jax.lax.scan(body, _sum_group(per_client, state.params, *first), rest)
    return _finish(state, *carry, noise_key, aggregator, server_optimizer)

  if backend == "vmap":
    return vmap_round
  if backend == "chunked":
    return chunked_round

  one_client = jax.jit(per_client)
  accumulate = jax.jit(lambda total, prepared, scalars: (
      tree_util.add(total[0], tree_util.scale(prepared, scalars["weight"])),
      jax.tree.map(jnp.add, total[1], scalars)))
  finish = jax.jit(lambda state, summed, totals, noise_key: _finish(
      state, summed, totals, noise_key, aggregator, server_optimizer))

  def loop_round(state, batch, key):
    check_batch(batch)
    num_slots = batch.client_mask.shape[0]
    keys, noise_key = split_keys(key, num_slots)
    total = None
    for k in range(num_slots):
      prepared, scalars = one_client(
          state.params, batch.x[k], batch.y[k], batch.example_mask[k],
          batch.num_examples[k], batch.client_mask[k], keys[k])
      if total is None:
        total = (tree_util.zeros_like(prepared), jax.tree.map(jnp.zeros_like, scalars))
      total = accumulate(total, prepared, scalars)
    return finish(state, total[0], total[1], noise_key)

  return loop_round
