"""Tests for fedjax_priv.secure.quantization."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv.secure import quantization as q


def test_padded_dim():
  assert [q.padded_dim(d) for d in (1, 2, 3, 5, 8, 1000, 1024, 1025)] == [
      1, 2, 4, 8, 8, 1024, 1024, 2048]
  with pytest.raises(ValueError, match="dimension d"):
    q.padded_dim(0)


def test_ravel_round_trip():
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(2)}
  flat, unravel = q.ravel(tree)
  assert flat.shape == (8,) and flat.dtype == jnp.float32
  back = unravel(flat)
  np.testing.assert_array_equal(back["w"], tree["w"])
  np.testing.assert_array_equal(back["b"], tree["b"])


@pytest.mark.parametrize("d", [1, 2, 64, 4096])
def test_rotation_is_orthogonal_and_inverse_exact(d):
  x = jax.random.normal(jax.random.key(d), (5, d)) * 3.0
  key = jax.random.key(7)
  rotate = jax.jit(jax.vmap(q.hadamard_rotate, in_axes=(0, None)))
  y = rotate(x, key)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=1), jnp.linalg.norm(x, axis=1), rtol=1e-5)
  back = jax.vmap(q.hadamard_unrotate, in_axes=(0, None))(y, key)
  np.testing.assert_allclose(back, x, atol=1e-5 * 3.0 * np.sqrt(np.log2(d) + 1))
  if d > 1:
    # A real rotation: it moves vectors, and another key moves them elsewhere.
    assert float(jnp.abs(y - x).max()) > 0.1
    assert float(jnp.abs(rotate(x, jax.random.key(8)) - y).max()) > 0.1


def test_rotation_spreads_a_spike():
  """A one-hot vector becomes flat: every coordinate has magnitude 1/sqrt(d)."""
  d = 256
  y = q.hadamard_rotate(jnp.zeros(d).at[3].set(1.0), jax.random.key(0))
  np.testing.assert_allclose(jnp.abs(y), 1.0 / np.sqrt(d), rtol=1e-5)


def test_rotation_rejects_non_power_of_two():
  with pytest.raises(ValueError, match="power-of-two length, got 6"):
    q.hadamard_rotate(jnp.ones(6), jax.random.key(0))


def test_stochastic_round_is_unbiased():
  """Mean rounding error over 4000 draws is within 4 standard errors of 0, coordinate-wise."""
  x = jnp.asarray(np.random.default_rng(0).uniform(-50, 50, 64), jnp.float32)
  draws = 4000
  rounded = jax.jit(jax.vmap(q.stochastic_round, in_axes=(None, 0)))(
      x, jax.random.split(jax.random.key(1), draws))
  assert rounded.dtype == jnp.int32
  err = np.asarray(rounded, np.float64) - np.asarray(x, np.float64)
  assert np.all(np.abs(err) < 1.0)
  frac = np.asarray(x - jnp.floor(x), np.float64)
  stderr = np.sqrt(frac * (1 - frac) / draws) + 1e-9
  assert np.all(np.abs(err.mean(0)) < 4 * stderr + 1e-6)
  # Not deterministic rounding: both neighbours occur.
  assert np.all(err.min(0) < 0) and np.all(err.max(0) > 0)


def encode_decode_sum(xs, scale, bits, rotation_key, round_keys):
  """The secure-sum pipeline without masks: per-client encode, modular sum, decode."""

  def encode(x, key):
    return q.wrap(q.quantize(q.hadamard_rotate(x, rotation_key), scale, key), bits)

  total = q.modular_sum(jnp.ones(xs.shape[0]), jax.vmap(encode)(xs, round_keys), bits)
  decoded = q.unwrap(total, bits)
  return q.hadamard_unrotate(q.dequantize(decoded, scale), rotation_key), decoded


def test_decoded_sum_error_within_bound():
  n, d, scale, bits = 16, 256, 50.0, 24
  xs = jax.random.normal(jax.random.key(2), (n, d)) * 0.3
  bound = q.error_bound(scale, d, n)
  run = jax.jit(lambda k: encode_decode_sum(xs, scale, bits, jax.random.key(3),
                                            jax.random.split(k, n))[0])
  errors = np.stack([np.asarray(run(k)) for k in jax.random.split(jax.random.key(4), 40)])
  errors -= np.asarray(xs.sum(0))[None]
  # Unrotated errors are mixes of rounding errors; the L2 norm is preserved, so the
  # L2 bound holds as is, and no coordinate can exceed the L2 worst case sqrt(d) n / s.
  rms = np.sqrt(np.mean(np.sum(errors**2, axis=1)))
  assert rms <= bound["l2_rms"]
  assert rms > 0.3 * bound["l2_rms"]  # The bound is not vacuous (E = n d / 6 for uniform frac).
  assert np.abs(errors).max() <= np.sqrt(d) * bound["per_coordinate"]
  # Averaging over draws cancels the error (unbiased): the mean is 6 x smaller than one draw.
  assert np.sqrt(np.sum(errors.mean(0) ** 2)) < rms / 4


def test_error_bound_in_the_integer_domain():
  """Without rotation, each decoded coordinate is within n / scale of the float sum."""
  n, d, scale, bits = 8, 32, 10.0, 16
  xs = jax.random.normal(jax.random.key(5), (n, d))
  keys = jax.random.split(jax.random.key(6), n)
  ints = jax.vmap(q.quantize, in_axes=(0, None, 0))(xs, scale, keys)
  total = q.unwrap(q.modular_sum(jnp.ones(n), q.wrap(ints, bits), bits), bits)
  np.testing.assert_array_equal(total, np.asarray(ints).sum(0))  # No wrap: exact.
  err = np.abs(np.asarray(q.dequantize(total, scale)) - np.asarray(xs.sum(0)))
  assert err.max() < q.error_bound(scale, d, n)["per_coordinate"]


@pytest.mark.parametrize("bits", [1, 2, 8, 16, 31, 32])
def test_wrap_unwrap_round_trip(bits):
  half = 2 ** (bits - 1)
  rng = np.random.default_rng(bits)
  v = np.concatenate([rng.integers(-half, half, 500), [-half, half - 1, 0, -1]]).astype(np.int64)
  v = v[(v >= -2**31) & (v < 2**31)]
  u = q.wrap(jnp.asarray(v, jnp.int32), bits)
  assert u.dtype == jnp.uint32
  assert int(u.max()) < 2**bits
  np.testing.assert_array_equal(np.asarray(u, np.int64), np.mod(v, 2**bits))
  back = q.unwrap(u, bits)
  assert back.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(back, np.int64), v)


def test_unwrap_is_centred_lift_of_any_residue():
  bits = 6
  u = jnp.arange(2**bits, dtype=jnp.uint32)
  lifted = np.asarray(q.unwrap(u, bits))
  np.testing.assert_array_equal(np.sort(lifted), np.arange(-32, 32))
  np.testing.assert_array_equal(np.mod(lifted, 64), np.arange(64))


def test_modular_sum_selects_positive_weights_and_wraps():
  bits = 12
  rng = np.random.default_rng(0)
  values = rng.integers(0, 2**bits, (7, 5)).astype(np.uint32)
  weights = np.array([1, 0, 2.5, 0, 1, 1, 0], np.float32)
  got = q.modular_sum(jnp.asarray(weights), jnp.asarray(values), bits)
  expected = np.mod(values[weights > 0].astype(np.int64).sum(0), 2**bits)
  np.testing.assert_array_equal(np.asarray(got, np.int64), expected)
  # Group sums combined with modular_add equal the sum in one go (chunked backend).
  add = functools.partial(q.modular_add, bits=bits)
  parts = add(q.modular_sum(jnp.asarray(weights[:3]), jnp.asarray(values[:3]), bits),
              q.modular_sum(jnp.asarray(weights[3:]), jnp.asarray(values[3:]), bits))
  np.testing.assert_array_equal(parts, got)


def test_wrap_around_decodes_garbage_and_is_flagged():
  """A sum past 2^(b-1) decodes to value - 2^b; the overflow statistics say so."""
  bits, scale, clip, n = 8, 10.0, 5.0, 4  # Each client holds 50, the sum 200 > 127.
  ints = jnp.full((n, 3), 50, jnp.int32)
  decoded = q.unwrap(q.modular_sum(jnp.ones(n), q.wrap(ints, bits), bits), bits)
  np.testing.assert_array_equal(decoded, [200 - 256] * 3)
  assert q.overflow_ratio(clip, scale, n, bits) > 1.0
  # With 2 clients the sum (100) fits and the bound says so.
  assert q.overflow_ratio(clip, scale, 2, bits) <= 1.0
  safe = q.unwrap(q.modular_sum(jnp.ones(2), q.wrap(ints[:2], bits), bits), bits)
  np.testing.assert_array_equal(safe, [100] * 3)
  assert float(q.range_used(safe, bits)) == pytest.approx(100 / 128)


def test_bad_bits_raise():
  for bits in (0, 33, 8.0):
    with pytest.raises(ValueError, match="bits must be an int"):
      q.wrap(jnp.zeros(2, jnp.int32), bits)
  with pytest.raises(ValueError, match="scale must be > 0"):
    q.error_bound(0.0, 4, 2)
