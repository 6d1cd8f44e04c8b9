"""Tests for fedjax_priv.simulation.round and fedjax_priv.simulation.program.

Every jitted round is built once per (config, backend) and cached, and every
jitted function counts how often its Python body is traced, so the tests can
share compiles and the no-recompilation test can check the counters.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch, gather_cohort
from fedjax_priv.data.packing import CohortData
from fedjax_priv.models.zoo import logistic_regression, mlp
from fedjax_priv.privacy.aggregation import dp_mean, weighted_mean
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.simulation.program import Batching, round_from_cohort, rounds_on_device
from fedjax_priv.simulation.round import build_round, update_is_finite

# These tests check semantics, not speed: compiling at XLA's lowest backend
# optimisation level roughly halves CPU compile time, which dominates here.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

INPUT_SHAPE = (4, 4, 1)
NUM_CLASSES = 3
MLP = mlp(INPUT_SHAPE, NUM_CLASSES, (8,))
LOGREG = logistic_regression(INPUT_SHAPE, NUM_CLASSES)
K, S, B = 10, 2, 4
CHUNK = 4  # Does not divide K: the chunked backend pads 10 -> 12 slots.

# Sensitivity config: logistic regression started from zero params, so the new
# server params (server SGD, lr 1) are exactly the aggregated update.
SENS_CLIP, SENS_COHORT = 0.5, 8.0

CONFIGS = {
    # User-level DP-FedAvg with noise on.
    "dp_mean": lambda: (MLP, make_client_update(MLP, optax.sgd(0.5)),
                        dp_mean(0.3, 1.0, float(K)), optax.sgd(1.0)),
    # Example-level DP-SGD inside each client, FedAvg mean, adaptive server.
    "example_dp": lambda: (MLP, make_client_update(MLP, optax.sgd(0.5), ExampleDP(0.5, 1.0, 4.0)),
                           weighted_mean(), optax.adam(0.05)),
    # Plain FedAvg.
    "fedavg": lambda: (MLP, make_client_update(MLP, optax.sgd(0.5)),
                       weighted_mean("num_examples"), optax.sgd(1.0)),
    # dp_mean with noise off, for the sensitivity property.
    "sensitivity": lambda: (LOGREG, make_client_update(LOGREG, optax.sgd(1.0)),
                            dp_mean(SENS_CLIP, 0.0, SENS_COHORT), optax.sgd(1.0)),
}

TRACES: dict = {}


def counted_jit(name, fn):
  """jit(fn) that counts traces of fn's Python body in TRACES[name]."""
  TRACES[name] = 0

  def wrapper(*args):
    TRACES[name] += 1
    return fn(*args)

  return jit(wrapper)


@functools.cache
def get_config(config):
  return CONFIGS[config]()


@functools.cache
def get_round(config, backend):
  _, client_update, aggregator, server_opt = get_config(config)
  fn = build_round(client_update, aggregator, server_opt, backend, client_chunk_size=CHUNK)
  return fn if backend == "loop" else counted_jit((config, backend), fn)


@functools.cache
def initial_params(config):
  return jit(get_config(config)[0].init)(jax.random.key(0))


def init_state(config, zero_params=False):
  server_opt = get_config(config)[3]
  params = initial_params(config)
  if zero_params:
    params = tree_util.zeros_like(params)
  return server_init(params, server_opt)


def make_batch(seed, num_clients=K, num_real=None, x_scale=1.0) -> ClientBatch:
  """A random cohort with ragged example masks; slots >= num_real are padding."""
  num_real = num_clients if num_real is None else num_real
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_clients, S, B, *INPUT_SHAPE)) * x_scale
  y = rng.integers(0, NUM_CLASSES, (num_clients, S, B))
  example_mask = (rng.random((num_clients, S, B)) < 0.8).astype(np.float32)
  num_examples = rng.integers(1, 3 * S * B, num_clients)
  client_mask = (np.arange(num_clients) < num_real).astype(np.float32)
  return ClientBatch(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32),
                     jnp.asarray(example_mask), jnp.asarray(num_examples, jnp.int32),
                     jnp.asarray(client_mask))


