"""Tests for fedjax_priv.privacy.{aggregation,clipping,noise} and fedjax_priv.tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.aggregation import ClientContext, RoundContext, dp_mean, weighted_mean
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.privacy.noise import gaussian_like

CLIP, SIGMA, COHORT = 2.0, 1.5, 10.0
# Two leaves of 100k coordinates each: the std estimate has relative error
# ~1/sqrt(2n) = 0.16%, far inside the 2% tolerance.
ZERO_SUM = {"a": jnp.zeros((200, 500), jnp.float32), "b": jnp.zeros((100_000,), jnp.float32)}


def round_ctx(key):
  mask = jnp.ones(4, jnp.float32)
  return RoundContext(key, jax.random.key(99), mask, mask)


CLIENT_CTX = ClientContext(jnp.int32(0), jax.random.key(5), jax.random.key(99),
                           jnp.ones(4, jnp.float32))


def flat(tree):
  return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def correlation(u, v):
  return float(np.corrcoef(np.ravel(u), np.ravel(v))[0, 1])


@pytest.fixture(scope="module")
def finalize():
  aggregator = dp_mean(CLIP, SIGMA, COHORT)
  run = jax.jit(lambda total, weight, key: aggregator.finalize((), total, weight, round_ctx(key)))
  return lambda total, weight, key: run(total, weight, key)[0]


# --- dp_mean noise -----------------------------------------------------------------


def test_dp_mean_reports_noise_stddev():
  """finalize reports noise_stddev = sigma * C / expected cohort size (the std after division)."""
  for sigma in (SIGMA, 0.0):
    _, state, stats = dp_mean(CLIP, sigma, COHORT).finalize((), ZERO_SUM, 1.0,
                                                           round_ctx(jax.random.key(0)))
    assert state == ()
    assert float(stats["noise_stddev"]) == pytest.approx(sigma * CLIP / COHORT)


def test_dp_mean_noise_statistics(finalize):
  """finalize(0) is N(0, (sigma C / m)^2) per coordinate: std within 2%, mean within 4 SE."""
  noise = flat(finalize(ZERO_SUM, jnp.float32(7.0), jax.random.key(0)))
  expected_std = SIGMA * CLIP / COHORT
  assert noise.size == 200_000
  np.testing.assert_allclose(noise.std(), expected_std, rtol=0.02)
  assert abs(noise.mean()) < 4 * expected_std / np.sqrt(noise.size)


def test_dp_mean_noise_ignores_realised_weight(finalize):
  """The denominator is public: finalize does not depend on the realised total weight."""
  key = jax.random.key(1)
  sum_tree = jax.tree.map(lambda leaf: jnp.ones_like(leaf) * 3.0, ZERO_SUM)
  a = flat(finalize(sum_tree, jnp.float32(2.0), key))
  b = flat(finalize(sum_tree, jnp.float32(9.0), key))
  np.testing.assert_array_equal(a, b)
  # And the signal part is sum / m.
  zero = flat(finalize(ZERO_SUM, jnp.float32(2.0), key))
  np.testing.assert_allclose(a - zero, 3.0 / COHORT, rtol=1e-4)


def test_dp_mean_noise_independent_across_rounds_and_leaves(finalize):
  """Noise of two rounds' keys, and of two leaves of one round, is uncorrelated."""
  first = finalize(ZERO_SUM, jnp.float32(1.0), jax.random.key(2))
  second = finalize(ZERO_SUM, jnp.float32(1.0), jax.random.key(3))
  n = ZERO_SUM["b"].size
  tolerance = 4.0 / np.sqrt(n)
  assert abs(correlation(first["a"], second["a"])) < tolerance
  assert abs(correlation(first["b"], second["b"])) < tolerance
  assert abs(correlation(first["a"], first["b"])) < tolerance
  # Not merely uncorrelated on average: not equal, and the same key reproduces.
  assert not np.allclose(first["a"], second["a"])
  np.testing.assert_array_equal(first["b"], finalize(ZERO_SUM, jnp.float32(1.0),
                                                     jax.random.key(2))["b"])


def test_gaussian_like_leaves_of_equal_shape_are_independent():
  """gaussian_like gives leaves of equal shape uncorrelated draws, with std `stddev`."""
  tree = [jnp.zeros(50_000), jnp.zeros(50_000)]
  noise = gaussian_like(jax.random.key(4), tree, 0.5)
  assert abs(correlation(noise[0], noise[1])) < 4.0 / np.sqrt(50_000)
  np.testing.assert_allclose(np.std(np.asarray(noise[0])), 0.5, rtol=0.03)


# --- prepare -----------------------------------------------------------------------


def test_dp_mean_prepare_clips_and_weights_uniformly():
  """dp_mean.prepare clips to C, weights 1 whatever num_examples, reports the clipping."""
  aggregator = dp_mean(CLIP, SIGMA, COHORT)
  big = {"w": jnp.full((3, 4), 5.0), "b": jnp.full((2,), -5.0)}
  prepared, weight, stats = aggregator.prepare((), big, jnp.int32(1000), CLIENT_CTX)
  np.testing.assert_allclose(tree_util.l2_norm(prepared), CLIP, rtol=1e-6)
  assert float(weight) == 1.0
  np.testing.assert_allclose(stats["delta_norm"], tree_util.l2_norm(big), rtol=1e-6)
  assert float(stats["clipped_fraction"]) == 1.0
  small = tree_util.scale(big, 1e-3)
  prepared, weight, stats = aggregator.prepare((), small, jnp.int32(3), CLIENT_CTX)
  assert float(weight) == 1.0 and float(stats["clipped_fraction"]) == 0.0
  np.testing.assert_array_equal(flat(prepared), flat(small))


