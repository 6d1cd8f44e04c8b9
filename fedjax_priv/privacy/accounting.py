"""Privacy accounting: the DpEvents of what the engine runs, and their ε.

Host-side only (numpy/scipy/`dp_accounting`, no JAX). The round builder emits
one `dp_accounting.DpEvent` per round with the builders below; a
`PrivacyLedger` records them; `compute_epsilon` turns any recorded event into
an (ε, δ) guarantee with an RDP or PLD accountant.

Neighbouring relations. An ε is only meaningful together with the relation
it protects, and the relation also fixes what the Gaussian's noise multiplier
means (noise std divided by the L2 sensitivity *under that relation*):

* add/remove one unit (user for `user_level_event`, example for
  `example_level_event`): Poisson-sampled events and plain Gaussian
  composition. Adding or removing one clipped contribution of norm ≤ C moves
  the sum by ≤ C, so the event's noise multiplier is the engine's σ.
* replace one user: fixed-size cohorts sampled without replacement. Swapping
  one user's clipped delta (norm ≤ C) for another moves the sum by ≤ 2C, so
  the event's noise multiplier is σ/2.
* replace one unit by the "special" all-zero unit (`REPLACE_SPECIAL`): tree
  aggregation without sampling (DP-FTRL, `tree_aggregation_event`). The
  swapped contribution moves every tree node it enters by ≤ C, so the event's
  noise multiplier is σ.

`compute_epsilon` infers the relation from the event and refuses an event that
mixes the two, because no single relation makes both parts correct.

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy" (DP-SGD, moments
  accountant). McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models" (DP-FedAvg). Mironov 2017, "Rényi Differential Privacy";
  Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled
  Gaussian Mechanism". Wang, Balle & Kasiviswanathan 2019, "Subsampled Rényi
  Differential Privacy and Analytical Moments Accountant". Canonne, Kamath &
  Steinke 2020, "The Discrete Gaussian for Differential Privacy" (RDP → DP
  conversion used by `dp_accounting`). Meiser & Mohammadi 2018, Koskela et al.
  2020, Doroshenko et al. 2022 (privacy loss distributions). Kairouz, McMahan,
  Song, Thakkar, Thakurta & Xu 2021, "Practical and Private (Deep) Learning
  without Sampling or Shuffling" (tree aggregation, App. D).
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

NeighboringRelation = dp_accounting.NeighboringRelation

# Dense RDP orders: the optimal order for typical DP-SGD / DP-FedAvg settings
# lies between ~1.5 and ~40, and a grid step of 0.05 there keeps the
# discretisation loss in ε well below the digits anyone reports. The large
# orders cover very small ε / very large σ.
DEFAULT_RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 20 for x in range(1, 200)]
    + list(range(11, 64))
    + [128, 256, 512, 1024]
)

DEFAULT_PLD_DISCRETIZATION = 1e-3

_ACCOUNTANTS = ("rdp", "pld")
_SAMPLINGS = ("poisson", "fixed", "full")

# Calibration searches σ in [_MIN_NOISE_MULTIPLIER, _MAX_NOISE_MULTIPLIER].
_MIN_NOISE_MULTIPLIER = 1e-6
_MAX_NOISE_MULTIPLIER = 1e4

# `dp_accounting` logs this (through absl) each time the series for a
# fractional RDP order fails to converge; it then sets that order's RDP to +inf,
# which only drops the order from the minimisation over orders. The result is
# still a valid upper bound, so the message is noise, but it can be printed
# hundreds of times during a calibration.
_RDP_CONVERGENCE_MESSAGE = "_compute_log_a_frac failed to converge"


class _DropRdpConvergenceWarnings(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_RDP_CONVERGENCE_MESSAGE)


@contextlib.contextmanager
def _quiet_rdp_convergence_warnings() -> Iterator[None]:
  """Drops only the harmless RDP convergence message; all else still logs."""
  logger = logging.getLogger("absl")
  log_filter = _DropRdpConvergenceWarnings()
  logger.addFilter(log_filter)
  try:
    yield
  finally:
    logger.removeFilter(log_filter)


# --------------------------------------------------------------------------
# Argument checks.


def check_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an int >= minimum, or ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
  return int(value)


def check_positive(name: str, value: Any) -> float:
  """`value` as a finite float > 0, or ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
  return float(value)


