"""Residue-number-system arithmetic and the negacyclic number-theoretic transform in uint32.

A polynomial of R_q = Z_q[X] / (X^n + 1), q = q_1 ... q_L, is stored as its L
residue polynomials: a uint32 array [..., L, n] with entry [..., i, j] in
[0, q_i). Any leading axes (ciphertexts, clients) are batch axes, so every
function here vectorises over them and runs under jit/vmap with JAX's default
32-bit integers (no x64).

Exact modular products without 64-bit integers: for q_i < 2^26 the quotient
floor(a b / q_i) is estimated in float32 (off by at most ~20), the remainder
a b - k q_i is computed exactly modulo 2^32 in wrapping uint32 arithmetic and,
being below 2^31 in magnitude, read back as int32; a second float32 step and a
sign fix bring it into [0, q_i). Products of 26-bit residues in float32 with
exact uint32 corrections were chosen over 16-bit limb splitting of 31-bit
residues because they need fewer multiplications per product; the benchmark
`experiments/benchmarks/he_aggregation.py` reports the resulting speed.

The transform is the negacyclic NTT of Longa & Naehrig (2016): Cooley-Tukey
butterflies with powers of a primitive 2n-th root psi in bit-reversed order
(normal order in, bit-reversed out) and the Gentleman-Sande inverse, so that
intt(ntt(a) * ntt(b)) is the product a b mod (X^n + 1) without zero padding.

References:
  Longa & Naehrig. 2016. Speeding up the Number Theoretic Transform for Faster
  Ideal Lattice-Based Cryptography. CANS 2016 (Algorithms 1 and 2).
  Bajard, Eynard, Hasan & Zucca. 2016. A Full RNS Variant of FV like Somewhat
  Homomorphic Encryption Schemes. SAC 2016 (RNS representation of BFV).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv.secure.he.params import RlweParams


def quotient_remainder(a: jax.Array, b: jax.Array, q: jax.Array, b_over_q: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """(floor(a b / q), a b mod q) for uint32 a, b in [0, q), q < 2^26, all broadcastable.

  `b_over_q` is float32 b / q (precomputed for constant b). The float32
  estimate of a b / q carries at most ~5 rounding errors of relative size 2^-24
  on a value below 2^26, so it is off by less than 21 and the remainder
  r = a b - k q lies in (-21 q, 21 q), inside int32: wrapping uint32 arithmetic
  gives it exactly. The second estimate, of r / q < 21, is exact to far below
  one half, leaving |r'| <= q / 2 for the final sign fix.
  """
  k = (a.astype(jnp.float32) * b_over_q).astype(jnp.uint32)  # >= 0, so truncation = floor.
  r = jax.lax.bitcast_convert_type(a * b - k * q, jnp.int32)
  qi = q.astype(jnp.int32)
  k2 = jnp.round(r.astype(jnp.float32) * (1.0 / q.astype(jnp.float32))).astype(jnp.int32)
  r = r - k2 * qi
  negative = r < 0
  quotient = k.astype(jnp.int32) + k2 - negative.astype(jnp.int32)
  return quotient, jnp.where(negative, r + qi, r).astype(jnp.uint32)


def mul_mod(a: jax.Array, b: jax.Array, q: jax.Array, b_over_q: jax.Array | None = None
            ) -> jax.Array:
  """a b mod q, elementwise, for uint32 residues in [0, q) with q < 2^26."""
  if b_over_q is None:
    b_over_q = b.astype(jnp.float32) / q.astype(jnp.float32)
  return quotient_remainder(a, b, q, b_over_q)[1]


def add_mod(a: jax.Array, b: jax.Array, q: jax.Array) -> jax.Array:
  s = a + b
  return jnp.where(s >= q, s - q, s)


def sub_mod(a: jax.Array, b: jax.Array, q: jax.Array) -> jax.Array:
  d = a + (q - b)
  return jnp.where(d >= q, d - q, d)


def _bit_reverse(i: int, bits: int) -> int:
  return int(format(i, f"0{bits}b")[::-1], 2) if bits else 0


def _primitive_root_2n(p: int, n: int) -> int:
  """The smallest-base primitive 2n-th root of unity mod p (p = 1 mod 2n)."""
  for g in range(2, p):
    psi = pow(g, (p - 1) // (2 * n), p)
    if pow(psi, n, p) == p - 1:
      return psi
  raise ValueError(f"no primitive {2 * n}-th root of unity mod {p}")


class RnsRing:
  """R_q in RNS form: modular arithmetic, sampling helpers and the NTT.

  Built once per parameter set on the host (numpy tables); its methods are
  pure jnp functions of uint32 arrays [..., L, n] and can be jitted and vmapped.
  """

  def __init__(self, params: RlweParams):
    self.params = params
    self.n = n = params.n
    self.num_primes = len(params.primes)
    primes = np.array(params.primes, dtype=np.int64)
    self.q = primes.astype(np.uint32)[:, None]  # [L, 1]: broadcasts over coefficients.
    log_n = n.bit_length() - 1
    rev = [_bit_reverse(i, log_n) for i in range(n)]
    fwd, inv = [], []
    for p in params.primes:
      psi = _primitive_root_2n(p, n)
      psi_inv = pow(psi, -1, p)
      fwd.append([pow(psi, r, p) for r in rev])
      inv.append([pow(psi_inv, r, p) for r in rev])
    fwd = np.array(fwd, dtype=np.int64)
    inv = np.array(inv, dtype=np.int64)
    # The inverse transform's 1/n is folded into its last stage (m = 1).
    n_inv = np.array([pow(n, -1, p) for p in params.primes], dtype=np.int64)
    self._last = np.stack([n_inv, inv[:, 1] * n_inv % primes], axis=1)  # [L, 2]
    self._fwd = fwd.astype(np.uint32)
    self._inv = inv.astype(np.uint32)
    self._fwd_q = (fwd / primes[:, None]).astype(np.float32)
    self._inv_q = (inv / primes[:, None]).astype(np.float32)

  # --- elementwise ---------------------------------------------------------------

  def add(self, a: jax.Array, b: jax.Array) -> jax.Array:
    return add_mod(a, b, self.q)

  def sub(self, a: jax.Array, b: jax.Array) -> jax.Array:
    return sub_mod(a, b, self.q)

  def mul(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """Coefficient-wise product (in the NTT domain: the ring product)."""
    return mul_mod(a, b, self.q)

  def negate(self, a: jax.Array) -> jax.Array:
    return jnp.where(a == 0, a, self.q - a)

  def from_signed(self, x: jax.Array) -> jax.Array:
    """int32 [..., n] with |x| < min q_i -> its residues uint32 [..., L, n]."""
    x = x[..., None, :].astype(jnp.int32)
    return jnp.where(x < 0, x + self.q.astype(jnp.int32), x).astype(jnp.uint32)

  def from_unsigned(self, x: jax.Array) -> jax.Array:
    """uint32 [..., n] with 0 <= x < 2^32 -> its residues uint32 [..., L, n]."""
    return x[..., None, :].astype(jnp.uint32) % self.q

  def scalar(self, value: int) -> np.ndarray:
    """The residues of the integer `value` as a uint32 [L, 1] constant."""
    return np.array([[value % p] for p in self.params.primes], dtype=np.uint32)

  def mul_scalar(self, a: jax.Array, value: int) -> jax.Array:
    """a * value mod q for a Python integer `value` (e.g. Delta)."""
    c = self.scalar(value)
    return mul_mod(a, c, self.q, (c / self.q.astype(np.float64)).astype(np.float32))

  def sum(self, x: jax.Array, axis: int = 0) -> jax.Array:
    """Sum mod q over `axis` (e.g. over clients), never overflowing uint32.

    Residues are below 2^26, so 32 of them sum below 2^31: sum blocks of 32
    exactly, reduce, and repeat until one block is left.
    """
    x = jnp.moveaxis(x, axis, 0)
    block = 32
    while x.shape[0] > 1:
      pad = -x.shape[0] % block
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
      x = x.reshape(-1, min(block, x.shape[0]), *x.shape[1:]).sum(axis=1, dtype=jnp.uint32)
      x = x % self.q
    return x[0]

  # --- transforms ----------------------------------------------------------------

  def ntt(self, a: jax.Array) -> jax.Array:
    """Forward negacyclic NTT of uint32 [..., L, n]; output in bit-reversed order."""
    batch, n, num_primes = a.shape[:-2], self.n, self.num_primes
    q = self.q[:, :, None]
    m, t = 1, n
    while m < n:
      t //= 2
      a = a.reshape(*batch, num_primes, m, 2, t)
      w = self._fwd[:, m:2 * m, None]
      w_q = self._fwd_q[:, m:2 * m, None]
      u, v = a[..., 0, :], mul_mod(a[..., 1, :], w, q, w_q)
      a = jnp.stack([add_mod(u, v, q), sub_mod(u, v, q)], axis=-2)
      m *= 2
    return a.reshape(*batch, num_primes, n)

  def intt(self, a: jax.Array) -> jax.Array:
    """Inverse of `ntt`: bit-reversed uint32 [..., L, n] in, normal order out."""
    batch, n, num_primes = a.shape[:-2], self.n, self.num_primes
    q = self.q[:, :, None]
    m, t = n // 2, 1
    while m >= 1:
      a = a.reshape(*batch, num_primes, m, 2, t)
      u, v = a[..., 0, :], a[..., 1, :]
      if m > 1:
        w, w_q = self._inv[:, m:2 * m, None], self._inv_q[:, m:2 * m, None]
        a = jnp.stack([add_mod(u, v, q), mul_mod(sub_mod(u, v, q), w, q, w_q)], axis=-2)
      else:
        scale = self._last[:, :, None].astype(np.uint32)  # [L, 2, 1]: n^-1 and psi^-1 n^-1.
        scale_q = (self._last / self.q.astype(np.float64))[:, :, None].astype(np.float32)
        a = jnp.stack([mul_mod(add_mod(u, v, q), scale[:, :1], q, scale_q[:, :1]),
                       mul_mod(sub_mod(u, v, q), scale[:, 1:], q, scale_q[:, 1:])], axis=-2)
      t *= 2
      m //= 2
    return a.reshape(*batch, num_primes, n)

  def poly_mul(self, a: jax.Array, b: jax.Array) -> jax.Array:
    """Negacyclic product a b mod (X^n + 1, q) of coefficient-form polynomials."""
    return self.intt(self.mul(self.ntt(a), self.ntt(b)))
