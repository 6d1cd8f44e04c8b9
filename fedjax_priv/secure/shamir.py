"""t-of-n Shamir secret sharing over GF(p), p = 65521, vectorised in uint32 jnp.

A secret s is the constant term of a random polynomial f of degree t - 1;
holder x gets f(x). Any t shares give s back by Lagrange interpolation at 0;
t - 1 shares say nothing about it. Secure aggregation shares every client's
secrets this way so the server can recover those of clients that drop out.

The field is the largest prime below 2^16, so the product of two elements is
below 2^32 and all arithmetic stays exact in uint32 without 64-bit types
(JAX disables x64 by default). Every function broadcasts over leading axes,
so one call shares or reconstructs the secrets of a whole cohort.

A 16-bit field is a simulation choice: it exercises the data flow and the
threshold exactly, but real deployments share 128- or 256-bit secrets.

References:
  Shamir 1979, "How to Share a Secret" (CACM).
  Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
  Machine Learning" (CCS): t-of-n sharing of the self-mask seed and the
  key-agreement secret of every client.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PRIME = 65521
_P = np.uint32(PRIME)  # A numpy constant: importing must not start a JAX backend.


def mulmod(a: jax.Array, b: jax.Array) -> jax.Array:
  """a * b mod p for uint32 a, b in [0, p): the product is < 2^32, so exact."""
  return (a * b) % _P


def powmod(base: jax.Array, exponent: jax.Array) -> jax.Array:
  """base ** exponent mod p, elementwise, for uint32 exponents in [0, 2^16)."""
  result = jnp.ones_like(base)
  for bit in range(16):  # Square-and-multiply over the 16 exponent bits (static).
    take = ((exponent >> bit) & 1).astype(bool)
    result = jnp.where(take, mulmod(result, base), result)
    base = mulmod(base, base)
  return result


def inverse(a: jax.Array) -> jax.Array:
  """a^-1 mod p by Fermat's little theorem (a != 0)."""
  return powmod(a, jnp.full_like(a, PRIME - 2))


def _prodmod(a: jax.Array) -> jax.Array:
  """Product mod p over the last axis, as a log-depth tree of mulmods."""
  n = a.shape[-1]
  width = 1 << max(n - 1, 0).bit_length()
  a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - n)], constant_values=1)
  while a.shape[-1] > 1:
    a = mulmod(a[..., 0::2], a[..., 1::2])
  return a[..., 0]


def _check_threshold(threshold: int) -> None:
  if not (isinstance(threshold, int) and 1 <= threshold < PRIME):
    raise ValueError(f"threshold must be an int in [1, {PRIME}), got {threshold!r}")


def share(key: jax.Array, secrets: jax.Array, xs: jax.Array, threshold: int,
          active: jax.Array | None = None) -> jax.Array:
  """Shares of `secrets` at the points `xs` under random degree-(t-1) polynomials.

  Args:
    key: PRNG key for the polynomials' random coefficients.
    secrets: uint32[...] in [0, p).
    xs: uint32[..., h] holder coordinates, distinct and non-zero mod p (e.g.
      slot + 1); leading axes broadcast against `secrets`.
    threshold: t >= 1, the number of shares that reconstruct a secret.
    active: optional traced int t' in [1, t], or one per secret (shape of
      `secrets`), a threshold known only when the round runs (e.g. a
      majority of its real clients): the coefficients of degree >= t' are
      zero, so the polynomials have degree t' - 1 and t' shares reconstruct
      (`reconstruct(..., active=t')`). The draws are those of the static t,
      so active = t shares exactly as without it.

  Returns:
    uint32[..., h]: f_s(x) for each secret s and each of its holders x.
  """
  _check_threshold(threshold)
  secrets = secrets.astype(jnp.uint32)
  coeffs = jax.random.randint(key, (threshold - 1, *secrets.shape), 0, PRIME).astype(jnp.uint32)
  if active is not None:
    degree = jnp.arange(1, threshold).reshape((-1,) + (1,) * secrets.ndim)
    coeffs = jnp.where(degree < active, coeffs, jnp.uint32(0))
  xs = xs.astype(jnp.uint32)
  acc = jnp.zeros(jnp.broadcast_shapes(secrets.shape + (1,), xs.shape), jnp.uint32)

  def horner(acc, c):
    # acc * x < 2^32 - 2^17 and c < 2^16: the sum stays below 2^32.
    return (mulmod(acc, xs) + c[..., None]) % _P, None

  acc, _ = jax.lax.scan(horner, acc, coeffs[::-1])
  return (mulmod(acc, xs) + secrets[..., None]) % _P


def lagrange_at_zero(xs: jax.Array, active: jax.Array | None = None) -> jax.Array:
  """Coefficients l_j with f(0) = sum_j l_j f(x_j) for deg f < t.

  l_j = prod_{m != j} x_m / (x_m - x_j). O(t^2) per row of xs.

  Args:
    xs: uint32[..., t], distinct and non-zero mod p.
    active: optional traced int t' in [1, t], or one per row of xs ([...]):
      interpolate through the first t' points only (deg f < t'); the other
      coefficients are 0.

  Returns:
    uint32[..., t] in [0, p).
  """
  xs = xs.astype(jnp.uint32)
  t = xs.shape[-1]
  skip = jnp.eye(t, dtype=bool)
  if active is not None:
    used = jnp.arange(t) < jnp.asarray(active)[..., None]         # [..., m]
    skip = skip | ~used[..., None, :]                             # [..., j, m]: leave x_m out
  others = jnp.broadcast_to(xs[..., None, :], xs.shape + (t,))   # [..., j, m] = x_m
  diffs = (others + _P - xs[..., :, None]) % _P                   # x_m - x_j
  numerator = _prodmod(jnp.where(skip, jnp.uint32(1), others))
  denominator = _prodmod(jnp.where(skip, jnp.uint32(1), diffs))
  weights = mulmod(numerator, inverse(denominator))
  return weights if active is None else jnp.where(used, weights, jnp.uint32(0))


def reconstruct(xs: jax.Array, shares: jax.Array, active: jax.Array | None = None
                ) -> jax.Array:
  """The secrets from t shares each, by Lagrange interpolation at 0.

  Args:
    xs: uint32[..., t] the coordinates of the shares; a row shared by many
      secrets (shape [t]) is interpolated once and broadcast.
    shares: uint32[..., t], broadcasting against xs.
    active: optional traced int t' in [1, t], or one per secret: use the
      first t' shares only.

  Returns:
    uint32[...] in [0, p): the secrets, exact when the shares (the first t'
    with `active`) are genuine shares of polynomials of degree < t (< t').
  """
  weights = lagrange_at_zero(xs, active)
  # Each term is < p, so a sum over t < 2^16 terms stays below 2^32.
  return jnp.sum(mulmod(weights, shares.astype(jnp.uint32)), axis=-1, dtype=jnp.uint32) % _P