def replace_client(batch: ClientBatch, k: int, **fields) -> ClientBatch:
  """Copy of `batch` with slot k's fields (x, y, example_mask, ...) replaced."""
  new = {}
  for name, value in batch._asdict().items():
    new[name] = value.at[k].set(fields[name]) if name in fields else value
  return ClientBatch(**new)


def append_garbage_slots(batch: ClientBatch, extra: int, seed: int) -> ClientBatch:
  """Appends `extra` padded slots (client_mask 0) full of huge random data."""
  rng = np.random.default_rng(seed)
  garbage = ClientBatch(
      x=jnp.asarray(rng.normal(size=(extra, *batch.x.shape[1:])) * 1e4, jnp.float32),
      y=jnp.asarray(rng.integers(0, NUM_CLASSES, (extra, S, B)), jnp.int32),
      example_mask=jnp.ones((extra, S, B), jnp.float32),
      num_examples=jnp.full((extra,), 1000, jnp.int32),
      client_mask=jnp.zeros((extra,), jnp.float32))
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch, garbage)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_metrics_close(a, b, rtol=1e-5, atol=1e-5):
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=rtol, atol=atol,
                               err_msg=name)


def tree_distance(a, b):
  return float(tree_util.l2_norm(tree_util.sub(a, b)))


# --- Backends agree -------------------------------------------------------------


@pytest.mark.parametrize("config", ["dp_mean", "example_dp"])
def test_backends_agree_with_noise(config):
  """vmap, chunked (chunk not dividing K) and loop give the same round, noise included."""
  state = init_state(config)
  batch = make_batch(seed=1, num_real=K - 1)  # One padded slot too.
  key = jax.random.key(7)
  results = {backend: get_round(config, backend)(state, batch, key)
             for backend in ("vmap", "chunked", "loop")}
  ref_state, ref_metrics = results["loop"]
  for backend in ("vmap", "chunked"):
    new_state, metrics = results[backend]
    assert_trees_close(new_state.params, ref_state.params)
    assert_trees_close(new_state.opt_state, ref_state.opt_state)
    assert int(new_state.round) == int(ref_state.round) == 1
    assert_metrics_close(metrics, ref_metrics)
  # The noise is really on: another key gives another result, so the agreement
  # above needed the backends' keys to line up.
  other_state, _ = get_round(config, "vmap")(state, batch, jax.random.key(8))
  assert tree_distance(other_state.params, ref_state.params) > 1e-3


# --- Padding invariance ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["vmap", "chunked"])
@pytest.mark.parametrize("config", ["dp_mean", "example_dp"])
def test_padded_client_slots_change_nothing(config, backend):
  """Appending padded slots (client_mask 0, huge garbage data) leaves the round unchanged."""
  round_fn = get_round(config, backend)
  state = init_state(config)
  batch = make_batch(seed=2)
  padded = append_garbage_slots(batch, extra=3, seed=3)
  key = jax.random.key(11)
  state_a, metrics_a = round_fn(state, batch, key)
  state_b, metrics_b = round_fn(state, padded, key)
  assert_trees_close(state_a.params, state_b.params, rtol=1e-6, atol=1e-7)
  assert_metrics_close(metrics_a, metrics_b, rtol=1e-6, atol=1e-7)
  assert float(metrics_b["clients"]) == K
  assert float(metrics_b["nonfinite_clients"]) == 0


# --- Non-finite clients ---------------------------------------------------------


def test_update_is_finite_rejects_nan_inf_and_norms_whose_square_overflows():
  """Finite means a finite squared L2 norm; integer and key leaves are skipped."""
  ok = {"w": jnp.ones((3, 2)), "b": jnp.array([1e19, -1e19])}  # Norm^2 2e38 < 3.4e38.
  state = {"count": jnp.array(2**31 - 1, jnp.int32), "key": jax.random.key(0)}
  assert bool(update_is_finite(ok, state))
  for bad in (np.nan, np.inf, -np.inf, 2e19):  # 2e19^2 = 4e38 overflows float32.
    assert not bool(update_is_finite({**ok, "b": ok["b"].at[0].set(bad)}, state)), bad
  nan_state = {**state, "c": jnp.array([np.nan])}
  assert not bool(update_is_finite(ok, nan_state))
  # Compiled and vmapped, as the round runs it.
  rows = jnp.array([[1e19, -1e19], [1.0, jnp.nan], [3e19, 0.0], [0.0, 0.0]])
  flags = jax.jit(jax.vmap(lambda row: update_is_finite(row, ())))(rows)
  np.testing.assert_array_equal(flags, [True, False, False, True])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, 3e19])  # 3e19: a finite delta, norm^2 > 3.4e38.