def _check_real(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a real number, got {value!r}.")
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  return float(value)


def _check_noise_multiplier(value: Any) -> float:
  value = _check_real("noise_multiplier", value)
  if value < 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {value!r}.")
  return value


def check_probability(name: str, value: Any, *, allow_zero: bool) -> float:
  """`value` as a float in (0, 1] ([0, 1] with allow_zero), or ValueError naming `name`."""
  value = _check_real(name, value)
  low_ok = value >= 0 if allow_zero else value > 0
  if not (low_ok and value <= 1):
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")
  return value


def check_delta(delta: Any) -> float:
  """`delta` as a float in (0, 1), or ValueError."""
  delta = _check_real("delta", delta)
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}.")
  return delta


def _check_accountant(accountant: Any) -> str:
  if accountant not in _ACCOUNTANTS:
    raise ValueError(
        f"accountant must be one of {_ACCOUNTANTS}, got {accountant!r}."
    )
  return accountant


def _check_event(name: str, event: Any) -> dp_event.DpEvent:
  if not isinstance(event, dp_event.DpEvent):
    raise TypeError(
        f"{name} must be a dp_accounting.DpEvent, got {type(event).__name__}."
    )
  return event


# --------------------------------------------------------------------------
# Events.


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
  noise_multiplier = _check_noise_multiplier(noise_multiplier)
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
  cohort_size = _check_real("cohort_size", cohort_size)
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
  noise_multiplier = _check_noise_multiplier(noise_multiplier)
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
  noise_multiplier = _check_noise_multiplier(noise_multiplier)
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


# --------------------------------------------------------------------------
# Accountants.


def _relations_used(event: dp_event.DpEvent) -> set[NeighboringRelation]:
  """The neighbouring relations the parts of `event` are expressed in.

  A sampled event owns the Gaussian inside it, so the walk stops there. A
  `GaussianDpEvent` outside any sampling is read as add/remove (this module
  emits it only for full participation, whose sensitivity C is the add/remove
  one). Other event types carry no relation of their own here; the chosen
  accountant checks them.
  """
  if isinstance(event, dp_event.SampledWithoutReplacementDpEvent):
    return {NeighboringRelation.REPLACE_ONE}
  if isinstance(event, dp_event.SingleEpochTreeAggregationDpEvent):
    return {NeighboringRelation.REPLACE_SPECIAL}
  if isinstance(
      event, (dp_event.PoissonSampledDpEvent, dp_event.GaussianDpEvent)
  ):
    return {NeighboringRelation.ADD_OR_REMOVE_ONE}
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return _relations_used(event.event)
  if isinstance(event, dp_event.ComposedDpEvent):
    return set().union(*(_relations_used(e) for e in event.events))
  return set()


def _neighboring_relation(event: dp_event.DpEvent) -> NeighboringRelation:
  relations = _relations_used(event)
  if len(relations) > 1:
    names = sorted(relation.name for relation in relations)
    raise ValueError(
        f"event mixes neighbouring relations {names} (SampledWithoutReplacement"
        "DpEvent: replace-one; SingleEpochTreeAggregationDpEvent: replace-"
        "special; PoissonSampledDpEvent or unsampled GaussianDpEvent: add/"
        "remove); no single neighbouring relation makes all noise multipliers "
        f"correct, so no ε is reported. Got event={event}."
    )
  return relations.pop() if relations else NeighboringRelation.ADD_OR_REMOVE_ONE


def _first_unsupported(
    accountant: dp_accounting.PrivacyAccountant, event: dp_event.DpEvent
) -> dp_event.DpEvent | None:
  """Innermost non-composition subevent `accountant` cannot process."""
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return _first_unsupported(accountant, event.event)
  if isinstance(event, dp_event.ComposedDpEvent):
    for sub in event.events:
      bad = _first_unsupported(accountant, sub)
      if bad is not None:
        return bad
    return None
  return None if accountant.supports(event) else event