@pytest.mark.parametrize("weighting,expected_weight", [("num_examples", 7.0), ("uniform", 1.0)])
def test_weighted_mean_prepare_and_finalize(weighting, expected_weight):
  """weighted_mean weights by example count (or 1) and divides by the realised total."""
  aggregator = weighted_mean(weighting)
  delta = {"w": jnp.arange(6.0).reshape(2, 3)}
  prepared, weight, _ = aggregator.prepare((), delta, jnp.int32(7), CLIENT_CTX)
  assert float(weight) == expected_weight
  np.testing.assert_array_equal(prepared["w"], delta["w"])
  mean, _, _ = aggregator.finalize((), tree_util.scale(delta, 4.0), jnp.float32(4.0),
                                   round_ctx(jax.random.key(0)))
  np.testing.assert_allclose(mean["w"], delta["w"], rtol=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    (dict(clip_norm=0.0, noise_multiplier=1.0, expected_cohort_size=5.0), "clip_norm"),
    (dict(clip_norm=1.0, noise_multiplier=-1.0, expected_cohort_size=5.0), "noise_multiplier"),
    (dict(clip_norm=1.0, noise_multiplier=1.0, expected_cohort_size=0.0), "expected_cohort_size"),
])
def test_dp_mean_rejects_bad_configuration(kwargs, field):
  """Bad hyper-parameters fail at construction with a message naming the field."""
  with pytest.raises(ValueError, match=field):
    dp_mean(**kwargs)


def test_weighted_mean_rejects_unknown_weighting():
  with pytest.raises(ValueError, match="weighting"):
    weighted_mean("by_magic")


# --- Clipping and tree helpers ------------------------------------------------------


def test_clip_leaves_small_tree_untouched():
  """A tree with norm <= C comes back unchanged, with its norm."""
  small = {"a": jnp.array([0.3, -0.4]), "b": jnp.array([[0.0]])}
  clipped, norm = jax.jit(clip_by_l2_norm)(small, 1.0)
  np.testing.assert_allclose(norm, 0.5, rtol=1e-6)
  np.testing.assert_array_equal(flat(clipped), flat(small))


def test_clip_large_tree_to_exactly_c():
  """A tree with norm > C is scaled (direction kept) to norm exactly C."""
  rng = np.random.default_rng(0)
  large = {"a": jnp.asarray(rng.normal(size=(30, 7)) * 10, jnp.float32),
           "b": jnp.asarray(rng.normal(size=(5,)) * 10, jnp.float32)}
  clipped, norm = jax.jit(clip_by_l2_norm)(large, 0.7)
  np.testing.assert_allclose(tree_util.l2_norm(clipped), 0.7, rtol=1e-6)
  np.testing.assert_allclose(norm, np.linalg.norm(flat(large)), rtol=1e-5)
  np.testing.assert_allclose(flat(clipped), flat(large) * 0.7 / np.linalg.norm(flat(large)),
                             rtol=1e-5, atol=1e-7)


def test_clip_all_zero_tree():
  """An all-zero tree stays zero and finite (no 0/0)."""
  zero = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  clipped, norm = jax.jit(clip_by_l2_norm)(zero, 1.0)
  assert float(norm) == 0.0
  np.testing.assert_array_equal(flat(clipped), 0.0)


def test_weighted_sum_equals_explicit_sum():
  """tree.weighted_sum over the leading axis equals sum_k w_k * leaf[k]."""
  rng = np.random.default_rng(1)
  stacked = {"a": rng.normal(size=(6, 4, 3)).astype(np.float32),
             "b": rng.normal(size=(6,)).astype(np.float32)}
  weights = rng.random(6).astype(np.float32)
  got = jax.jit(tree_util.weighted_sum)(jnp.asarray(weights), jax.tree.map(jnp.asarray, stacked))
  for name, leaf in stacked.items():
    expected = sum(weights[k] * leaf[k] for k in range(6))
    np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6)


def test_weighted_sum_zero_weight_ignores_huge_finite_values():
  """A zero weight removes a slot holding huge (finite) values exactly."""
  stacked = jnp.array([[1.0, 2.0], [3e37, -3e37]])
  got = tree_util.weighted_sum(jnp.array([2.0, 0.0]), stacked)
  np.testing.assert_array_equal(got, [2.0, 4.0])


def test_l2_norm_and_all_finite():
  """l2_norm is the norm of all leaves together; all_finite spots NaN and inf."""
  tree = {"a": jnp.array([3.0]), "b": jnp.array([[4.0, 0.0]])}
  np.testing.assert_allclose(tree_util.l2_norm(tree), 5.0, rtol=1e-6)
  assert bool(tree_util.all_finite(tree))
  assert not bool(tree_util.all_finite({**tree, "c": jnp.array([jnp.nan])}))
  assert not bool(tree_util.all_finite({**tree, "c": jnp.array([-jnp.inf])}))
  # Compiled and vmapped as the round runs it; huge finite values are finite.
  rows = jnp.array([[3e38, -3e38], [1.0, jnp.nan], [jnp.inf, 0.0], [-3e38, 3e38]])
  flags = jax.jit(jax.vmap(tree_util.all_finite))(rows)
  np.testing.assert_array_equal(flags, [True, False, False, True])