@pytest.mark.parametrize("config", ["fedavg", "dp_mean"])
def test_nonfinite_client_is_excluded(config, bad_value):
  """A client whose update is NaN, inf or too large to square is zeroed, counted, and
  equals an absent client."""
  round_fn = get_round(config, "vmap")
  state = init_state(config)
  batch = make_batch(seed=4)
  bad = 3
  x_bad = batch.x[bad].at[0, 0].set(bad_value)
  mask_bad = batch.example_mask[bad].at[0, 0].set(1.0)
  broken = replace_client(batch, bad, x=x_bad, example_mask=mask_bad)
  absent = replace_client(batch, bad, client_mask=0.0)
  key = jax.random.key(5)

  state_broken, metrics_broken = round_fn(state, broken, key)
  state_absent, metrics_absent = round_fn(state, absent, key)

  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(state_broken.params))
  assert float(metrics_broken["nonfinite_clients"]) == 1
  assert float(metrics_absent["nonfinite_clients"]) == 0
  assert float(metrics_broken["clients"]) == float(metrics_absent["clients"]) == K - 1
  assert np.isfinite(float(metrics_broken["train_loss"]))
  assert_trees_close(state_broken.params, state_absent.params, rtol=1e-6, atol=1e-7)
  # Every metric, the aggregator's per-client stats (delta_norm, ...) included:
  # prepare saw the broken delta, and nothing it reported may leak.
  assert_metrics_close({**metrics_broken, "nonfinite_clients": 0.0}, metrics_absent, rtol=1e-6,
                       atol=1e-7)


# --- Aggregation against a hand computation --------------------------------------


def per_client_deltas(config, state, batch, key):
  """Each client's delta from the single-client function, with the round's keys."""
  _, client_update, _, _ = get_config(config)
  client_key, _ = jax.random.split(key)
  one = jit(client_update)
  return [one(state.params, batch.x[k], batch.y[k], batch.example_mask[k],
              jax.random.fold_in(client_key, k))[0] for k in range(batch.x.shape[0])]


def test_dp_mean_round_divides_clipped_sum_by_expected_cohort_size():
  """With sigma=0, the update is sum of real clients' clipped deltas / expected size."""
  config = "sensitivity"
  state = init_state(config, zero_params=True)
  batch = make_batch(seed=6, num_clients=8, num_real=5, x_scale=3.0)
  key = jax.random.key(0)
  new_state, metrics = get_round(config, "vmap")(state, batch, key)
  deltas = per_client_deltas(config, state, batch, key)
  expected = tree_util.zeros_like(state.params)
  for k in range(5):
    expected = tree_util.add(expected, clip_by_l2_norm(deltas[k], SENS_CLIP)[0])
  expected = tree_util.scale(expected, 1.0 / SENS_COHORT)
  assert_trees_close(new_state.params, expected, rtol=1e-5, atol=1e-6)
  assert float(metrics["clients"]) == 5


def test_weighted_mean_round_weights_by_num_examples():
  """FedAvg's update is sum_k n_k delta_k / sum_k n_k over the real clients."""
  config = "fedavg"
  state = init_state(config)
  batch = make_batch(seed=8, num_real=K - 2)
  key = jax.random.key(1)
  new_state, _ = get_round(config, "vmap")(state, batch, key)
  deltas = per_client_deltas(config, state, batch, key)
  n = np.asarray(batch.num_examples, np.float64) * np.asarray(batch.client_mask)
  expected = tree_util.zeros_like(state.params)
  for k in range(K):
    expected = tree_util.add(expected, tree_util.scale(deltas[k], float(n[k] / n.sum())))
  assert_trees_close(new_state.params, tree_util.add(state.params, expected))


