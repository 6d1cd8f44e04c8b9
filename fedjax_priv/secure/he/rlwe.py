"""BFV public-key encryption over R_q with an n-of-n shared secret key (threshold decryption).

Keys (distributed key generation with a common random polynomial a):
  each of M key holders j draws a ternary secret s_j and an error e_j and
  publishes b_j = -a s_j + e_j; the public key is (b, a) = (sum_j b_j, a), the
  key of the secret s = sum_j s_j, which no proper subset of holders knows.
Encryption of m in Z_t^n (centred, coefficient packing: n integers per ciphertext):
  u ternary, e1, e2 errors;  c = (c0, c1) = (b u + e1 + Delta m, a u + e2).
Addition: coefficient-wise mod q; ciphertexts stay in coefficient form.
Threshold decryption: holder j publishes d_j = c1 s_j + E_j with smudging noise
  E_j uniform on [-B_sm, B_sm); anyone then computes x = c0 + sum_j d_j
  = Delta m + noise and m = round(t x / q) mod t.

n-of-n sharing has no dropout tolerance on the decryption side: if one key
holder does not answer, its d_j is missing and the sum cannot be decrypted (a
t-of-n variant would Shamir-share each s_j). Clients that drop before sending
a ciphertext cost nothing: the sum of the others is a valid ciphertext.

Scale-and-round without big integers (Halevi, Polyakov & Shoup 2019): with
x_i' = x_i (q / q_i)^-1 mod q_i, t x / q = sum_i x_i' t / q_i - t v for an
integer v, so modulo t, t x / q = sum_i (floor(x_i' t / q_i) + (x_i' t mod q_i) / q_i).
The integer parts come from the exact quotient of the modular product (t < q_i),
the fractions are summed in float32, error below 2^-16 (`params.check_noise_budget`
leaves that margin).

Randomness is JAX's counter-based PRNG (threefry), not a vetted cryptographic
generator: this simulates the arithmetic, noise growth and cost of the scheme.

References:
  Lyubashevsky, Peikert & Regev. 2010. On Ideal Lattices and Learning with
  Errors over Rings. EUROCRYPT 2010.
  Brakerski. 2012. Fully Homomorphic Encryption without Modulus Switching from
  Classical GapSVP. CRYPTO 2012.
  Fan & Vercauteren. 2012. Somewhat Practical Fully Homomorphic Encryption.
  IACR ePrint 2012/144.
  Asharov, Jain, Lopez-Alt, Tromer, Vaikuntanathan & Wichs. 2012. Multiparty
  Computation with Low Communication, Computation and Interaction via Threshold
  FHE. EUROCRYPT 2012 (shared keys, partial decryptions with smudging noise).
  Halevi, Polyakov & Shoup. 2019. An Improved RNS Variant of the BFV
  Homomorphic Encryption Scheme. CT-RSA 2019 (RNS decryption).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv.secure.he.ntt import RnsRing, quotient_remainder, mul_mod


class PublicKey(NamedTuple):
  """(b, a) in the NTT domain, uint32 [L, n] each."""
  b_hat: jax.Array
  a_hat: jax.Array


class Ciphertext(NamedTuple):
  """(c0, c1) in coefficient form, uint32 [..., L, n] each."""
  c0: jax.Array
  c1: jax.Array


def sample_ternary(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform on {-1, 0, 1}, int32."""
  return jax.random.randint(key, shape, -1, 2, dtype=jnp.int32)


def sample_error(key: jax.Array, shape: tuple[int, ...], sigma: float, bound: int) -> jax.Array:
  """Rounded N(0, sigma^2) clipped to [-bound, bound] (SEAL's clipped normal), int32."""
  e = jnp.round(sigma * jax.random.normal(key, shape, jnp.float32))
  return jnp.clip(e, -bound, bound).astype(jnp.int32)


