"""Integer noise for distributed DP: the discrete Gaussian, Poisson and Skellam samplers.

Every sampler is vectorised over all coordinates and jittable. Randomness
comes from JAX's counter-based PRNG and the samplers use float32 arithmetic:
fine for research simulation, not a hardened sampler (Mironov 2012 shows how
floating-point noise can leak).

References:
  Canonne, Kamath & Steinke 2020, "The Discrete Gaussian for Differential
  Privacy" (NeurIPS): the discrete Gaussian sampler.
  Hoermann 1993, "The transformed rejection method for generating Poisson
  random variables" (PTRS).
  Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for Differentially
  Private Federated Learning" (NeurIPS).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from fedjax_priv.checks import check_positive

# Rejection samplers run at most this many vectorised rounds. The discrete
# Gaussian sampler accepts a candidate with probability >= 0.44 for every
# sigma > 0 (checked on a grid in the tests), so a coordinate is still
# unaccepted after 128 rounds with probability <= 0.56^128 < 1e-32; PTRS
# accepts with probability >= 0.8, so the bound is far smaller there. An
# unaccepted coordinate gets 0 noise; its probability is an extra delta
# (at most d * 1e-32 per client and round), negligible next to any delta used.
MAX_SAMPLER_ROUNDS = 128

# PTRS is valid for lam >= 10; below, jax.random.poisson's inversion sampler
# is exact. Above ~1e6, jax.random.poisson's float32 log-density cancels
# catastrophically (its sample variance is off by several percent), hence
# our own PTRS with a cancellation-free acceptance test.
_PTRS_MIN_LAM = 10.0


def discrete_gaussian(key: jax.Array, sigma: float, shape: Sequence[int]) -> jax.Array:
  """Independent draws from the discrete Gaussian N_Z(0, sigma^2).

  P[X = x] is proportional to exp(-x^2 / (2 sigma^2)) on the integers. Its
  variance is slightly below sigma^2 for sigma < 1 and equal to it up to
  ~1e-9 relative error above sigma ~ 1.

  Algorithm 3 of Canonne, Kamath & Steinke (2020): draw Y from the discrete
  Laplace with scale t = floor(sigma) + 1 (a difference of two geometric
  variables, each floor(t E) with E ~ Exp(1)) and accept it with probability
  exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2)). We chose exact rejection over a
  truncated inverse CDF because it needs no table (sigma reaches 1e5 at 20
  bits) and its only error is the failure event, whose probability is
  bounded (see MAX_SAMPLER_ROUNDS). All coordinates are drawn together in a
  `lax.while_loop` that stops once every coordinate has accepted (about
  log(d) / 1.4 rounds), or after MAX_SAMPLER_ROUNDS.

  Args:
    key: PRNG key.
    sigma: the scale, a Python float > 0, in integer units. float32 keeps
      t E exact to ~1e-7 relative, fine up to sigma ~ 1e6.
    shape: output shape.

  Returns:
    int32 array of `shape`.
  """
  sigma = check_positive("sigma", sigma)
  shape = tuple(shape)
  t = float(math.floor(sigma) + 1)
  center, two_var = sigma * sigma / t, 2.0 * sigma * sigma

  def propose(round_key):
    exp_key, accept_key = jax.random.split(round_key)
    e = jax.random.exponential(exp_key, (2, *shape), jnp.float32)
    y = jnp.floor(t * e[0]) - jnp.floor(t * e[1])
    accept = jax.random.uniform(accept_key, shape) < jnp.exp(
        -jnp.square(jnp.abs(y) - center) / two_var)
    return y.astype(jnp.int32), accept

  return _rejection_loop(key, shape, propose)


def poisson(key: jax.Array, lam: float, shape: Sequence[int]) -> jax.Array:
  """Independent Poisson(lam) draws, accurate for large lam too.

  For lam < 10 this is `jax.random.poisson`. Above, PTRS (Hoermann 1993) with
  two changes that keep float32 exact enough at lam up to ~1e7: the proposal
  is computed as an offset from floor(lam), and the log acceptance ratio
  -lam + k log lam - log k! is evaluated in the cancellation-free form
  -lam bd(r) - log(2 pi k) / 2 - stirling(k), r = (k - lam) / lam.

  Args:
    key: PRNG key.
    lam: the mean, a Python float >= 0.
    shape: output shape.

  Returns:
    int32 array of `shape`.
  """
  lam = float(lam)
  if not (math.isfinite(lam) and 0 <= lam < 2.0**30):
    raise ValueError(f"lam must be finite and in [0, 2^30), got {lam!r}")
  shape = tuple(shape)
  if lam < _PTRS_MIN_LAM:
    return jax.random.poisson(key, lam, shape, jnp.int32)
  base, frac = math.floor(lam), lam - math.floor(lam)
  b = 0.931 + 2.53 * math.sqrt(lam)
  a = -0.059 + 0.02483 * b
  log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
  v_r = 0.9277 - 3.6224 / (b - 2)

  def propose(round_key):
    u_key, v_key = jax.random.split(round_key)
    u = jax.random.uniform(u_key, shape, jnp.float32, -0.5, 0.5)
    v = jax.random.uniform(v_key, shape, jnp.float32)
    us = 0.5 - jnp.abs(u)
    offset = jnp.floor((2 * a / us + b) * u + (frac + 0.43))  # k - floor(lam)
    k = offset + base
    log_ratio = jnp.log(v) + log_inv_alpha - jnp.log(a / jnp.square(us) + b)
    k_safe = jnp.maximum(k, 1.0)
    log_pmf = (-lam * _bd((offset - frac) / lam) - 0.5 * jnp.log(2 * math.pi * k_safe)
               - _stirling_correction(k_safe))
    # Below k = 10 the Stirling series is inaccurate, but there the direct
    # form has nothing to cancel.
    log_pmf = jnp.where(k < 10, -lam + k * math.log(lam) - jax.lax.lgamma(k + 1.0), log_pmf)
    fast = (us >= 0.07) & (v <= v_r)
    invalid = (k < 0) | ((us < 0.013) & (v > us))
    return k.astype(jnp.int32), fast | (~invalid & (log_ratio <= log_pmf))

  return _rejection_loop(key, shape, propose)


def skellam(key: jax.Array, variance: float, shape: Sequence[int]) -> jax.Array:
  """Independent draws from Sk(mu/2, mu/2) = Poisson(mu/2) - Poisson(mu/2), mu = variance.

  Mean 0, variance mu exactly. A sum of independent Skellam variables is
  Skellam with the variances added, so n clients each adding variance mu / n
  give the sum exactly Sk with variance mu.

  Args:
    key: PRNG key.
    variance: mu, a Python float >= 0, in integer units.
    shape: output shape.

  Returns:
    int32 array of `shape`.
  """
  variance = float(variance)
  if not (math.isfinite(variance) and variance >= 0):
    raise ValueError(f"variance must be finite and >= 0, got {variance!r}")
  plus_key, minus_key = jax.random.split(key)
  return poisson(plus_key, variance / 2, shape) - poisson(minus_key, variance / 2, shape)


def _rejection_loop(key: jax.Array, shape: tuple, propose: Callable) -> jax.Array:
  """Keeps each coordinate's first accepted proposal; stops when all have one.

  `propose(round_key) -> (int32 candidates, bool accepted)` for all coordinates.
  """

  def cond(carry):
    i, _, done = carry
    return (i < MAX_SAMPLER_ROUNDS) & ~jnp.all(done)

  def body(carry):
    i, sample, done = carry
    candidate, accept = propose(jax.random.fold_in(key, i))
    return i + 1, jnp.where(accept & ~done, candidate, sample), done | accept

  init = (jnp.int32(0), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.bool_))
  return jax.lax.while_loop(cond, body, init)[1]


def _bd(r: jax.Array) -> jax.Array:
  """(1 + r) log(1 + r) - r, without cancellation near r = 0 (series for |r| < 1/4)."""
  r_small = jnp.clip(r, -0.25, 0.25)
  series = jnp.zeros_like(r)
  for j in range(15, 1, -1):  # Horner on sum_{j>=2} (-1)^j r^j / (j (j - 1)).
    series = (series + (-1.0) ** j / (j * (j - 1))) * r_small
  series = series * r_small
  r_big = jnp.maximum(r, -0.999999)
  direct = (1 + r_big) * jnp.log1p(r_big) - r_big
  return jnp.where(jnp.abs(r) < 0.25, series, direct)


def _stirling_correction(k: jax.Array) -> jax.Array:
  """log k! - (k log k - k + log(2 pi k) / 2), asymptotic series (error < 1e-9 for k >= 10)."""
  inv = 1.0 / k
  inv2 = inv * inv
  return inv * (1 / 12 - inv2 * (1 / 360 - inv2 / 1260))