# --- Sensitivity of dp_mean -------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["replace", "remove", "add"]),
       client=st.integers(0, 6), log_scale=st.floats(0.0, 4.0))
def test_dp_mean_sensitivity(seed, mode, client, log_scale):
  """sigma=0: add/remove one client moves the update <= C/m, replacing one <= 2C/m."""
  round_fn = get_round("sensitivity", "vmap")
  state = init_state("sensitivity", zero_params=True)
  base = make_batch(seed, num_clients=8, num_real=7)  # Slot 7 is padding.
  rng = np.random.default_rng(seed + 1)
  new_data = dict(
      x=jnp.asarray(rng.normal(size=base.x.shape[1:]) * 10.0**log_scale, jnp.float32),
      y=jnp.asarray(rng.integers(0, NUM_CLASSES, (S, B)), jnp.int32),
      example_mask=jnp.ones((S, B), jnp.float32))
  if mode == "replace":
    neighbour = replace_client(base, client, **new_data)
  elif mode == "remove":
    neighbour = replace_client(base, client, client_mask=0.0)
  else:
    neighbour = replace_client(base, 7, client_mask=1.0, **new_data)
  key = jax.random.key(seed % 1000)
  # Zero start params and server SGD with lr 1: new params == the update.
  update_a = round_fn(state, base, key)[0].params
  update_b = round_fn(state, neighbour, key)[0].params
  bound = (2.0 if mode == "replace" else 1.0) * SENS_CLIP / SENS_COHORT
  assert tree_distance(update_a, update_b) <= bound + 1e-6


def test_dp_mean_sensitivity_is_attained_by_a_large_client():
  """Removing a client whose delta exceeds C moves the update by exactly C/m (clipping active)."""
  round_fn = get_round("sensitivity", "vmap")
  state = init_state("sensitivity", zero_params=True)
  base = make_batch(seed=9, num_clients=8, num_real=7)
  big = replace_client(base, 0, x=base.x[0] * 1e3, example_mask=jnp.ones((S, B)))
  removed = replace_client(big, 0, client_mask=0.0)
  key = jax.random.key(3)
  distance = tree_distance(round_fn(state, big, key)[0].params,
                           round_fn(state, removed, key)[0].params)
  np.testing.assert_allclose(distance, SENS_CLIP / SENS_COHORT, rtol=1e-5)


# --- No recompilation -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["vmap", "chunked"])
def test_second_round_does_not_recompile(backend):
  """Rounds 2 and 3 (state from the previous round, new data and key) reuse round 1's compile."""
  config = "example_dp"  # Adam on the server: its state feeds back into round 2.
  round_fn = get_round(config, backend)
  state = init_state(config)
  before = TRACES[(config, backend)]
  state, _ = round_fn(state, make_batch(seed=20), jax.random.key(20))
  traces, cache = TRACES[(config, backend)], round_fn._cache_size()
  assert traces <= before + 1  # Round 1 traces at most once (the jit may be warm already).
  state, _ = round_fn(state, make_batch(seed=21), jax.random.key(21))
  state, _ = round_fn(state, make_batch(seed=22), jax.random.key(22))
  assert TRACES[(config, backend)] == traces
  assert round_fn._cache_size() == cache
  assert int(state.round) == 3


# --- Where the update is written out -----------------------------------------------


