"""Shards the client axis of a round over the devices of a mesh, on one host or many.

A sharded round computes what `build_round` computes, with the cohort's client
slots split over the devices of the mesh axis `axis_name` (a `jax.shard_map`
region; the server state, the keys and the result are replicated):

  1. the cohort is padded with empty slots (client_mask 0) to a multiple of the
     device count (times the chunk, for the chunked backend), and device d
     holds the contiguous block of slots [d * K_d, (d + 1) * K_d);
  2. each device trains and prepares its own clients, vmapped (backend "vmap")
     or vmapped inside chunks under a `lax.scan` (backend "chunked"), and sums
     them with the aggregator's `group_sum` / `combine`;
  3. the per-device sums meet in one collective: `lax.psum` when the
     aggregator's `combine` is plain addition, otherwise an `all_gather` of the
     D partial sums folded in device order with `combine` (modular sums of
     secure aggregation, ciphertext sums), so a custom sum is never replaced
     by a float add;
  4. every device then runs `finalize` and the server update on the same
     summed values with the same server key, so the central noise is drawn
     once -- identical on every device, after the sum, never once per device
     -- and the new state stays replicated.

Client slot k gets the key fold_in(client_key, k) for its global slot k, as in
`build_round`, so a sharded round equals the single-device round of the same
cohort and key to float rounding, noise included.

Many hosts use JAX's own multi-controller runtime: every process calls
`jax.distributed.initialize(...)`, builds the mesh over `jax.devices()` (all
processes' devices), contributes its block of clients with
`shard_local_batch` and runs the same jitted round. On CPU the collectives
between processes need `jax.config.update("jax_cpu_collectives_implementation",
"gloo")` before the first computation.

Privacy: sharding changes no privacy property. The round computes the same
function of the same cohort, so each aggregator's neighbouring relation
(add/remove or replace-one, user or example level) and sensitivity hold as
documented there, and the round's DpEvent is unchanged.

Public JAX APIs relied on (jax 0.10 and 0.11): `jax.shard_map` (with
`check_vma`), `jax.lax.psum`, `jax.lax.all_gather`, `jax.lax.axis_index`,
`jax.sharding.Mesh`, `NamedSharding`, `PartitionSpec`,
`jax.lax.with_sharding_constraint`, `jax.device_put`,
`jax.make_array_from_process_local_data` and `jax.distributed.initialize`.

References:
  JAX documentation, "Manual parallelism with shard_map" and "Multi-process
  environments" (https://docs.jax.dev). McMahan et al. 2018 (ICLR), "Learning
  Differentially Private Recurrent Language Models": the DP-FedAvg round whose
  sum is sharded here.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import ClientUpdate
from fedjax_priv.algorithms.server import ServerState
from fedjax_priv.types import ClientBatch
from fedjax_priv.privacy.aggregation import Aggregator, RoundContext
from fedjax_priv.simulation.program import Batching, rounds_on_device
from fedjax_priv.simulation.round import (RoundFn, check_batch, finish_round, pad_client_slots,
                                          per_client_fn, stateless_update, sum_chunks, sum_group)

CLIENT_AXIS = "clients"
SHARDED_BACKENDS = ("vmap", "chunked")


def client_mesh(devices: Sequence[jax.Device] | None = None,
                axis_name: str = CLIENT_AXIS) -> Mesh:
  """A one-axis mesh over `devices` (default `jax.devices()`: every process's devices)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("client_mesh needs at least one device, got none")
  return Mesh(np.asarray(devices), (axis_name,))


def _axis_size(mesh: Mesh, axis_name: str) -> int:
  if axis_name not in mesh.shape:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh, whose axes are "
                     f"{tuple(mesh.shape)}")
  return mesh.shape[axis_name]


