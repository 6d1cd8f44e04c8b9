"""Aggregators: how client deltas become one server update.

An aggregator is split in the two places the round builder needs it:

  prepare(delta, num_examples) -> (delta', weight, stats)   # one client, vmapped
  finalize(weighted_sum, total_weight, key) -> update       # once per round

Between the two the round builder forms sum_k weight_k * delta'_k over the
cohort (as a dot product, chunk by chunk), after setting the weight of padded
slots and of clients whose delta is not finite to zero. `stats` is a dict of
scalars the builder averages over the real clients for the round's metrics.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.privacy.noise import gaussian_like

WEIGHTINGS = ("num_examples", "uniform")


class Aggregator(NamedTuple):
  """A pair of pure functions; see the module docstring.

  Attributes:
    prepare: (delta, num_examples) -> (delta', weight scalar, dict of scalars).
    finalize: (weighted sum, total weight, key) -> server update (mean delta).
    noise_stddev: std of the Gaussian noise finalize adds to each coordinate of
      the update, after division (0.0 for a non-private aggregator).
  """
  prepare: Callable
  finalize: Callable
  noise_stddev: float


def weighted_mean(weighting: str = "num_examples") -> Aggregator:
  """The FedAvg mean (McMahan et al. 2017), weighted by example count or uniform.

  Not private: the weights and the denominator depend on the data.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

  def prepare(delta, num_examples):
    weight = num_examples.astype(jnp.float32) if weighting == "num_examples" else jnp.float32(1.0)
    return delta, weight, {"delta_norm": tree_util.l2_norm(delta)}

  def finalize(weighted_sum, total_weight, key):
    del key
    return tree_util.scale(weighted_sum, 1.0 / jnp.maximum(total_weight, 1e-12))

  return Aggregator(prepare, finalize, 0.0)


def dp_mean(clip_norm: float, noise_multiplier: float, expected_cohort_size: float) -> Aggregator:
  """User-level DP mean of DP-FedAvg (McMahan et al. 2018, ICLR).

  Each client's delta is clipped to L2 norm C, the clipped deltas are summed,
  N(0, sigma^2 C^2) is added once to every coordinate, and the result is divided
  by the public expected cohort size, never by the realised count (which would
  leak whether a user took part).

  Neighbouring relation: add/remove one user's whole dataset (Poisson cohorts);
  the sum moves by at most C, so the L2 sensitivity of the mean is
  C / expected_cohort_size. With fixed-size cohorts the relation is replace-one
  and the sensitivity doubles; `privacy.accounting.user_level_event` accounts
  for that.

  Args:
    clip_norm: C > 0.
    noise_multiplier: sigma >= 0 (0 gives clipping only, no privacy).
    expected_cohort_size: public denominator, e.g. q * N for Poisson sampling.
  """
  if not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  if not expected_cohort_size > 0:
    raise ValueError(f"expected_cohort_size must be > 0, got {expected_cohort_size}")

  def prepare(delta, num_examples):
    del num_examples  # Weighting by example count would break the sensitivity bound.
    clipped, norm = clip_by_l2_norm(delta, clip_norm)
    stats = {"delta_norm": norm, "clipped_fraction": (norm > clip_norm).astype(jnp.float32)}
    return clipped, jnp.float32(1.0), stats

  def finalize(weighted_sum, total_weight, key):
    del total_weight
    noisy = tree_util.add(weighted_sum, gaussian_like(key, weighted_sum, noise_multiplier * clip_norm))
    return tree_util.scale(noisy, 1.0 / expected_cohort_size)

  return Aggregator(prepare, finalize, noise_multiplier * clip_norm / expected_cohort_size)
