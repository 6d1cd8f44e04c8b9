"""Tests of fedjax_priv.privacy.dp_ftrl (Kairouz et al. 2021)."""

import functools

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.aggregation import ClientContext, RoundContext, dp_mean
from fedjax_priv.privacy.dp_ftrl import TreeState, dp_ftrl_aggregator, num_levels

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

COHORT, CLIP = 8, 0.5


def run_rounds(aggregator, deltas, key):
  """Scans rounds of prepare -> sum -> finalize over deltas [R, K, D].

  Returns the updates [R, D] and the per-round states and stats.
  """
  num_clients, dim = deltas.shape[1:]
  mask = jnp.ones((num_clients,), jnp.float32)

  def one_round(state, inputs):
    round_deltas, round_key = inputs
    ctx = ClientContext(jnp.int32(0), round_key, round_key, mask)
    prepared, weights, _ = jax.vmap(
        lambda d: aggregator.prepare(state, d, jnp.int32(1), ctx))(round_deltas)
    total = aggregator.group_sum(weights, prepared)
    update, new_state, stats = aggregator.finalize(
        state, total, jnp.sum(weights), RoundContext(round_key, round_key, mask, mask))
    return new_state, (update, new_state, stats)

  state = aggregator.init(jnp.zeros(dim))
  keys = jax.random.split(key, deltas.shape[0])
  _, outputs = jax.lax.scan(one_round, state, (deltas, keys))
  return outputs


def test_noise_off_equals_dp_fedavg():
  deltas = jax.random.normal(jax.random.key(0), (10, COHORT, 6))
  ftrl_updates, _, _ = jit(run_rounds, static_argnums=0)(
      dp_ftrl_aggregator(CLIP, 0.0, COHORT, restart_every=4), deltas, jax.random.key(1))
  fedavg_updates, _, _ = jit(run_rounds, static_argnums=0)(
      dp_mean(CLIP, 0.0, COHORT), deltas, jax.random.key(1))
  np.testing.assert_allclose(ftrl_updates, fedavg_updates, rtol=1e-6, atol=1e-7)
  # And the server params are theta_0 + prefix sum / M of the clipped updates.
  norms = np.linalg.norm(np.asarray(deltas), axis=-1, keepdims=True)
  clipped = np.asarray(deltas) * np.minimum(1.0, CLIP / norms)
  np.testing.assert_allclose(np.cumsum(ftrl_updates, 0), np.cumsum(clipped.sum(1), 0) / COHORT,
                             rtol=1e-5, atol=1e-6)


SIGMA, RESTART, DIM, SEEDS = 1.5, 12, 512, 16


@pytest.fixture(scope="module")
def noise_only():
  """Updates of a tree fed zero deltas: pure noise, [SEEDS, R, DIM] with R = 2 epochs."""
  aggregator = dp_ftrl_aggregator(CLIP, SIGMA, COHORT, restart_every=RESTART)
  deltas = jnp.zeros((2 * RESTART, COHORT, DIM))
  run = jit(jax.vmap(lambda key: run_rounds(aggregator, deltas, key)))
  return run(jax.random.split(jax.random.key(7), SEEDS))


def test_prefix_sum_noise_has_tree_variance(noise_only):
  updates, states, stats = noise_only
  # Noise of the released prefix sum at step t of the first tree (times M).
  prefix_noise = np.cumsum(np.asarray(updates), axis=1)[:, :RESTART] * COHORT
  for t in range(1, RESTART + 1):
    nodes = bin(t).count("1")
    assert nodes <= int(np.ceil(np.log2(t))) + 1
    assert float(stats["tree_nodes"][0, t - 1]) == nodes
    variance = np.var(prefix_noise[:, t - 1])
    # SEEDS * DIM = 8192 samples: the variance estimate's rel. std is ~1.6%.
    assert variance == pytest.approx(nodes * (SIGMA * CLIP) ** 2, rel=0.08), t
  # The state's live nodes add up to the prefix noise at every step.
  node_sum = np.asarray(states.nodes).sum(axis=2)[:, :RESTART - 1]
  np.testing.assert_allclose(node_sum, prefix_noise[:, :RESTART - 1], rtol=1e-4, atol=1e-4)
  # Prefix sums far apart share nodes: S_8 and S_12 share the level-3 node,
  # so their noises correlate (covariance = one node's variance).
  covariance = np.mean(prefix_noise[:, 7] * prefix_noise[:, 11])
  assert covariance == pytest.approx((SIGMA * CLIP) ** 2, rel=0.15)


def test_tree_restarts_every_epoch(noise_only):
  updates, states, stats = noise_only
  steps = np.asarray(states.step[0])
  np.testing.assert_array_equal(steps, [*range(1, RESTART), 0] * 2)
  # At the end of an epoch the tree is emptied.
  assert not np.any(np.asarray(states.nodes)[:, RESTART - 1])
  # The second tree starts afresh: its first prefix has one node, and its
  # noise is independent of the first tree's final noise.
  assert float(stats["tree_nodes"][0, RESTART]) == 1
  first_tree = np.sum(np.asarray(updates)[:, :RESTART], axis=1) * COHORT
  second_tree = np.cumsum(np.asarray(updates)[:, RESTART:], axis=1) * COHORT
  for t in (1, 4, RESTART):
    nodes = bin(t).count("1")
    assert np.var(second_tree[:, t - 1]) == pytest.approx(nodes * (SIGMA * CLIP) ** 2, rel=0.08)
  correlation = np.corrcoef(first_tree.ravel(), second_tree[:, 0].ravel())[0, 1]
  assert abs(correlation) < 0.05


def test_init_state_shapes_and_levels():
  assert [num_levels(t) for t in (1, 2, 3, 4, 7, 8, 1600)] == [1, 2, 2, 3, 3, 4, 11]
  aggregator = dp_ftrl_aggregator(CLIP, 1.0, COHORT, restart_every=5)
  state = aggregator.init({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)})
  assert isinstance(state, TreeState)
  assert state.nodes["w"].shape == (3, 2, 3) and state.nodes["b"].shape == (3, 3)
  # Each update enters at most ceil(log2(T + 1)) nodes of a T-leaf tree,
  # the depth dp_accounting charges per epoch.
  for t in (1, 5, 8, 1600):
    assert num_levels(t) == int(np.ceil(np.log2(t + 1)))


def test_accounting_event_of_the_aggregator():
  # 3 epochs of 16 rounds: per epoch a Gaussian of multiplier
  # sigma / sqrt(ceil(log2 17)) = sigma / sqrt(5); epochs compose.
  eps = accounting.compute_epsilon(accounting.tree_aggregation_event(10.0, 48, 16), 1e-5)
  gaussian = accounting.compute_epsilon(
      dp_accounting.GaussianDpEvent(10.0 / np.sqrt(5 * 3)), 1e-5)
  assert eps == pytest.approx(gaussian, rel=1e-12)


def test_bad_arguments_are_named():
  for kwargs, name in [({"restart_every": 0}, "restart_every"),
                       ({"restart_every": 2.5}, "restart_every"),
                       ({"clip_norm": 0.0}, "clip_norm"),
                       ({"noise_multiplier": -1.0}, "noise_multiplier"),
                       ({"expected_cohort_size": 0.0}, "expected_cohort_size")]:
    args = {"clip_norm": CLIP, "noise_multiplier": 1.0, "expected_cohort_size": COHORT,
            "restart_every": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
      dp_ftrl_aggregator(**args)