def _slots_per_chunk(num_slots: int, num_devices: int, backend: str, client_chunk_size: int):
  """Clients per vmapped group on one device: its whole block, or equal chunks of it."""
  per_device = -(-num_slots // num_devices)
  if backend == "vmap":
    return per_device
  num_chunks = -(-per_device // client_chunk_size)
  return -(-per_device // num_chunks)


def _sum_local_clients(per_client, state, batch, slots, keys, round_key, cohort_mask,
                       aggregator: Aggregator, chunk: int):
  """Sums one device's clients: vmap inside chunks of `chunk` slots, scan over the chunks.

  Returns (partial sum, summed scalars, [K_d] weights), like `sum_group`.
  """
  chunks = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), (batch, slots, keys))

  def group(carry, chunk_inputs):
    # Stateless clients: an empty client-state pytree, so nothing is gathered.
    summed, totals, weights, _ = sum_group(per_client, state, (), *chunk_inputs, round_key,
                                            cohort_mask, aggregator)
    return summed, totals, weights, carry

  summed, totals, weights, _ = sum_chunks(group, chunks, aggregator)
  return summed, totals, weights


def _all_devices_sum(partial, aggregator: Aggregator, axis_name: str, num_devices: int):
  """The cohort's sum from each device's partial sum, replicated on every device."""
  if aggregator.combine is tree_util.add:
    return jax.lax.psum(partial, axis_name)
  # A custom combine (e.g. a sum mod 2^b) is not a float add: gather the D
  # partial sums and fold them in device order, the same on every device.
  gathered = jax.lax.all_gather(partial, axis_name)
  total = jax.tree.map(lambda leaf: leaf[0], gathered)
  for d in range(1, num_devices):
    total = aggregator.combine(total, jax.tree.map(lambda leaf, d=d: leaf[d], gathered))
  return total


def build_sharded_round(client_update: ClientUpdate, aggregator: Aggregator,
                        server_optimizer: optax.GradientTransformation, mesh: Mesh,
                        backend: str = "chunked", client_chunk_size: int = 64,
                        axis_name: str = CLIENT_AXIS) -> RoundFn:
  """Builds `round_fn(state, batch, key) -> (new_state, metrics)` sharded over `mesh`.

  The same round as `build_round(client_update, aggregator, server_optimizer,
  backend, client_chunk_size)`, with the client axis split over the devices of
  `mesh.shape[axis_name]`; see the module docstring. The returned function is
  pure and traceable: jit it (its batch is best given already sharded by
  `shard_batch`, its state replicated by `replicate`), or scan it over rounds
  with `sharded_rounds_on_device`.

  Args:
    client_update: single-client local training, from `make_client_update`.
    aggregator: any `Aggregator`; a `combine` other than `tree.add` is honoured
      (all-gather then fold) instead of being replaced by a float psum.
    server_optimizer: optax optimizer applied to -mean_delta.
    mesh: devices to shard over; other mesh axes, if any, hold replicas.
    backend: "vmap" (each device vmaps over its whole block of clients) or
      "chunked" (each device scans over equal chunks of at most
      `client_chunk_size` of its clients).
    client_chunk_size: the most clients per chunk and device for "chunked".
    axis_name: the mesh axis that the client slots are split over.

  Returns:
    A pure function; a batch of K slots is padded with empty slots to a
    multiple of the device count D (times the per-device chunk for
    "chunked"). The metrics and the new state are replicated over the mesh.
  """
  if backend not in SHARDED_BACKENDS:
    raise ValueError(f"backend must be one of {SHARDED_BACKENDS} for a sharded round, got "
                     f"{backend!r}")
  if not (isinstance(client_chunk_size, int) and client_chunk_size >= 1):
    raise ValueError(f"client_chunk_size must be an int >= 1, got {client_chunk_size!r}")
  num_devices = _axis_size(mesh, axis_name)
  per_client = per_client_fn(stateless_update(client_update), aggregator)

  def device_round(state, batch, cohort_mask, key, chunk):
    """One device's view: its block of slots in, the replicated round out."""
    local_slots = batch.client_mask.shape[0]
    # The same key schedule as build_round, indexed by the global slot.
    client_key, server_key, round_key = jax.random.split(key, 3)
    offset = jax.lax.axis_index(axis_name) * local_slots
    slots = (offset + jnp.arange(local_slots)).astype(jnp.int32)
    keys = jax.vmap(lambda k: jax.random.fold_in(client_key, k))(slots)
    partial, local_totals, local_weights = _sum_local_clients(
        per_client, state, batch, slots, keys, round_key, cohort_mask, aggregator, chunk)
    summed = _all_devices_sum(partial, aggregator, axis_name, num_devices)
    totals = jax.lax.psum(local_totals, axis_name)
    weights = jax.lax.all_gather(local_weights, axis_name, tiled=True)
    ctx = RoundContext(server_key, round_key, cohort_mask, (weights > 0).astype(jnp.float32))
    return finish_round(state, summed, totals, ctx, aggregator, server_optimizer)

  def sharded_round(state: ServerState, batch: ClientBatch, key: jax.Array):
    check_batch(batch)
    chunk = _slots_per_chunk(batch.client_mask.shape[0], num_devices, backend, client_chunk_size)
    batch = pad_client_slots(batch, num_devices * chunk)
    clients = PartitionSpec(axis_name)
    # check_vma=False: with it on, shard_map types values created inside a
    # device's code as replicated and transposes them to a psum, so client code
    # that differentiates with respect to such a value (the zero perturbations
    # of ghost norms) would silently receive other devices' gradients; this was
    # measured. Off, each device runs the single-device code as written, and
    # replication of the outputs rests on psum/all_gather giving every device
    # the same values (tested against the single-device round).
    return jax.shard_map(
        functools.partial(device_round, chunk=chunk), mesh=mesh,
        in_specs=(PartitionSpec(), clients, PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(), check_vma=False)(state, batch, batch.client_mask, key)

  return sharded_round


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` (server state, population) whole on every device of `mesh`.

  With several processes every process must pass the same values.
  """
  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(batch: ClientBatch, mesh: Mesh, axis_name: str = CLIENT_AXIS) -> ClientBatch:
  """The whole cohort, padded to a multiple of the device count and split over `axis_name`.

  With several processes every process passes the whole (same) cohort and
  only its own devices' slots are transferred; `shard_local_batch` is for
  processes that each hold only their own clients.
  """
  check_batch(batch)
  num_devices = _axis_size(mesh, axis_name)
  padded = pad_client_slots(jax.tree.map(jnp.asarray, batch), num_devices)
  return jax.device_put(padded, NamedSharding(mesh, PartitionSpec(axis_name)))


def shard_local_batch(local_batch: ClientBatch, mesh: Mesh,
                      axis_name: str = CLIENT_AXIS) -> ClientBatch:
  """The global cohort built from each process's own block of client slots.

  Process p passes slots [p * L, (p + 1) * L) of the cohort (the processes'
  blocks in `jax.process_index()` order, all of the same size L, a multiple of
  this process's device count on the mesh axis): pad the cohort with
  `pad_clients` to a multiple of the mesh's device count before splitting it.
  On one process this is `shard_batch` without the padding.
  """
  check_batch(local_batch)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  local_slots = local_batch.client_mask.shape[0]
  if local_slots % local_devices:
    raise ValueError(f"local_batch has {local_slots} client slots, not a multiple of this "
                     f"process's {local_devices} devices; pad the whole cohort with "
                     f"pad_clients(batch, {_axis_size(mesh, axis_name)}) before splitting it")
  sharding = NamedSharding(mesh, PartitionSpec(axis_name))
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      local_batch)


def pad_clients(batch: ClientBatch, multiple: int) -> ClientBatch:
  """Appends empty slots (client_mask 0, all-zero data) up to a multiple of `multiple`."""
  if not (isinstance(multiple, int) and multiple >= 1):
    raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
  check_batch(batch)
  return pad_client_slots(jax.tree.map(jnp.asarray, batch), multiple)


def sharded_rounds_on_device(round_fn: RoundFn, batching: Batching, mesh: Mesh,
                             axis_name: str = CLIENT_AXIS):
  """`rounds_on_device` with each round's cohort gathered and trained sharded over `mesh`.

  Args:
    round_fn: from `build_sharded_round` over the same mesh.
    batching: how each client's local batches are drawn.
    mesh: the devices; `population` should be `replicate`d over it.
    axis_name: the mesh axis the client slots are split over.

  Returns:
    `run(state, population, indices [R, K], masks [R, K], keys [R]) ->
    (state, metrics [R])`, to be jitted; K is padded with empty slots to a
    multiple of the device count, so each device gathers and batches its own
    block of the cohort.
  """
  num_devices = _axis_size(mesh, axis_name)
  clients = NamedSharding(mesh, PartitionSpec(axis_name))

  def constrained_round(state, batch, key):
    # The gather and batch sampling before the round follow this layout, so
    # every device draws only its own clients' data.
    return round_fn(state, jax.lax.with_sharding_constraint(batch, clients), key)

  scan_rounds = rounds_on_device(constrained_round, batching)

  def run(state, population, indices, masks, keys):
    extra = -indices.shape[1] % num_devices
    indices = jnp.pad(indices, ((0, 0), (0, extra)), constant_values=-1)
    masks = jnp.pad(masks, ((0, 0), (0, extra)))
    return scan_rounds(state, population, indices, masks, keys)

  return run
