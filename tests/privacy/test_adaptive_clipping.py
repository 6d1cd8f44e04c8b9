"""Tests of fedjax_priv.privacy.adaptive_clipping (Andrew et al. 2021)."""

import functools

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.adaptive_clipping import (AdaptiveClipState, adaptive_clip_mean,
                                                   split_noise_multiplier)
from fedjax_priv.privacy.aggregation import ClientContext, RoundContext
from fedjax_priv.simulation.round import build_round

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

COHORT, DIM = 100, 4
LOG_MEAN, LOG_STD = 0.0, 1.0  # Client update norms ~ LogNormal(0, 1).


def run_rounds(aggregator, num_rounds, seed):
  """Rounds of prepare -> sum -> finalize on synthetic deltas; returns C per round.

  Every client's delta points in a random direction with an L2 norm drawn
  from LogNormal(LOG_MEAN, LOG_STD), so the gamma-quantile of the norms is
  exp(LOG_MEAN + LOG_STD * Phi^-1(gamma)).
  """
  cohort_mask = jnp.ones((COHORT,), jnp.float32)

  def one_round(state, key):
    dir_key, norm_key, agg_key = jax.random.split(key, 3)
    directions = jax.random.normal(dir_key, (COHORT, DIM))
    directions /= jnp.linalg.norm(directions, axis=1, keepdims=True)
    norms = jnp.exp(LOG_MEAN + LOG_STD * jax.random.normal(norm_key, (COHORT,)))
    deltas = {"w": directions * norms[:, None]}
    slots = jnp.arange(COHORT, dtype=jnp.int32)
    client_keys = jax.random.split(agg_key, COHORT)

    def prepare(delta, slot, client_key):
      ctx = ClientContext(slot, client_key, agg_key, cohort_mask)
      return aggregator.prepare(state, delta, jnp.int32(1), ctx)

    prepared, weights, _ = jax.vmap(prepare)(deltas, slots, client_keys)
    total = aggregator.group_sum(weights, prepared)
    ctx = RoundContext(agg_key, agg_key, cohort_mask, cohort_mask)
    _, new_state, round_stats = aggregator.finalize(state, total, jnp.sum(weights), ctx)
    return new_state, round_stats["clip_norm"]

  state = aggregator.init({"w": jnp.zeros(DIM)})
  keys = jax.random.split(jax.random.key(seed), num_rounds)
  _, clip_norms = jit(lambda s, k: jax.lax.scan(one_round, s, k))(state, keys)
  return np.asarray(clip_norms)


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_clip_norm_converges_to_target_quantile_of_update_norms(quantile):
  # Paper defaults (C_0 = 0.1, eta_C = 0.2, sigma_b = M / 20) with noise on:
  # from 0.1 the norm reaches the quantile within ~50-75 rounds and then
  # hovers around it (Andrew et al. 2021, Sec. 4 / Fig. 1, qualitatively).
  aggregator = adaptive_clip_mean(1.0, COHORT, target_quantile=quantile)
  clip_norms = run_rounds(aggregator, 200, seed=int(quantile * 10))
  target = np.exp(LOG_MEAN + LOG_STD * stats.norm.ppf(quantile))
  assert clip_norms[0] == pytest.approx(0.1)
  settled = np.exp(np.mean(np.log(clip_norms[100:])))
  assert settled == pytest.approx(target, rel=0.10)
  # It is a tracking estimate, not a constant: it still moves round to round.
  assert np.std(np.log(clip_norms[100:])) > 0


def test_clip_norm_moves_in_the_right_direction():
  # Every update is tiny (norm ~1e-3 << C_0): the fraction unclipped is ~1,
  # so C must shrink every round by about exp(-eta (1 - gamma)).
  aggregator = adaptive_clip_mean(0.0, COHORT, count_stddev=0.0)
  state = aggregator.init({"w": jnp.zeros(DIM)})
  ones = jnp.ones((COHORT,), jnp.float32)
  ctx = ClientContext(jnp.int32(0), jax.random.key(0), jax.random.key(1), ones)
  prepared, weight, _ = aggregator.prepare(state, {"w": jnp.full((DIM,), 5e-4)}, 1, ctx)
  total = tree_util.scale(prepared, COHORT)
  update, new_state, out = aggregator.finalize(
      state, total, weight * COHORT, RoundContext(jax.random.key(2), ctx.round_key, ones, ones))
  assert float(out["unclipped_fraction"]) == pytest.approx(1.0)
  assert float(new_state.clip_norm) == pytest.approx(0.1 * np.exp(-0.2 * 0.5), rel=1e-6)
  # Noise off, nothing clipped: the update is the plain mean.
  np.testing.assert_allclose(update["w"], np.full(DIM, 5e-4), rtol=1e-6)


