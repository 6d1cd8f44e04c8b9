"""fast_random: bit-identical to jax.random on every path, and a real N(0, 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fedjax_priv.privacy import fast_random
from fedjax_priv.privacy.noise import gaussian_like


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 11), (1000, 3)])
@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5])
def test_equal_to_jax_random_bit_for_bit(shape, seed):
  key = jax.random.fold_in(jax.random.key(seed), 3)
  normal = jax.jit(fast_random.standard_normal, static_argnums=1)(key, shape)
  np.testing.assert_array_equal(normal, jax.random.normal(key, shape, jnp.float32))
  assert normal.dtype == jnp.float32 and normal.shape == shape


def test_equal_under_vmap_and_scan():
  keys = jax.random.split(jax.random.key(4), 6)
  batched = jax.jit(jax.vmap(lambda k: fast_random.standard_normal(k, (33,))))(keys)
  _, scanned = jax.lax.scan(lambda c, k: (c, fast_random.standard_normal(k, (33,))), 0, keys)
  expected = jnp.stack([jax.random.normal(k, (33,)) for k in keys])
  np.testing.assert_array_equal(batched, expected)
  np.testing.assert_array_equal(scanned, expected)


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


def test_gaussian_like_statistics():
  # 200k draws: mean and std within 5 standard errors, and a KS test of normality.
  noise = gaussian_like(jax.random.key(11), {"w": jnp.zeros((400, 500))}, 2.5)["w"]
  draws = np.asarray(noise).ravel() / 2.5
  n = draws.size
  assert abs(draws.mean()) < 5 / np.sqrt(n)
  assert abs(draws.std() - 1.0) < 5 / np.sqrt(2 * n)
  assert stats.kstest(draws, "norm").pvalue > 1e-4
