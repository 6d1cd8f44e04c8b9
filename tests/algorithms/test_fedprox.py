"""Tests for FedProx: the proximal term, its client update and its rounds under every backend."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.fedprox import proximal_gradient, proximal_term
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression, mlp
from fedjax_priv.privacy.aggregation import weighted_mean
from fedjax_priv.simulation.round import BACKENDS, build_round

sys.path.insert(0, str(Path(__file__).parent))
from _logreg_reference import logreg_grad  # noqa: E402

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

D, C = 5, 3
LOGREG = logistic_regression((D,), C)
LR, MU = 0.4, 0.7
K, S, B = 5, 3, 4


def random_params(seed):
  params = LOGREG.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), params)


def make_batch(seed, num_real=K):
  rng = np.random.default_rng(seed)
  mask = (rng.random((K, S, B)) < 0.8).astype(np.float32)
  mask[1, 2] = 0.0  # A client with an empty (padded) step.
  return ClientBatch(jnp.asarray(rng.normal(size=(K, S, B, D)), jnp.float32),
                     jnp.asarray(rng.integers(0, C, (K, S, B)), jnp.int32), jnp.asarray(mask),
                     jnp.asarray(rng.integers(1, 20, K), jnp.int32),
                     jnp.asarray(np.arange(K) < num_real, jnp.float32))


def test_proximal_gradient_is_the_exact_gradient_of_the_term():
  model = mlp((D,), C, (4,))
  params, anchor = model.init(jax.random.key(0)), model.init(jax.random.key(1))
  by_autodiff = jax.grad(proximal_term)(params, anchor, MU)
  by_formula = proximal_gradient(params, anchor, MU)
  for u, v in zip(jax.tree.leaves(by_autodiff), jax.tree.leaves(by_formula)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
  value = float(proximal_term(params, anchor, MU))
  expected = 0.5 * MU * sum(np.sum((np.asarray(p) - np.asarray(a)) ** 2) for p, a in
                            zip(jax.tree.leaves(params), jax.tree.leaves(anchor)))
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_two_local_steps_match_a_hand_computation():
  params = random_params(0)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, B, D)).astype(np.float32)
  y = rng.integers(0, C, (2, B))
  mask = np.array([[1, 1, 0, 1], [1, 0, 1, 1]], np.float32)
  delta, metrics = jit(make_client_update(LOGREG, optax.sgd(LR), proximal_mu=MU))(
      params, jnp.asarray(x), jnp.asarray(y, jnp.int32), jnp.asarray(mask), jax.random.key(0))
  w0 = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b0 = np.asarray(params["Dense_0"]["bias"], np.float64)
  w, b = w0.copy(), b0.copy()
  for step in range(2):
    gw, gb = logreg_grad(w, b, x[step].astype(np.float64), y[step], mask[step])
    w, b = w - LR * (gw + MU * (w - w0)), b - LR * (gb + MU * (b - b0))
  np.testing.assert_allclose(np.asarray(delta["Dense_0"]["kernel"]), w - w0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(delta["Dense_0"]["bias"]), b - b0, rtol=1e-5, atol=1e-6)
  assert float(metrics.steps_taken) == 2.0


def test_mu_zero_equals_fedavg_even_when_traced():
  params = random_params(2)
  batch = make_batch(3)
  fedavg = jit(make_client_update(LOGREG, optax.sgd(LR)))
  # A traced mu takes the proximal code path, which must then add exactly zero.
  traced = jit(lambda mu, *args: make_client_update(LOGREG, optax.sgd(LR), proximal_mu=mu)(*args))
  for k in range(2):
    args = (params, batch.x[k], batch.y[k], batch.example_mask[k], jax.random.key(k))
    want, _ = fedavg(*args)
    got, _ = traced(jnp.float32(0.0), *args)
    for u, v in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      # Equal up to fusion order (1 ulp was seen on an H100), not bit for bit.
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
    moved, _ = traced(jnp.float32(MU), *args)
    assert tree_util.l2_norm(tree_util.sub(moved, want)) > 1e-4


def test_proximal_term_shrinks_client_drift():
  params = random_params(4)
  batch = make_batch(5)
  args = (params, batch.x[0], batch.y[0], batch.example_mask[0], jax.random.key(0))
  norms = [float(tree_util.l2_norm(jit(make_client_update(LOGREG, optax.sgd(LR),
                                                          proximal_mu=mu))(*args)[0]))
           for mu in (0.0, 0.5, 2.0)]
  assert norms[0] > norms[1] > norms[2] > 0


@functools.cache
def fedprox_round(backend):
  fn = build_round(make_client_update(LOGREG, optax.sgd(LR), proximal_mu=MU), weighted_mean(),
                   optax.sgd(1.0), backend, client_chunk_size=2)
  return fn if backend == "loop" else jit(fn)


def test_fedprox_round_agrees_across_backends_and_matches_client_mean():
  params = random_params(6)
  batch = make_batch(7, num_real=4)  # Slot 4 is padding; chunk 2 pads 5 -> 6 slots.
  state = server_init(params, optax.sgd(1.0))
  results = {backend: fedprox_round(backend)(state, batch, jax.random.key(8))
             for backend in BACKENDS}
  client = jit(make_client_update(LOGREG, optax.sgd(LR), proximal_mu=MU))
  deltas = [client(params, batch.x[k], batch.y[k], batch.example_mask[k], jax.random.key(0))[0]
            for k in range(4)]
  weights = np.asarray(batch.num_examples[:4], np.float64)
  expected = jax.tree.map(lambda p, *d: np.asarray(p) + np.tensordot(
      weights / weights.sum(), np.stack([np.asarray(x) for x in d]), 1), params, *deltas)
  for backend, (new_state, metrics) in results.items():
    for u, v in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(np.asarray(u), v, rtol=1e-5, atol=1e-6, err_msg=backend)
    assert float(metrics["clients"]) == 4.0


@pytest.mark.parametrize("mu", [-0.1, float("nan")])
def test_negative_mu_is_refused(mu):
  with pytest.raises(ValueError, match="proximal_mu"):
    make_client_update(LOGREG, optax.sgd(LR), proximal_mu=mu)
