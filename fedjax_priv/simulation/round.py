"""The round builder: one federated round under the `vmap`, `chunked` or `loop` backend.

A round takes the server state, a `ClientBatch` for the cohort ([K, S, B, ...])
and a PRNG key, and returns the new server state and a dict of scalar metrics:

  1. every client trains locally from the server params (client_update);
  2. the aggregator prepares each delta (e.g. clips it) and gives it a weight;
     padded client slots get weight 0;
  3. a client whose update is not finite (a NaN or an infinity, or an L2 norm
     whose square overflows float32) is counted and never averaged in: its
     prepared delta is zeroed and its weight is 0 (for distributed-DP
     aggregators, which add a noise share per client, its delta is zeroed
     before `prepare` and it enters the sum with a zero update);
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

Algorithms whose clients keep state across rounds (SCAFFOLD's control
variates) use `build_stateful_round`: the population's states are one stacked
pytree [N, ...] that the round gathers by cohort index, passes to each client
update with the whole `ServerState`, and scatters back for the clients whose
contribution entered the sum; padded, non-finite and dropped clients keep
their old state. `build_round` is the same machinery with an empty state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import ClientUpdate
from fedjax_priv.algorithms.server import ServerState, server_update
from fedjax_priv.types import ClientBatch
from fedjax_priv.privacy.aggregation import Aggregator, ClientContext, RoundContext

BACKENDS = ("vmap", "chunked", "loop")

StatefulRoundFn = Callable[..., tuple[ServerState, Any, dict]]


@dataclasses.dataclass(frozen=True)
class RoundFn:
  """`round_fn(state, batch, key) -> (new_state, metrics)`, and whether it may be traced.

  Attributes:
    fn: the round.
    traceable: True for the `vmap` and `chunked` backends, whose round is a
      pure function to jit, vmap or scan over rounds; False for `loop`, whose
      round is a host function that jits per client and must be called
      eagerly.
  """
  fn: Callable[[ServerState, ClientBatch, jax.Array], tuple[ServerState, dict]]
  traceable: bool

  def __call__(self, state: ServerState, batch: ClientBatch, key: jax.Array):
    return self.fn(state, batch, key)

  def wrap(self, wrapper: Callable) -> RoundFn:
    """`wrapper(self.fn)` as a RoundFn that keeps `traceable`."""
    return RoundFn(wrapper(self.fn), self.traceable)


# (server_state, client_state, x, y, mask, key) -> (delta, new_client_state, ClientMetrics)
StatefulClientUpdate = Callable[..., tuple]


def stateless_update(client_update: ClientUpdate) -> StatefulClientUpdate:
  """A `make_client_update` function as a stateful one whose client state passes through."""

  def update(server_state, client_state, x, y, mask, key):
    delta, metrics = client_update(server_state.params, x, y, mask, key)
    return delta, client_state, metrics

  return update


def update_is_finite(delta, new_client_state) -> jax.Array:
  """Scalar bool: False for a client update that must not reach the sum.

  That is an update whose squared L2 norm is not finite: a NaN or an infinity
  in any floating leaf, or a norm above ~1.8e19, whose square overflows
  float32 (an update no model survives). Integer and key leaves are skipped.
  The test is the clip norm's own reduction (`tree.squared_l2_norm`), which
  XLA computes once for both: a separate finiteness pass over every delta
  cost 3.5 % of a W1 round on one core (experiments/results/runner_vs_floor.md).
  """
  floats = [leaf for leaf in jax.tree.leaves((delta, new_client_state))
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.isfinite(tree_util.squared_l2_norm(floats))


def per_client_fn(client_update: StatefulClientUpdate, aggregator: Aggregator):
  """One client's contribution: (delta', per-client scalars incl. its weight, new state)."""

  def per_client(state, client_state, x, y, mask, num_examples, client_mask, slot, key, round_key,
                 cohort_mask):
    train_key, agg_key = jax.random.split(key)
    delta, new_client_state, metrics = client_update(state, client_state, x, y, mask, train_key)
    finite = update_is_finite(delta, new_client_state)
    keep = client_mask * finite.astype(jnp.float32)
    ctx = ClientContext(slot, agg_key, round_key, cohort_mask)
    zero_if_nonfinite = lambda tree: tree_util.select(finite, tree, tree_util.zeros_like(tree))
    if aggregator.sums_nonfinite_as_zero:
      # A distributed-DP client with a non-finite update still sends its
      # noise share, prepared from a zero update; it enters the sum.
      prepared, weight, stats = aggregator.prepare(
          state.aggregator_state, zero_if_nonfinite(delta), num_examples, ctx)
      enters = client_mask
    else:
      # Any other one is left out: its prepared contribution is zeroed and
      # weighted 0 after `prepare`, which gives the sum the same value as
      # zeroing the delta before it, without a pass that writes the zeroed
      # delta out (XLA:CPU fuses this select into prepare's last
      # elementwise pass, e.g. the clip scaling).
      prepared, weight, stats = aggregator.prepare(state.aggregator_state, delta, num_examples,
                                                   ctx)
      prepared = zero_if_nonfinite(prepared)
      enters = keep
    # jnp.where, not a product: 0 * NaN is NaN and would poison the sums.
    scalars = {name: jnp.where(keep > 0, value, 0.0) for name, value in
               {"loss_sum": metrics.loss_sum, "examples_seen": metrics.examples_seen,
                **stats}.items()}
    scalars.update(clients=keep, nonfinite_clients=client_mask * (1.0 - finite),
                   weight=jnp.where(enters > 0, weight, 0.0))
    # Only a finite contribution that entered the sum may advance the
    # client's state, so the server's view (e.g. SCAFFOLD's c, built from the
    # summed dc_i) never drifts from the states the clients keep.
    new_client_state = tree_util.select(weight * keep > 0, new_client_state, client_state)
    return prepared, scalars, new_client_state

  return per_client


def sum_group(per_client, state: ServerState, client_states, batch: ClientBatch, slots, keys,
               round_key, cohort_mask, aggregator: Aggregator):
  """Vmaps `per_client` over a group of clients and sums their contributions.

  Returns the group's summed contribution, its summed scalars, the [c]
  weights (which slots entered the sum) and the clients' new states [c, ...].
  """
  prepared, scalars, new_states = jax.vmap(
      per_client, in_axes=(None, 0, 0, 0, 0, 0, 0, 0, 0, None, None))(
          state, client_states, batch.x, batch.y, batch.example_mask, batch.num_examples,
          batch.client_mask, slots, keys, round_key, cohort_mask)
  weights = scalars["weight"]
  return (aggregator.group_sum(weights, prepared),
          {name: jnp.sum(value) for name, value in scalars.items()}, weights, new_states)


def _gather_states(client_states, client_ids, client_mask):
  """The cohort's states [K, ...] from the population's [N, ...]; padded slots read row 0."""
  safe = jnp.where(client_mask > 0, client_ids, 0)
  return jax.tree.map(lambda leaf: leaf[safe], client_states)


def _scatter_states(client_states, client_ids, weights, new_states):
  """Writes back the states of the slots with weight > 0; the others point past the end."""
  def scatter(leaf, new):
    target = jnp.where(weights > 0, client_ids, leaf.shape[0])
    return leaf.at[target].set(new, mode="drop")

  return jax.tree.map(scatter, client_states, new_states)


def check_client_states(client_states, client_ids, num_slots: int) -> None:
  """Raises ValueError unless ids are [K] integers and every state leaf is [N, ...].

  Shapes are static, so this runs at trace time: before anything compiles.
  """
  if tuple(client_ids.shape) != (num_slots,) or not jnp.issubdtype(client_ids.dtype, jnp.integer):
    raise ValueError(f"client_ids must be an integer array of shape ({num_slots},) to match the "
                     f"batch, got {client_ids.dtype}{tuple(client_ids.shape)}")
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(client_states)}
  if None in sizes or len(sizes) > 1:
    raise ValueError("client_states leaves must all be stacked [N, ...] over the same population "
                     f"size N, got leading sizes {sorted(map(str, sizes))}")


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


def pad_client_slots(batch: ClientBatch, multiple: int) -> ClientBatch:
  """Pads the client axis with empty slots (client_mask 0) to a multiple of `multiple`."""
  extra = -batch.client_mask.shape[0] % multiple
  if extra == 0:
    return batch
  return jax.tree.map(lambda a: jnp.pad(a, [(0, extra)] + [(0, 0)] * (a.ndim - 1)), batch)


def sum_chunks(group, chunks, aggregator: Aggregator, carry=()):
  """Sums a cohort chunk by chunk: `group` on each chunk, a `lax.scan` over the chunks.

  Args:
    group: `(carry, chunk) -> (summed, totals, weights [c], carry)` for one
      chunk, e.g. `sum_group` on its clients; `carry` threads state that the
      chunks update in turn (the population's client states), or ().
    chunks: pytree of [G, c, ...] arrays, G chunks of c client slots.
    aggregator: its `combine` adds the chunks' sums.
    carry: the initial carry.

  Returns:
    (sum, summed totals, weights [G c], final carry). The first chunk seeds
    the scan's carry, which fixes the structure and dtypes of the sum.
  """
  summed, totals, weights, carry = group(carry, jax.tree.map(lambda a: a[0], chunks))

  def body(acc, chunk):
    chunk_sum, chunk_totals, chunk_weights, carry = group(acc[2], chunk)
    return (aggregator.combine(acc[0], chunk_sum), jax.tree.map(jnp.add, acc[1], chunk_totals),
            carry), chunk_weights

  (summed, totals, carry), rest_weights = jax.lax.scan(
      body, (summed, totals, carry), jax.tree.map(lambda a: a[1:], chunks))
  return summed, totals, jnp.concatenate([weights, rest_weights.reshape(-1)]), carry


def _finalize(aggregator: Aggregator, state: ServerState, summed, total_weight,
              ctx: RoundContext):
  """`aggregator.finalize`; on CPU inside a conditional, so its update is computed once.

  The update feeds two consumers, the server optimizer and the `update_norm`
  metric. XLA:CPU fuses cheap producers into every consumer: for a noisy
  update it cut the Gaussian noise's inverse error function at its log and
  square root, wrote those out, and evaluated the rest for each consumer (a
  W1 round 2 % slower on one core). A conditional is a boundary XLA:CPU's
  fusion does not cross, kept while its predicate is not a constant; both
  branches are `finalize`, so the predicate (the round counter, always >= 0)
  changes nothing but where the update is written out: once, by the kernel
  that draws the noise. A conditional's outputs get buffers of their own, a
  copy of the aggregator state every round, so it is used only when that
  state is no larger than the update (dp_mean's is empty; a matrix-factorization
  ring of past noise is not). Other platforms call `finalize` directly: a GPU
  conditional reads its predicate on the host. Under a `vmap` that batches
  the round counter the conditional becomes a select of both branches:
  correct, twice the work (sweeps keep the counter unbatched).
  """
  args = (state.aggregator_state, summed, total_weight, ctx)
  finalize = lambda args: aggregator.finalize(*args)
  if tree_util.num_parameters(state.aggregator_state) > tree_util.num_parameters(summed):
    return finalize(args)
  apart = lambda round_index, args: jax.lax.cond(round_index >= 0, finalize, finalize, args)
  return jax.lax.platform_dependent(state.round, args, cpu=apart,
                                    default=lambda round_index, args: finalize(args))


def finish_round(state, summed, totals, ctx: RoundContext, aggregator, server_optimizer):
  """Finalizes the cohort's sum, applies the server optimizer and forms the round's metrics.

  The building blocks above (`per_client_fn`, `sum_group`, `pad_client_slots`,
  `sum_chunks`, this) are shared with `simulation.sharding`, which runs them
  per device.
  """
  update, aggregator_state, agg_stats = _finalize(aggregator, state, summed,
                                                  totals.pop("weight"), ctx)
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
    A `RoundFn`: for "vmap" and "chunked" a pure function to be jitted (or
    scanned over rounds) by the caller (`traceable`); for "loop" a host
    function that jits per client and must not itself be traced.
  """
  stateful = build_stateful_round(stateless_update(client_update), aggregator, server_optimizer,
                                  backend, client_chunk_size)

  def round_fn(state, batch, key):
    check_batch(batch)
    no_ids = jnp.zeros(batch.client_mask.shape, jnp.int32)
    state, _, metrics = stateful(state, (), batch, no_ids, key)
    return state, metrics

  return RoundFn(round_fn, traceable=backend != "loop")


def build_stateful_round(client_update: StatefulClientUpdate, aggregator: Aggregator,
                         server_optimizer: optax.GradientTransformation,
                         backend: str = "chunked", client_chunk_size: int = 64
                         ) -> StatefulRoundFn:
  """Builds `round_fn(state, client_states, batch, client_ids, key) -> (state, states, metrics)`.

  Args:
    client_update: `(server_state, client_state, x, y, mask, key) -> (delta,
      new_client_state, ClientMetrics)` for one client, e.g. from
      `algorithms.scaffold.make_scaffold_client_update`. It sees the whole
      `ServerState` (params, aggregator state) and its own state slice.
    aggregator, server_optimizer, backend, client_chunk_size: as in `build_round`.

  Args (of the returned function):
    state: the `ServerState`.
    client_states: pytree of [N, ...] arrays, one row per client of the
      population (N clients).
    batch: the cohort's `ClientBatch` ([K, S, B, ...]).
    client_ids: [K] int32, each slot's row in `client_states`; ignored for
      padded slots. Real clients must be distinct.
    key: the round's PRNG key.

  Returns:
    As `build_round`'s function, plus the new client states: the rows of the
    clients that entered the sum are replaced, every other row is unchanged.
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  if not (isinstance(client_chunk_size, int) and client_chunk_size >= 1):
    raise ValueError(f"client_chunk_size must be an int >= 1, got {client_chunk_size!r}")
  per_client = per_client_fn(client_update, aggregator)

  def split_keys(key, num_slots):
    client_key, server_key, round_key = jax.random.split(key, 3)
    slot_keys = jax.vmap(lambda k: jax.random.fold_in(client_key, k))(jnp.arange(num_slots))
    return slot_keys, server_key, round_key

  def check(batch, client_states, client_ids):
    check_batch(batch)
    check_client_states(client_states, client_ids, batch.client_mask.shape[0])

  def finish(state, client_states, summed, totals, ctx):
    state, metrics = finish_round(state, summed, totals, ctx, aggregator, server_optimizer)
    return state, client_states, metrics

  def vmap_round(state, client_states, batch, client_ids, key):
    check(batch, client_states, client_ids)
    num_slots = batch.client_mask.shape[0]
    keys, server_key, round_key = split_keys(key, num_slots)
    slots = jnp.arange(num_slots, dtype=jnp.int32)
    cohort_states = _gather_states(client_states, client_ids, batch.client_mask)
    summed, totals, weights, new_states = sum_group(
        per_client, state, cohort_states, batch, slots, keys, round_key, batch.client_mask,
        aggregator)
    client_states = _scatter_states(client_states, client_ids, weights, new_states)
    ctx = RoundContext(server_key, round_key, batch.client_mask, (weights > 0).astype(jnp.float32))
    return finish(state, client_states, summed, totals, ctx)

  def chunked_round(state, client_states, batch, client_ids, key):
    check(batch, client_states, client_ids)
    num_slots = batch.client_mask.shape[0]
    # Equal chunks of at most client_chunk_size: padding stays below one slot
    # per chunk instead of up to a whole chunk (K = 16 at chunk 64 would
    # otherwise train 48 empty slots).
    num_chunks = -(-num_slots // client_chunk_size)
    chunk = -(-num_slots // num_chunks)
    extra = -num_slots % chunk
    batch = pad_client_slots(batch, chunk)
    client_ids = jnp.pad(client_ids, (0, extra))
    padded_slots = batch.client_mask.shape[0]
    keys, server_key, round_key = split_keys(key, padded_slots)
    slots = jnp.arange(padded_slots, dtype=jnp.int32)
    cohort_mask = batch.client_mask
    chunks = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]),
                          (batch, client_ids, slots, keys))

    def group(client_states, chunk):
      # Each chunk gathers and scatters its own rows, so only one chunk of
      # client states is ever materialised next to the population's.
      chunk_batch, ids, chunk_slots, chunk_keys = chunk
      cohort_states = _gather_states(client_states, ids, chunk_batch.client_mask)
      summed, totals, weights, new_states = sum_group(
          per_client, state, cohort_states, chunk_batch, chunk_slots, chunk_keys, round_key,
          cohort_mask, aggregator)
      return summed, totals, weights, _scatter_states(client_states, ids, weights, new_states)

    summed, totals, weights, client_states = sum_chunks(group, chunks, aggregator, client_states)
    ctx = RoundContext(server_key, round_key, cohort_mask, (weights > 0).astype(jnp.float32))
    return finish(state, client_states, summed, totals, ctx)

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
  loop_finish = jax.jit(finish)
  one_row = lambda client_states, k: jax.tree.map(lambda leaf: leaf[k], client_states)
  write_row = jax.jit(lambda client_states, k, new, weight: _scatter_states(
      client_states, k[None], weight[None], jax.tree.map(lambda leaf: leaf[None], new)))

  def loop_round(state, client_states, batch, client_ids, key):
    check(batch, client_states, client_ids)
    num_slots = batch.client_mask.shape[0]
    keys, server_key, round_key = split_keys(key, num_slots)
    has_states = bool(jax.tree.leaves(client_states))
    total, weights = None, []
    for k in range(num_slots):
      row = client_ids[k] if batch.client_mask[k] > 0 else 0
      prepared, scalars, new_state = one_client(
          state, one_row(client_states, row), batch.x[k], batch.y[k], batch.example_mask[k],
          batch.num_examples[k], batch.client_mask[k], jnp.int32(k), keys[k], round_key,
          batch.client_mask)
      total = first_total(prepared, scalars) if total is None else accumulate(
          total, prepared, scalars)
      weights.append(scalars["weight"])
      if has_states:
        client_states = write_row(client_states, client_ids[k], new_state, scalars["weight"])
    ctx = RoundContext(server_key, round_key, batch.client_mask,
                       (jnp.stack(weights) > 0).astype(jnp.float32))
    return loop_finish(state, client_states, total[0], total[1], ctx)

  return loop_round