def test_cpu_round_finalizes_in_a_conditional_unless_the_aggregator_state_is_large():
  """On CPU the round keeps one conditional around `finalize` (XLA:CPU then computes
  a noisy update once for the server step and update_norm, instead of splitting its
  noise between them); an aggregator whose state is larger than the update calls
  `finalize` directly, since the conditional's outputs would copy that state.
  Other platforms always call it directly."""
  _, client_update, aggregator, server_opt = get_config("dp_mean")
  batch, key = make_batch(seed=30), jax.random.key(30)

  def conditionals(agg):
    round_fn = build_round(client_update, agg, server_opt, "vmap")
    state = server_init(initial_params("dp_mean"), server_opt, agg)
    return jit(round_fn).lower(state, batch, key).compile().as_text().count(" conditional(")

  big = jnp.zeros(2 * sum(leaf.size for leaf in jax.tree.leaves(initial_params("dp_mean"))))
  with_big_state = aggregator._replace(
      init=lambda params: big,
      finalize=lambda state, total, weight, ctx: aggregator.finalize((), total, weight, ctx)[:1]
      + (state + 1.0, {}))
  assert conditionals(aggregator) == (1 if jax.default_backend() == "cpu" else 0)
  assert conditionals(with_big_state) == 0


# --- Multi-round program -----------------------------------------------------------

POP_CLIENTS, POP_MAX, R, COHORT = 7, 8, 3, 4
BATCHING = Batching(num_steps=S, batch_size=B)


def make_population(seed):
  rng = np.random.default_rng(seed)
  num_examples = rng.integers(0, POP_MAX + 1, POP_CLIENTS)
  valid = np.arange(POP_MAX)[None, :] < num_examples[:, None]
  x = rng.normal(size=(POP_CLIENTS, POP_MAX, *INPUT_SHAPE)) * valid[..., None, None, None]
  y = rng.integers(0, NUM_CLASSES, (POP_CLIENTS, POP_MAX)) * valid
  return CohortData(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32),
                    jnp.asarray(num_examples, jnp.int32), jnp.ones(POP_CLIENTS, jnp.float32))


def make_schedule(seed):
  """[R, K] cohort indices (-1 in padded slots), masks and [R] keys."""
  rng = np.random.default_rng(seed)
  indices = np.stack([rng.permutation(POP_CLIENTS)[:COHORT] for _ in range(R)])
  masks = np.ones((R, COHORT), np.float32)
  masks[1, -1] = 0.0  # Round 2 has a padded slot.
  indices[masks == 0] = -1
  keys = jax.random.split(jax.random.key(seed), R)
  return jnp.asarray(indices, jnp.int32), jnp.asarray(masks), keys


@functools.cache
def get_program():
  _, client_update, aggregator, server_opt = get_config("dp_mean")
  round_fn = build_round(client_update, aggregator, server_opt, "vmap")
  return (counted_jit("rounds_on_device", rounds_on_device(round_fn, BATCHING)),
          jit(round_from_cohort(round_fn, BATCHING)))


def test_rounds_on_device_equals_repeated_round_from_cohort():
  """A lax.scan over R=3 rounds equals R calls of round_from_cohort with the same keys."""
  scan_fn, one_round = get_program()
  population = make_population(30)
  indices, masks, keys = make_schedule(31)
  state0 = init_state("dp_mean")
  scanned_state, scanned_metrics = scan_fn(state0, population, indices, masks, keys)

  state = state0
  for r in range(R):
    cohort = gather_cohort(population, indices[r], masks[r])
    state, metrics = one_round(state, cohort, keys[r])
    for name, value in metrics.items():
      np.testing.assert_allclose(scanned_metrics[name][r], value, rtol=1e-5, atol=1e-6,
                                 err_msg=f"round {r}: {name}")
  assert_trees_close(scanned_state.params, state.params)
  assert int(scanned_state.round) == R
  np.testing.assert_array_equal(scanned_metrics["clients"], [COHORT, COHORT - 1, COHORT])


def test_rounds_on_device_does_not_recompile():
  """Calling the multi-round program again with a new schedule and state reuses the compile."""
  scan_fn, _ = get_program()
  state = init_state("dp_mean")
  before = TRACES["rounds_on_device"]
  state, _ = scan_fn(state, make_population(40), *make_schedule(41))
  traces, cache = TRACES["rounds_on_device"], scan_fn._cache_size()
  assert traces <= before + 1 and cache == 1
  state, _ = scan_fn(state, make_population(42), *make_schedule(43))
  assert TRACES["rounds_on_device"] == traces
  assert scan_fn._cache_size() == cache
  assert int(state.round) == 2 * R
