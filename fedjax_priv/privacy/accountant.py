"""Accountants: (ε, δ) of a DpEvent with dp_accounting's RDP or PLD accountant.

Host-side only. `compute_epsilon` infers the neighbouring relation from the
event (`events.relation_of`), builds the accountant for it and composes the
event. Events carrying an RDP curve (`events.RdpCurveDpEvent`, distributed
DP) are composed exactly on the RDP curve: `dp_accounting` composes every
other part at the same integer orders, the curves are added (Poisson-sampled
ones through `poisson_subsampled_rdp`), and RDP is converted to (ε, δ) once.

References:
  Mironov 2017, "Rényi Differential Privacy"; Mironov, Talwar & Zhang 2019,
  "Rényi Differential Privacy of the Sampled Gaussian Mechanism". Canonne,
  Kamath & Steinke 2020, "The Discrete Gaussian for Differential Privacy"
  (RDP → DP conversion used by `dp_accounting`). Meiser & Mohammadi 2018,
  Koskela et al. 2020, Doroshenko et al. 2022 (privacy loss distributions).
  Zhu & Wang 2019, "Poisson Subsampled Renyi Differential Privacy" (ICML).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import dp_accounting
import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special

from fedjax_priv.checks import check_delta, check_probability, check_real
from fedjax_priv.privacy.events import (NeighboringRelation, RdpCurveDpEvent, check_event,
                                        relation_of, relations_used)

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

# The integer orders of the default grid: the distributed-DP bounds and Zhu &
# Wang's subsampling bound are stated for integer orders.
INTEGER_RDP_ORDERS: tuple[int, ...] = tuple(
    int(o) for o in DEFAULT_RDP_ORDERS if float(o).is_integer())

_ACCOUNTANTS = ("rdp", "pld")

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



def _check_accountant(accountant) -> str:
  if accountant not in _ACCOUNTANTS:
    raise ValueError(
        f"accountant must be one of {_ACCOUNTANTS}, got {accountant!r}."
    )
  return accountant


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


def poisson_subsampled_rdp(base_rdp: Callable[[np.ndarray], np.ndarray],
                           sampling_probability: float, orders: Sequence[int]) -> np.ndarray:
  """RDP of a mechanism run on a Poisson subsample (Zhu & Wang 2019, Thm. 5).

  For integer alpha >= 2, with q the sampling probability and eps the base
  mechanism's RDP:

    (alpha - 1) eps'(alpha) <= log[ (1-q)^(alpha-1) (alpha q - q + 1)
        + C(alpha, 2) q^2 (1-q)^(alpha-2) e^eps(2)
        + 3 sum_{l=3}^{alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^((l-1) eps(l)) ].

  The bound holds for add/remove and for zero-out (replace-special)
  neighbours alike. The subsampled mechanism is never worse than the base
  one (Renyi divergence is jointly quasi-convex), so the minimum of the two
  is returned.

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
  q = check_probability("sampling_probability", sampling_probability, allow_zero=False)
  orders = orders.astype(np.int64)
  base = np.asarray(base_rdp(orders), np.float64)
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


def _curves(event: dp_event.DpEvent) -> list[RdpCurveDpEvent]:
  if isinstance(event, RdpCurveDpEvent):
    return [event]
  if isinstance(event, (dp_event.SelfComposedDpEvent, dp_event.PoissonSampledDpEvent)):
    return _curves(event.event)
  if isinstance(event, dp_event.ComposedDpEvent):
    return [c for e in event.events for c in _curves(e)]
  return []


def _curve_function(curve: RdpCurveDpEvent) -> Callable[[np.ndarray], np.ndarray]:
  values = np.asarray(curve.rdp, np.float64)
  return lambda orders: values[np.asarray(orders, np.int64) - 2]


def _rdp_with_curves(event: dp_event.DpEvent, relation: NeighboringRelation,
                     orders: tuple[int, ...]) -> np.ndarray:
  """RDP at integer `orders` of an event that contains `RdpCurveDpEvent`s."""
  if isinstance(event, RdpCurveDpEvent):
    return _curve_function(event)(orders)
  if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(
      event.event, RdpCurveDpEvent):
    return poisson_subsampled_rdp(_curve_function(event.event), event.sampling_probability,
                                  orders)
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return event.count * _rdp_with_curves(event.event, relation, orders)
  if isinstance(event, dp_event.ComposedDpEvent):
    return sum((_rdp_with_curves(e, relation, orders) for e in event.events),
               np.zeros(len(orders)))
  if _curves(event):
    raise ValueError(f"an RdpCurveDpEvent can only be composed or Poisson-sampled, got {event}.")
  acct = rdp_privacy_accountant.RdpAccountant(list(orders), relation)
  bad = _first_unsupported(acct, event)
  if bad is not None:
    raise ValueError(f"the RDP accountant cannot account for {type(bad).__name__} under the "
                     f"{relation.name} relation (subevent {bad}).")
  with _quiet_rdp_convergence_warnings():
    acct.compose(event)
  # dp_accounting exposes no public accessor for the composed curve; the
  # attribute is pinned by tests/privacy/test_accountant.py.
  return np.asarray(acct._rdp, np.float64)  # pylint: disable=protected-access


