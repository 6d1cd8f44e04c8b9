"""Tests for fedjax_priv.simulation.sharding.

Several devices need XLA_FLAGS set before jax is imported, so the sharded rounds
run in subprocesses (_sharding_worker.py: 4 forced CPU devices in one process,
or 2 processes of 2 devices joined by jax.distributed over gloo) that print
their results; this process computes the same rounds on its single device and
compares. The subprocesses start once per module and run while this process
compiles its references.
"""

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _sharding_cases as cases  # noqa: E402
from fedjax_priv.simulation import sharding  # noqa: E402
from fedjax_priv.simulation.program import rounds_on_device  # noqa: E402
from fedjax_priv.simulation.round import build_round  # noqa: E402

WORKER = str(Path(__file__).with_name("_sharding_worker.py"))
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(*args) -> subprocess.Popen:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
  out, err = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == 0, f"worker {proc.args[2:]} failed:\n{err[-4000:]}"
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  assert len(lines) == 1, out[-2000:]
  return json.loads(lines[0][len("RESULT "):])


@pytest.fixture(scope="module")
def workers():
  """Starts every subprocess at once; each result is read when a test first needs it."""
  port = _free_port()
  procs = {"devices": _launch("devices"),
           "process0": _launch("process", 0, port), "process1": _launch("process", 1, port)}
  results = {}

  def get(name):
    if name not in results:
      results[name] = _result(procs[name])
    return results[name]

  yield get
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


@functools.cache
def single_round(name, backend):
  client_update, aggregator = cases.get_config(name)
  return cases.jit(build_round(client_update, aggregator, optax.sgd(1.0), backend,
                               client_chunk_size=cases.CHUNK))


@functools.cache
def single_device(name, backend, seed_key=cases.SEED_KEY):
  """The unsharded round on this process's one device, as JSON-like lists."""
  state, metrics = single_round(name, backend)(cases.init_state(name), cases.make_batch(),
                                               jax.random.key(seed_key))
  return cases.to_json(state, metrics)


def assert_results_close(sharded, reference, atol=1e-6):
  assert sharded["round"] == reference["round"]
  assert len(sharded["params"]) == len(reference["params"])
  for got, want in zip(sharded["params"], reference["params"]):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=atol)
  assert sorted(sharded["metrics"]) == sorted(reference["metrics"])
  for name, want in reference["metrics"].items():
    np.testing.assert_allclose(np.asarray(sharded["metrics"][name]), np.asarray(want),
                               rtol=1e-5, atol=atol, err_msg=name)


def params_distance(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(a["params"], b["params"]))


# --- Many devices, one host ----------------------------------------------------


@pytest.mark.parametrize("name,backend", cases.CASES)
def test_sharded_round_equals_single_device(workers, name, backend):
  """4 devices (K = 10 padded to 12) give the single-device round, noise included."""
  result = workers("devices")
  reference = single_device(name, backend)
  assert_results_close(result[f"{name}/{backend}"], reference)
  assert result[f"{name}/{backend}/params_devices"] == 4  # Replicated on every device.


def test_noise_is_on_and_drawn_once(workers):
  """The agreement above is not vacuous: the noise moves the params, and is not D-fold.

  With noise drawn per device and summed, the update's noise would have
  2x (sqrt 4) the single-device std; equality already excludes that, and
  another key must give another result.
  """
  result = workers("devices")["dp_mean/vmap"]
  other = single_device("dp_mean", "vmap", seed_key=cases.SEED_KEY + 1)
  assert params_distance(result, other) > 1e-2


def test_compiled_round_shards_the_cohort(workers):
  """The batch is split 3-3-3-3 over 4 devices and the sum is an all-reduce."""
  result = workers("devices")
  assert result["num_devices"] == 4
  assert result["batch_devices"] == 4
  assert result["batch_shard_slots"] == [3, 3, 3, 3]
  assert result["input_batch_spec"] == str(jax.sharding.PartitionSpec(sharding.CLIENT_AXIS))
  assert result["hlo_all_reduce"]


def test_sharded_rounds_on_device_equal_single_device(workers):
  """Two scanned rounds with each cohort gathered by index on 4 devices."""
  client_update, aggregator = cases.get_config("dp_mean")
  round_fn = build_round(client_update, aggregator, optax.sgd(1.0), "chunked", cases.CHUNK)
  run = cases.jit(rounds_on_device(round_fn, cases.BATCHING))
  state, metrics = run(cases.init_state("dp_mean"), cases.make_population(),
                       *cases.cohort_indices())
  reference = cases.to_json(state, metrics)
  assert reference["round"] == cases.ROUNDS
  assert_results_close(workers("devices")["rounds_on_device"], reference)


# --- Many hosts ------------------------------------------------------------------


@pytest.mark.parametrize("name,backend", [("dp_mean", "chunked"), ("example_dp", "vmap")])
def test_two_processes_equal_single_process(workers, name, backend):
  """2 processes x 2 devices, each holding only its block of the cohort, agree with 1 device."""
  first, second = workers("process0"), workers("process1")
  assert first["process_count"] == 2 and first["num_devices"] == 4
  assert first["local_devices"] == 2
  # Slots 0-5 (6 real clients) and 6-11 (3 real, 3 padding) of the padded cohort.
  assert (first["local_real_clients"], second["local_real_clients"]) == (6.0, 3.0)
  reference = single_device(name, backend)
  assert_results_close(first[f"{name}/{backend}"], reference)
  assert_results_close(second[f"{name}/{backend}"], reference)


# --- Bad input -------------------------------------------------------------------


def test_bad_configuration_fails_naming_the_field():
  client_update, aggregator = cases.get_config("dp_mean")
  mesh = sharding.client_mesh()
  with pytest.raises(ValueError, match="backend"):
    sharding.build_sharded_round(client_update, aggregator, optax.sgd(1.0), mesh, "loop")
  with pytest.raises(ValueError, match="client_chunk_size"):
    sharding.build_sharded_round(client_update, aggregator, optax.sgd(1.0), mesh, "chunked", 0)
  with pytest.raises(ValueError, match="'hosts' is not an axis"):
    sharding.build_sharded_round(client_update, aggregator, optax.sgd(1.0), mesh,
                                 axis_name="hosts")
  with pytest.raises(ValueError, match="multiple"):
    sharding.pad_clients(cases.make_batch(), 0)
  bad = cases.make_batch()._replace(client_mask=np.ones(cases.K - 1, np.float32))
  with pytest.raises(ValueError, match="client_mask"):
    sharding.shard_batch(bad, mesh)


def test_one_device_mesh_round_equals_build_round():
  """On a one-device mesh the sharded round is the plain round (padding 10 -> 10)."""
  mesh = sharding.client_mesh()
  client_update, aggregator = cases.get_config("dp_mean")
  round_fn = cases.jit(sharding.build_sharded_round(client_update, aggregator, optax.sgd(1.0),
                                                    mesh, "vmap"))
  state, metrics = round_fn(sharding.replicate(cases.init_state("dp_mean"), mesh),
                            sharding.shard_batch(cases.make_batch(), mesh),
                            jax.random.key(cases.SEED_KEY))
  assert_results_close(cases.to_json(state, metrics), single_device("dp_mean", "vmap"))
