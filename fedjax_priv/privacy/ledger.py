"""PrivacyLedger: the host-side record of the DpEvents that ran, one per round."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dp_accounting
from dp_accounting import dp_event

from fedjax_priv.checks import check_int, check_probability
from fedjax_priv.privacy.accountant import DEFAULT_PLD_DISCRETIZATION, compute_epsilon
from fedjax_priv.privacy.calibration import steps_within_budget
from fedjax_priv.privacy.events import check_event, event_from_json, event_to_json
from fedjax_priv.privacy.truncation import overflow_term

_STATE_VERSION = 1

class PrivacyLedger:
  """Host-side record of the DpEvents that ran, one `record` per round.

  Consecutive identical per-round events are stored as one run, so `event`
  stays short and accounting cost grows with the number of distinct runs, not
  rounds. Overflow probabilities of truncated Poisson cohorts are summed and
  charged as in `overflow_delta`; a round whose event accounts the
  truncation itself (`TruncatedSubsampledGaussianDpEvent`, PLD only) is
  recorded with overflow probability 0.

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
    self._rounds = 0
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
    check_event("event", event)
    p = check_probability(
        "overflow_probability", overflow_probability, allow_zero=True
    )
    self._epsilon_cache.clear()
    self._rounds += 1
    self._overflow_probability_total += p
    if isinstance(event, dp_event.NoOpDpEvent):
      # A round that released nothing about the unit (e.g. a later round of
      # an epoch whose event was charged at its start): counted, not composed.
      return
    if self._runs and self._runs[-1][0] == event:
      last, count = self._runs[-1]
      self._runs[-1] = (last, count + 1)
    else:
      self._runs.append((event, 1))

  @property
  def rounds(self) -> int:
    """Number of recorded rounds."""
    return self._rounds

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
      extra = overflow_term(epsilon, self._overflow_probability_total)
      self._epsilon_cache[key] = (epsilon, min(1.0, delta + extra))
    return self._epsilon_cache[key]

  def rounds_within_budget(
      self,
      next_round: dp_event.DpEvent | Callable[[int], dp_event.DpEvent],
      target_epsilon: float,
      delta: float,
      max_rounds: int,
      accountant: str = "rdp",
      *,
      first_round: int = 0,
      orders: Sequence[float] | None = None,
      value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
  ) -> int:
    """How many more rounds fit in an (ε, δ) budget.

    The largest k <= max_rounds such that everything recorded so far
    composed with the next k rounds has ε <= target_epsilon at `delta` (see
    `steps_within_budget`). A runner calls it before each round and stops
    at 0. Overflow δ (truncated Poisson cohorts) is charged by `epsilon`,
    not here.

    Args:
      next_round: the DpEvent of every upcoming round, or round index ->
        DpEvent when rounds differ (epochs).
      target_epsilon, delta, accountant, orders,
        value_discretization_interval: as `steps_within_budget`.
      max_rounds: the most rounds asked about, >= 0.
      first_round: the index of the next round (for `next_round` callables).

    Returns:
      k in [0, max_rounds].
    """
    event_at = next_round if callable(next_round) else (
        lambda r: check_event("next_round", next_round))
    spent = self

    def make_event(k: int) -> dp_event.DpEvent:
      ledger = PrivacyLedger()
      ledger._runs = list(spent._runs)  # pylint: disable=protected-access
      for r in range(first_round, first_round + k):
        ledger.record(event_at(r))
      return ledger.event

    return steps_within_budget(
        make_event, target_epsilon, delta, max_rounds, accountant, orders=orders,
        value_discretization_interval=value_discretization_interval)

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable state (plain dicts, lists, strs, ints, floats)."""
    return {
        "version": _STATE_VERSION,
        "runs": [
            {"event": event_to_json(e), "count": count}
            for e, count in self._runs
        ],
        "overflow_probability_total": self._overflow_probability_total,
        "rounds": self._rounds,
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
      ledger._runs.append((event_from_json(run["event"]), count))
    ledger._overflow_probability_total = float(total)
    composed = sum(count for _, count in ledger._runs)
    # Ledgers written before NoOp rounds were counted apart hold no "rounds".
    rounds = state.get("rounds", composed)
    ledger._rounds = check_int("state['rounds']", rounds, composed)
    return ledger
