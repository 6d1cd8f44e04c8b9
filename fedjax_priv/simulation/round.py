"""The round builder: one federated round under the `vmap`, `chunked` or `loop` backend.

A round takes the server state, a `ClientBatch` for the cohort ([K, S, B, ...])
and a PRNG key, and returns the new server state and a dict of scalar metrics:

  1. every client trains locally from the server params (client_update);
  2. a client whose delta is not finite is zeroed and counted, never averaged in;
  3. the aggregator prepares each delta (e.g. clips it) and gives it a weight;
     padded client slots get weight 0;
  4. the prepared deltas are summed over the cohort with the aggregator's
     `group_sum` (by default a weighted sum written as a dot product);
  5. the aggregator finalizes the sum once (e.g. adds noise, divides by the
     public expected cohort size, updates its own state) and the server
     optimizer applies the update.

Backends compute exactly the same thing:
  vmap     all K clients in one vmap (fastest for small cohorts);
  chunked  vmap inside chunks of `client_chunk_size` clients, lax.scan over
           chunks, so memory and throughput stay flat as K grows;
  loop     a Python loop with one jitted local-training call per client: the
           readable reference the tests hold the fast backends to.

Client slot k always gets the key fold_in(client_key, k), split into its
training and aggregation keys, and the aggregator the same server and shared
keys, so the three backends agree to float rounding, noise included.
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
from fedjax_priv.privacy.aggregation import Aggregator, ClientContext, RoundContext

BACKENDS = ("vmap", "chunked", "loop")

RoundFn = Callable[[ServerState, ClientBatch, jax.Array], tuple[ServerState, dict]]


def _per_client_fn(client_update: ClientUpdate, aggregator: Aggregator):
  """One client's contribution: (delta', per-client scalars incl. its weight)."""

  def per_client(params, agg_state, x, y, mask, num_examples, client_mask, slot, key, round_key,
                 cohort_mask):
    train_key, agg_key = jax.random.split(key)
    delta, metrics = client_update(params, x, y, mask, train_key)
    finite = tree_util.all_finite(delta)
    delta = tree_util.select(finite, delta, tree_util.zeros_like(delta))
    ctx = ClientContext(slot, agg_key, round_key, cohort_mask)
    prepared, weight, stats = aggregator.prepare(agg_state, delta, num_examples, ctx)
    keep = client_mask * finite.astype(jnp.float32)
    # jnp.where, not a product: 0 * NaN is NaN and would poison the sums.
    scalars = {name: jnp.where(keep > 0, value, 0.0) for name, value in
               {"loss_sum": metrics.loss_sum, "examples_seen": metrics.examples_seen,
                **stats}.items()}
    scalars.update(clients=keep, nonfinite_clients=client_mask * (1.0 - finite),
                   weight=weight * keep)
    return prepared, scalars

  return per_client


def _sum_group(per_client, state: ServerState, batch: ClientBatch, slots, keys, round_key,
               cohort_mask, aggregator: Aggregator):
  """Vmaps `per_client` over a group of clients and sums their contributions.

  Returns the group's summed contribution, its summed scalars and the [c]
  weights (which slots entered the sum).
  """
  prepared, scalars = jax.vmap(per_client, in_axes=(None, None, 0, 0, 0, 0, 0, 0, 0, None, None))(
      state.params, state.aggregator_state, batch.x, batch.y, batch.example_mask,
      batch.num_examples, batch.client_mask, slots, keys, round_key, cohort_mask)
  weights = scalars["weight"]
  return (aggregator.group_sum(weights, prepared),
          {name: jnp.sum(value) for name, value in scalars.items()}, weights)


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


def _finish(state, summed, totals, ctx: RoundContext, aggregator, server_optimizer):
  update, aggregator_state, agg_stats = aggregator.finalize(
      state.aggregator_state, summed, totals.pop("weight"), ctx)
  new_state = server_update(state, update, server_optimizer)._replace(
      aggregator_state=aggregator_state)
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
  metrics.update(agg_stats)
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
    client_key, server_key, round_key = jax.random.split(key, 3)
    slot_keys = jax.vmap(lambda k: jax.random.fold_in(client_key, k))(jnp.arange(num_slots))
    return slot_keys, server_key, round_key

  def vmap_round(state, batch, key):
    check_batch(batch)
    num_slots = batch.client_mask.shape[0]
    keys, server_key, round_key = split_keys(key, num_slots)
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    summed, totals, weights = _sum_group(per_client, state, batch, slots, keys, round_key,
                                         batch.client_mask, aggregator)
    ctx = RoundContext(server_key, round_key, batch.client_mask, (weights > 0).astype(jnp.float32))
    return _finish(state, summed, totals, ctx, aggregator, server_optimizer)

  def chunked_round(state, batch, key):
    check_batch(batch)
    num_slots = batch.client_mask.shape[0]
    # Equal chunks of at most client_chunk_size: padding stays below one slot
    # per chunk instead of up to a whole chunk (K = 16 at chunk 64 would
    # otherwise train 48 empty slots).
    num_chunks = -(-num_slots // client_chunk_size)
    chunk = -(-num_slots // num_chunks)
    batch = _pad_clients(batch, chunk)
    padded_slots = batch.client_mask.shape[0]
    keys, server_key, round_key = split_keys(key, padded_slots)
    slots = jnp.arange(padded_slots, dtype=jnp.int32)
    cohort_mask = batch.client_mask
    chunks = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), (batch, slots, keys))

    def group(chunk):
      return _sum_group(per_client, state, *chunk, round_key, cohort_mask, aggregator)

    def body(carry, chunk):
      summed, totals, weights = group(chunk)
      carry = (aggregator.combine(carry[0], summed), jax.tree.map(jnp.add, carry[1], totals))
      return carry, weights

    first = jax.tree.map(lambda a: a[0], chunks)
    rest = jax.tree.map(lambda a: a[1:], chunks)
    # The first chunk seeds the carry, which fixes its structure and dtypes.
    first_summed, first_totals, first_weights = group(first)
    (summed, totals), rest_weights = jax.lax.scan(body, (first_summed, first_totals), rest)
    weights = jnp.concatenate([first_weights, rest_weights.reshape(-1)])
    ctx = RoundContext(server_key, round_key, cohort_mask, (weights > 0).astype(jnp.float32))
    return _finish(state, summed, totals, ctx, aggregator, server_optimizer)

  if backend == "vmap":
    return vmap_round
  if backend == "chunked":
    return chunked_round

  one_client = jax.jit(per_client)
  accumulate = jax.jit(lambda total, prepared, scalars: (
      aggregator.combine(total[0], aggregator.group_sum(
          scalars["weight"][None], jax.tree.map(lambda leaf: leaf[None], prepared))),
      jax.tree.map(jnp.add, total[1], scalars)))
  first_total = jax.jit(lambda prepared, scalars: (
      aggregator.group_sum(scalars["weight"][None],
                           jax.tree.map(lambda leaf: leaf[None], prepared)), scalars))
  finish = jax.jit(lambda state, summed, totals, ctx: _finish(
      state, summed, totals, ctx, aggregator, server_optimizer))

  def loop_round(state, batch, key):
    check_batch(batch)
    num_slots = batch.client_mask.shape[0]
    keys, server_key, round_key = split_keys(key, num_slots)
    total, weights = None, []
    for k in range(num_slots):
      prepared, scalars = one_client(
          state.params, state.aggregator_state, batch.x[k], batch.y[k], batch.example_mask[k],
          batch.num_examples[k], batch.client_mask[k], jnp.int32(k), keys[k], round_key,
          batch.client_mask)
      total = first_total(prepared, scalars) if total is None else accumulate(
          total, prepared, scalars)
      weights.append(scalars["weight"])
    ctx = RoundContext(server_key, round_key, batch.client_mask,
                       (jnp.stack(weights) > 0).astype(jnp.float32))
    return finish(state, total[0], total[1], ctx)

  return loop_round
