"""FedAdam, FedYogi and FedAdagrad (Reddi et al. 2021): optax server optimizers on -mean_delta.

One round of each is checked against the optimizer's update written out by
hand (adaptivity tau = eps = 1e-3, as in the paper), under every backend.
"""

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv.algorithms.client_update import make_client_update
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
K, B = 4, 5  # One local step per client; slot 3 is padding.
CLIENT_LR, SERVER_LR, TAU, B1, B2 = 0.5, 0.1, 1e-3, 0.9, 0.99


def adam_step(g):
  # Bias-corrected first step: m_hat = g, v_hat = g^2.
  return -SERVER_LR * g / (np.abs(g) + TAU)


def yogi_step(g):
  init = 1e-6  # optax's initial accumulator for both moments.
  m = B1 * init + (1 - B1) * g
  v = init - (1 - B2) * np.sign(init - g * g) * g * g
  return -SERVER_LR * (m / (1 - B1)) / (np.sqrt(v / (1 - B2)) + TAU)


def adagrad_step(g):
  return -SERVER_LR * g / np.sqrt(0.1 + g * g + TAU)  # optax's initial accumulator is 0.1.


OPTIMIZERS = {
    "adam": (lambda: optax.adam(SERVER_LR, b1=B1, b2=B2, eps=TAU), adam_step),
    "yogi": (lambda: optax.yogi(SERVER_LR, b1=B1, b2=B2, eps=TAU), yogi_step),
    "adagrad": (lambda: optax.adagrad(SERVER_LR, eps=TAU), adagrad_step),
}


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
                        LOGREG.init(jax.random.key(0)))
  mask = (rng.random((K, 1, B)) < 0.8).astype(np.float32)
  mask[:, :, 0] = 1.0
  batch = ClientBatch(jnp.asarray(rng.normal(size=(K, 1, B, D)), jnp.float32),
                      jnp.asarray(rng.integers(0, C, (K, 1, B)), jnp.int32), jnp.asarray(mask),
                      jnp.asarray([3, 7, 5, 9], jnp.int32), jnp.asarray([1, 1, 1, 0], jnp.float32))
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  sizes = np.asarray(batch.num_examples[:3], np.float64)
  grads = [logreg_grad(w, b, np.asarray(batch.x[k, 0], np.float64), np.asarray(batch.y[k, 0]),
                       np.asarray(batch.example_mask[k, 0], np.float64)) for k in range(3)]
  # One SGD step per client: delta_k = -lr * grad_k; the FedAvg mean weights by n_k.
  mean_delta = [-CLIENT_LR * sum(n * g[i] for n, g in zip(sizes, grads)) / sizes.sum()
                for i in range(2)]
  return params, batch, (w, b), mean_delta


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_one_round_matches_the_hand_written_update(setup, name):
  params, batch, (w, b), mean_delta = setup
  make_optimizer, hand_step = OPTIMIZERS[name]
  want = [v + hand_step(-d) for v, d in zip((w, b), mean_delta)]  # Pseudo-gradient -mean_delta.
  results = {}
  for backend in BACKENDS:
    fn = build_round(make_client_update(LOGREG, optax.sgd(CLIENT_LR)), weighted_mean(),
                     make_optimizer(), backend, client_chunk_size=3)
    state = server_init(params, make_optimizer())
    results[backend], _ = (fn if backend == "loop" else jit(fn))(state, batch, jax.random.key(1))
  for backend, state in results.items():
    for got, expected in zip((state.params["Dense_0"]["kernel"], state.params["Dense_0"]["bias"]),
                             want):
      np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-6,
                                 err_msg=f"{name} {backend}")
    # The optimizer state advanced too, identically under every backend.
    for u, v in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(results["loop"].opt_state)):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-7)
