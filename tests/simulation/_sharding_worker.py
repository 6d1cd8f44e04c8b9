"""Runs sharded rounds in a fresh process and prints their results as one JSON line.

  python _sharding_worker.py devices             4 forced CPU devices, one process
  python _sharding_worker.py process PID PORT    one of 2 processes with 2 CPU devices each

XLA_FLAGS must be set before jax is imported, hence a subprocess per device
layout; test_sharding.py compares the printed results with single-device rounds.
"""

import json
import os
import sys

MODE = sys.argv[1]
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count="
                           + ("4" if MODE == "devices" else "2"))
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402  (after XLA_FLAGS)

if MODE == "process":
  # Before anything touches a backend (building the cases does).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{sys.argv[3]}", num_processes=2,
                             process_id=int(sys.argv[2]))

import numpy as np  # noqa: E402
import optax  # noqa: E402

import _sharding_cases as cases  # noqa: E402
from fedjax_priv.simulation import sharding  # noqa: E402


def sharded_round(mesh, name, backend):
  client_update, aggregator = cases.get_config(name)
  return cases.jit(sharding.build_sharded_round(client_update, aggregator, optax.sgd(1.0), mesh,
                                                backend, client_chunk_size=cases.CHUNK))


def devices_mode() -> dict:
  mesh = sharding.client_mesh()
  batch = sharding.shard_batch(cases.make_batch(), mesh)
  key = jax.random.key(cases.SEED_KEY)
  out = {"num_devices": len(jax.devices()),
         "batch_devices": len(batch.x.sharding.device_set),
         "batch_shard_slots": [int(s.data.shape[0]) for s in batch.x.addressable_shards]}
  for name, backend in cases.CASES:
    round_fn = sharded_round(mesh, name, backend)
    state = sharding.replicate(cases.init_state(name), mesh)
    new_state, metrics = round_fn(state, batch, key)
    out[f"{name}/{backend}"] = cases.to_json(new_state, metrics)
    out[f"{name}/{backend}/params_devices"] = len(
        jax.tree.leaves(new_state.params)[0].sharding.device_set)
    if (name, backend) == ("dp_mean", "chunked"):
      compiled = round_fn.lower(state, batch, key).compile()
      text = compiled.as_text()
      out["hlo_all_reduce"] = "all-reduce" in text
      out["input_batch_spec"] = str(compiled.input_shardings[0][1].x.spec)
  # Many rounds in one scan, each round's cohort gathered on its devices.
  client_update, aggregator = cases.get_config("dp_mean")
  round_fn = sharding.build_sharded_round(client_update, aggregator, optax.sgd(1.0), mesh,
                                          "chunked", client_chunk_size=cases.CHUNK)
  run = cases.jit(sharding.sharded_rounds_on_device(round_fn, cases.BATCHING, mesh))
  state = sharding.replicate(cases.init_state("dp_mean"), mesh)
  population = sharding.replicate(cases.make_population(), mesh)
  indices, masks, keys = cases.cohort_indices()
  final, metrics = run(state, population, indices, masks, keys)
  out["rounds_on_device"] = cases.to_json(final, metrics)
  return out


def process_mode(process_id: int) -> dict:
  mesh = sharding.client_mesh()
  # Every process knows only its own block of the padded cohort's slots.
  padded = sharding.pad_clients(cases.make_batch(), mesh.size)
  block = padded.client_mask.shape[0] // jax.process_count()
  local = jax.tree.map(lambda a: np.asarray(a)[process_id * block:(process_id + 1) * block], padded)
  batch = sharding.shard_local_batch(local, mesh)
  out = {"process_count": jax.process_count(), "num_devices": len(jax.devices()),
         "local_devices": len(jax.local_devices()),
         "local_real_clients": float(local.client_mask.sum())}
  key = jax.random.key(cases.SEED_KEY)
  for name, backend in (("dp_mean", "chunked"), ("example_dp", "vmap")):
    state = sharding.replicate(cases.init_state(name), mesh)
    new_state, metrics = sharded_round(mesh, name, backend)(state, batch, key)
    out[f"{name}/{backend}"] = cases.to_json(new_state, metrics)
  jax.distributed.shutdown()
  return out


if __name__ == "__main__":
  result = devices_mode() if MODE == "devices" else process_mode(int(sys.argv[2]))
  print("RESULT " + json.dumps(result))
