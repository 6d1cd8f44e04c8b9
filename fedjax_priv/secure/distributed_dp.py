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
cohort (and so the number of noise shares) is unchanged: the "zero-out"
relation, `dp_accounting.NeighboringRelation.REPLACE_SPECIAL`. User level.
The integer sum then moves by one rounded update, of L2 norm <= Delta_2 and
L1 norm <= Delta_1. Poisson subsampling of users is composed with the general
bound of Zhu & Wang (2019, Thm. 5), which holds for this relation as for
add/remove. The number of shares that reach the sum can vary (Poisson
cohorts, dropouts): the accounting holds for a guaranteed minimum
`DistributedDPConfig.min_shares`, and a round with fewer shares fails
(`distributed_dp_accounting` has the argument). A client whose update is not
finite still sends its noise share, with a zero update.

The pieces: `integer_samplers` (noise), `distributed_dp_config` (the scales),
`distributed_dp_accounting` (RDP curves, events, ε); this module has the
client encoding and the aggregators, and re-exports the rest.

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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.aggregation import Aggregator
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.secure import quantization
from fedjax_priv.secure.distributed_dp_accounting import (NOISE_KINDS, ddg_epsilon, ddg_rdp,
                                                          ddg_tau, min_shares_for, round_event,
                                                          round_privacy, skellam_epsilon,
                                                          skellam_rdp)
from fedjax_priv.secure.distributed_dp_config import DistributedDPConfig
from fedjax_priv.secure.integer_samplers import (MAX_SAMPLER_ROUNDS, discrete_gaussian, poisson,
                                              skellam)

__all__ = [
    "MAX_SAMPLER_ROUNDS", "NOISE_KINDS", "DistributedDPConfig", "DistributedDPState",
    "conditional_stochastic_round", "ddg_epsilon", "ddg_rdp", "ddg_tau", "decode_sum",
    "discrete_gaussian", "distributed_discrete_gaussian_mean", "encode_client", "integer_noise",
    "min_shares_for", "poisson", "round_event", "round_privacy", "shares_guard", "skellam",
    "skellam_epsilon", "skellam_mean", "skellam_rdp",
]

# Fold-in tags: the rotation key is derived from the round key shared by the
# cohort (the server needs it to rotate back); rounding and noise keys from
# the client's private key.
_ROTATION_TAG, _ROUNDING_TAG, _NOISE_TAG = 0x0D0, 0x0D1, 0x0D2

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
    update, guard_stats = shares_guard(config, update, ctx)
    shares = guard_stats["noise_shares"]
    overflow = (exact >= half_range) | (exact < -half_range)
    stats = {**guard_stats,
             "noise_stddev": jnp.sqrt(shares) * config.local_stddev * config.gamma / n,
             "modular_overflow": jnp.any(overflow).astype(jnp.float32),
             "overflow_fraction": jnp.mean(overflow.astype(jnp.float32)),
             "range_used": quantization.range_used(exact, bits)}
    return update, state, stats

  return Aggregator(init, prepare, finalize, group_sum, combine,
                    privacy=round_privacy(config, kind), sums_nonfinite_as_zero=True)


def shares_guard(config: DistributedDPConfig, update: Any, ctx) -> tuple[Any, dict]:
  """Fails the round (zero update) when fewer than `config.guaranteed_shares` shares entered.

  The accounting holds for at least that many shares of noise; a round with
  fewer would have had less noise than accounted, so nothing of it is used.

  Returns:
    (the update, or zeros; stats noise_shares and shares_short (1.0 when the
    round failed)).
  """
  shares = jnp.sum(ctx.included)
  short = shares < config.guaranteed_shares
  update = jax.tree.map(lambda leaf: jnp.where(short, jnp.zeros_like(leaf), leaf), update)
  return update, {"noise_shares": shares, "shares_short": short.astype(jnp.float32)}


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
    sum), shares_short (1.0: fewer than config.guaranteed_shares, the round
    failed and its update is zero), noise_stddev (model units, of the update), modular_overflow (1.0 if
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
