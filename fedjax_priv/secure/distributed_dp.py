"""Distributed DP: clients add discrete noise before secure aggregation.

With secure aggregation the server only sees the sum of the cohort's updates,
so no one is left to add central noise. Instead every client adds a share of
integer noise to its quantised update, and the shares sum to the noise that
protects the sum (Kairouz, Liu & Steinke 2021; Agarwal, Kairouz & Liu 2021).
One round, per client and then at the server:

  delta --ravel, clip to C--> x f32[d] --pad to d' = 2^k, Hadamard rotation
  (shared key)--> --/ gamma, conditional stochastic rounding (||.||_2 <=
  Delta_2)--> int32[d'] --+ noise share--> --mod 2^b--> uint32[d']
  --modular sum over the cohort--> --centred lift, * gamma, rotate back,
  unpad, / n--> update

Two noise families:

* distributed discrete Gaussian (DDG): each client adds N_Z(0, s^2) per
  coordinate. A sum of discrete Gaussians is not a discrete Gaussian; the
  privacy loss carries an extra term tau that vanishes quickly as s grows
  (`ddg_rdp`).
* Skellam: each client adds Sk(mu/2, mu/2) = Poisson(mu/2) - Poisson(mu/2),
  variance mu. Skellam is closed under summation, so the sum is exactly
  Skellam with variance n mu (`skellam_rdp`).

The granularity gamma trades rounding error against the modulus: the
default picks the gamma at which `k_stddevs` standard deviations of a
coordinate of the noisy sum fill the b-bit ring. Rounding inflates the
sensitivity from C / gamma to `DistributedDPConfig.l2_sensitivity`
(conditional rounding keeps it small); the accountants use the inflated
values, so the epsilon is that of what runs.

Neighbouring relation: replace one user's update by nothing while the
cohort (and so the number of noise shares, n) is unchanged: the "zero-out"
relation, `dp_accounting.NeighboringRelation.REPLACE_SPECIAL`. User level.
The integer sum then moves by one rounded update, of L2 norm <= Delta_2 and
L1 norm <= Delta_1. Poisson subsampling of users is composed with the general
bound of Zhu & Wang (2019, Thm. 5), which holds for this relation as for
add/remove. With Poisson cohorts the number of noise shares is random: the
accountants assume `num_clients` shares every round and the aggregators
report the realised `noise_shares`; a round with fewer shares had less noise
than accounted.

What is simulated: the integer arithmetic exactly (rounding, noise, wrap-around
mod 2^b). The pairwise masks of SecAgg cancel in the modular sum and are not
drawn here (`fedjax_priv.secure.secagg` simulates them). Randomness comes from
JAX's counter-based PRNG and the samplers use float32 arithmetic: fine for
research simulation, not a hardened sampler (Mironov 2012 shows how floating
point noise can leak).

References:
  Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism
  for Federated Learning with Secure Aggregation" (ICML; arXiv:2102.06387):
  the pipeline, conditional randomized rounding, the granularity heuristic and
  the RDP of sums of discrete Gaussians.
  Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for Differentially
  Private Federated Learning" (NeurIPS): Skellam noise and its RDP bound.
  Canonne, Kamath & Steinke 2020, "The Discrete Gaussian for Differential
  Privacy" (NeurIPS): the discrete Gaussian sampler.
  Hoermann 1993, "The transformed rejection method for generating Poisson
  random variables" (PTRS).
  Zhu & Wang 2019, "Poisson Subsampled Renyi Differential Privacy" (ICML).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.aggregation import Aggregator
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.secure import quantization

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

# Fold-in tags: the rotation key is derived from the round key shared by the
# cohort (the server needs it to rotate back); rounding and noise keys from
# the client's private key.
_ROTATION_TAG, _ROUNDING_TAG, _NOISE_TAG = 0x0D0, 0x0D1, 0x0D2


# --------------------------------------------------------------------------
# Samplers.


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
  sigma = accounting.check_positive("sigma", sigma)
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


# --------------------------------------------------------------------------
# Configuration: one place that derives every scale from the hyper-parameters.


@dataclasses.dataclass(frozen=True)
class DistributedDPConfig:
  """Hyper-parameters of one distributed-DP round and the scales derived from them.

  Attributes:
    clip_norm: C > 0, L2 clip of each client's delta, in model units.
    noise_multiplier: z >= 0: the summed noise of `num_clients` shares has
      per-coordinate std z * C in model units (variance z^2 C^2 / gamma^2 in
      integer units); 0 adds no noise (epsilon = inf).
    num_clients: n >= 1, the noise shares per round (the cohort size) and the
      public denominator of the mean.
    dim: d >= 1, the number of model parameters.
    bits: b in [1, 32], the modulus 2^b of secure aggregation.
    beta: in [0, 1), the conditional-rounding parameter of Kairouz et al.
      (Thm. 1): rounding is retried until the L2 norm is <= the inflated
      bound, which each try meets with probability >= 1 - beta. 0 disables
      the conditioning (bound C / gamma + sqrt(d')). Default exp(-1/2).
    k_stddevs: k > 0, how many standard deviations of a coordinate of the
      noisy sum the ring must hold when gamma is derived from `bits`.
    granularity: gamma > 0, one integer step in model units; None derives
      it from `bits` (see `gamma`).
    max_rounding_tries: >= 1, conditional-rounding retries before giving up
      and sending the zero vector (a legal, norm-0 contribution).
  """
  clip_norm: float
  noise_multiplier: float
  num_clients: int
  dim: int
  bits: int = 16
  beta: float = math.exp(-0.5)
  k_stddevs: float = 4.0
  granularity: float | None = None
  max_rounding_tries: int = 100

  def __post_init__(self):
    accounting.check_positive("clip_norm", self.clip_norm)
    z = self.noise_multiplier
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not (math.isfinite(z) and z >= 0):
      raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
    for name, minimum in (("num_clients", 1), ("dim", 1), ("max_rounding_tries", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if (isinstance(self.bits, bool) or not isinstance(self.bits, int)
        or not 1 <= self.bits <= quantization.MAX_BITS):
      raise ValueError(f"bits must be an int in [1, {quantization.MAX_BITS}], got {self.bits!r}")
    if not (isinstance(self.beta, (int, float)) and 0 <= self.beta < 1):
      raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
    accounting.check_positive("k_stddevs", self.k_stddevs)
    if self.granularity is None:
      if 4.0**self.bits <= self.k_stddevs**2 * self.num_clients:
        raise ValueError(
            f"bits={self.bits} is too small for num_clients={self.num_clients} and "
            f"k_stddevs={self.k_stddevs}: the rounding noise alone overflows 2^bits; "
            "raise bits or set granularity")
    else:
      accounting.check_positive("granularity", self.granularity)

  @property
  def padded_dim(self) -> int:
    """d' = the power of two >= dim that the rotation works in; noise is added to d' coordinates."""
    return quantization.padded_dim(self.dim)

  @functools.cached_property
  def gamma(self) -> float:
    """Granularity: one integer step, in model units.

    Unless given, the gamma of Kairouz et al. (Sec. 4.4) solving
    2^b = 2 k sqrt(C^2 n^2 / d' + n (gamma^2 / 4 + sigma_local^2)) / gamma,
    where sigma_local^2 n = z^2 C^2: k standard deviations of a rotated
    coordinate of the sum (signal at its worst, n aligned clients; rounding
    error; noise) span the ring.
    """
    if self.granularity is not None:
      return float(self.granularity)
    c, n, k = self.clip_norm, self.num_clients, self.k_stddevs
    signal_and_noise = c * c * n * n / self.padded_dim + (self.noise_multiplier * c) ** 2
    return 2 * k * math.sqrt(signal_and_noise) / math.sqrt(4.0**self.bits - k * k * n)

  @property
  def local_stddev(self) -> float:
    """Per-client noise scale in integer units: z C / (gamma sqrt(n))."""
    return self.noise_multiplier * self.clip_norm / (self.gamma * math.sqrt(self.num_clients))

  @functools.cached_property
  def l2_sensitivity(self) -> float:
    """Delta_2: L2 bound of one client's rounded vector, in integer units.

    Kairouz et al. (Thm. 1, conditional randomized rounding): with c = C /
    gamma, min{c + sqrt(d'), sqrt(c^2 + d'/4 + sqrt(2 ln(1/beta)) (c +
    sqrt(d')/2))}; the first bound holds for any stochastic rounding, the
    second is what conditioning on the norm enforces.
    """
    c, d = self.clip_norm / self.gamma, self.padded_dim
    bound = c + math.sqrt(d)
    if self.beta > 0:
      squared = c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2)
      bound = min(bound, math.sqrt(squared))
    return bound

  @property
  def l1_sensitivity(self) -> float:
    """Delta_1 = Delta_2 min(sqrt(d'), Delta_2): L1 <= sqrt(d') L2, and L1 <= L2^2 on integers."""
    return self.l2_sensitivity * min(math.sqrt(self.padded_dim), self.l2_sensitivity)


# --------------------------------------------------------------------------
# Accounting (host side, numpy).

# The bounds below are stated for integer orders (and Zhu & Wang's subsampling
# bound needs them), so we keep the integer orders of the package default.
INTEGER_RDP_ORDERS: tuple[int, ...] = tuple(
    int(o) for o in accounting.DEFAULT_RDP_ORDERS if float(o).is_integer())


def ddg_tau(local_stddev: float, num_clients: int) -> float:
  """tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1)) (Kairouz et al., Thm. 1).

  The distance, in the RDP bound, between a sum of n N_Z(0, s^2) and one
  N_Z(0, n s^2); it is ~1e-8 already at s = 1 for any n.
  """
  k = np.arange(1, num_clients, dtype=np.float64)
  return float(10 * np.sum(np.exp(-2 * math.pi**2 * local_stddev**2 * k / (k + 1))))


def ddg_rdp(config: DistributedDPConfig, orders: Sequence[float]) -> np.ndarray:
  """RDP of one round of the distributed discrete Gaussian, full participation.

  Kairouz et al. (Prop. 14; Thm. 1 is its concentrated-DP corollary): with
  n clients each adding N_Z(0, s^2), s >= 1/2, d' coordinates, tau =
  `ddg_tau`, a2 = Delta_2 / (sqrt(n) s), a1 = Delta_1 / (sqrt(n) s):

    eps(alpha) = min{ alpha a2^2 / 2 + tau d',
                      alpha (a2^2 + 2 a1 tau + tau^2 d') / 2,
                      alpha (a2 + tau sqrt(d'))^2 / 2 }.

  Args:
    config: the mechanism; Delta_1, Delta_2 are its rounding-inflated
      sensitivities.
    orders: RDP orders > 1.

  Returns:
    float64[len(orders)]; +inf everywhere when noise_multiplier is 0.

  Raises:
    ValueError: the local scale s is below 1/2, where the bound is not proven.
  """
  orders = np.asarray(orders, np.float64)
  if config.noise_multiplier == 0:
    return np.full(orders.shape, np.inf)
  s, n, d = config.local_stddev, config.num_clients, config.padded_dim
  if s < 0.5:
    raise ValueError(
        f"the per-client discrete Gaussian scale must be >= 1/2 integer steps for the DDG "
        f"bound, got {s:.4g} (noise_multiplier={config.noise_multiplier}, gamma="
        f"{config.gamma:.4g}); raise noise_multiplier or bits")
  tau = ddg_tau(s, n)
  a2 = config.l2_sensitivity / (math.sqrt(n) * s)
  a1 = config.l1_sensitivity / (math.sqrt(n) * s)
  return np.minimum.reduce([
      orders * a2**2 / 2 + tau * d,
      orders * (a2**2 + 2 * a1 * tau + tau**2 * d) / 2,
      orders * (a2 + tau * math.sqrt(d)) ** 2 / 2,
  ])


def skellam_rdp(config: DistributedDPConfig, orders: Sequence[float]) -> np.ndarray:
  """RDP of one round of the distributed Skellam mechanism, full participation.

  Agarwal, Kairouz & Liu (2021, multi-dimensional Skellam, Thm. 3.5): with
  the summed noise Sk of variance mu = z^2 C^2 / gamma^2 per coordinate,

    eps(alpha) = alpha Delta_2^2 / (2 mu)
                 + min{ ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2),
                        3 Delta_1 / (2 mu) }.

  Args:
    config: the mechanism; Delta_1, Delta_2 are its rounding-inflated
      sensitivities.
    orders: integer RDP orders > 1.

  Returns:
    float64[len(orders)]; +inf everywhere when noise_multiplier is 0.
  """
  orders = np.asarray(orders, np.float64)
  if config.noise_multiplier == 0:
    return np.full(orders.shape, np.inf)
  mu = config.num_clients * config.local_stddev**2
  l1, l2 = config.l1_sensitivity, config.l2_sensitivity
  return orders * l2**2 / (2 * mu) + np.minimum(
      ((2 * orders - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def poisson_subsampled_rdp(base_rdp: Callable[[np.ndarray], np.ndarray],
                           sampling_probability: float, orders: Sequence[int]) -> np.ndarray:
  """RDP of a mechanism run on a Poisson subsample (Zhu & Wang 2019, Thm. 5).

  For integer alpha >= 2, with q the sampling probability and eps the base
  mechanism's RDP:

    (alpha - 1) eps'(alpha) <= log[ (1-q)^(alpha-1) (alpha q - q + 1)
        + C(alpha, 2) q^2 (1-q)^(alpha-2) e^eps(2)
        + 3 sum_{l=3}^{alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) ].

  The subsampled mechanism is never worse than the base one (Renyi
  divergence is jointly quasi-convex), so the minimum of the two is returned.

  Args:
    base_rdp: integer orders -> RDP of the base mechanism.
    sampling_probability: q in (0, 1].
    orders: integer orders >= 2.

  Returns:
    float64[len(orders)].
  """
  orders = np.asarray(orders)
  if np.any(orders < 2) or np.any(orders != np.round(orders)):
    raise ValueError(f"orders must be integers >= 2, got {orders.tolist()!r}")
  orders = orders.astype(np.int64)
  base = np.asarray(base_rdp(orders), np.float64)
  q = sampling_probability
  if q == 1:
    return base
  # eps(l) for every integer l up to the largest order, indexed by l.
  eps = np.concatenate([[0.0, 0.0], np.asarray(base_rdp(np.arange(2, orders.max() + 1)),
                                              np.float64)])
  log_q, log_1mq = math.log(q), math.log1p(-q)
  out = np.empty(len(orders))
  for i, alpha in enumerate(orders):
    l = np.arange(3, alpha + 1)
    log_terms = np.concatenate([
        [(alpha - 1) * log_1mq + math.log1p((alpha - 1) * q),
         _log_comb(alpha, 2) + 2 * log_q + (alpha - 2) * log_1mq + eps[2]],
        math.log(3) + _log_comb(alpha, l) + l * log_q + (alpha - l) * log_1mq
        + (l - 1) * eps[l]])
    out[i] = special.logsumexp(log_terms) / (alpha - 1)
  return np.minimum(out, base)


def _log_comb(n, k):
  return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)


def _epsilon(base_rdp: Callable, rounds: int, delta: float, sampling_probability: float,
             orders: Sequence[int] | None) -> float:
  rounds = accounting.check_int("rounds", rounds, 0)
  delta = accounting.check_delta(delta)
  q = accounting.check_probability("sampling_probability", sampling_probability,
                                    allow_zero=False)
  if rounds == 0:
    return 0.0
  orders = INTEGER_RDP_ORDERS if orders is None else tuple(orders)
  rdp = rounds * poisson_subsampled_rdp(base_rdp, q, orders)
  return float(dp_accounting.rdp.compute_epsilon(orders, rdp, delta)[0])


def ddg_epsilon(config: DistributedDPConfig, rounds: int, delta: float,
                sampling_probability: float = 1.0, orders: Sequence[int] | None = None) -> float:
  """epsilon of `rounds` rounds of `distributed_discrete_gaussian_mean(config)`.

  Composes `ddg_rdp` over rounds, amplified by Poisson sampling of users with
  probability q (`poisson_subsampled_rdp`; q = 1: every user every round),
  and converts RDP to (epsilon, delta) with `dp_accounting`'s conversion
  (Canonne, Kamath & Steinke 2020, Prop. 12). Relation: zero-out one user
  (module docstring).

  Args:
    config: the mechanism.
    rounds: >= 0.
    delta: in (0, 1).
    sampling_probability: q in (0, 1].
    orders: integer RDP orders >= 2; default `INTEGER_RDP_ORDERS`.

  Returns:
    epsilon >= 0 (inf without noise).
  """
  return _epsilon(functools.partial(ddg_rdp, config), rounds, delta, sampling_probability,
                  orders)


def skellam_epsilon(config: DistributedDPConfig, rounds: int, delta: float,
                    sampling_probability: float = 1.0,
                    orders: Sequence[int] | None = None) -> float:
  """epsilon of `rounds` rounds of `skellam_mean(config)`; arguments as `ddg_epsilon`."""
  return _epsilon(functools.partial(skellam_rdp, config), rounds, delta, sampling_probability,
                  orders)


# --------------------------------------------------------------------------
# Client encoding and aggregators.


def conditional_stochastic_round(x: jax.Array, key: jax.Array, norm: float, bound: float,
                                 max_tries: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Stochastic rounding retried until the L2 norm is <= `bound` (Kairouz et al., Sec. 4.1).

  float32 cannot compare ||r||^2 with bound^2 when both are ~1e12 and differ by
  ~1e6 (20+ bits). So the test is on the rounding error e = r - x instead:
  ||r||^2 = ||x||^2 + 2 <x, e> + ||e||^2 <= bound^2 holds whenever
  2 <x, e> + ||e||^2 <= bound^2 - norm^2 (computed in float64 on the host) and
  ||x|| <= norm; both sides of the new test are small, and a 1e-3 safety
  factor absorbs their float32 error.

  Args:
    x: f32[d] in integer units, with ||x|| <= `norm`.
    key: PRNG key private to the client.
    norm: a bound on ||x|| (the scaled clip norm), Python float.
    bound: Delta_2, Python float.
    max_tries: retries before giving up.

  Returns:
    (int32[d] rounded vector, or zeros if every try failed; int32 tries used;
    bool failed). The result's norm is <= bound in every case, which is what
    the privacy analysis needs.
  """
  margin = jnp.float32((bound * bound - norm * norm) * (1 - 1e-3))

  def attempt(i):
    rounded = quantization.stochastic_round(x, jax.random.fold_in(key, i))
    error = rounded.astype(jnp.float32) - x
    return rounded, 2 * jnp.vdot(x, error) + jnp.vdot(error, error) <= margin

  def cond(carry):
    i, _, ok = carry
    return (i < max_tries) & ~ok

  def body(carry):
    i, _, _ = carry
    return (i + 1, *attempt(i))

  tries, rounded, ok = jax.lax.while_loop(cond, body, (jnp.int32(1), *attempt(0)))
  return jnp.where(ok, rounded, 0), tries, ~ok


class DistributedDPState(NamedTuple):
  """The aggregator's state: only the shape of the model.

  Attributes:
    shapes: pytree like the params with leaves float32[0, *leaf.shape]: the
      structure `finalize` unflattens the decoded sum into, at no memory cost.
  """
  shapes: Any


def _shape_template(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.zeros((0, *jnp.shape(p)), jnp.result_type(p)), params)


def _unravel_like(shapes: Any) -> Callable:
  _, unravel = quantization.ravel(jax.tree.map(lambda t: jnp.zeros(t.shape[1:], t.dtype), shapes))
  return unravel


NOISE_KINDS = ("discrete_gaussian", "skellam")


def integer_noise(config: DistributedDPConfig,
                  kind: str) -> Callable[[jax.Array, tuple], jax.Array]:
  """The per-client integer noise sampler `(key, shape) -> int32` of `kind` for `config`.

  "discrete_gaussian": N_Z(0, s^2), s = `config.local_stddev` (Kairouz et
  al. 2021); "skellam": Sk(s^2 / 2, s^2 / 2), variance s^2 (Agarwal et al.
  2021). With noise_multiplier 0 it returns zeros.

  Raises:
    ValueError: unknown kind, or a discrete Gaussian scale below 1/2 integer
      step, below which the DDG bound is unproven.
  """
  if kind not in NOISE_KINDS:
    raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
  if config.noise_multiplier == 0:
    return _no_noise
  sigma = config.local_stddev
  if kind == "skellam":
    return lambda key, shape: skellam(key, sigma * sigma, shape)
  if sigma < 0.5:
    raise ValueError(f"the per-client discrete Gaussian scale must be >= 1/2 integer steps, got "
                     f"{sigma:.4g}; raise noise_multiplier or bits")
  return lambda key, shape: discrete_gaussian(key, sigma, shape)


def _no_noise(key, shape):
  del key
  return jnp.zeros(shape, jnp.int32)


def encode_client(config: DistributedDPConfig, noise: Callable[[jax.Array, tuple], jax.Array],
                  delta: Any, key: jax.Array, round_key: jax.Array
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One client's noisy integer vector: clip, rotate, scale, round conditionally, add noise.

  Args:
    config: the round's hyper-parameters.
    noise: the integer sampler, from `integer_noise`.
    delta: the client's update pytree (config.dim parameters).
    key: PRNG key private to the client (rounding and noise).
    round_key: the cohort's shared key (the rotation).

  Returns:
    (int32[d'] rounded vector plus noise share, in integer units; stats:
    delta_norm, clipped_fraction, rounded_norm_ratio (||rounded|| /
    Delta_2, <= 1), rounding_tries, rounding_failed).
  """
  flat, _ = quantization.ravel(delta)
  # Clipping to a hair below C keeps ||rotated / gamma|| <= C / gamma despite
  # float32 error in the clip, rotation and scaling (the rounding test needs it).
  clipped, norm = clip_by_l2_norm(flat, config.clip_norm * (1 - 1e-5))
  rotated = quantization.hadamard_rotate(quantization.pad(clipped, config.padded_dim),
                                         jax.random.fold_in(round_key, _ROTATION_TAG))
  bound = config.l2_sensitivity
  rounded, tries, failed = conditional_stochastic_round(
      rotated / config.gamma, jax.random.fold_in(key, _ROUNDING_TAG),
      config.clip_norm / config.gamma, bound, config.max_rounding_tries)
  noisy = rounded + noise(jax.random.fold_in(key, _NOISE_TAG), (config.padded_dim,))
  stats = {"delta_norm": norm,
           "clipped_fraction": (norm > config.clip_norm).astype(jnp.float32),
           "rounded_norm_ratio": tree_util.l2_norm(rounded) / jnp.float32(bound),
           "rounding_tries": tries.astype(jnp.float32),
           "rounding_failed": failed.astype(jnp.float32)}
  return noisy, stats


def decode_sum(config: DistributedDPConfig, integer_sum: jax.Array,
               round_key: jax.Array) -> jax.Array:
  """float32[d] model-unit sum from the int32[d'] centred sum of `encode_client` vectors."""
  decoded = integer_sum.astype(jnp.float32) * config.gamma
  return quantization.hadamard_unrotate(
      decoded, jax.random.fold_in(round_key, _ROTATION_TAG))[:config.dim]


def _distributed_mean(config: DistributedDPConfig, kind: str) -> Aggregator:
  """The DDG / Skellam pipeline with the per-client integer noise of `kind`."""
  noise = integer_noise(config, kind)
  bits, n = config.bits, config.num_clients
  half_range = 2.0 ** (bits - 1)

  def init(params):
    size = tree_util.num_parameters(params)
    if size != config.dim:
      raise ValueError(f"DistributedDPConfig.dim={config.dim} but the params have {size} "
                       "parameters")
    return DistributedDPState(_shape_template(params))

  def prepare(state, delta, num_examples, ctx):
    del state, num_examples  # Example-count weights would break the sensitivity bound.
    noisy, stats = encode_client(config, noise, delta, ctx.key, ctx.round_key)
    # The float copy of the exact integer sum is a simulation-only diagnostic:
    # it lets finalize tell whether the modular sum wrapped. The update is
    # decoded from the modular sum alone, as a real server would.
    prepared = (quantization.wrap(noisy, bits), noisy.astype(jnp.float32))
    return prepared, jnp.float32(1.0), stats

  def group_sum(weights, prepared):
    wrapped, exact = prepared
    return (quantization.modular_sum(weights, wrapped, bits),
            tree_util.weighted_sum((weights > 0).astype(jnp.float32), exact))

  def combine(a, b):
    return quantization.modular_add(a[0], b[0], bits), a[1] + b[1]

  def finalize(state, total, total_weight, ctx):
    del total_weight  # Divide by the public n, never by the realised count.
    wrapped, exact = total
    flat = decode_sum(config, quantization.unwrap(wrapped, bits), ctx.round_key)
    update = tree_util.scale(_unravel_like(state.shapes)(flat), 1.0 / n)
    shares = jnp.sum(ctx.included)
    overflow = (exact >= half_range) | (exact < -half_range)
    stats = {"noise_shares": shares,
             "noise_stddev": jnp.sqrt(shares) * config.local_stddev * config.gamma / n,
             "modular_overflow": jnp.any(overflow).astype(jnp.float32),
             "overflow_fraction": jnp.mean(overflow.astype(jnp.float32)),
             "range_used": quantization.range_used(exact, bits)}
    return update, state, stats

  return Aggregator(init, prepare, finalize, group_sum, combine)


def distributed_discrete_gaussian_mean(config: DistributedDPConfig) -> Aggregator:
  """User-level distributed discrete Gaussian mean (Kairouz, Liu & Steinke 2021).

  Each client clips its delta to C, rotates it with the cohort's shared
  Hadamard rotation, scales by 1 / gamma, rounds conditionally (L2 norm <=
  Delta_2), adds N_Z(0, s^2) per coordinate with s = z C / (gamma sqrt(n)), and
  wraps mod 2^b (`encode_client`); the server sums mod 2^b, lifts to
  [-2^(b-1), 2^(b-1)), rescales, rotates back (`decode_sum`) and divides by n.
  The n shares sum to noise of variance ~ z^2 C^2 per coordinate (model
  units); `ddg_epsilon` accounts for it. Relation: zero-out one user (module
  docstring).

  Args:
    config: the hyper-parameters; `config.dim` must equal the model's size.

  Returns:
    An Aggregator for `build_round`. Per client (averaged): the stats of
    `encode_client`. Per round: noise_shares (clients whose noise entered the
    sum), noise_stddev (model units, of the update), modular_overflow (1.0 if
    any coordinate wrapped), overflow_fraction, range_used (max |exact sum| /
    2^(b-1)).

  Raises:
    ValueError: s < 1/2 integer steps, below which the DDG bound is unproven.
  """
  return _distributed_mean(config, "discrete_gaussian")


def skellam_mean(config: DistributedDPConfig) -> Aggregator:
  """User-level distributed Skellam mean (Agarwal, Kairouz & Liu 2021).

  The pipeline of `distributed_discrete_gaussian_mean` with Skellam noise of
  variance s^2 = z^2 C^2 / (gamma^2 n) per client and coordinate, so the sum
  is exactly Skellam with variance z^2 C^2 / gamma^2; `skellam_epsilon`
  accounts for it. Relation: zero-out one user (module docstring).

  Args:
    config: the hyper-parameters; `config.dim` must equal the model's size.

  Returns:
    An Aggregator reporting the stats of `distributed_discrete_gaussian_mean`.
  """
  return _distributed_mean(config, "skellam")
