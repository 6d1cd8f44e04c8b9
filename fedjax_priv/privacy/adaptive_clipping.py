"""DP-FedAvg with a clip norm that tracks a quantile of the update norms.

Andrew, Thakkar, McMahan & Ramaswamy (2021) replace the hand-tuned clip norm
C of DP-FedAvg by an online estimate of the gamma-quantile of the clients'
update norms. Each round, besides its clipped delta, every client reports one
bit b_i = 1[||delta_i|| <= C]; the server adds Gaussian noise to the count and
moves C geometrically towards the quantile:

  b_bar = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / M + 1/2,
  C <- C * exp(-eta_C * (b_bar - gamma)),

with M the public expected cohort size. If more than a gamma-fraction of
updates fit under C, C shrinks; otherwise it grows.

Privacy. Centring the bit (b_i - 1/2 in {-1/2, +1/2}) halves its sensitivity
to 1/2, so the count is a Gaussian mechanism with multiplier 2*sigma_b. The
delta sum and the count are released together: one Gaussian mechanism on the
concatenated vector (delta_sum / (z_delta C), count / sigma_b), whose
sensitivity under add/remove one user is sqrt(z_delta^-2 + (2 sigma_b)^-2).
Choosing

  z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)

makes that sensitivity 1/z, so each round (sampling included, since both
parts see the same cohort) is exactly the Gaussian mechanism of DP-FedAvg
with multiplier z: account it with
`accounting.user_level_event(z, rounds, ...)`, as for `dp_mean(C, z, M)`.
Under fixed-size cohorts (replace one user) both sensitivities double and the
same event builder applies. C itself is a function of past noisy releases
only, so using it is post-processing.

References:
  Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning
  with Adaptive Clipping", NeurIPS (Algorithm 1 and Sec. 3; defaults
  gamma = 0.5, eta_C = 0.2, C_0 = 0.1, sigma_b = M / 20).
  McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
  Recurrent Language Models" (DP-FedAvg).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.aggregation import Aggregator, gaussian_sum_privacy
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.privacy.noise import gaussian_like


class AdaptiveClipState(NamedTuple):
  """The clip norm C (float32 scalar, units of the deltas) used by the next round."""
  clip_norm: jax.Array


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
  """z_delta such that (delta sum, centred count) together are a Gaussian of multiplier z.

  Args:
    noise_multiplier: z > 0, the multiplier the whole round is accounted with.
    count_stddev: sigma_b, std of the noise on the centred count (in clients).

  Returns:
    z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) >= z, the multiplier of the
    noise on the clipped delta sum (its std is z_delta * C).

  Raises:
    ValueError: 2 sigma_b <= z, when the count alone would already spend more
      than the whole budget.
  """
  if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
    raise ValueError(f"noise_multiplier must be finite and > 0, got {noise_multiplier!r}")
  if not 2 * count_stddev > noise_multiplier:
    raise ValueError(
        f"count_stddev={count_stddev!r} is too small for noise_multiplier={noise_multiplier!r}: "
        f"the count's multiplier 2 * count_stddev must exceed noise_multiplier "
        f"(Andrew et al. 2021 use count_stddev = expected_cohort_size / 20).")
  return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def adaptive_clip_mean(noise_multiplier: float, expected_cohort_size: float, *,
                       target_quantile: float = 0.5, learning_rate: float = 0.2,
                       initial_clip_norm: float = 0.1,
                       count_stddev: float | None = None) -> Aggregator:
  """DP mean whose clip norm follows the `target_quantile` of client update norms.

  Neighbouring relation: add/remove one user's whole dataset (Poisson
  cohorts), or replace one user (fixed-size cohorts); user-level DP. The
  round's DpEvent is that of `dp_mean` with multiplier `noise_multiplier`
  (see the module docstring).

  Args:
    noise_multiplier: z >= 0, the multiplier the round is accounted with; 0
      adds no noise to the deltas (no privacy) but still noises the count.
    expected_cohort_size: M > 0, public denominator of the mean and of b_bar.
    target_quantile: gamma in (0, 1), the fraction of updates left unclipped.
    learning_rate: eta_C > 0 of the geometric update.
    initial_clip_norm: C_0 > 0.
    count_stddev: sigma_b >= 0, std of the count noise in clients; default
      M / 20. Must exceed z / 2 when z > 0.

  Returns:
    An Aggregator whose state is `AdaptiveClipState`. Finalize reports
    `clip_norm` (C used this round), `unclipped_fraction` (b_bar, the noisy
    estimate) and `noise_stddev` (per-coordinate std of the update's noise,
    z_delta * C / M).

  Raises:
    ValueError: an argument out of range, named, before anything is traced.
  """
  if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
    raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
  if not expected_cohort_size > 0:
    raise ValueError(f"expected_cohort_size must be > 0, got {expected_cohort_size!r}")
  if not 0 < target_quantile < 1:
    raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
  if not initial_clip_norm > 0:
    raise ValueError(f"initial_clip_norm must be > 0, got {initial_clip_norm!r}")
  if count_stddev is None:
    count_stddev = expected_cohort_size / 20
  if not count_stddev >= 0:
    raise ValueError(f"count_stddev must be >= 0, got {count_stddev!r}")
  delta_multiplier = (split_noise_multiplier(noise_multiplier, count_stddev)
                      if noise_multiplier > 0 else 0.0)

  def init(params):
    del params
    return AdaptiveClipState(jnp.float32(initial_clip_norm))

  def prepare(state, delta, num_examples, ctx):
    del num_examples, ctx  # Weighting by example count would break the sensitivity bound.
    clipped, norm = clip_by_l2_norm(delta, state.clip_norm)
    unclipped = (norm <= state.clip_norm).astype(jnp.float32)
    stats = {"delta_norm": norm, "clipped_fraction": 1.0 - unclipped}
    # The centred bit has sensitivity 1/2; see the module docstring.
    return (clipped, unclipped - 0.5), jnp.float32(1.0), stats

  def finalize(state, total, total_weight, ctx):
    del total_weight  # The realised count would leak participation.
    delta_sum, centred_count = total
    clip_norm = state.clip_norm
    delta_key, count_key = jax.random.split(ctx.key)
    noise = gaussian_like(delta_key, delta_sum, delta_multiplier * clip_norm)
    update = tree_util.scale(tree_util.add(delta_sum, noise), 1.0 / expected_cohort_size)
    noisy_count = centred_count + count_stddev * jax.random.normal(count_key, (), jnp.float32)
    unclipped_fraction = noisy_count / expected_cohort_size + 0.5
    new_clip = clip_norm * jnp.exp(-learning_rate * (unclipped_fraction - target_quantile))
    stats = {"clip_norm": clip_norm, "unclipped_fraction": unclipped_fraction,
             "noise_stddev": delta_multiplier * clip_norm / expected_cohort_size}
    return update, AdaptiveClipState(new_clip.astype(jnp.float32)), stats

  return Aggregator(init, prepare, finalize, privacy=gaussian_sum_privacy(
      noise_multiplier, f"adaptive_clip_mean(noise_multiplier={noise_multiplier}, "
      f"target_quantile={target_quantile})"))
