"""Tests for SCAFFOLD (option II) and the stateful round builder, against a hand-written loop."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.scaffold import (ScaffoldState, init_client_controls,
                                             make_scaffold_client_update, scaffold_aggregator)
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.privacy.aggregation import dp_mean, weighted_mean
from fedjax_priv.simulation.round import BACKENDS, build_stateful_round

sys.path.insert(0, str(Path(__file__).parent))
from _logreg_reference import logreg_grad  # noqa: E402

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

D, C = 4, 3
LOGREG = logistic_regression((D,), C)
N, K, S, B = 6, 5, 2, 3   # Population 6; 5 slots: 3 real clients + 2 padded.
LR, SERVER_LR = 0.3, 0.8
FRACTION = 3 / N
# Per round: the real clients' ids, then the padded slots' ids, which point at
# clients outside the cohort (or out of range) whose state must not move.
COHORTS = [([0, 2, 4], [1, -1]), ([1, 2, 5], [3, 0]), ([5, 0, 3], [2, 7])]
EMPTY = (1, 2)      # Round 1, slot 2 (client 5): no real example, so K = 0 steps.
NONFINITE = (2, 1)  # Round 2, slot 1 (client 0): a NaN in a real example.


def make_round_data(round_index):
  rng = np.random.default_rng(round_index)
  real, padded = COHORTS[round_index]
  x = rng.normal(size=(K, S, B, D)).astype(np.float32)
  y = rng.integers(0, C, (K, S, B))
  mask = (rng.random((K, S, B)) < 0.8).astype(np.float32)
  mask[:, :, 0] = 1.0
  mask[0, 1] = 0.0  # One empty step for the first client: it takes K = 1 step.
  if EMPTY[0] == round_index:
    mask[EMPTY[1]] = 0.0
  if NONFINITE[0] == round_index:
    x[NONFINITE[1], 0, 0, 0] = np.nan
  batch = ClientBatch(jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(mask),
                      jnp.full((K,), 10, jnp.int32),
                      jnp.asarray(np.arange(K) < len(real), jnp.float32))
  return batch, jnp.asarray(real + padded, jnp.int32)


def reference(params, rounds):
  """SCAFFOLD option II written out per client in float64 (Karimireddy et al. 2020, Alg. 1)."""
  x = [np.asarray(params["Dense_0"][name], np.float64) for name in ("kernel", "bias")]
  c = [np.zeros_like(v) for v in x]
  ci = [[np.zeros_like(v) for v in x] for _ in range(N)]
  for r in range(rounds):
    batch, ids = make_round_data(r)
    dys, dcs = [], []
    for slot, client in enumerate(COHORTS[r][0]):
      if (r, slot) == NONFINITE:
        continue  # Its update is not finite: excluded, its state kept.
      data = [np.asarray(a[slot], np.float64) for a in (batch.x, batch.y, batch.example_mask)]
      y, steps = [v.copy() for v in x], 0
      for s in range(S):
        if data[2][s].sum() == 0:
          continue
        grad = logreg_grad(*y, data[0][s], data[1][s].astype(int), data[2][s])
        y = [yv - LR * (g + cv - civ) for yv, g, cv, civ in zip(y, grad, c, ci[client])]
        steps += 1
      new_ci = ci[client] if steps == 0 else [
          civ - cv + (xv - yv) / (steps * LR) for civ, cv, xv, yv in zip(ci[client], c, x, y)]
      dys.append([yv - xv for yv, xv in zip(y, x)])
      dcs.append([n - o for n, o in zip(new_ci, ci[client])])
      ci[client] = new_ci
    x = [xv + SERVER_LR * np.mean([d[i] for d in dys], 0) for i, xv in enumerate(x)]
    c = [cv + FRACTION * np.mean([d[i] for d in dcs], 0) for i, cv in enumerate(c)]
  return x, c, ci


@functools.cache
def scaffold_round(backend):
  fn = build_stateful_round(make_scaffold_client_update(LOGREG, LR),
                            scaffold_aggregator(weighted_mean("uniform"), FRACTION),
                            optax.sgd(SERVER_LR), backend, client_chunk_size=2)
  return fn if backend == "loop" else jit(fn)


def initial(seed=0):
  params = LOGREG.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)
  aggregator = scaffold_aggregator(weighted_mean("uniform"), FRACTION)
  return params, server_init(params, optax.sgd(SERVER_LR), aggregator)


def run_rounds(backend, rounds=3):
  params, state = initial()
  controls = init_client_controls(params, N)
  history = []
  for r in range(rounds):
    batch, ids = make_round_data(r)
    state, controls, metrics = scaffold_round(backend)(state, controls, batch, ids,
                                                       jax.random.key(r))
    history.append(metrics)
  return params, state, controls, history


@pytest.fixture(scope="module")
def runs():
  return {backend: run_rounds(backend) for backend in BACKENDS}


def as_pair(tree):
  return [np.asarray(tree["Dense_0"][name]) for name in ("kernel", "bias")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_rounds_match_the_hand_written_loop(runs, backend):
  params, state, controls, history = runs[backend]
  want_x, want_c, want_ci = reference(params, 3)
  for got, want in zip(as_pair(state.params), want_x):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  assert isinstance(state.aggregator_state, ScaffoldState)
  for got, want in zip(as_pair(state.aggregator_state.control), want_c):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  for client in range(N):
    rows = [leaf[client] for leaf in as_pair(controls)]
    for got, want in zip(rows, want_ci[client]):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=f"client {client}")
  assert [float(m["nonfinite_clients"]) for m in history] == [0.0, 0.0, 1.0]
  assert [float(m["clients"]) for m in history] == [3.0, 3.0, 2.0]


def test_every_client_that_trained_moved_its_control(runs):
  """Each client trained at least once (0 in round 0, 5 and 3 in round 2); all controls moved."""
  params, state, controls, _ = runs["vmap"]
  moved = [float(np.abs(np.asarray(controls["Dense_0"]["kernel"][i])).max()) for i in range(N)]
  assert all(m > 1e-4 for m in moved), moved
  # The correction matters: the run's params are not the initial ones.
  assert np.abs(as_pair(state.params)[0] - np.asarray(params["Dense_0"]["kernel"])).max() > 1e-3


def test_first_round_equals_fedavg():
  """With zero control variates SCAFFOLD's first round is FedAvg's."""
  params, state = initial()
  batch, ids = make_round_data(0)
  new_state, _, _ = scaffold_round("vmap")(state, init_client_controls(params, N), batch, ids,
                                           jax.random.key(0))
  fedavg = make_client_update(LOGREG, optax.sgd(LR))
  deltas = [fedavg(params, batch.x[k], batch.y[k], batch.example_mask[k], jax.random.key(0))[0]
            for k in range(3)]
  for name in ("kernel", "bias"):
    want = np.asarray(params["Dense_0"][name]) + SERVER_LR * np.mean(
        [np.asarray(d["Dense_0"][name]) for d in deltas], 0)
    np.testing.assert_allclose(np.asarray(new_state.params["Dense_0"][name]), want, rtol=1e-5,
                               atol=1e-6)


def test_bad_inputs_are_refused_before_compiling():
  params, state = initial()
  batch, ids = make_round_data(0)
  controls = init_client_controls(params, N)
  round_fn = build_stateful_round(make_scaffold_client_update(LOGREG, LR),
                                  scaffold_aggregator(weighted_mean("uniform"), FRACTION),
                                  optax.sgd(1.0), "vmap")
  with pytest.raises(ValueError, match="client_ids"):
    round_fn(state, controls, batch, ids[:3], jax.random.key(0))
  with pytest.raises(ValueError, match="client_states"):
    round_fn(state, {"a": jnp.zeros((N, 2)), "b": jnp.zeros((N + 1, 2))}, batch, ids,
             jax.random.key(0))
  with pytest.raises(ValueError, match="ScaffoldState"):
    plain = server_init(params, optax.sgd(1.0), weighted_mean())
    build_stateful_round(make_scaffold_client_update(LOGREG, LR), weighted_mean(),
                         optax.sgd(1.0), "vmap")(plain, controls, batch, ids, jax.random.key(0))
  with pytest.raises(ValueError, match="cohort_fraction"):
    scaffold_aggregator(weighted_mean(), 1.5)
  with pytest.raises(ValueError, match="learning_rate"):
    make_scaffold_client_update(LOGREG, 0.0)


def test_dp_mean_clips_the_model_and_control_uploads_jointly():
  """Under dp_mean the pair (dy, dc) is one clipped upload: its joint norm is at most C."""
  clip, cohort = 0.05, 3.0
  params, _ = initial()
  aggregator = scaffold_aggregator(dp_mean(clip, 0.0, cohort), FRACTION)
  state = server_init(params, optax.sgd(1.0), aggregator)
  batch, ids = make_round_data(0)
  one_client = batch._replace(client_mask=jnp.asarray([1, 0, 0, 0, 0], jnp.float32))
  round_fn = jit(build_stateful_round(make_scaffold_client_update(LOGREG, LR), aggregator,
                                      optax.sgd(1.0), "vmap"))
  new_state, _, metrics = round_fn(state, init_client_controls(params, N), one_client, ids,
                                   jax.random.key(0))
  dy = [g - w for g, w in zip(as_pair(new_state.params), as_pair(params))]
  dc = as_pair(new_state.aggregator_state.control)
  # Server lr 1: x moves by sum / cohort; c moves by FRACTION * sum / cohort.
  joint = np.sqrt(sum(np.sum((cohort * d) ** 2) for d in dy) +
                  sum(np.sum((cohort * d / FRACTION) ** 2) for d in dc))
  assert float(metrics["delta_norm"]) > clip  # The upload was clipped...
  np.testing.assert_allclose(joint, clip, rtol=1e-4)  # ...to norm C, jointly.