def _curve_orders(event: dp_event.DpEvent) -> tuple[int, ...]:
  top = min(curve.max_order for curve in _curves(event))
  return tuple(o for o in INTEGER_RDP_ORDERS if o <= top)


def _curve_event_rdp(event: dp_event.DpEvent, accountant: str) -> tuple[tuple[int, ...],
                                                                         np.ndarray]:
  if accountant != "rdp":
    raise ValueError(f"accountant={accountant!r} cannot account for RdpCurveDpEvent (distributed "
                     "DP); use accountant=\"rdp\".")
  orders = _curve_orders(event)
  return orders, _rdp_with_curves(event, relation_of(event), orders)


def _without_replacement_as_dominating_pair(event: dp_event.DpEvent) -> dp_event.DpEvent:
  """`event` with each sampled-without-replacement Gaussian replaced by its tight PLD equivalent.

  Sampling a fixed-size subset of K of N records without replacement, under
  the replace-one relation, turns a mechanism with dominating pair (P, Q)
  into one with dominating pair (q P + (1 - q) Q, Q), q = K / N (Balle,
  Barthe & Gaboardi 2018, Thm. 10, "advanced joint convexity"; Zhu, Dong &
  Wang 2022, "Optimal Accounting of Differential Privacy via Characteristic
  Function", Table 1). For the Gaussian mechanism, whose replace-one pair is
  (N(1, nm^2), N(0, nm^2)) with nm relative to the replace-one sensitivity,
  that is exactly the pair dp_accounting's PLD accountant builds for
  `PoissonSampledDpEvent(q, GaussianDpEvent(nm))` under add/remove, in
  both orders (the "remove" and "add" directions). Both orders are attained
  by the fixed-size sampler (let every other record equal the replaced one,
  or the replacing one), so this is tight, not only an upper bound. A plain
  Gaussian in the same event keeps its pair N(1) vs N(0), which the
  add/remove PLD accountant also gives. Other sampled-without-replacement
  mechanisms are left for the accountant to refuse.
  """
  if isinstance(event, dp_event.SelfComposedDpEvent):
    return dp_event.SelfComposedDpEvent(_without_replacement_as_dominating_pair(event.event),
                                        event.count)
  if isinstance(event, dp_event.ComposedDpEvent):
    return dp_event.ComposedDpEvent([_without_replacement_as_dominating_pair(e)
                                     for e in event.events])
  if (isinstance(event, dp_event.SampledWithoutReplacementDpEvent)
      and type(event.event) is dp_event.GaussianDpEvent):
    return dp_event.PoissonSampledDpEvent(
        event.sample_size / event.source_dataset_size, event.event)
  return event


def _composed_accountant(
    event: dp_event.DpEvent,
    accountant: str,
    orders: Sequence[float] | None,
    value_discretization_interval: float,
) -> dp_accounting.PrivacyAccountant:
  """An accountant of the right relation with `event` composed into it.

  Under "pld", a replace-one event of fixed-size (without replacement)
  sampled Gaussians is composed in its dominating-pair form
  (`_without_replacement_as_dominating_pair`) by the add/remove PLD
  accountant, which builds exactly those pairs.
  """
  check_event("event", event)
  accountant = _check_accountant(accountant)
  relation = relation_of(event)
  if accountant == "pld" and relation == NeighboringRelation.REPLACE_ONE:
    rewritten = _without_replacement_as_dominating_pair(event)
    if not relations_used(rewritten) - {NeighboringRelation.ADD_OR_REMOVE_ONE}:
      event, relation = rewritten, NeighboringRelation.ADD_OR_REMOVE_ONE
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
    if isinstance(bad, dp_event.TruncatedSubsampledGaussianDpEvent):
      # Only the PLD accountant has the truncated-Poisson analysis; under RDP
      # the plan must be built for RDP (ideal Poisson event + δ overflow term).
      hint = (' Use accountant="pld", or build the plan for "rdp" (Poisson-sampled event '
              "with the overflow charged to delta).")
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
  (see the module docstring); events mixing the two are refused. Under
  "rdp" such an event gets Wang, Balle & Kasiviswanathan's (2019) bound;
  under "pld" a Gaussian inside it gets its tight dominating pair (Balle et
  al. 2018; Zhu, Dong & Wang 2022), which is much smaller (`FixedSize`).

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
  if _curves(check_event("event", event)):
    accountant = _check_accountant(accountant)
    orders, rdp = _curve_event_rdp(event, accountant)
    return float(rdp_privacy_accountant.compute_epsilon(orders, rdp, delta)[0])
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
  epsilon = check_real("epsilon", epsilon)
  if epsilon < 0:
    raise ValueError(f"epsilon must be >= 0, got {epsilon!r}.")
  if _curves(check_event("event", event)):
    accountant = _check_accountant(accountant)
    orders, rdp = _curve_event_rdp(event, accountant)
    return float(rdp_privacy_accountant.compute_delta(orders, rdp, epsilon)[0])
  acct = _composed_accountant(
      event, accountant, orders, value_discretization_interval
  )
  with _quiet_rdp_convergence_warnings():
    return float(acct.get_delta(epsilon))