def _make_accountant(
    accountant: str,
    relation: NeighboringRelation,
    orders: Sequence[float] | None,
    value_discretization_interval: float,
) -> dp_accounting.PrivacyAccountant:
  if accountant == "rdp":
    orders = DEFAULT_RDP_ORDERS if orders is None else tuple(orders)
    if not orders or any(not (o > 1 and math.isfinite(o)) for o in orders):
      raise ValueError(
          f"orders must be a non-empty sequence of finite numbers > 1, got "
          f"{orders!r}."
      )
    return rdp_privacy_accountant.RdpAccountant(list(orders), relation)
  if not (
      math.isfinite(value_discretization_interval)
      and value_discretization_interval > 0
  ):
    raise ValueError(
        "value_discretization_interval must be finite and > 0, got "
        f"{value_discretization_interval!r}."
    )
  return pld_privacy_accountant.PLDAccountant(
      relation, value_discretization_interval=value_discretization_interval
  )


def _composed_accountant(
    event: dp_event.DpEvent,
    accountant: str,
    orders: Sequence[float] | None,
    value_discretization_interval: float,
) -> dp_accounting.PrivacyAccountant:
  """An accountant of the right relation with `event` composed into it."""
  _check_event("event", event)
  accountant = _check_accountant(accountant)
  relation = _neighboring_relation(event)
  acct = _make_accountant(
      accountant, relation, orders, value_discretization_interval
  )
  bad = _first_unsupported(acct, event)
  if bad is not None:
    hint = ""
    if accountant == "pld" and _make_accountant(
        "rdp", relation, None, value_discretization_interval
    ).supports(event):
      hint = ' Use accountant="rdp", which supports it.'
    raise ValueError(
        f"accountant={accountant!r} cannot account for "
        f"{type(bad).__name__} under the {relation.name} relation "
        f"(subevent {bad}).{hint}"
    )
  with _quiet_rdp_convergence_warnings():
    acct.compose(event)
  return acct


