"""DpEvents of what the engine runs, the neighbouring relation each is stated in, and a JSON codec.

Host-side only (no JAX). An ε is only meaningful together with the relation
it protects, and the relation also fixes what a Gaussian's noise multiplier
means (noise std divided by the L2 sensitivity *under that relation*):

* add/remove one unit (user for `user_level_event`, example for
  `example_level_event`): Poisson-sampled events and plain Gaussian
  composition. Adding or removing one clipped contribution of norm ≤ C moves
  the sum by ≤ C, so the event's noise multiplier is the engine's σ.
* replace one user: fixed-size cohorts sampled without replacement. Swapping
  one user's clipped delta (norm ≤ C) for another moves the sum by ≤ 2C, so
  the event's noise multiplier is σ/2.
* replace one unit by the "special" all-zero unit (`REPLACE_SPECIAL`, zero-out):
  tree aggregation without sampling (DP-FTRL, `tree_aggregation_event`) and
  distributed DP (`RdpCurveDpEvent` of the discrete Gaussian or Skellam sum).

`relation_of(event)` infers the relation from an event and refuses an event
that mixes relations, because no single relation makes all parts correct.

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy" (DP-SGD).
  McMahan et al. 2018, "Learning Differentially Private Recurrent Language
  Models" (DP-FedAvg). Wang, Balle & Kasiviswanathan 2019, "Subsampled Rényi
  Differential Privacy and Analytical Moments Accountant" (sampling without
  replacement). Kairouz, McMahan, Song, Thakkar, Thakurta & Xu 2021,
  "Practical and Private (Deep) Learning without Sampling or Shuffling"
  (tree aggregation, App. D).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attr
import dp_accounting
from dp_accounting import dp_event

from fedjax_priv.checks import check_int, check_non_negative, check_probability, check_real

NeighboringRelation = dp_accounting.NeighboringRelation

_SAMPLINGS = ("poisson", "fixed", "full")


def check_event(name: str, event: Any) -> dp_event.DpEvent:
  """`event` if it is a DpEvent, else TypeError naming `name`."""
  if not isinstance(event, dp_event.DpEvent):
    raise TypeError(
        f"{name} must be a dp_accounting.DpEvent, got {type(event).__name__}."
    )
  return event


def _poisson_gaussian(q: float, noise_multiplier: float) -> dp_event.DpEvent:
  """One Poisson-sampled Gaussian step; q = 1 is the unsampled Gaussian."""
  gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
  return gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)


def user_level_event(
    noise_multiplier: float,
    rounds: int,
    sampling: str,
    num_clients: int,
    cohort_size: float,
    *,
    fixed_as_poisson: bool = False,
) -> dp_event.DpEvent:
  """DpEvent of `rounds` rounds of DP-FedAvg (McMahan et al. 2018).

  Each round clips every sampled client's model delta to L2 norm C, sums the
  clipped deltas, adds N(0, σ²C²·I) once to the sum and divides by a public
  constant (the expected cohort size), which is post-processing. The unit of
  privacy is a user: all of one client's data.

  Sampling schemes and the neighbouring relation each one is accounted under:

  * ``"poisson"``: each client joins each round independently with
    probability q = cohort_size / num_clients (cohort_size is the *expected*
    cohort size). Relation: add/remove one user. Sensitivity of the clipped
    sum is C, so the event is
    ``SelfComposed(PoissonSampled(q, Gaussian(σ)), rounds)``
    (Mironov, Talwar & Zhang 2019); q = 1 gives the ``"full"`` event.
  * ``"fixed"``: a cohort of exactly cohort_size distinct clients drawn
    uniformly without replacement from num_clients (public). Relation:
    replace one user, since a fixed-size sample is only analysed for a
    dataset of fixed, public size. Replacing one user's clipped delta
    (norm ≤ C) by another's moves the sum by up to 2C, so relative to the
    replace-one sensitivity the noise multiplier is σC / 2C = σ/2 and the
    event is ``SelfComposed(SampledWithoutReplacement(num_clients,
    cohort_size, Gaussian(σ/2)), rounds)``.

    Why σ/2 is the right input to `dp_accounting`: its RDP accountant only
    composes `SampledWithoutReplacementDpEvent` when constructed with
    ``NeighboringRelation.REPLACE_ONE`` (it refuses otherwise), and
    ``_compute_rdp_sample_wor_gaussian`` evaluates Theorem 27 of Wang, Balle
    & Kasiviswanathan (2019) with the base mechanism's RDP taken as
    α / (2·nm²), where nm is the event's noise multiplier documented as "the
    ratio of the standard deviation of the Gaussian noise to the
    l2-sensitivity". That theorem is stated for the replace-one relation, so
    nm must be std / (replace-one sensitivity) = σ/2. Passing σ would
    understate ε. Integer orders use the theorem's bound (exactly up to
    order 256, a looser closed form above); fractional orders interpolate
    between neighbouring integers (their Corollary 10), still an upper bound.
    The resulting ε protects replacing one user and is not interchangeable
    with an add/remove ε.
  * ``"full"``: every client, every round (q = 1); requires
    cohort_size == num_clients. Relation: add/remove one user, sensitivity C:
    ``SelfComposed(Gaussian(σ), rounds)``.

  ``fixed_as_poisson=True`` accounts ``"fixed"`` cohorts as if they were
  Poisson-sampled with q = cohort_size / num_clients (add/remove, σ). Many
  papers report ε this way, but it is an approximation, not a proven bound
  for the sampler that ran (shuffled or fixed-size batches can leak more than
  Poisson ones; Chua et al. 2024, "How Private are DP-SGD Implementations?"),
  so it is opt-in and emits a `UserWarning` naming the approximation.

  Args:
    noise_multiplier: σ, the noise std divided by the clipping norm C.
      Finite, >= 0 (0 means no privacy: ε = ∞).
    rounds: number of rounds, >= 0; 0 gives ``NoOpDpEvent()``.
    sampling: ``"poisson"``, ``"fixed"`` or ``"full"``.
    num_clients: size of the client population, >= 1.
    cohort_size: ``"poisson"``: expected cohort size in (0, num_clients];
      ``"fixed"``: the integer cohort size in [1, num_clients];
      ``"full"``: must equal num_clients.
    fixed_as_poisson: only with ``sampling="fixed"``: account the fixed-size
      cohorts as Poisson sampling (an approximation; warns). Default False.

  Returns:
    The DpEvent of all `rounds` rounds.

  Raises:
    ValueError: an argument is out of range, naming it and its value.
  """
  noise_multiplier = check_non_negative("noise_multiplier", noise_multiplier)
  if not isinstance(fixed_as_poisson, bool):
    raise ValueError(f"fixed_as_poisson must be a bool, got {fixed_as_poisson!r}.")
  if fixed_as_poisson and sampling != "fixed":
    raise ValueError(
        f"fixed_as_poisson=True applies only to sampling='fixed', got "
        f"sampling={sampling!r}."
    )
  rounds = check_int("rounds", rounds, 0)
  if sampling not in _SAMPLINGS:
    raise ValueError(f"sampling must be one of {_SAMPLINGS}, got {sampling!r}.")
  num_clients = check_int("num_clients", num_clients, 1)
  cohort_size = check_real("cohort_size", cohort_size)
  if not 0 < cohort_size <= num_clients:
    raise ValueError(
        f"cohort_size must be in (0, num_clients={num_clients}], got "
        f"{cohort_size!r}."
    )

  if sampling == "fixed" and not cohort_size.is_integer():
    raise ValueError(
        "cohort_size must be an integer for sampling='fixed', got "
        f"{cohort_size!r}."
    )
  if fixed_as_poisson:
    warnings.warn(
        f"fixed-size cohorts of {int(cohort_size)} out of {num_clients} are "
        f"accounted as Poisson sampling with q = {cohort_size / num_clients:g} "
        "(add/remove relation): an approximation, not a proven bound for "
        "fixed-size sampling.",
        UserWarning,
        stacklevel=2,
    )
  if sampling == "poisson" or fixed_as_poisson:
    per_round = _poisson_gaussian(cohort_size / num_clients, noise_multiplier)
  elif sampling == "fixed":
    per_round = dp_accounting.SampledWithoutReplacementDpEvent(
        num_clients,
        int(cohort_size),
        # Replace-one sensitivity is 2C; see the docstring.
        dp_accounting.GaussianDpEvent(noise_multiplier / 2),
    )
  else:
    if cohort_size != num_clients:
      raise ValueError(
          "cohort_size must equal num_clients for sampling='full', got "
          f"cohort_size={cohort_size!r}, num_clients={num_clients}."
      )
    per_round = dp_accounting.GaussianDpEvent(noise_multiplier)

  if rounds == 0:
    return dp_accounting.NoOpDpEvent()
  return dp_accounting.SelfComposedDpEvent(per_round, rounds)


def example_level_event(
    noise_multiplier: float, steps: int, sampling_rate: float
) -> dp_event.DpEvent:
  """DpEvent of `steps` DP-SGD steps with Poisson sampling (Abadi et al. 2016).

  Each step includes every example independently with probability q, clips
  each per-example gradient to L2 norm C, sums, and adds N(0, σ²C²·I).
  Relation: add/remove one example, under which the clipped sum has
  sensitivity C, so the event is
  ``SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)``; with q = 1 it is
  plain Gaussian composition ``SelfComposed(Gaussian(σ), steps)``.

  Args:
    noise_multiplier: σ, noise std divided by the clipping norm. Finite, >= 0.
    steps: number of noisy steps, >= 0; 0 gives ``NoOpDpEvent()``.
    sampling_rate: q in (0, 1], e.g. expected batch size / dataset size.

  Returns:
    The DpEvent of all `steps` steps.

  Raises:
    ValueError: an argument is out of range, naming it and its value.
  """
  noise_multiplier = check_non_negative("noise_multiplier", noise_multiplier)
  steps = check_int("steps", steps, 0)
  q = check_probability("sampling_rate", sampling_rate, allow_zero=False)
  if steps == 0:
    return dp_accounting.NoOpDpEvent()
  return dp_accounting.SelfComposedDpEvent(_poisson_gaussian(q, noise_multiplier), steps)


def tree_aggregation_event(
    noise_multiplier: float, rounds: int, restart_every: int
) -> dp_event.DpEvent:
  """DpEvent of `rounds` rounds of DP-FTRL tree aggregation (Kairouz et al. 2021).

  Each round clips every participating client's update to L2 norm C and adds
  the sum as a leaf of a binary tree whose every node carries fresh
  N(0, σ²C²·I) noise; the server releases noisy prefix sums (see
  `fedjax_priv.privacy.dp_ftrl`). The tree restarts every `restart_every`
  rounds (an epoch), and the accounting *requires* that each client
  contributes to at most one round per epoch: no sampling or shuffling is
  assumed, so nothing is amplified.

  Relation: replace one user's data by the special user whose update is
  always zero (``REPLACE_SPECIAL``; Kairouz et al. 2021, Sec. 2 and App. D).
  The replaced update (norm ≤ C) enters one leaf and the ≤ ⌈log2(T + 1)⌉
  nodes above it of a T-leaf tree, each with sensitivity C, so one epoch is
  the Gaussian mechanism of multiplier σ/√⌈log2(T + 1)⌉ and epochs compose:
  ``SelfComposed(SingleEpochTreeAggregation(σ, restart_every), epochs)``
  plus one shorter tree for a trailing partial epoch. (The paper's own code
  uses ⌈log2 T⌉ levels, which undercounts by one when T is a power of two;
  `dp_accounting`'s ⌈log2(T + 1)⌉ is the safe count.)

  Args:
    noise_multiplier: σ, the std of each tree node's noise divided by C.
      Finite, >= 0.
    rounds: number of rounds run, >= 0; 0 gives ``NoOpDpEvent()``.
    restart_every: rounds per tree (epoch), >= 1.

  Returns:
    The DpEvent of all `rounds` rounds; account it with ``accountant="rdp"``
    (the PLD accountant does not support tree aggregation).

  Raises:
    ValueError: an argument is out of range, naming it and its value.
  """
  noise_multiplier = check_non_negative("noise_multiplier", noise_multiplier)
  rounds = check_int("rounds", rounds, 0)
  restart_every = check_int("restart_every", restart_every, 1)
  epochs, remainder = divmod(rounds, restart_every)
  parts = []
  if epochs:
    parts.append(dp_accounting.SelfComposedDpEvent(
        dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, restart_every),
        epochs))
  if remainder:
    parts.append(
        dp_accounting.SingleEpochTreeAggregationDpEvent(noise_multiplier, remainder))
  if not parts:
    return dp_accounting.NoOpDpEvent()
  return parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)




@attr.define(frozen=True)
class RdpCurveDpEvent(dp_event.DpEvent):
  """A mechanism known by its Rényi-DP curve, for mechanisms `dp_accounting` has no event for.

  The distributed discrete Gaussian and Skellam sums are not Gaussian
  mechanisms; their RDP bounds (Kairouz et al. 2021; Agarwal et al. 2021)
  are given as functions of the order. This event carries such a bound at
  every integer order 2, 3, ..., `2 + len(rdp) - 1`, which is what Poisson
  subsampling of a general mechanism needs (Zhu & Wang 2019, Thm. 5; see
  `accountant.poisson_subsampled_rdp`). Only the RDP accountant composes it.

  Attributes:
    rdp: RDP ε(α) at α = 2, 3, ...; +inf where the bound does not hold.
    relation: the neighbouring relation the curve is stated under.
    name: what mechanism the curve is of, for reports.
  """
  rdp: tuple[float, ...]
  relation: NeighboringRelation = NeighboringRelation.REPLACE_SPECIAL
  name: str = ""

  @property
  def max_order(self) -> int:
    return 1 + len(self.rdp)


def relations_used(event: dp_event.DpEvent) -> set[NeighboringRelation]:
  """The neighbouring relations the parts of `event` are expressed in.

  A sampled event owns the mechanism inside it, so the walk stops there
  (a sampled RDP curve keeps the curve's relation). A
  `GaussianDpEvent` outside any sampling is read as add/remove (this module
  emits it only for full participation, whose sensitivity C is the add/remove
  one). Other event types carry no relation of their own here; the chosen
  accountant checks them.
  """
  if isinstance(event, dp_event.SampledWithoutReplacementDpEvent):
    return {NeighboringRelation.REPLACE_ONE}
  if isinstance(event, dp_event.SingleEpochTreeAggregationDpEvent):
    return {NeighboringRelation.REPLACE_SPECIAL}
  if isinstance(event, RdpCurveDpEvent):
    return {event.relation}
  if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(
      event.event, RdpCurveDpEvent):
    # Zhu & Wang's subsampling bound holds under the curve's own relation.
    return {event.event.relation}
  if isinstance(
      event, (dp_event.PoissonSampledDpEvent, dp_event.GaussianDpEvent)
  ):
    return {NeighboringRelation.ADD_OR_REMOVE_ONE}
  if isinstance(event, dp_event.TruncatedSubsampledGaussianDpEvent):
    # Poisson sampling truncated to a capacity (`simulation.participation.Poisson`
    # under the PLD accountant): stated for add/remove, like its untruncated form.
    return {NeighboringRelation.ADD_OR_REMOVE_ONE}
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return relations_used(event.event)
  if isinstance(event, dp_event.ComposedDpEvent):
    return set().union(*(relations_used(e) for e in event.events))
  return set()


def relation_of(event: dp_event.DpEvent) -> NeighboringRelation:
  relations = relations_used(event)
  if len(relations) > 1:
    names = sorted(relation.name for relation in relations)
    raise ValueError(
        f"event mixes neighbouring relations {names} (SampledWithoutReplacement"
        "DpEvent: replace-one; SingleEpochTreeAggregationDpEvent: replace-"
        "special; PoissonSampledDpEvent, TruncatedSubsampledGaussianDpEvent or "
        "unsampled GaussianDpEvent: add/remove); no single neighbouring relation "
        f"makes all noise multipliers correct, so no ε is reported. Got event={event}."
    )
  return relations.pop() if relations else NeighboringRelation.ADD_OR_REMOVE_ONE






def event_to_json(event: dp_event.DpEvent) -> dict[str, Any]:
  """JSON-serialisable form of the event types this module emits."""
  if isinstance(event, dp_event.NoOpDpEvent):
    return {"type": "NoOpDpEvent"}
  if isinstance(event, dp_event.GaussianDpEvent):
    return {
        "type": "GaussianDpEvent",
        "noise_multiplier": float(event.noise_multiplier),
    }
  if isinstance(event, dp_event.PoissonSampledDpEvent):
    return {
        "type": "PoissonSampledDpEvent",
        "sampling_probability": float(event.sampling_probability),
        "event": event_to_json(event.event),
    }
  if isinstance(event, dp_event.TruncatedSubsampledGaussianDpEvent):
    return {
        "type": "TruncatedSubsampledGaussianDpEvent",
        "dataset_size": int(event.dataset_size),
        "sampling_probability": float(event.sampling_probability),
        "truncated_batch_size": int(event.truncated_batch_size),
        "noise_multiplier": float(event.noise_multiplier),
    }
  if isinstance(event, dp_event.SampledWithoutReplacementDpEvent):
    return {
        "type": "SampledWithoutReplacementDpEvent",
        "source_dataset_size": int(event.source_dataset_size),
        "sample_size": int(event.sample_size),
        "event": event_to_json(event.event),
    }
  if isinstance(event, dp_event.SingleEpochTreeAggregationDpEvent):
    counts = event.step_counts
    return {
        "type": "SingleEpochTreeAggregationDpEvent",
        "noise_multiplier": float(event.noise_multiplier),
        "step_counts": (
            [int(c) for c in counts] if isinstance(counts, Sequence) else int(counts)
        ),
    }
  if isinstance(event, RdpCurveDpEvent):
    return {
        "type": "RdpCurveDpEvent",
        "rdp": [float(v) if math.isfinite(v) else "inf" for v in event.rdp],
        "relation": event.relation.name,
        "name": event.name,
    }
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return {
        "type": "SelfComposedDpEvent",
        "count": int(event.count),
        "event": event_to_json(event.event),
    }
  if isinstance(event, dp_event.ComposedDpEvent):
    return {
        "type": "ComposedDpEvent",
        "events": [event_to_json(e) for e in event.events],
    }
  raise ValueError(
      f"cannot serialise event of type {type(event).__name__}: only NoOp, "
      "Gaussian, PoissonSampled, TruncatedSubsampledGaussian, SampledWithoutReplacement, "
      "SingleEpochTreeAggregation, RdpCurve, SelfComposed and Composed DpEvents are "
      "supported."
  )


def event_from_json(data: Any) -> dp_event.DpEvent:
  """Inverse of `_event_to_json`."""
  if not isinstance(data, Mapping) or "type" not in data:
    raise ValueError(
        f"serialised event must be a dict with 'type', got {data!r}."
    )
  kind = data["type"]
  try:
    if kind == "NoOpDpEvent":
      return dp_accounting.NoOpDpEvent()
    if kind == "GaussianDpEvent":
      return dp_accounting.GaussianDpEvent(float(data["noise_multiplier"]))
    if kind == "PoissonSampledDpEvent":
      return dp_accounting.PoissonSampledDpEvent(
          float(data["sampling_probability"]), event_from_json(data["event"])
      )
    if kind == "TruncatedSubsampledGaussianDpEvent":
      return dp_accounting.TruncatedSubsampledGaussianDpEvent(
          int(data["dataset_size"]),
          float(data["sampling_probability"]),
          int(data["truncated_batch_size"]),
          float(data["noise_multiplier"]),
      )
    if kind == "SampledWithoutReplacementDpEvent":
      return dp_accounting.SampledWithoutReplacementDpEvent(
          int(data["source_dataset_size"]),
          int(data["sample_size"]),
          event_from_json(data["event"]),
      )
    if kind == "SingleEpochTreeAggregationDpEvent":
      counts = data["step_counts"]
      return dp_accounting.SingleEpochTreeAggregationDpEvent(
          float(data["noise_multiplier"]),
          [int(c) for c in counts] if isinstance(counts, list) else int(counts),
      )
    if kind == "RdpCurveDpEvent":
      return RdpCurveDpEvent(tuple(float(v) for v in data["rdp"]),
                             NeighboringRelation[data["relation"]], str(data["name"]))
    if kind == "SelfComposedDpEvent":
      return dp_accounting.SelfComposedDpEvent(
          event_from_json(data["event"]), int(data["count"])
      )
    if kind == "ComposedDpEvent":
      return dp_accounting.ComposedDpEvent(
          [event_from_json(e) for e in data["events"]]
      )
  except KeyError as e:
    raise ValueError(f"serialised {kind} lacks field {e}: {data!r}.") from e
  except (TypeError, ValueError) as e:
    raise ValueError(f"serialised {kind} is malformed ({e}): {data!r}.") from e
  raise ValueError(f"unknown serialised event type {kind!r}.")