def sample_smudging(ring: RnsRing, key: jax.Array, shape: tuple[int, ...], bound: int
                    ) -> jax.Array:
  """Uniform integers on [-bound, bound) (bound a power of two) as residues [..., L, n].

  The integer can exceed 32 bits, so it is drawn as 16-bit limbs and its
  residues are accumulated limb by limb.
  """
  if bound == 0:
    return jnp.zeros((*shape[:-1], ring.num_primes, shape[-1]), jnp.uint32)
  bits = bound.bit_length()  # 2 * bound = 2^bits values.
  num_limbs = -(-bits // 16)
  limbs = jax.random.bits(key, (num_limbs, *shape), jnp.uint32) >> 16
  top_bits = bits - 16 * (num_limbs - 1)
  limbs = limbs.at[-1].set(limbs[-1] >> (16 - top_bits))
  total = ring.negate(jnp.broadcast_to(ring.scalar(bound), (*shape[:-1], ring.num_primes,
                                                             shape[-1])))
  for j in range(num_limbs):
    total = ring.add(total, ring.mul_scalar(ring.from_unsigned(limbs[j]), 2**(16 * j)))
  return total


def keygen(ring: RnsRing, key: jax.Array, num_key_holders: int
           ) -> tuple[PublicKey, jax.Array]:
  """Distributed key generation, simulated in one place.

  Args:
    ring: the RNS ring of the parameter set.
    key: PRNG key; the common random polynomial a and every holder's secret
      come from it.
    num_key_holders: M >= 1 (1: an ordinary single-key scheme).

  Returns:
    (public key, secret shares s_j in the NTT domain, uint32 [M, L, n]).
  """
  params, n = ring.params, ring.n
  key_a, key_s, key_e = jax.random.split(key, 3)
  # a uniform mod q is uniform in the NTT domain too, so it is drawn there.
  a_hat = jax.random.randint(key_a, (ring.num_primes, n), 0, ring.q.astype(np.int32),
                             dtype=jnp.int32).astype(jnp.uint32)
  s_hat = ring.ntt(ring.from_signed(sample_ternary(key_s, (num_key_holders, n))))
  e = ring.from_signed(sample_error(key_e, (num_key_holders, n), params.sigma,
                                    params.error_bound))
  b_shares = ring.sub(e, ring.intt(ring.mul(a_hat, s_hat)))
  b_hat = ring.ntt(ring.sum(b_shares, axis=0))
  return PublicKey(b_hat, a_hat), s_hat


def encode(ring: RnsRing, message: jax.Array) -> jax.Array:
  """Delta * m mod q for m int32 [..., n], taken mod t into (-t/2, t/2] first."""
  t = ring.params.t
  m = jnp.remainder(message.astype(jnp.int32), t)
  m = jnp.where(m > t // 2, m - t, m)
  return ring.mul_scalar(ring.from_signed(m), ring.params.delta)


def encrypt(ring: RnsRing, pk: PublicKey, message: jax.Array, key: jax.Array) -> Ciphertext:
  """Encrypts int32 [..., n] messages (each row one ciphertext) under `pk`.

  Returns:
    Ciphertext with c0, c1 uint32 [..., L, n]. Cost per ciphertext: one forward
    and two inverse NTTs per prime.
  """
  params = ring.params
  key_u, key_e = jax.random.split(key)
  u = sample_ternary(key_u, message.shape)
  e = sample_error(key_e, (2, *message.shape), params.sigma, params.error_bound)
  return encrypt_with(ring, pk, message, u, e[0], e[1])


def encrypt_with(ring: RnsRing, pk: PublicKey, message: jax.Array, u: jax.Array,
                 e1: jax.Array, e2: jax.Array) -> Ciphertext:
  """(b u + e1 + Delta m, a u + e2) for given int32 [..., n] ephemeral u and errors e1, e2."""
  u_hat = ring.ntt(ring.from_signed(u))
  c0 = ring.add(ring.add(ring.intt(ring.mul(pk.b_hat, u_hat)), ring.from_signed(e1)),
                encode(ring, message))
  c1 = ring.add(ring.intt(ring.mul(pk.a_hat, u_hat)), ring.from_signed(e2))
  return Ciphertext(c0, c1)


def add(ring: RnsRing, a: Ciphertext, b: Ciphertext) -> Ciphertext:
  return Ciphertext(ring.add(a.c0, b.c0), ring.add(a.c1, b.c1))


def masked_sum(ring: RnsRing, weights: jax.Array, stacked: Ciphertext) -> Ciphertext:
  """Sum of the ciphertexts [K, ...] whose weight [K] is > 0; the rest count as zero."""
  keep = (weights > 0).reshape(-1, *([1] * (stacked.c0.ndim - 1)))
  return Ciphertext(*(ring.sum(jnp.where(keep, c, 0).astype(jnp.uint32), axis=0)
                      for c in stacked))


def partial_decrypt(ring: RnsRing, c1: jax.Array, s_hat: jax.Array, key: jax.Array,
                    smudging: int) -> jax.Array:
  """Every key holder's share of a decryption: d_j = c1 s_j + E_j.

  Args:
    ring: the RNS ring.
    c1: uint32 [..., L, n], the second component of the (summed) ciphertext.
    s_hat: uint32 [M, L, n], the holders' secret shares in the NTT domain.
    key: PRNG key for the smudging noise.
    smudging: B_sm from `params.smudging_bound` (0: none).

  Returns:
    uint32 [M, ..., L, n].
  """
  c1_hat = ring.ntt(c1)
  s_hat = s_hat.reshape(s_hat.shape[0], *([1] * (c1.ndim - 2)), *s_hat.shape[1:])
  shares = ring.intt(ring.mul(c1_hat[None], s_hat))
  shape = (*shares.shape[:-2], shares.shape[-1])
  return ring.add(shares, sample_smudging(ring, key, shape, smudging))


def combine(ring: RnsRing, c0: jax.Array, partials: jax.Array) -> jax.Array:
  """Decrypts from c0 [..., L, n] and all M partial decryptions [M, ..., L, n]: int32 [..., n].

  Returns the message centred in (-t/2, t/2].
  """
  x = ring.add(c0, ring.sum(partials, axis=0))
  return scale_and_round(ring, x)


def scale_and_round(ring: RnsRing, x: jax.Array) -> jax.Array:
  """round(t x / q) mod t, centred, for x = Delta m + noise given as residues [..., L, n]."""
  params = ring.params
  t = params.t
  q_hat_inv = ring.scalar(0)
  for i, p in enumerate(params.primes):
    q_hat_inv[i, 0] = pow(params.q // p % p, -1, p)
  x = mul_mod(x, q_hat_inv, ring.q, (q_hat_inv / ring.q.astype(np.float64)).astype(np.float32))
  t_res = np.full_like(ring.q, t)
  whole, frac = quotient_remainder(x, t_res, ring.q,
                                    (t_res / ring.q.astype(np.float64)).astype(np.float32))
  inv_q = (1.0 / ring.q.astype(np.float64)).astype(np.float32)
  # Each whole part is below t < 2^25, so L <= 33 of them fit int32. The
  # float32 accumulator sheds its integer part after every term to stay in
  # [0, 2), where its rounding error is below 2^-22 per term.
  integer = jnp.zeros(x.shape[:-2] + x.shape[-1:], jnp.int32)
  acc = jnp.zeros(x.shape[:-2] + x.shape[-1:], jnp.float32)
  for i in range(ring.num_primes):
    acc = acc + frac[..., i, :].astype(jnp.float32) * inv_q[i, 0]
    carry = jnp.floor(acc)
    acc = acc - carry
    integer = integer + whole[..., i, :] + carry.astype(jnp.int32)
  m = jnp.remainder(integer + jnp.round(acc).astype(jnp.int32), t)
  return jnp.where(m > t // 2, m - t, m)


def decrypt(ring: RnsRing, ct: Ciphertext, s_hat: jax.Array, key: jax.Array,
            smudging: int = 0) -> jax.Array:
  """Threshold decryption with every holder's share: int32 [..., n] centred messages."""
  return combine(ring, ct.c0, partial_decrypt(ring, ct.c1, s_hat, key, smudging))
