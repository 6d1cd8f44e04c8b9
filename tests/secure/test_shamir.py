"""Tests for fedjax_priv.secure.shamir."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv.secure import shamir

P = shamir.PRIME


def test_field_arithmetic_matches_python_ints():
  rng = np.random.default_rng(0)
  a = rng.integers(0, P, 200)
  b = rng.integers(0, P, 200)
  e = rng.integers(0, 2**16, 200)
  ua, ub, ue = (jnp.asarray(v, jnp.uint32) for v in (a, b, e))
  np.testing.assert_array_equal(shamir.mulmod(ua, ub), (a * b) % P)
  np.testing.assert_array_equal(shamir.powmod(ua, ue),
                                [pow(int(x), int(y), P) for x, y in zip(a, e)])
  nonzero = jnp.asarray(a[a > 0], jnp.uint32)
  np.testing.assert_array_equal(shamir.mulmod(shamir.inverse(nonzero), nonzero), 1)


def test_any_t_of_n_shares_reconstruct_many_secrets_at_once():
  n, t = 7, 4
  secrets = jnp.asarray([0, 1, 2, 12345, P - 1], jnp.uint32)
  xs = jnp.arange(1, n + 1, dtype=jnp.uint32)
  shares = shamir.share(jax.random.key(0), secrets, xs, t)
  assert shares.shape == (5, n) and int(shares.max()) < P
  for subset in itertools.combinations(range(n), t):
    idx = np.asarray(subset)
    np.testing.assert_array_equal(shamir.reconstruct(xs[idx], shares[:, idx]), secrets)


def test_fewer_than_t_shares_do_not_reconstruct():
  """t - 1 shares interpolate a lower-degree polynomial: the result is not the secret."""
  n, t = 6, 4
  secrets = jnp.arange(100, 164, dtype=jnp.uint32)
  xs = jnp.arange(1, n + 1, dtype=jnp.uint32)
  shares = shamir.share(jax.random.key(1), secrets, xs, t)
  wrong = shamir.reconstruct(xs[:t - 1], shares[:, :t - 1])
  assert np.mean(np.asarray(wrong) == np.asarray(secrets)) < 0.1


def test_an_active_threshold_known_at_run_time_lowers_the_degree():
  """Shares drawn for t = 6 with a traced active t' = 3: any 3 shares reconstruct with active=3,
  2 do not; with t' = t the shares are those drawn without `active`."""
  n, t = 8, 6
  secrets = jnp.arange(500, 564, dtype=jnp.uint32)
  xs = jnp.arange(1, n + 1, dtype=jnp.uint32)
  share = jax.jit(lambda active: shamir.share(jax.random.key(3), secrets, xs, t, active))
  shares = share(jnp.int32(3))
  for subset in itertools.combinations(range(n), 3):
    idx = np.asarray(list(subset) + [s for s in range(t) if s not in subset][:t - 3])
    got = jax.jit(shamir.reconstruct)(xs[idx], shares[:, idx], jnp.int32(3))
    np.testing.assert_array_equal(got, secrets)
  wrong = shamir.reconstruct(xs[:t], shares[:, :t], jnp.int32(2))
  assert np.mean(np.asarray(wrong) == np.asarray(secrets)) < 0.1
  np.testing.assert_array_equal(share(jnp.int32(t)),
                                shamir.share(jax.random.key(3), secrets, xs, t))
  # One active threshold per secret (SecAgg+'s per-client majorities).
  per_secret = jnp.arange(64, dtype=jnp.int32) % t + 1
  shares = shamir.share(jax.random.key(4), secrets, xs, t, per_secret)
  got = shamir.reconstruct(jnp.broadcast_to(xs[:t], (64, t)), shares[:, :t], per_secret)
  np.testing.assert_array_equal(got, secrets)


def test_t_minus_1_shares_are_uniform_whatever_the_secret():
  """Secrecy: one share (t = 2) of secret 0 and of secret 5 have the same uniform law."""
  keys = jax.random.split(jax.random.key(2), 4000)
  xs = jnp.asarray([3], jnp.uint32)
  draw = jax.jit(jax.vmap(lambda k, s: shamir.share(k, s, xs, 2)[0], in_axes=(0, None)))
  for secret in (0, 5):
    values = np.asarray(draw(keys, jnp.uint32(secret)))
    counts = np.bincount(values * 16 // P, minlength=16)
    assert counts.min() > 4000 / 16 * 0.75 and counts.max() < 4000 / 16 * 1.25


def test_per_row_holders_broadcast():
  """Each secret shared among its own holders (SecAgg+ neighbourhoods) in one call."""
  t = 3
  secrets = jnp.asarray([11, 22, 33], jnp.uint32)
  xs = jnp.asarray([[1, 5, 9, 2], [7, 3, 4, 8], [100, 200, 300, 400]], jnp.uint32)
  shares = shamir.share(jax.random.key(3), secrets, xs, t)
  np.testing.assert_array_equal(shamir.reconstruct(xs[:, 1:], shares[:, 1:]), secrets)
  np.testing.assert_array_equal(shamir.reconstruct(xs[:, :3], shares[:, :3]), secrets)


def test_threshold_one_is_the_secret_itself():
  shares = shamir.share(jax.random.key(4), jnp.asarray([9], jnp.uint32),
                        jnp.asarray([1, 2], jnp.uint32), 1)
  np.testing.assert_array_equal(shares, [[9, 9]])


def test_bad_threshold_raises():
  with pytest.raises(ValueError, match="threshold must be an int"):
    shamir.share(jax.random.key(0), jnp.zeros(2, jnp.uint32), jnp.arange(1, 3, dtype=jnp.uint32),
                 0)
