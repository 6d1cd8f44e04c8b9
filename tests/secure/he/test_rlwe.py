"""Tests for fedjax_priv.secure.he.{ntt,rlwe} against an independent big-int reference.

The reference below works on Python integers modulo the full q (no RNS, no
NTT): schoolbook negacyclic products, Chinese remaindering, and BFV decryption
by exact rational rounding. Ring sizes are the smallest the security table
allows (n = 1024 with one prime, n = 2048 with two) to keep it fast.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv.secure.he import params as he_params
from fedjax_priv.secure.he import rlwe
from fedjax_priv.secure.he.ntt import RnsRing, mul_mod

# --- Big-int reference ------------------------------------------------------------


def ref_mul(a, b, q):
  """Schoolbook product of two int polynomials mod (X^n + 1, q), on Python ints."""
  n = len(a)
  b = np.array([int(v) for v in b], dtype=object)
  out = np.zeros(n, dtype=object)
  for i, ai in enumerate(a):
    if ai:
      # X^i * b: shift by i, the coefficients that pass X^n come back negated.
      out += int(ai) * np.concatenate([-b[n - i:], b[:n - i]])
  return [int(v) % q for v in out]


def to_int(residues, primes):
  """CRT: residues [L, n] -> list of n ints in [0, q)."""
  q = int(np.prod([int(p) for p in primes], dtype=object))
  out = [0] * residues.shape[-1]
  for i, p in enumerate(primes):
    q_hat = q // p
    factor = q_hat * pow(q_hat, -1, p)
    for j, r in enumerate(residues[i]):
      out[j] += int(r) * factor
  return [v % q for v in out]


def to_residues(values, primes):
  return np.array([[int(v) % p for v in values] for p in primes], dtype=np.uint32)


def centred(v, q):
  v %= q
  return v - q if v > q // 2 else v


def ref_round(x, q, t):
  """round(t x / q) mod t, centred in (-t/2, t/2], by exact integer arithmetic."""
  m = (2 * t * (x % q) + q) // (2 * q) % t
  return m - t if m > t // 2 else m


# --- Fixtures ---------------------------------------------------------------------


@functools.cache
def ring(n, num_primes, t=2**16):
  return RnsRing(he_params.RlweParams(n, he_params.ntt_primes(n, num_primes), t))


def random_poly(rng, q, n):
  return [int(v) for v in rng.integers(0, 2**62, n, dtype=np.int64)] if q > 2**62 else [
      int(v) for v in rng.integers(0, q, n)]


# --- Modular arithmetic and NTT ---------------------------------------------------


def test_mul_mod_is_exact_on_random_and_extreme_residues():
  primes = he_params.ntt_primes(4096, 4)
  q = np.array(primes, dtype=np.uint64)[:, None]
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2**40, (4, 100_000)).astype(np.uint64) % q
  b = rng.integers(0, 2**40, (4, 100_000)).astype(np.uint64) % q
  extremes = np.array([0, 1, 2], dtype=np.uint64)
  a[:, :9] = np.concatenate([np.broadcast_to(extremes, (4, 3)), q - 1 - extremes,
                             q // 2 + extremes], axis=1)
  b[:, :9] = q - 1
  got = mul_mod(jnp.asarray(a, jnp.uint32), jnp.asarray(b, jnp.uint32), jnp.asarray(q, jnp.uint32))
  np.testing.assert_array_equal(np.asarray(got, np.uint64), a * b % q)


@pytest.mark.parametrize("n,num_primes", [(1024, 1), (2048, 2)])
def test_ntt_product_matches_schoolbook(n, num_primes):
  r = ring(n, num_primes)
  q = r.params.q
  rng = np.random.default_rng(n)
  a, b = random_poly(rng, q, n), random_poly(rng, q, n)
  a[0], a[-1] = q - 1, q - 1  # Extremes, and a term that wraps past X^n.
  residues = jnp.asarray(np.stack([to_residues(a, r.params.primes),
                                   to_residues(b, r.params.primes)]))
  prod = jax.jit(r.poly_mul)(residues[0], residues[1])
  assert to_int(np.asarray(prod), r.params.primes) == ref_mul(a, b, q)
  # The inverse transform undoes the forward one.
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: r.intt(r.ntt(x)))(residues)),
                                np.asarray(residues))


# --- Keys, encryption, decryption -------------------------------------------------


def test_keygen_encrypt_decrypt_match_reference():
  """Shared keys are RLWE samples; a ciphertext equals the big-int formula; decryption agrees."""
  r, num_holders = ring(2048, 2), 3
  params, n, q, t = r.params, 2048, r.params.q, r.params.t
  pk, s_hat = jax.jit(lambda k: rlwe.keygen(r, k, num_holders))(jax.random.key(0))
  intt = jax.jit(r.intt)
  shares = [[centred(v, q) for v in to_int(np.asarray(intt(s_hat[j])), params.primes)]
            for j in range(num_holders)]
  for share in shares:
    assert set(share) <= {-1, 0, 1} and len(set(share)) == 3
  s = [sum(col) for col in zip(*shares)]
  a = to_int(np.asarray(intt(pk.a_hat)), params.primes)
  b = to_int(np.asarray(intt(pk.b_hat)), params.primes)
  # b + a s = sum_j e_j: small, within the clipped-error bound of M holders.
  e = [centred(x + y, q) for x, y in zip(b, ref_mul(a, s, q))]
  assert max(abs(v) for v in e) <= num_holders * params.error_bound
  assert np.std(e) > 3.0 * np.sqrt(num_holders) * 0.8  # Really noisy, not zero.

  rng = np.random.default_rng(1)
  message = rng.integers(-t // 2 + 1, t // 2 + 1, n)
  u = rng.integers(-1, 2, n)
  e1, e2 = rng.integers(-19, 20, (2, n))
  ct = jax.jit(lambda *args: rlwe.encrypt_with(r, pk, *args))(
      *(jnp.asarray(v, jnp.int32) for v in (message, u, e1, e2)))
  delta = q // t
  want_c0 = [(x + int(y) + delta * int(m)) % q for x, y, m in zip(ref_mul(b, u, q), e1, message)]
  want_c1 = [(x + int(y)) % q for x, y in zip(ref_mul(a, u, q), e2)]
  assert to_int(np.asarray(ct.c0), params.primes) == want_c0
  assert to_int(np.asarray(ct.c1), params.primes) == want_c1

  # Reference decryption with the combined secret, and the threshold one in JAX.
  x = [(c0 + c1s) % q for c0, c1s in zip(want_c0, ref_mul(want_c1, s, q))]
  noise = [centred(v - delta * int(m), q) for v, m in zip(x, message)]
  assert max(abs(v) for v in noise) <= he_params.fresh_noise_bound(params, num_holders)
  assert [ref_round(v, q, t) for v in x] == message.tolist()
  got = jax.jit(lambda c, k: rlwe.decrypt(r, c, s_hat, k))(ct, jax.random.key(2))
  np.testing.assert_array_equal(np.asarray(got), message)
  # A partial decryption alone is not the message: every share is needed.
  alone = jax.jit(lambda c, k: rlwe.combine(
      r, c.c0, rlwe.partial_decrypt(r, c.c1, s_hat, k, 0)[:num_holders - 1]))(
          ct, jax.random.key(3))
  assert np.mean(np.asarray(alone) == message) < 0.01


def test_scale_and_round_matches_reference_up_to_the_noise_bound():
  """Decoding is exact for every noise up to the checked bound, at both signs."""
  r = ring(2048, 2, t=2**10 + 7)
  params, q, t, n = r.params, r.params.q, r.params.t, 2048
  num_clients = 4
  # The largest noise check_noise_budget admits for these K = 4 summed messages.
  limit = (q * (2**15 - 1) // 2**15 - num_clients * t * t) // (2 * t)
  rng = np.random.default_rng(3)
  message = [int(v) for v in rng.integers(-t // 2 + 1, t // 2 + 1, n)]
  summed_messages = [m + t * int(w) for m, w in zip(message, rng.integers(-2, 3, n))]
  noise = [int(v) for v in rng.integers(-limit, limit, n, dtype=np.int64)]
  noise[:4] = [limit, -limit, limit - 1, 0]
  delta = q // t
  x = [(delta * m + v) % q for m, v in zip(summed_messages, noise)]
  got = jax.jit(functools.partial(rlwe.scale_and_round, r))(jnp.asarray(
      to_residues(x, params.primes)))
  assert [ref_round(v, q, t) for v in x] == message
  np.testing.assert_array_equal(np.asarray(got), message)


def test_smudging_noise_is_uniform_on_its_range():
  r = ring(2048, 2)
  bound = 2**40  # Above 32 bits: exercises the multi-limb draw.
  draw = jax.jit(lambda k: rlwe.sample_smudging(r, k, (4, 2048), bound))(jax.random.key(4))
  values = np.array([centred(v, r.params.q) for v in to_int(
      np.asarray(draw).transpose(1, 0, 2).reshape(2, -1), r.params.primes)], dtype=np.float64)
  assert values.min() >= -bound and values.max() < bound
  assert values.min() < -0.99 * bound and values.max() > 0.99 * bound
  # Uniform on [-B, B): mean 0 and std B / sqrt(3), within a few standard errors.
  assert abs(values.mean()) < 5 * bound / np.sqrt(3 * values.size)
  assert abs(values.std() / (bound / np.sqrt(3)) - 1) < 0.02


# --- Homomorphic sums ---------------------------------------------------------------


SUM_WIDTH = 8  # Coordinates per client: small, so that 4096 clients stay fast.


@functools.lru_cache(maxsize=None)
def _sum_program(slots: int):
  """(ring, keys, smudging bound, jitted encrypt-sum-decrypt) for `slots` client slots.

  Cohorts smaller than `slots` pad with zero-weight slots, so the cohorts of
  one group share a compile. Three key holders with smudging fit the n = 2048
  budget up to a few hundred clients; 4096 clients fit one key, no smudging.
  """
  r = ring(2048, 2, t=2**16)
  num_holders, stat_bits = (3, 8) if slots < 4096 else (1, 0)
  he_params.check_noise_budget(r.params, slots, num_holders, stat_bits)
  smudging = he_params.smudging_bound(r.params, slots, num_holders, stat_bits)
  pk, s_hat = jax.jit(lambda k: rlwe.keygen(r, k, num_holders))(jax.random.key(5))

  @jax.jit
  def run(messages, weights, key):
    padded = jnp.pad(messages, [(0, 0), (0, 0), (0, 2048 - SUM_WIDTH)])
    keys = jax.random.split(key, slots)
    cts = jax.vmap(lambda m, k: rlwe.encrypt(r, pk, m, k))(padded, keys)
    total = rlwe.masked_sum(r, weights, cts)
    return rlwe.decrypt(r, total, s_hat, jax.random.fold_in(key, 1), smudging)

  return run


@pytest.mark.parametrize("num_clients,slots", [(1, 64), (2, 64), (33, 64), (4096, 4096)])
def test_decrypted_sum_equals_plain_sum(num_clients, slots):
  """The threshold-decrypted sum of K ciphertexts is the integer sum, exactly."""
  rng = np.random.default_rng(num_clients)
  limit = 2**15 // num_clients
  messages = np.zeros((slots, 1, SUM_WIDTH), np.int64)
  messages[:num_clients] = rng.integers(-limit, limit + 1, (num_clients, 1, SUM_WIDTH))
  weights = np.zeros(slots, np.float32)
  weights[:num_clients] = rng.random(num_clients) < 0.8  # Random dropouts.
  weights[0] = 1.0
  # Padded slots carry garbage that their zero weight must keep out of the sum.
  messages[num_clients:] = rng.integers(-limit, limit + 1, (slots - num_clients, 1, SUM_WIDTH))
  got = np.asarray(_sum_program(slots)(jnp.asarray(messages, jnp.int32), jnp.asarray(weights),
                                       jax.random.key(6)))
  want = (messages * weights[:, None, None].astype(np.int64)).sum(0)
  np.testing.assert_array_equal(got[:, :SUM_WIDTH], want)
  np.testing.assert_array_equal(got[:, SUM_WIDTH:], 0)


def test_sums_beyond_half_t_wrap_modulo_t():
  r = ring(1024, 1, t=2**4)
  he_params.check_noise_budget(r.params, 3, 1, 0)

  @jax.jit
  def run(key):
    pk, s_hat = rlwe.keygen(r, key, 1)
    messages = jnp.full((3, 1, 1024), 7, jnp.int32)  # 21 = 5 (mod 16).
    cts = jax.vmap(lambda m, k: rlwe.encrypt(r, pk, m, k))(messages, jax.random.split(key, 3))
    total = rlwe.masked_sum(r, jnp.ones(3), cts)
    return rlwe.decrypt(r, total, s_hat, key)

  np.testing.assert_array_equal(np.asarray(run(jax.random.key(7))), 5)
