"""Rounds shared by test_sharding.py and the subprocesses it launches (_sharding_worker.py).

Both sides build the same models, cohorts and keys from here, so a result computed
on 4 forced CPU devices (or by 2 processes) can be compared with the single-device
result computed in the test process. Importing this module imports jax: a worker
must set XLA_FLAGS first.
"""

import functools

import jax
import numpy as np
import optax

from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.data.packing import CohortData
from fedjax_priv.models.zoo import mlp
from fedjax_priv.privacy.aggregation import dp_mean, weighted_mean
from fedjax_priv.secure.aggregators import secure_sum
from fedjax_priv.simulation.program import Batching

# Semantics, not speed: XLA's lowest backend optimisation level roughly halves
# CPU compile time, which dominates these tests.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

INPUT_SHAPE = (3, 3, 1)
NUM_CLASSES = 3
MODEL = mlp(INPUT_SHAPE, NUM_CLASSES, (4,))
K, S, B = 10, 2, 3  # K = 10 is not a multiple of 4 devices: padded to 12.
CHUNK = 2           # Per-device chunks of 2: 3 clients per device -> 2 chunks of 2.
SEED_KEY = 7
POPULATION, ROUNDS = 16, 2
BATCHING = Batching(num_steps=S, batch_size=B)

CONFIGS = {
    # User-level DP-FedAvg, central noise on.
    "dp_mean": lambda: (make_client_update(MODEL, optax.sgd(0.5)), dp_mean(0.3, 1.0, float(K))),
    # Example-level DP-SGD inside each client (ghost norms), FedAvg mean.
    "example_dp": lambda: (make_client_update(MODEL, optax.sgd(0.5), ExampleDP(0.5, 1.0, 3.0)),
                           weighted_mean()),
    # A custom combine (sum mod 2^b) with simulated dropouts.
    "secure_sum": lambda: (make_client_update(MODEL, optax.sgd(0.5)),
                           secure_sum(bits=24, scale=256.0, denominator=float(K), clip_norm=1.0,
                                      threshold=6, dropout_rate=0.2, max_cohort=K)),
}
# (config, backend) pairs the device test shards.
CASES = (("dp_mean", "vmap"), ("dp_mean", "chunked"), ("example_dp", "vmap"),
         ("example_dp", "chunked"), ("secure_sum", "chunked"))


@functools.cache
def get_config(name):
  return CONFIGS[name]()


def init_state(name):
  params = jit(MODEL.init)(jax.random.key(0))
  return server_init(params, optax.sgd(1.0), get_config(name)[1])


def make_batch(seed=1, num_clients=K, num_real=K - 1) -> ClientBatch:
  """A random cohort with ragged example masks; slots >= num_real are padding."""
  rng = np.random.default_rng(seed)
  return ClientBatch(
      x=rng.normal(size=(num_clients, S, B, *INPUT_SHAPE)).astype(np.float32),
      y=rng.integers(0, NUM_CLASSES, (num_clients, S, B)).astype(np.int32),
      example_mask=(rng.random((num_clients, S, B)) < 0.8).astype(np.float32),
      num_examples=rng.integers(1, 3 * S * B, num_clients).astype(np.int32),
      client_mask=(np.arange(num_clients) < num_real).astype(np.float32))


def make_population(seed=2, max_examples=8) -> CohortData:
  rng = np.random.default_rng(seed)
  return CohortData(
      x=rng.normal(size=(POPULATION, max_examples, *INPUT_SHAPE)).astype(np.float32),
      y=rng.integers(0, NUM_CLASSES, (POPULATION, max_examples)).astype(np.int32),
      num_examples=rng.integers(1, max_examples + 1, POPULATION).astype(np.int32),
      client_mask=np.ones(POPULATION, np.float32))


def cohort_indices(seed=3):
  """[R, K] indices (the last slot of each round padded) and masks, [R] keys."""
  rng = np.random.default_rng(seed)
  indices = np.stack([rng.permutation(POPULATION)[:K] for _ in range(ROUNDS)]).astype(np.int32)
  masks = np.ones((ROUNDS, K), np.float32)
  masks[:, -1] = 0.0
  indices[:, -1] = -1
  keys = jax.random.split(jax.random.key(11), ROUNDS)
  return indices, masks, keys


def host_value(leaf):
  """A replicated array's value, readable on every process (np.asarray is not, with several)."""
  return np.asarray(leaf.addressable_data(0)) if isinstance(leaf, jax.Array) else np.asarray(leaf)


def to_json(state, metrics) -> dict:
  """Params leaves, round and metrics as nested lists, the form a worker prints."""
  return {"params": [host_value(leaf).tolist() for leaf in jax.tree.leaves(state.params)],
          "round": int(host_value(state.round)),
          "metrics": {name: host_value(value).tolist() for name, value in metrics.items()}}