def compute_epsilon(
    event: dp_event.DpEvent,
    delta: float,
    accountant: str = "rdp",
    *,
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
  """ε such that `event` is (ε, δ)-DP under the relation its parts imply.

  The relation is add/remove one unit unless the event contains
  `SampledWithoutReplacementDpEvent`, in which case it is replace one unit
  (see the module docstring); events mixing the two are refused.

  Args:
    event: the DpEvent to account, e.g. from `user_level_event` or
      `PrivacyLedger.event`.
    delta: target δ in (0, 1).
    accountant: ``"rdp"`` (`dp_accounting.rdp.RdpAccountant`, RDP → DP via
      Canonne, Kamath & Steinke 2020, Prop. 12) or ``"pld"``
      (`dp_accounting.pld.PLDAccountant`, pessimistic discretisation, so
      still an upper bound; tighter, supports fewer events).
    orders: RDP orders (all > 1); default `DEFAULT_RDP_ORDERS`. Only "rdp".
    value_discretization_interval: privacy-loss grid step of the PLD; smaller
      is tighter and slower. Only "pld".

  Returns:
    ε >= 0 (``math.inf`` when no finite ε holds, e.g. σ = 0).

  Raises:
    ValueError: a bad argument, an event mixing relations, or an event the
      chosen accountant cannot process (naming both).
    TypeError: `event` is not a DpEvent.
  """
  delta = check_delta(delta)
  acct = _composed_accountant(
      event, accountant, orders, value_discretization_interval
  )
  with _quiet_rdp_convergence_warnings():
    return float(acct.get_epsilon(delta))


def compute_delta(
    event: dp_event.DpEvent,
    epsilon: float,
    accountant: str = "rdp",
    *,
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
  """δ such that `event` is (ε, δ)-DP; the counterpart of `compute_epsilon`.

  Args:
    event: the DpEvent to account.
    epsilon: target ε, finite and >= 0.
    accountant: ``"rdp"`` or ``"pld"``, as in `compute_epsilon`.
    orders: RDP orders; default `DEFAULT_RDP_ORDERS`. Only "rdp".
    value_discretization_interval: PLD grid step. Only "pld".

  Returns:
    δ in [0, 1].

  Raises:
    ValueError, TypeError: as `compute_epsilon`.
  """
  epsilon = _check_real("epsilon", epsilon)
  if epsilon < 0:
    raise ValueError(f"epsilon must be >= 0, got {epsilon!r}.")
  acct = _composed_accountant(
      event, accountant, orders, value_discretization_interval
  )
  with _quiet_rdp_convergence_warnings():
    return float(acct.get_delta(epsilon))


# --------------------------------------------------------------------------
# Truncated (static-capacity) Poisson sampling.


def _overflow_term(epsilon: float, total_overflow_probability: float) -> float:
  """(1 + e^ε)·P[some round overflows], capped at 1 (δ ≥ 1 is vacuous)."""
  if total_overflow_probability == 0:
    return 0.0
  # Beyond this, (1 + e^ε)·p >= 1 for any p >= 1e-300 and exp would overflow.
  if epsilon > 700:
    return 1.0
  return min(1.0, (1 + math.exp(epsilon)) * total_overflow_probability)


def overflow_delta(
    epsilon: float, rounds: int, overflow_probability_per_round: float
) -> float:
  """Extra δ paid for truncating Poisson cohorts (or batches) to a capacity.

  The engine needs static shapes, so a Poisson-sampled cohort larger than the
  compiled capacity is truncated. Let M be the ideal (untruncated) mechanism,
  (ε, δ)-DP, and M' the truncated one. Run both on the same randomness: they
  differ only on the event F that some round overflows, and by a union bound
  P[F] <= rounds·p =: β, where p bounds the per-round overflow probability
  on *both* datasets of a neighbouring pair (under add/remove, compute it for
  the larger population, num_clients + 1). For every output set S:

    P[M'(D) ∈ S] <= P[M(D) ∈ S] + β <= e^ε P[M(D') ∈ S] + δ + β
                 <= e^ε (P[M'(D') ∈ S] + β) + δ + β,

  so M' is (ε, δ + (1 + e^ε)·β)-DP. This function returns (1 + e^ε)·β.

  Args:
    epsilon: ε of the ideal mechanism, >= 0 (``math.inf`` allowed).
    rounds: number of rounds (or steps), >= 0.
    overflow_probability_per_round: p in [0, 1], an upper bound on
      P[cohort size > capacity] in one round.

  Returns:
    (1 + e^ε)·rounds·p, capped at 1.

  Raises:
    ValueError: an argument is out of range, naming it and its value.
  """
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not (
      epsilon >= 0
  ):
    raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}.")
  rounds = check_int("rounds", rounds, 0)
  p = check_probability(
      "overflow_probability_per_round",
      overflow_probability_per_round,
      allow_zero=True,
  )
  return _overflow_term(float(epsilon), rounds * p)


def epsilon_with_overflow(
    event: dp_event.DpEvent,
    delta: float,
    rounds: int,
    overflow_probability_per_round: float,
    accountant: str = "rdp",
    *,
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
) -> tuple[float, float]:
  """(ε, δ_total) of `event` run with truncated Poisson sampling.

  ε is `compute_epsilon(event, delta)` of the ideal mechanism and
  δ_total = delta + overflow_delta(ε, rounds, overflow_probability_per_round).

  Args:
    event: DpEvent of the ideal (untruncated) mechanism.
    delta: δ at which ε is computed, in (0, 1).
    rounds: rounds (or steps) whose cohort could overflow, >= 0.
    overflow_probability_per_round: per-round overflow probability bound.
    accountant, orders, value_discretization_interval: as `compute_epsilon`.

  Returns:
    (ε, δ_total): the truncated mechanism is (ε, δ_total)-DP.
  """
  epsilon = compute_epsilon(
      event,
      delta,
      accountant,
      orders=orders,
      value_discretization_interval=value_discretization_interval,
  )
  extra = overflow_delta(epsilon, rounds, overflow_probability_per_round)
  return epsilon, min(1.0, delta + extra)


# --------------------------------------------------------------------------
# Calibration.


def calibrate_noise_multiplier(
    make_event: Callable[[float], dp_event.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 1e-3,
    *,
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
  """Smallest σ (to relative `tolerance`) with ε(make_event(σ)) <= target.

  Brackets by doubling (or halving) from σ = 1, then bisects. Only σ whose
  computed ε met the target is ever returned, so the guarantee holds for the
  returned value even if ε(σ) is not exactly monotone (PLD discretisation).

  Args:
    make_event: σ ↦ DpEvent, e.g.
      ``lambda s: user_level_event(s, 1000, "poisson", 10**6, 100)``.
    target_epsilon: target ε, finite and > 0.
    delta: δ in (0, 1).
    accountant: ``"rdp"`` or ``"pld"``.
    tolerance: relative width of the final bracket, in (0, 1).
    orders, value_discretization_interval: as `compute_epsilon`.

  Returns:
    σ with ε(σ) <= target_epsilon and ε(σ·(1 - tolerance)) > target (up to
    monotonicity). σ below 1e-6 is not searched: if even 1e-6 meets the
    target, 1e-6 is returned.

  Raises:
    ValueError: target_epsilon <= 0, a bad argument, or the target is not
      reached even with σ = 1e4.
  """
  target = _check_real("target_epsilon", target_epsilon)
  if target <= 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}.")
  delta = check_delta(delta)
  tolerance = _check_real("tolerance", tolerance)
  if not 0 < tolerance < 1:
    raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}.")

  def meets_target(sigma: float) -> bool:
    event = _check_event("make_event(noise_multiplier)", make_event(sigma))
    return (
        compute_epsilon(
            event,
            delta,
            accountant,
            orders=orders,
            value_discretization_interval=value_discretization_interval,
        )
        <= target
    )

  # Invariant after bracketing: meets_target(hi) and not meets_target(lo).
  if meets_target(1.0):
    hi = 1.0
    lo = 0.5
    while meets_target(lo):
      hi = lo
      if lo <= _MIN_NOISE_MULTIPLIER:
        return hi
      lo = max(lo / 2, _MIN_NOISE_MULTIPLIER)
  else:
    lo = 1.0
    hi = 2.0
    while not meets_target(hi):
      if hi >= _MAX_NOISE_MULTIPLIER:
        raise ValueError(
            f"target_epsilon={target!r} at delta={delta!r} is not reached "
            f"with noise_multiplier up to {_MAX_NOISE_MULTIPLIER:g}."
        )
      lo = hi
      hi = min(2 * hi, _MAX_NOISE_MULTIPLIER)

  while hi - lo > tolerance * hi:
    mid = 0.5 * (lo + hi)
    if meets_target(mid):
      hi = mid
    else:
      lo = mid
  return hi


def steps_within_budget(
    make_event: Callable[[int], dp_event.DpEvent],
    target_epsilon: float,
    delta: float,
    max_steps: int,
    accountant: str = "rdp",
    *,
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
) -> int:
  """Largest T in [0, max_steps] with ε(make_event(T)) <= target_epsilon.

  The budget counterpart of `calibrate_noise_multiplier`: with σ fixed, how
  many rounds (or steps) can run before the next one would exceed the
  budget. ε must be non-decreasing in T, which holds for every composition
  of mechanisms. Exponential search from T = 1, then bisection: O(log T)
  accountant calls, each composing one event.

  Args:
    make_event: T ↦ DpEvent of the first T steps, e.g.
      ``lambda t: user_level_event(1.1, t, "poisson", 10**6, 100)``; must
      accept T = 0 (usually ``NoOpDpEvent()``).
    target_epsilon: ε budget, finite and > 0.
    delta: δ in (0, 1).
    max_steps: upper end of the search, >= 0.
    accountant, orders, value_discretization_interval: as `compute_epsilon`.

  Returns:
    T: make_event(T) meets the budget and make_event(T + 1) does not (or
    T = max_steps). 0 when even one step exceeds it.

  Raises:
    ValueError: a bad argument (named).
  """
  target = _check_real("target_epsilon", target_epsilon)
  if target <= 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}.")
  delta = check_delta(delta)
  max_steps = check_int("max_steps", max_steps, 0)

  def within(steps: int) -> bool:
    event = _check_event("make_event(steps)", make_event(steps))
    return compute_epsilon(
        event, delta, accountant, orders=orders,
        value_discretization_interval=value_discretization_interval) <= target

  # Invariant: within(lo) and (hi > max_steps or not within(hi)).
  lo, hi = 0, 1
  while hi <= max_steps and within(hi):
    lo, hi = hi, 2 * hi
  hi = min(hi, max_steps + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if within(mid):
      lo = mid
    else:
      hi = mid
  return lo


# --------------------------------------------------------------------------
# Ledger.

_STATE_VERSION = 1


def _event_to_json(event: dp_event.DpEvent) -> dict[str, Any]:
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
        "event": _event_to_json(event.event),
    }
  if isinstance(event, dp_event.SampledWithoutReplacementDpEvent):
    return {
        "type": "SampledWithoutReplacementDpEvent",
        "source_dataset_size": int(event.source_dataset_size),
        "sample_size": int(event.sample_size),
        "event": _event_to_json(event.event),
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
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return {
        "type": "SelfComposedDpEvent",
        "count": int(event.count),
        "event": _event_to_json(event.event),
    }
  if isinstance(event, dp_event.ComposedDpEvent):
    return {
        "type": "ComposedDpEvent",
        "events": [_event_to_json(e) for e in event.events],
    }
  raise ValueError(
      f"cannot serialise event of type {type(event).__name__}: only NoOp, "
      "Gaussian, PoissonSampled, SampledWithoutReplacement, "
      "SingleEpochTreeAggregation, SelfComposed and Composed DpEvents are "
      "supported."
  )


def _event_from_json(data: Any) -> dp_event.DpEvent:
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
          float(data["sampling_probability"]), _event_from_json(data["event"])
      )
    if kind == "SampledWithoutReplacementDpEvent":
      return dp_accounting.SampledWithoutReplacementDpEvent(
          int(data["source_dataset_size"]),
          int(data["sample_size"]),
          _event_from_json(data["event"]),
      )
    if kind == "SingleEpochTreeAggregationDpEvent":
      counts = data["step_counts"]
      return dp_accounting.SingleEpochTreeAggregationDpEvent(
          float(data["noise_multiplier"]),
          [int(c) for c in counts] if isinstance(counts, list) else int(counts),
      )
    if kind == "SelfComposedDpEvent":
      return dp_accounting.SelfComposedDpEvent(
          _event_from_json(data["event"]), int(data["count"])
      )
    if kind == "ComposedDpEvent":
      return dp_accounting.ComposedDpEvent(
          [_event_from_json(e) for e in data["events"]]
      )
  except KeyError as e:
    raise ValueError(f"serialised {kind} lacks field {e}: {data!r}.") from e
  raise ValueError(f"unknown serialised event type {kind!r}.")


