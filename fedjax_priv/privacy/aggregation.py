"""Aggregators: how client deltas become one server update.

An aggregator is a small set of pure functions, split where the round builder
needs it (optax style: the state is explicit, keys are explicit):

  init(params) -> state                                          # once
  prepare(state, delta, num_examples, ClientContext)              # one client, vmapped
      -> (prepared, weight, stats)
  group_sum(weight [c], prepared [c, ...]) -> partial sum         # over a group of clients
  combine(partial, partial) -> partial                            # across groups (chunks)
  finalize(state, total, total_weight, RoundContext)              # once per round
      -> (update, new_state, stats)

The builder sets the weight of padded slots and of clients whose delta is not
finite to zero, and replaces the prepared contribution of a non-finite client
by zeros (for aggregators with `sums_nonfinite_as_zero` it replaces the delta
by zeros before `prepare` instead), so `prepare` must be a pure function that
tolerates a NaN or infinite delta (its outputs are then discarded) and
`group_sum` must give a zero-weight slot no influence. The default sums are
the float weighted sum (a dot product) and addition; secure aggregators
replace them with modular integer sums. `stats` are dicts of float32 scalars:
the builder averages prepare's over the real clients and reports finalize's
as they are.

The state travels in `ServerState.aggregator_state`: it holds what an
aggregator learns across rounds (an adaptive clip norm, a DP-FTRL tree).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.privacy.noise import gaussian_like

WEIGHTINGS = ("num_examples", "uniform")


class ClientContext(NamedTuple):
  """What one client's `prepare` may use besides its own delta.

  Attributes:
    slot: int32 scalar, the client's slot in the cohort, in [0, K).
    key: PRNG key private to this client's aggregation step (stochastic
      rounding, local noise); independent of its training key.
    round_key: PRNG key shared by the whole cohort this round (pairwise mask
      seeds, simulated dropouts); the same in every client's context.
    cohort_mask: [K] float32, 1.0 for slots that hold a real client.
  """
  slot: jax.Array
  key: jax.Array
  round_key: jax.Array
  cohort_mask: jax.Array


class RoundContext(NamedTuple):
  """What `finalize` may use besides the summed contributions.

  Attributes:
    key: the server's PRNG key (central noise).
    round_key: the cohort's shared key, equal to every ClientContext.round_key.
    cohort_mask: [K] float32, 1.0 for slots that hold a real client.
    included: [K] float32, 1.0 for slots whose contribution entered the sum
      (weight > 0): real clients minus non-finite ones and those `prepare`
      dropped.
  """
  key: jax.Array
  round_key: jax.Array
  cohort_mask: jax.Array
  included: jax.Array


def _no_state(params: Any) -> tuple:
  del params
  return ()


NeighboringRelation = dp_accounting.NeighboringRelation
ADD_OR_REMOVE, REPLACE_ONE, ZERO_OUT = (NeighboringRelation.ADD_OR_REMOVE_ONE,
                                        NeighboringRelation.REPLACE_ONE,
                                        NeighboringRelation.REPLACE_SPECIAL)


class RoundPrivacy(NamedTuple):
  """What one round of a mechanism releases about one user who takes part in it.

  A mechanism states this once, from its own parameters; a participation
  object (`simulation.participation`) wraps it into the round's event with
  its sampling, and the ledger records that. No noise multiplier, clip norm
  or cohort size is typed a second time.

  Attributes:
    event: relation -> the DpEvent of one round whose sum contains the user's
      contribution, before any sampling, with noise multipliers relative to
      the sensitivity under that relation. Raises ValueError for a relation
      not in `relations`.
    relations: the neighbouring relations `event` is stated for, preferred
      first: add/remove one user, zero-out (replace the user's contribution
      by the zero contribution, `REPLACE_SPECIAL`), replace one user.
    amplified_by_sampling: False when whoever sees the output also learns who
      took part (local DP: the server sees each upload), so sampling gives
      no amplification.
    rounds_per_event: 1; or E when `event` covers E consecutive rounds in
      which the user takes part at most once (a DP-FTRL tree of E leaves),
      or in the pattern `participation` allows.
    participation: None (at most one participation per event); or (k, b)
      when `event` covers the `rounds_per_event` rounds of a whole run in
      which a user may take part up to k times, any two at least b rounds
      apart (a matrix-factorization mechanism, `mf_aggregator`). Only a
      participation that guarantees such a pattern (`Cyclic`) may run it.
    description: one line naming the mechanism and its parameters.
    banded: None; or (bands, sigma_1) for a banded matrix-factorization
      mechanism: its strategy has `bands` non-zero diagonals and its noise,
      relative to the sensitivity of a single participation (the strategy's
      largest column norm times C), has multiplier sigma_1. With cyclic
      Poisson groups of at least `bands` rounds (`CyclicPoisson`) it is
      amplified by sampling (Choquette-Choo et al. 2023b, Thm. 4).
  """
  event: Callable[[NeighboringRelation], dp_accounting.DpEvent]
  relations: tuple[NeighboringRelation, ...]
  amplified_by_sampling: bool = True
  rounds_per_event: int = 1
  description: str = ""
  participation: tuple[int, int] | None = None
  banded: tuple[int, float] | None = None


def gaussian_sum_privacy(noise_multiplier: float, description: str) -> RoundPrivacy:
  """The Gaussian mechanism on a sum of contributions clipped to norm C, noise std sigma C.

  Adding, removing or zeroing out one contribution moves the sum by <= C, so
  the event's multiplier is sigma; replacing it by another moves the sum by
  <= 2C, so the replace-one multiplier is sigma / 2 (Dwork & Roth 2014,
  Sec. 3.5.3).
  """

  def event(relation):
    check_relation(relation, (ADD_OR_REMOVE, ZERO_OUT, REPLACE_ONE))
    factor = 2.0 if relation == REPLACE_ONE else 1.0
    return dp_accounting.GaussianDpEvent(float(noise_multiplier) / factor)

  return RoundPrivacy(event, (ADD_OR_REMOVE, ZERO_OUT, REPLACE_ONE), description=description)


def check_relation(relation, supported) -> None:
  if relation not in supported:
    names = ", ".join(r.name for r in supported)
    raise ValueError(f"this mechanism is accounted under {names}, not {relation!r}")


class Aggregator(NamedTuple):
  """Pure functions that turn client deltas into a server update; see the module docstring.

  `privacy` is the mechanism's own statement of what one round releases
  (None: no guarantee, e.g. the FedAvg mean or a secure sum without noise).
  `sums_nonfinite_as_zero`: a client whose update is not finite still
  enters the sum, prepared from a zero update; distributed-DP aggregators
  need it, because each client's contribution carries its share of the
  noise. Without it, `prepare` sees the client's non-finite delta and the
  builder discards what it returns.
  """
  init: Callable
  prepare: Callable
  finalize: Callable
  group_sum: Callable = tree_util.weighted_sum
  combine: Callable = tree_util.add
  privacy: RoundPrivacy | None = None
  sums_nonfinite_as_zero: bool = False


def weighted_mean(weighting: str = "num_examples") -> Aggregator:
  """The FedAvg mean (McMahan et al. 2017), weighted by example count or uniform.

  Not private: the weights and the denominator depend on the data.
  """
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")

  def prepare(state, delta, num_examples, ctx):
    del state, ctx
    weight = num_examples.astype(jnp.float32) if weighting == "num_examples" else jnp.float32(1.0)
    return delta, weight, {"delta_norm": tree_util.l2_norm(delta)}

  def finalize(state, weighted_sum, total_weight, ctx):
    del ctx
    return tree_util.scale(weighted_sum, 1.0 / jnp.maximum(total_weight, 1e-12)), state, {}

  return Aggregator(_no_state, prepare, finalize)


def clipping_prepare(clip_norm: Any):
  """The `prepare` of user-level DP aggregators: clip the delta to C, weight 1.

  Every client weighs 1 whatever its example count: weighting by it would
  break the sensitivity bound. Reports `delta_norm` and `clipped_fraction`.
  """

  def prepare(state, delta, num_examples, ctx):
    del state, num_examples, ctx
    clipped, norm = clip_by_l2_norm(delta, clip_norm)
    stats = {"delta_norm": norm, "clipped_fraction": (norm > clip_norm).astype(jnp.float32)}
    return clipped, jnp.float32(1.0), stats

  return prepare


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

  Returns:
    A stateless Aggregator; finalize reports `noise_stddev`, the std of the
    noise in each coordinate of the update, sigma * C / expected_cohort_size.
  """
  # Traced values (a sweep vmaps over them) are checked by the sweep, on the host.
  if tree_util.is_concrete_number(clip_norm) and not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
  if tree_util.is_concrete_number(noise_multiplier) and not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  if not expected_cohort_size > 0:
    raise ValueError(f"expected_cohort_size must be > 0, got {expected_cohort_size}")

  def finalize(state, weighted_sum, total_weight, ctx):
    del total_weight
    noise = gaussian_like(ctx.key, weighted_sum, noise_multiplier * clip_norm)
    update = tree_util.scale(tree_util.add(weighted_sum, noise), 1.0 / expected_cohort_size)
    return update, state, {"noise_stddev": jnp.float32(
        noise_multiplier * clip_norm / expected_cohort_size)}

  return Aggregator(_no_state, clipping_prepare(clip_norm), finalize,
                    privacy=_dp_mean_privacy(clip_norm, noise_multiplier))


def _dp_mean_privacy(clip_norm: Any, noise_multiplier: Any) -> RoundPrivacy:
  # Traced values (inside a sweep's vmap) are accounted from the host's copy.
  concrete = tree_util.is_concrete_number(noise_multiplier)
  return gaussian_sum_privacy(
      noise_multiplier if concrete else math.nan,
      f"dp_mean(clip_norm={clip_norm}, noise_multiplier={noise_multiplier})" if concrete else
      "dp_mean (traced hyper-parameters)")
