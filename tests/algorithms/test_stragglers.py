"""Tests for stragglers (FedProx's systems heterogeneity): the draw, both policies, all backends."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.algorithms.stragglers import apply_stragglers, straggler_steps, with_stragglers
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.privacy.aggregation import weighted_mean
from fedjax_priv.simulation.round import BACKENDS, build_round

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

D, C = 4, 3
LOGREG = logistic_regression((D,), C)
K, S, B = 6, 4, 3  # 5 real clients and one padded slot.
FRACTION = 0.5     # floor(0.5 * 5) = 2 stragglers per round.


def make_batch(seed):
  rng = np.random.default_rng(seed)
  return ClientBatch(jnp.asarray(rng.normal(size=(K, S, B, D)), jnp.float32),
                     jnp.asarray(rng.integers(0, C, (K, S, B)), jnp.int32),
                     jnp.ones((K, S, B), jnp.float32),
                     jnp.asarray(rng.integers(1, 9, K), jnp.int32),
                     jnp.asarray(np.arange(K) < 5, jnp.float32))


def test_draw_picks_the_fraction_of_real_clients_and_uniform_step_counts():
  client_mask = jnp.asarray(np.arange(K) < 5, jnp.float32)
  keys = jax.random.split(jax.random.key(0), 4000)
  draw = jax.jit(jax.vmap(lambda k: straggler_steps(k, client_mask, S, FRACTION)))
  steps, stragglers = draw(keys)
  steps, stragglers = np.asarray(steps), np.asarray(stragglers)
  np.testing.assert_array_equal(stragglers.sum(1), 2.0)
  assert stragglers[:, 5].sum() == 0  # Padding never straggles.
  np.testing.assert_allclose(stragglers[:, :5].mean(0), 0.4, atol=0.03)  # Uniform choice.
  assert np.all(steps[stragglers == 0] == S)
  counts = np.bincount(steps[stragglers == 1], minlength=S + 1)[1:]
  np.testing.assert_allclose(counts / counts.sum(), 1.0 / S, atol=0.02)  # Uniform in [1, S].


def test_partial_work_equals_training_on_the_first_steps_only():
  """Masked steps leave params and optimizer state untouched (Adam moves on zero gradients)."""
  batch = make_batch(1)
  partial, stragglers = apply_stragglers(batch, jax.random.key(2), FRACTION, "partial")
  steps = np.asarray(partial.example_mask.sum(2) > 0).sum(1)
  params = LOGREG.init(jax.random.key(0))
  client = make_client_update(LOGREG, optax.adam(0.1))
  for k in np.flatnonzero(np.asarray(stragglers)):
    got, metrics = client(params, partial.x[k], partial.y[k], partial.example_mask[k],
                          jax.random.key(0))
    s = steps[k]
    want, _ = client(params, batch.x[k, :s], batch.y[k, :s], batch.example_mask[k, :s],
                     jax.random.key(0))
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-6, atol=1e-7)
    assert float(metrics.steps_taken) == s
  np.testing.assert_array_equal(np.asarray(partial.client_mask), np.asarray(batch.client_mask))


def test_drop_removes_the_stragglers_from_the_cohort():
  batch = make_batch(3)
  dropped, stragglers = apply_stragglers(batch, jax.random.key(4), FRACTION, "drop")
  np.testing.assert_array_equal(np.asarray(dropped.client_mask),
                                np.asarray(batch.client_mask) * (1 - np.asarray(stragglers)))
  np.testing.assert_array_equal(np.asarray(dropped.x), np.asarray(batch.x))


@functools.cache
def rounds(policy, backend):
  inner = build_round(make_client_update(LOGREG, optax.sgd(0.3), proximal_mu=0.1),
                      weighted_mean(), optax.sgd(1.0), backend, client_chunk_size=4)
  fn = with_stragglers(inner, FRACTION, policy)
  return (fn, inner) if backend == "loop" else (jit(fn), jit(inner))


@pytest.mark.parametrize("policy", ["drop", "partial"])
def test_rounds_with_stragglers_agree_across_backends_and_with_the_masked_batch(policy):
  batch = make_batch(5)
  state = server_init(LOGREG.init(jax.random.key(1)), optax.sgd(1.0))
  key = jax.random.key(6)
  results = {backend: rounds(policy, backend)[0](state, batch, key) for backend in BACKENDS}
  # The same round by hand: the wrapper's key split, the masked batch, the plain round.
  straggler_key, round_key = jax.random.split(key)
  masked, _ = apply_stragglers(batch, straggler_key, FRACTION, policy)
  want, _ = rounds(policy, "vmap")[1](state, masked, round_key)
  for backend, (new_state, metrics) in results.items():
    for u, v in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want.params)):
      np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-5, atol=1e-6,
                                 err_msg=backend)
    assert float(metrics["stragglers"]) == 2.0
    # FedAvg's policy drops the stragglers; FedProx's keeps their partial work.
    assert float(metrics["clients"]) == (3.0 if policy == "drop" else 5.0)
  full, _ = rounds(policy, "vmap")[1](state, batch, round_key)
  assert max(float(np.abs(np.asarray(u) - np.asarray(v)).max()) for u, v in
             zip(jax.tree.leaves(full.params), jax.tree.leaves(want.params))) > 1e-4


@pytest.mark.parametrize("fraction, policy, field", [(1.5, "drop", "straggler_fraction"),
                                                     (-0.1, "partial", "straggler_fraction"),
                                                     (0.5, "skip", "straggler_policy")])
def test_bad_settings_are_refused(fraction, policy, field):
  with pytest.raises(ValueError, match=field):
    with_stragglers(lambda *a: a, fraction, policy)
