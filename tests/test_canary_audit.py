"""Tests of fedjax_priv.canary_audit: canaries, the observed deltas and the audit end to end.

Two reduced audited runs (3 digit hospitals, logistic regression, q = 1
full-batch DP-GD, 10 rounds, 200 canaries) are shared by the tests: one with
sigma calibrated to eps = 2, one with noise off (clipping kept).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv import config as config_lib
from fedjax_priv.data import FederatedDataset
from fedjax_priv.data.sampling import PoissonSampler
from fedjax_priv.models.model import example_losses
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv import canary_audit

NUM_CANARIES = 200
ROUNDS = 10
LEARNING_RATE, BATCH, CLIP = 2.0, 600, 1.0

SMALL = {
    "data": {"num_clients": 3, "partition": "iid"},
    "model": {"name": "logistic_regression"},
    "client": {"optimizer": "sgd", "learning_rate": LEARNING_RATE, "local_steps": 1,
               "batch_size": BATCH},
    "privacy": {"unit": "example", "clip_norm": CLIP, "target_epsilon": 2.0, "delta": 1e-5,
                "weighting": "uniform"},
    "simulation": {"backend": "vmap", "rounds": ROUNDS, "cohort_size": 3},
}
# Noise off; Poisson cohorts (some rounds miss a hospital, empty slots hold
# index -1) and chunks of 2 (3 slots padded to 4) exercise the slot bookkeeping.
NOISE_OFF = {
    **SMALL,
    "privacy": {**SMALL["privacy"], "target_epsilon": 0.0, "noise_multiplier": 0.0},
    "simulation": {**SMALL["simulation"], "backend": "chunked", "client_chunk_size": 2,
                   "cohort_size": 2, "sampling": "poisson"},
}


# These tests check semantics, not speed: XLA's lowest backend optimisation
# level roughly halves CPU compile time, which dominates here.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def noisy():
  return canary_audit.run_canary_audit(config_lib.from_dict(SMALL), NUM_CANARIES, seed=0,
                                compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def noise_off():
  return canary_audit.run_canary_audit(config_lib.from_dict(NOISE_OFF), NUM_CANARIES, seed=0,
                                compiler_options=FAST_COMPILE)


def test_bound_stays_below_the_accountant(noisy):
  assert noisy.epsilon_accountant == pytest.approx(2.0, abs=0.01)
  assert noisy.noise_multiplier > 1
  assert 0 <= noisy.epsilon_lower_bound <= noisy.epsilon_accountant
  # Members still score higher on average: the canaries do reach the updates.
  assert noisy.scores[noisy.is_member].mean() > noisy.scores[~noisy.is_member].mean()
  assert noisy.test_accuracy > 0.5  # 10 classes: chance is 0.1.


def test_noise_off_leaks_and_the_bound_shows_it(noise_off):
  assert noise_off.epsilon_accountant == float("inf")
  assert noise_off.epsilon_lower_bound > 1
  assert noise_off.bound.num_correct == noise_off.bound.num_guesses
  assert noise_off.num_members == int(noise_off.is_member.sum())


def test_noise_off_scores_are_the_clipped_canary_steps(noise_off):
  # Each round its owner takes part in, a member moves w_i by lr * C / b: its
  # gradient was clipped to exactly C, and the audit keeps lr / b as configured.
  sampler = PoissonSampler(3, 2 / 3, 0)
  owner = np.arange(NUM_CANARIES) % 3
  rounds_in = np.zeros(3)
  for r in range(ROUNDS):
    cohort = sampler.sample(r)
    rounds_in[cohort.indices[cohort.mask > 0]] += 1
  assert 0 < rounds_in.min() < ROUNDS  # Some hospital missed a round.
  expected = noise_off.is_member * rounds_in[owner] * LEARNING_RATE * CLIP / BATCH
  np.testing.assert_allclose(noise_off.scores, expected, rtol=1e-5, atol=1e-9)


def test_canary_gradient_is_a_fixed_clippable_direction():
  base = logistic_regression((2, 2, 1), 4)
  model = canary_audit.canary_model(base, 3, clip_norm=0.5)
  assert model.input_shape == (2, 2, 2)
  params = model.init(jax.random.key(0))
  # Training state must not matter: move the canary parameters off zero.
  params = {**params, "canary": jnp.array([0.3, -2.0, 7.0])}
  real = jax.random.uniform(jax.random.key(1), (1, 2, 2, 1))

  @jax.jit
  def grads(x, y):
    return jax.grad(lambda p: example_losses(model, p, x, jnp.array([y]))[0])(params)

  canary = jnp.concatenate([jnp.zeros((1, 2, 2, 1)), jnp.full((1, 2, 2, 1), 2.0)], -1)
  g = grads(canary, 0)
  np.testing.assert_allclose(g["canary"], [0.0, -1.0, 0.0], rtol=1e-6)  # -2C e_1, C = 0.5.
  assert all(float(jnp.abs(leaf).max()) == 0.0 for leaf in jax.tree.leaves(g["model"]))
  np.testing.assert_array_equal(model.apply(params, canary), jnp.zeros((1, 4)))

  with_id = jnp.concatenate([real, jnp.zeros_like(real)], -1)
  np.testing.assert_allclose(model.apply(params, with_id), base.apply(params["model"], real))
  g = grads(with_id, 2)
  np.testing.assert_array_equal(g["canary"], jnp.zeros(3))
  expected = jax.jit(jax.grad(lambda p: example_losses(base, p, real, jnp.array([2]))[0]))(
      params["model"])
  jax.tree.map(np.testing.assert_allclose, g["model"], expected)


def test_plant_canaries_appends_members_to_their_owner():
  x = np.arange(10 * 4, dtype=np.float32).reshape(10, 2, 2, 1)
  train = FederatedDataset(x, np.arange(10) % 3, np.array([0, 4, 4, 10]), ("a", "b", "c"))
  planted = canary_audit.plant_canaries(train, 60, np.random.default_rng(3))
  new = planted.train
  assert new.feature_shape == (2, 2, 2) and new.client_ids == train.client_ids
  np.testing.assert_array_equal(planted.owner, np.arange(60) % 3)
  assert 15 < planted.is_member.sum() < 45
  for c in range(3):
    old_x, old_y = train.client(c)
    new_x, new_y = new.client(c)
    members = np.flatnonzero(planted.is_member & (planted.owner == c))
    assert len(new_y) == len(old_y) + len(members)
    np.testing.assert_array_equal(new_x[:len(old_y), ..., :1], old_x)
    np.testing.assert_array_equal(new_x[:len(old_y), ..., 1], 0)
    np.testing.assert_array_equal(new_y[:len(old_y)], old_y)
    canaries = new_x[len(old_y):]
    np.testing.assert_array_equal(canaries[..., :1], 0)
    np.testing.assert_array_equal(canaries[:, 0, 0, 1], members + 1)
    np.testing.assert_array_equal(canaries[..., 1], canaries[:, :1, :1, 1] * np.ones((1, 2, 2)))
    np.testing.assert_array_equal(new_y[len(old_y):], 0)


@pytest.mark.parametrize("change, count, match", [
    (lambda c: dataclasses.replace(c, privacy=dataclasses.replace(c.privacy, unit="user")), 100,
     "privacy.unit"),
    (lambda c: dataclasses.replace(
        c, simulation=dataclasses.replace(c.simulation, backend="loop")), 100,
     "simulation.backend"),
    (lambda c: c, 1, "num_canaries"),
    (lambda c: dataclasses.replace(c, data=dataclasses.replace(c.data, stream=True)), 100,
     "data.stream"),
])
def test_bad_input_fails_before_compiling(change, count, match):
  with pytest.raises(ValueError, match=match):
    canary_audit.run_canary_audit(change(config_lib.from_dict(SMALL)), count)
  with pytest.raises(ValueError, match="confidence"):
    canary_audit.run_canary_audit(config_lib.from_dict(SMALL), 100, confidence=1.0)
