"""A run's privacy budget is (ε, δ): how many rounds fit, and whether the plan's δ_total may run.

Every level reports (ε, δ_total) with δ_total = δ + (1 + e^ε)·Σ P[overflow]
(truncated Poisson cohorts and batches, `privacy.truncation.overflow_delta`),
so δ_total grows with ε and with the rounds. (Under the PLD accountant,
truncated Poisson cohorts of a Gaussian sum are accounted by their own
event and charge nothing: δ_total = δ, `participation.Poisson`.) A claim
"(ε, δ)" whose δ_total is far above the requested δ is misleading, so:

- `rounds_within_budget`: under `epsilon_budget` > 0, the run stops before
  the round that would take any level's ε past the budget or its δ_total past
  the requested δ (`settings.delta`, up to `DELTA_SLACK`).
- `check_planned_delta`: before training, each level's δ_total after the
  rounds that will run is compared with δ: above it (up to `DELTA_SLACK`) the
  run warns; above `DELTA_REFUSE_FACTOR`·δ it is refused, unless
  `allow_delta_overflow` (config: `privacy.allow_delta_overflow = true`) says
  the user accepts it. With that opt-in the budget's δ side does not stop the
  run either; every claim still carries δ_total. Sweeps apply the same rule
  to every run of the grid before anything compiles (`check_delta_total`).

Why a slack: any truncated Poisson round adds a positive term, so δ_total > δ
after the first round of every such run (by 1.8e-6 relative for 60 clients,
expected cohort 6, σ = 0.8). Read strictly, the δ side would refuse every
Poisson-sampled budget run; `DELTA_SLACK` lets the truncation term take up to
10% of δ on top of it, and every report shows the δ_total that holds.
"""

from __future__ import annotations

import logging
from typing import Any

from fedjax_priv.privacy.ledger import PrivacyLedger

DELTA_REFUSE_FACTOR = 10.0
# δ_total may exceed the requested δ by this fraction before the budget stops
# a run or a warning is given (see the module docstring).
DELTA_SLACK = 0.1

_log = logging.getLogger(__name__)


def delta_limit(settings: Any) -> float:
  """The largest δ_total a run may claim without a warning or a budget stop."""
  return settings.delta * (1 + DELTA_SLACK)


def _delta_total_after(ledger: PrivacyLedger, plan: Any, first_round: int, rounds: int,
                       settings: Any) -> tuple[float, float]:
  """(ε, δ_total) of `ledger` and `rounds` more rounds of `plan` from `first_round`."""
  trial = PrivacyLedger.from_state_dict(ledger.state_dict())
  plan.charge(trial, first_round, first_round + rounds)
  return trial.epsilon(settings.delta, settings.accountant)


def _charges_delta(ledger: PrivacyLedger, plan: Any) -> bool:
  return plan.overflow_probability_per_round > 0 or ledger.overflow_probability_total > 0


def rounds_within_budget(exp: Any, ledgers: dict[str, PrivacyLedger], rounds_done: int
                         ) -> tuple[int, str | None]:
  """The last round the (ε, δ) budget allows, and which side binds.

  Args:
    exp: the `Experiment` (its settings and privacy levels).
    ledgers: unit -> the ledger of the rounds done so far.
    rounds_done: rounds already trained.

  Returns:
    (last round in [rounds_done, settings.rounds], None | "epsilon" |
    "delta"): "epsilon" when a level's ε would pass `epsilon_budget` in the
    next round, "delta" when a level's δ_total would pass `settings.delta`.
  """
  settings, total = exp.settings, exp.settings.rounds
  if settings.epsilon_budget <= 0 or not exp.levels:
    return total, None
  last, limit = total, None
  for plan in exp.levels:
    ledger = ledgers[plan.unit]
    fits = ledger.rounds_within_budget(
        plan.event_at, settings.epsilon_budget, settings.delta, total - rounds_done,
        settings.accountant, first_round=rounds_done)
    if rounds_done + fits < last:
      last, limit = rounds_done + fits, "epsilon"
    if settings.allow_delta_overflow or not _charges_delta(ledger, plan):
      continue

    def within(k: int) -> bool:
      return _delta_total_after(ledger, plan, rounds_done, k, settings)[1] <= delta_limit(settings)

    # δ_total grows with the rounds: bisect for the most that stay within δ.
    lo, hi = 0, last - rounds_done
    if within(hi):
      continue
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if within(mid) else (lo, mid)
    last, limit = rounds_done + lo, "delta"
  return last, limit


def check_planned_delta(exp: Any, ledgers: dict[str, PrivacyLedger], rounds_done: int,
                        last_round: int) -> None:
  """Warns when a level's planned δ_total exceeds δ; refuses above 10·δ without the opt-in.

  Raises:
    ValueError: δ_total after `last_round` rounds exceeds DELTA_REFUSE_FACTOR
      times `settings.delta` and `settings.allow_delta_overflow` is off.
  """
  settings = exp.settings
  for plan in exp.levels:
    ledger = ledgers[plan.unit]
    if not _charges_delta(ledger, plan):
      continue
    epsilon, delta_total = _delta_total_after(ledger, plan, rounds_done,
                                              last_round - rounds_done, settings)
    check_delta_total(plan, epsilon, delta_total, last_round, settings)


def check_delta_total(plan: Any, epsilon: float, delta_total: float, rounds: int,
                      settings: Any, run: str = "") -> None:
  """The planned-δ rule for one level whose (ε, δ_total) after `rounds` rounds is known.

  Silent up to `delta_limit`; a logged warning above it; a refusal above
  DELTA_REFUSE_FACTOR·δ unless `settings.allow_delta_overflow`.

  Args:
    plan: the level's `PrivacyPlan` (its unit and sampling name the cause).
    epsilon, delta_total: what the level will claim after `rounds` rounds.
    rounds: rounds the run will train.
    settings: the run's `RunSettings` (delta, accountant, allow_delta_overflow).
    run: which run this is, e.g. a sweep's grid values; "" for a single run.

  Raises:
    ValueError: the refusal, one line naming the run, the numbers and why.
  """
  if delta_total <= delta_limit(settings):
    return
  ratio = delta_total / settings.delta
  prefix = f"{run}: " if run else ""
  what = (f"{prefix}the {plan.unit} level's delta_total after {rounds} rounds is "
          f"{delta_total:.3g}, {ratio:.3g} x the requested privacy.delta = {settings.delta:g} "
          f"(epsilon {epsilon:.4g}; truncated Poisson sampling adds (1 + e^epsilon) x "
          "P[overflow] to delta)")
  if ratio > DELTA_REFUSE_FACTOR and not settings.allow_delta_overflow:
    # Only user-level Poisson cohorts have the exact truncated analysis (PLD).
    pld = (", set privacy.accountant = pld (accounts truncated Poisson cohorts with no delta "
           "term)" if plan.unit == "user" and plan.sampling == "poisson"
           and settings.accountant == "rdp" else "")
    raise ValueError(f"refusing to train: {what}; lower the rounds or epsilon{pld}, or set "
                     "privacy.allow_delta_overflow = true to accept this delta")
  _log.warning("WARNING: %s; the run claims (%.4g, %.3g)-DP, not (%.4g, %g)-DP",
               what, epsilon, delta_total, epsilon, settings.delta)