class PrivacyLedger:
  """Host-side record of the DpEvents that ran, one `record` per round.

  Consecutive identical per-round events are stored as one run, so `event`
  stays short and accounting cost grows with the number of distinct runs, not
  rounds. Overflow probabilities of truncated Poisson cohorts are summed and
  charged as in `overflow_delta`.

  Example::

    ledger = PrivacyLedger()
    for _ in range(rounds):
      ...  # run the round
      ledger.record(user_level_event(sigma, 1, "poisson", n, m), p_overflow)
    eps, delta_total = ledger.epsilon(1e-6)
  """

  def __init__(self) -> None:
    self._runs: list[tuple[dp_event.DpEvent, int]] = []
    self._overflow_probability_total = 0.0
    # The runner asks for the same (ε, δ) more than once between rounds (the
    # evaluation record, then the final report); a PLD composition takes seconds.
    self._epsilon_cache: dict[tuple, tuple[float, float]] = {}

  def record(
      self, event: dp_event.DpEvent, overflow_probability: float = 0.0
  ) -> None:
    """Records one round.

    Args:
      event: the round's DpEvent.
      overflow_probability: bound on this round's probability that the
        Poisson cohort exceeded its static capacity and was truncated, in
        [0, 1]; 0 when there is no truncation.
    """
    _check_event("event", event)
    p = check_probability(
        "overflow_probability", overflow_probability, allow_zero=True
    )
    if self._runs and self._runs[-1][0] == event:
      last, count = self._runs[-1]
      self._runs[-1] = (last, count + 1)
    else:
      self._runs.append((event, 1))
    self._overflow_probability_total += p
    self._epsilon_cache.clear()

  @property
  def rounds(self) -> int:
    """Number of recorded rounds."""
    return sum(count for _, count in self._runs)

  @property
  def overflow_probability_total(self) -> float:
    """Sum of the recorded per-round overflow probabilities."""
    return self._overflow_probability_total

  @property
  def event(self) -> dp_event.ComposedDpEvent:
    """All recorded rounds as one `ComposedDpEvent` of runs."""
    return dp_accounting.ComposedDpEvent(
        [
            e if count == 1 else dp_accounting.SelfComposedDpEvent(e, count)
            for e, count in self._runs
        ]
    )

  def epsilon(
      self,
      delta: float,
      accountant: str = "rdp",
      *,
      orders: Sequence[float] | None = None,
      value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
  ) -> tuple[float, float]:
    """(ε, δ_total) of everything recorded.

    Args:
      delta: δ at which ε is computed, in (0, 1).
      accountant, orders, value_discretization_interval: as
        `compute_epsilon`.

    Returns:
      (ε, δ_total) with δ_total = delta + (1 + e^ε)·Σ overflow_probability
      (see `overflow_delta`), capped at 1. Computed once per recorded state
      and arguments.
    """
    key = (delta, accountant, None if orders is None else tuple(orders),
           value_discretization_interval)
    if key not in self._epsilon_cache:
      epsilon = compute_epsilon(
          self.event,
          delta,
          accountant,
          orders=orders,
          value_discretization_interval=value_discretization_interval,
      )
      extra = _overflow_term(epsilon, self._overflow_probability_total)
      self._epsilon_cache[key] = (epsilon, min(1.0, delta + extra))
    return self._epsilon_cache[key]

  def rounds_within_budget(
      self,
      next_round: dp_event.DpEvent,
      target_epsilon: float,
      delta: float,
      max_rounds: int,
      accountant: str = "rdp",
      *,
      orders: Sequence[float] | None = None,
      value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
  ) -> int:
    """How many more rounds of `next_round` fit in an (ε, δ) budget.

    The largest k <= max_rounds such that everything recorded so far
    composed with k rounds of `next_round` has ε <= target_epsilon at
    `delta` (see `steps_within_budget`). A runner calls it before each round
    and stops at 0. Overflow δ (truncated Poisson cohorts) is charged by
    `epsilon`, not here.

    Args:
      next_round: DpEvent of one upcoming round.
      target_epsilon, delta, accountant, orders,
        value_discretization_interval: as `steps_within_budget`.
      max_rounds: the most rounds asked about, >= 0.

    Returns:
      k in [0, max_rounds].
    """
    _check_event("next_round", next_round)
    spent = self.event

    def make_event(k: int) -> dp_event.DpEvent:
      if k == 0:
        return spent
      return dp_accounting.ComposedDpEvent(
          [spent, dp_accounting.SelfComposedDpEvent(next_round, k)])

    return steps_within_budget(
        make_event, target_epsilon, delta, max_rounds, accountant, orders=orders,
        value_discretization_interval=value_discretization_interval)

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable state (plain dicts, lists, strs, ints, floats)."""
    return {
        "version": _STATE_VERSION,
        "runs": [
            {"event": _event_to_json(e), "count": count}
            for e, count in self._runs
        ],
        "overflow_probability_total": self._overflow_probability_total,
    }

  @classmethod
  def from_state_dict(cls, state: Mapping[str, Any]) -> PrivacyLedger:
    """Restores a ledger written by `state_dict` (e.g. after `json.loads`).

    Raises:
      ValueError: `state` is malformed or of another version.
    """
    if not isinstance(state, Mapping):
      raise ValueError(f"state must be a dict, got {type(state).__name__}.")
    if state.get("version") != _STATE_VERSION:
      raise ValueError(
          f"state['version'] must be {_STATE_VERSION}, got "
          f"{state.get('version')!r}."
      )
    runs = state.get("runs")
    if not isinstance(runs, list):
      raise ValueError(f"state['runs'] must be a list, got {runs!r}.")
    total = state.get("overflow_probability_total")
    if (
        isinstance(total, bool)
        or not isinstance(total, numbers.Real)
        or not 0 <= total < math.inf
    ):
      raise ValueError(
          "state['overflow_probability_total'] must be a finite number >= 0, "
          f"got {total!r}."
      )
    ledger = cls()
    for i, run in enumerate(runs):
      if not isinstance(run, Mapping) or "event" not in run:
        raise ValueError(f"state['runs'][{i}] must be a dict with 'event'.")
      count = check_int(f"state['runs'][{i}]['count']", run.get("count"), 1)
      ledger._runs.append((_event_from_json(run["event"]), count))
    ledger._overflow_probability_total = float(total)
    return ledger
