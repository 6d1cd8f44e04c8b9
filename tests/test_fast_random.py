"""fast_random: bit-identical to jax.random on every path, and a real N(0, 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_priv import fast_random
from fedjax_priv.privacy.noise import gaussian_like


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 11), (1000, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5])
def test_equal_to_jax_random_bit_for_bit(shape, seed):
  key = jax.random.fold_in(jax.random.key(seed), 3)
  normal = jax.jit(fast_random.standard_normal, static_argnums=1)(key, shape)
  np.testing.assert_array_equal(normal, jax.random.normal(key, shape, jnp.float32))
  assert normal.dtype == jnp.float32 and normal.shape == shape


@pytest.mark.parametrize("shape, seed", [((16,), 0), ((3, 5, 11), 2**31 + 5)])
def test_uniform_and_keys_equal_to_jax_random_bit_for_bit(shape, seed):
  key = jax.random.fold_in(jax.random.key(seed), 3)
  uniform = jax.jit(fast_random.uniform, static_argnums=1)(key, shape)
  np.testing.assert_array_equal(uniform, jax.random.uniform(key, shape, jnp.float32))
  assert uniform.dtype == jnp.float32 and uniform.shape == shape
  count = shape[-1]
  folded = jax.jit(fast_random.fold_in_range, static_argnums=1)(key, count)
  np.testing.assert_array_equal(jax.random.key_data(folded), jax.random.key_data(
      jnp.stack([jax.random.fold_in(key, i) for i in range(count)])))
  split = jax.jit(fast_random.split, static_argnums=1)(key, count)
  np.testing.assert_array_equal(jax.random.key_data(split),
                                jax.random.key_data(jax.random.split(key, count)))


def test_equal_under_vmap_and_scan():
  keys = jax.random.split(jax.random.key(4), 6)
  batched = jax.jit(jax.vmap(lambda k: fast_random.standard_normal(k, (33,))))(keys)
  _, scanned = jax.lax.scan(lambda c, k: (c, fast_random.standard_normal(k, (33,))), 0, keys)
  expected = jnp.stack([jax.random.normal(k, (33,)) for k in keys])
  np.testing.assert_array_equal(batched, expected)
  np.testing.assert_array_equal(scanned, expected)
  # The draws of a cohort's batches: vmapped over clients, inside a scan over rounds.
  draw = lambda k: (fast_random.uniform(k, (5,)), fast_random.split(k, 3),
                    fast_random.fold_in_range(k, 4))
  reference = lambda k: (jax.random.uniform(k, (5,)), jax.random.split(k, 3), jax.vmap(
      lambda i: jax.random.fold_in(k, i))(jnp.arange(4, dtype=jnp.uint32)))
  got = jax.jit(lambda ks: jax.lax.scan(
      lambda c, k: (c, jax.vmap(draw)(jax.random.split(k, 2))), 0, ks)[1])(keys)
  expected = jax.jit(jax.vmap(lambda k: jax.vmap(reference)(jax.random.split(k, 2))))(keys)
  for got_leaf, expected_leaf in zip(got, expected):
    if jnp.issubdtype(got_leaf.dtype, jax.dtypes.prng_key):
      got_leaf, expected_leaf = jax.random.key_data(got_leaf), jax.random.key_data(expected_leaf)
    np.testing.assert_array_equal(got_leaf, expected_leaf)


def test_block_function_matches_the_threefry_known_answer():
  # Known-answer vectors of Salmon et al.'s Random123 (kat_vectors, threefry2x32_20).
  cases = [((0x0, 0x0), (0x0, 0x0), (0x6B200159, 0x99BA4EFE)),
           ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
           ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
  for (k0, k1), (x0, x1), expected in cases:
    out = fast_random.threefry2x32(*(jnp.uint32(v) for v in (k0, k1, x0, x1)))
    assert tuple(int(v) for v in out) == expected


def test_other_keys_fall_back_to_jax_random():
  rbg = jax.random.key(0, impl="rbg")
  np.testing.assert_array_equal(fast_random.standard_normal(rbg, (9,)),
                                jax.random.normal(rbg, (9,)))
  legacy = jax.random.PRNGKey(5)
  np.testing.assert_array_equal(fast_random.standard_normal(legacy, (9,)),
                                jax.random.normal(legacy, (9,)))
  assert fast_random.standard_normal(jax.random.key(0), (0, 3)).shape == (0, 3)
  for key in (rbg, legacy):
    np.testing.assert_array_equal(fast_random.uniform(key, (9,)), jax.random.uniform(key, (9,)))
    np.testing.assert_array_equal(jax.random.key_data(fast_random.split(key, 4)),
                                  jax.random.key_data(jax.random.split(key, 4)))
  np.testing.assert_array_equal(
      jax.random.key_data(fast_random.fold_in_range(legacy, 3)),
      jax.random.key_data(jnp.stack([jax.random.fold_in(legacy, i) for i in range(3)])))
  assert fast_random.split(jax.random.key(0), 0).shape == (0,)


def test_gaussian_like_statistics():
  # 200k draws: mean and std within 5 standard errors, and a KS test of normality.
  noise = gaussian_like(jax.random.key(11), {"w": jnp.zeros((400, 500))}, 2.5)["w"]
  draws = np.asarray(noise).ravel() / 2.5
  n = draws.size
  assert abs(draws.mean()) < 5 / np.sqrt(n)
  assert abs(draws.std() - 1.0) < 5 / np.sqrt(2 * n)
  assert stats.kstest(draws, "norm").pvalue > 1e-4
