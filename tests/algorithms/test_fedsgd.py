"""Tests for FedSGD: FedAvg with one full-batch gradient step of rate 1 and a server step eta."""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_priv.algorithms.client_update import make_client_update, make_fedsgd_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.privacy.aggregation import weighted_mean
from fedjax_priv.simulation.round import BACKENDS, build_round

sys.path.insert(0, str(Path(__file__).parent))
from _logreg_reference import logreg_grad  # noqa: E402

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

D, C = 4, 3
LOGREG = logistic_regression((D,), C)
K, S, B = 4, 2, 3  # 3 real clients and one padded slot.
ETA = 0.6


def make_batch(seed):
  """Each client's n_k examples fill its first n_k slots once; the rest are masked."""
  rng = np.random.default_rng(seed)
  sizes = np.array([6, 2, 5, 0])
  mask = (np.arange(S * B)[None, :] < sizes[:, None]).astype(np.float32).reshape(K, S, B)
  return ClientBatch(jnp.asarray(rng.normal(size=(K, S, B, D)), jnp.float32),
                     jnp.asarray(rng.integers(0, C, (K, S, B)), jnp.int32), jnp.asarray(mask),
                     jnp.asarray(sizes, jnp.int32), jnp.asarray([1, 1, 1, 0], jnp.float32))


def random_params(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                      LOGREG.init(jax.random.key(seed)))


def test_fedsgd_round_is_a_server_gradient_step_on_the_pooled_gradient():
  params, batch = random_params(0), make_batch(1)
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  sizes = np.asarray(batch.num_examples[:3], np.float64)
  grads = [logreg_grad(w, b, np.asarray(batch.x[k], np.float64).reshape(-1, D),
                       np.asarray(batch.y[k]).reshape(-1),
                       np.asarray(batch.example_mask[k], np.float64).reshape(-1))
           for k in range(3)]
  want_w = w - ETA * sum(n * g[0] for n, g in zip(sizes, grads)) / sizes.sum()
  want_b = b - ETA * sum(n * g[1] for n, g in zip(sizes, grads)) / sizes.sum()
  state = server_init(params, optax.sgd(ETA))
  for backend in BACKENDS:
    fn = build_round(make_fedsgd_client_update(LOGREG), weighted_mean("num_examples"),
                     optax.sgd(ETA), backend, client_chunk_size=3)
    new_state, metrics = (fn if backend == "loop" else jit(fn))(state, batch, jax.random.key(2))
    np.testing.assert_allclose(np.asarray(new_state.params["Dense_0"]["kernel"]), want_w,
                               rtol=1e-5, atol=1e-6, err_msg=backend)
    np.testing.assert_allclose(np.asarray(new_state.params["Dense_0"]["bias"]), want_b,
                               rtol=1e-5, atol=1e-6, err_msg=backend)
    assert float(metrics["examples_seen"]) == 13.0


def test_fedsgd_client_is_fedavg_with_one_full_batch_step_of_rate_one():
  params, batch = random_params(3), make_batch(4)
  fedsgd = jit(make_fedsgd_client_update(LOGREG))
  fedavg = jit(make_client_update(LOGREG, optax.sgd(1.0)))
  merge = lambda a: a.reshape(1, S * B, *a.shape[2:])
  for k in range(3):
    got, metrics = fedsgd(params, batch.x[k], batch.y[k], batch.example_mask[k], jax.random.key(0))
    want, _ = fedavg(params, merge(batch.x[k]), merge(batch.y[k]), merge(batch.example_mask[k]),
                     jax.random.key(0))
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
    assert float(metrics.steps_taken) == 1.0