@pytest.mark.parametrize("z, sigma_b", [(1.0, 5.0), (0.7, 0.5), (3.0, 50.0)])
def test_split_noise_has_the_privacy_of_one_gaussian(z, sigma_b):
  # The round releases the delta sum with multiplier z_delta and the centred
  # count with multiplier 2 sigma_b; their RDP adds to that of a Gaussian of
  # multiplier z at every order, so accounting the round as
  # dp_mean(z) is exact, not a bound.
  z_delta = split_noise_multiplier(z, sigma_b)
  assert z_delta > z
  orders = list(accounting.DEFAULT_RDP_ORDERS)
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  both = rdp_privacy_accountant.RdpAccountant(orders, relation).compose(
      dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_delta),
                                     dp_accounting.GaussianDpEvent(2 * sigma_b)]))
  single = rdp_privacy_accountant.RdpAccountant(orders, relation).compose(
      dp_accounting.GaussianDpEvent(z))
  np.testing.assert_allclose(both._rdp, single._rdp, rtol=1e-12)
  assert both.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-12)


def test_noise_stddev_uses_the_split_multiplier():
  aggregator = adaptive_clip_mean(1.0, COHORT, initial_clip_norm=2.0)
  state = aggregator.init({"w": jnp.zeros(20_000)})
  ones = jnp.ones((COHORT,), jnp.float32)
  total = ({"w": jnp.zeros(20_000)}, jnp.float32(0.0))
  update, _, out = aggregator.finalize(
      state, total, 0.0, RoundContext(jax.random.key(3), jax.random.key(4), ones, ones))
  expected = split_noise_multiplier(1.0, COHORT / 20) * 2.0 / COHORT
  assert float(out["noise_stddev"]) == pytest.approx(expected, rel=1e-6)
  assert np.std(np.asarray(update["w"])) == pytest.approx(expected, rel=0.03)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="count_stddev"):
    adaptive_clip_mean(1.0, 10, count_stddev=0.4)  # 2 * 0.4 <= 1.0
  with pytest.raises(ValueError, match="count_stddev"):
    adaptive_clip_mean(3.0, 20)  # default sigma_b = 1: too small for z = 3
  with pytest.raises(ValueError, match="target_quantile"):
    adaptive_clip_mean(1.0, 100, target_quantile=1.0)
  with pytest.raises(ValueError, match="learning_rate"):
    adaptive_clip_mean(1.0, 100, learning_rate=0.0)
  with pytest.raises(ValueError, match="initial_clip_norm"):
    adaptive_clip_mean(1.0, 100, initial_clip_norm=-1.0)
  with pytest.raises(ValueError, match="expected_cohort_size"):
    adaptive_clip_mean(1.0, 0)
  with pytest.raises(ValueError, match="noise_multiplier"):
    adaptive_clip_mean(-1.0, 100)


def test_plugs_into_build_round_and_state_evolves():
  input_shape, num_classes, k, s, b = (3, 3, 1), 3, 6, 2, 4
  model = logistic_regression(input_shape, num_classes)
  aggregator = adaptive_clip_mean(1.0, float(k), count_stddev=1.0, initial_clip_norm=0.1)
  round_fn = jit(build_round(make_client_update(model, optax.sgd(0.5)), aggregator,
                             optax.sgd(1.0), backend="chunked", client_chunk_size=4))
  rng = np.random.default_rng(0)
  batch = ClientBatch(
      jnp.asarray(rng.normal(size=(k, s, b, *input_shape)), jnp.float32),
      jnp.asarray(rng.integers(0, num_classes, (k, s, b)), jnp.int32),
      jnp.ones((k, s, b), jnp.float32), jnp.full((k,), s * b, jnp.int32),
      jnp.asarray([1, 1, 1, 1, 1, 0], jnp.float32))  # One padded slot.
  state = server_init(model.init(jax.random.key(0)), optax.sgd(1.0), aggregator)
  assert isinstance(state.aggregator_state, AdaptiveClipState)
  clip_norms = []
  for r in range(3):
    state, metrics = round_fn(state, batch, jax.random.key(10 + r))
    clip_norms.append(float(metrics["clip_norm"]))
    assert float(metrics["clients"]) == 5
  # Updates of this model are far larger than C_0 = 0.1, so every client is
  # clipped and C grows each round.
  assert float(metrics["clipped_fraction"]) == 1.0
  assert clip_norms[0] == pytest.approx(0.1)
  assert clip_norms[0] < clip_norms[1] < clip_norms[2] < float(state.aggregator_state.clip_norm)
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(state.params))
