"""Tests of fedjax_priv.privacy.accounting: events, accountants, ledger, budget.

Agreement with published values lives in test_published_accounting.py.
"""

import json
import math
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, special

from fedjax_priv.privacy import accounting
from fedjax_priv.privacy import ledger as ledger_lib

def analytic_gaussian_epsilon(sigma, delta):
  """Exact ε of the Gaussian mechanism, sensitivity 1, noise std σ.

  Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential
  Privacy", Thm. 8: δ(ε) = Φ(1/2σ - εσ) - e^ε Φ(-1/2σ - εσ).
  """

  def delta_of(eps):
    return special.ndtr(0.5 / sigma - eps * sigma) - math.exp(
        eps
    ) * special.ndtr(-0.5 / sigma - eps * sigma)

  return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("sigma, rounds", [(10.0, 50), (3.0, 4), (1.0, 1)])
def test_full_participation_matches_analytic_gaussian(sigma, rounds):
  # T-fold composition of a Gaussian with multiplier σ is one Gaussian with
  # multiplier σ/√T; its exact ε is known in closed form.
  exact = analytic_gaussian_epsilon(sigma / math.sqrt(rounds), 1e-5)
  event = accounting.user_level_event(sigma, rounds, "full", 100, 100)
  pld = accounting.compute_epsilon(event, 1e-5, "pld")
  rdp = accounting.compute_epsilon(event, 1e-5, "rdp")
  # PLD discretises pessimistically: an upper bound, tight to the grid.
  assert exact - 1e-6 <= pld <= exact + 1e-2
  assert rdp >= exact - 1e-6


# ---------------------------------------------------------------------------
# Events.


def test_user_level_event_structure():
  sigma = 1.3
  assert accounting.user_level_event(sigma, 7, "poisson", 1000, 50) == (
      dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(
              0.05, dp_accounting.GaussianDpEvent(sigma)
          ),
          7,
      )
  )
  assert accounting.user_level_event(sigma, 7, "fixed", 1000, 50) == (
      dp_accounting.SelfComposedDpEvent(
          dp_accounting.SampledWithoutReplacementDpEvent(
              1000, 50, dp_accounting.GaussianDpEvent(sigma / 2)
          ),
          7,
      )
  )
  assert accounting.user_level_event(sigma, 7, "full", 1000, 1000) == (
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), 7)
  )
  for sampling, m in [("poisson", 50), ("fixed", 50), ("full", 1000)]:
    assert accounting.user_level_event(sigma, 0, sampling, 1000, m) == (
        dp_accounting.NoOpDpEvent()
    )


def test_example_level_event_structure():
  assert accounting.example_level_event(2.0, 3, 0.1) == (
      dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(
              0.1, dp_accounting.GaussianDpEvent(2.0)
          ),
          3,
      )
  )
  assert accounting.example_level_event(2.0, 3, 1.0) == (
      dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(2.0), 3)
  )
  assert accounting.example_level_event(2.0, 0, 0.1) == (
      dp_accounting.NoOpDpEvent()
  )
  assert accounting.compute_epsilon(dp_accounting.NoOpDpEvent(), 1e-5) == 0.0


def test_fixed_is_replace_one_with_sensitivity_2c():
  sigma, rounds, n, m = 1.5, 200, 1000, 20
  eps = accounting.compute_epsilon(
      accounting.user_level_event(sigma, rounds, "fixed", n, m), 1e-5
  )
  # The same as dp_accounting's replace-one accountant fed σ/2 directly.
  direct = (
      rdp_privacy_accountant.RdpAccountant(
          list(accounting.DEFAULT_RDP_ORDERS),
          dp_accounting.NeighboringRelation.REPLACE_ONE,
      )
      .compose(
          dp_accounting.SelfComposedDpEvent(
              dp_accounting.SampledWithoutReplacementDpEvent(
                  n, m, dp_accounting.GaussianDpEvent(sigma / 2)
              ),
              rounds,
          )
      )
      .get_epsilon(1e-5)
  )
  assert eps == direct
  # Larger than Poisson add/remove at the same q and σ.
  poisson = accounting.compute_epsilon(
      accounting.user_level_event(sigma, rounds, "poisson", n, m), 1e-5
  )
  assert eps > poisson
  # With the whole population in every cohort, replacing one user is a
  # Gaussian of sensitivity 2C: exactly full participation at σ/2.
  everyone = accounting.compute_epsilon(
      accounting.user_level_event(sigma, rounds, "fixed", n, n), 1e-5
  )
  halved = accounting.compute_epsilon(
      accounting.user_level_event(sigma / 2, rounds, "full", n, n), 1e-5
  )
  assert everyone == pytest.approx(halved, rel=1e-12)


_NOOP = dp_accounting.NoOpDpEvent()


@pytest.mark.parametrize(
    "function, args, kwargs, argument",
    [
        ("user_level_event", (-1.0, 1, "poisson", 10, 1), {}, "noise_multiplier"),
        ("user_level_event", (math.nan, 1, "poisson", 10, 1), {}, "noise_multiplier"),
        ("user_level_event", (1.0, -1, "poisson", 10, 1), {}, "rounds"),
        ("user_level_event", (1.0, 1.5, "poisson", 10, 1), {}, "rounds"),
        ("user_level_event", (1.0, 1, "uniform", 10, 1), {}, "sampling"),
        ("user_level_event", (1.0, 1, "poisson", 0, 1), {}, "num_clients"),
        ("user_level_event", (1.0, 1, "poisson", 10, 11), {}, "cohort_size"),
        ("user_level_event", (1.0, 1, "poisson", 10, 0), {}, "cohort_size"),
        ("user_level_event", (1.0, 1, "fixed", 10, 2.5), {}, "cohort_size"),
        ("user_level_event", (1.0, 1, "full", 10, 5), {}, "cohort_size"),
        ("example_level_event", (1.0, 1, 0.0), {}, "sampling_rate"),
        ("example_level_event", (1.0, 1, 1.5), {}, "sampling_rate"),
        ("compute_epsilon", (_NOOP, 0.0), {}, "delta"),
        ("compute_epsilon", (_NOOP, 1e-5, "gdp"), {}, "accountant"),
        ("compute_epsilon", (_NOOP, 1e-5), {"orders": [0.5]}, "orders"),
        (
            "compute_epsilon",
            (_NOOP, 1e-5, "pld"),
            {"value_discretization_interval": 0.0},
            "value_discretization_interval",
        ),
        ("compute_delta", (_NOOP, -1.0), {}, "epsilon"),
        ("overflow_delta", (-1.0, 10, 0.1), {}, "epsilon"),
        ("overflow_delta", (1.0, -1, 0.1), {}, "rounds"),
        ("overflow_delta", (1.0, 10, 1.5), {}, "overflow_probability_per_round"),
    ],
)
def test_bad_arguments_are_named(function, args, kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    getattr(accounting, function)(*args, **kwargs)


# ---------------------------------------------------------------------------
# Accounting properties.


def _poisson(sigma, rounds):
  return accounting.user_level_event(sigma, rounds, "poisson", 10_000, 100)


def test_epsilon_decreases_with_sigma_and_increases_with_rounds():
  def eps(sigma, rounds):
    return accounting.compute_epsilon(_poisson(sigma, rounds), 1e-5)

  assert eps(0.7, 500) > eps(1.0, 500) > eps(2.0, 500)
  assert eps(1.0, 10) < eps(1.0, 100) < eps(1.0, 1000)


@pytest.mark.parametrize("sigma", [0.8, 1.5])
def test_pld_not_above_rdp(sigma):
  event = _poisson(sigma, 300)
  rdp = accounting.compute_epsilon(event, 1e-6, "rdp")
  pld = accounting.compute_epsilon(event, 1e-6, "pld")
  assert pld <= rdp + 1e-3


def test_compute_delta_inverts_compute_epsilon():
  event = _poisson(1.0, 300)
  for accountant in ("rdp", "pld"):
    eps = accounting.compute_epsilon(event, 1e-6, accountant)
    assert accounting.compute_delta(event, eps, accountant) <= 1e-6 * (1 + 1e-3)
    assert accounting.compute_delta(event, 0.9 * eps, accountant) > 1e-6


def test_pld_refuses_sampling_without_replacement_of_a_non_gaussian():
  # A Gaussian inside gets its tight pair (test_fixed_size_accounting.py); a Laplace does not.
  event = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.LaplaceDpEvent(1.0))
  with pytest.raises(ValueError) as info:
    accounting.compute_epsilon(event, 1e-5, "pld")
  message = str(info.value)
  assert "'pld'" in message
  assert "SampledWithoutReplacementDpEvent" in message


def test_mixed_neighbouring_relations_are_refused():
  mixed = dp_accounting.ComposedDpEvent([
      accounting.user_level_event(1.0, 10, "fixed", 100, 10),
      accounting.user_level_event(1.0, 10, "poisson", 100, 10),
  ])
  with pytest.raises(ValueError, match="replace-one"):
    accounting.compute_epsilon(mixed, 1e-5)


def test_rdp_convergence_warnings_are_silenced(caplog):
  # q = 0.3, σ = 1 makes dp_accounting's fractional-order series give up
  # for a few orders (they are then dropped, which is safe).
  event = dp_accounting.PoissonSampledDpEvent(
      0.3, dp_accounting.GaussianDpEvent(1.0)
  )
  with caplog.at_level("WARNING", logger="absl"):
    eps = accounting.compute_epsilon(event, 1e-5)
  assert math.isfinite(eps)
  assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]


# ---------------------------------------------------------------------------
# Overflow of truncated Poisson cohorts.


def test_overflow_delta_formula():
  assert accounting.overflow_delta(2.0, 100, 1e-9) == pytest.approx(
      (1 + math.exp(2.0)) * 100 * 1e-9, rel=1e-12
  )
  assert accounting.overflow_delta(2.0, 100, 0.0) == 0.0
  assert accounting.overflow_delta(math.inf, 100, 1e-9) == 1.0
  event = _poisson(1.0, 100)
  eps, delta_total = accounting.epsilon_with_overflow(event, 1e-6, 100, 1e-10)
  assert eps == accounting.compute_epsilon(event, 1e-6)
  assert delta_total == pytest.approx(1e-6 + (1 + math.exp(eps)) * 100 * 1e-10)


# ---------------------------------------------------------------------------
# Calibration.


@pytest.mark.parametrize(
    "make_event, accountant",
    [
        (lambda s: _poisson(s, 1000), "rdp"),
        (lambda s: _poisson(s, 1000), "pld"),
        (lambda s: accounting.user_level_event(s, 100, "fixed", 1000, 20), "rdp"),
        (lambda s: accounting.user_level_event(s, 3, "full", 10, 10), "rdp"),
    ],
)
def test_calibrate_meets_target_and_is_nearly_smallest(make_event, accountant):
  target, delta = 2.0, 1e-5
  sigma = accounting.calibrate_noise_multiplier(make_event, target, delta, accountant)
  assert accounting.compute_epsilon(make_event(sigma), delta, accountant) <= target
  smaller = sigma * (1 - 1e-2)
  assert accounting.compute_epsilon(make_event(smaller), delta, accountant) > target


def test_calibrate_errors():
  make_event = lambda s: accounting.user_level_event(s, 1, "full", 10, 10)
  with pytest.raises(ValueError, match="target_epsilon"):
    accounting.calibrate_noise_multiplier(make_event, 0.0, 1e-5)
  # One Gaussian release with ε = 1e-4 at δ = 1e-10 needs σ ≈ 6e4 > 1e4.
  with pytest.raises(ValueError, match="not reached"):
    accounting.calibrate_noise_multiplier(make_event, 1e-4, 1e-10)


# ---------------------------------------------------------------------------
# Ledger.


def test_ledger_composition_equals_one_self_composed_event():
  per_round = accounting.user_level_event(1.1, 1, "poisson", 10_000, 100)
  ledger = accounting.PrivacyLedger()
  for _ in range(250):
    ledger.record(per_round)
  assert ledger.rounds == 250
  assert ledger.event == dp_accounting.ComposedDpEvent(
      [dp_accounting.SelfComposedDpEvent(per_round, 250)]
  )
  whole = accounting.user_level_event(1.1, 250, "poisson", 10_000, 100)
  for accountant in ("rdp", "pld"):
    eps, delta_total = ledger.epsilon(1e-6, accountant)
    assert eps == pytest.approx(
        accounting.compute_epsilon(whole, 1e-6, accountant), rel=1e-12
    )
    assert delta_total == 1e-6


def test_ledger_groups_runs_and_charges_overflow():
  a = accounting.user_level_event(1.0, 1, "poisson", 1000, 10)
  b = accounting.user_level_event(2.0, 1, "poisson", 1000, 10)
  ledger = accounting.PrivacyLedger()
  for event, p in [(a, 1e-9), (a, 1e-9), (b, 0.0), (a, 3e-9)]:
    ledger.record(event, overflow_probability=p)
  assert ledger.rounds == 4
  assert ledger.event == dp_accounting.ComposedDpEvent(
      [dp_accounting.SelfComposedDpEvent(a, 2), b, a]
  )
  eps, delta_total = ledger.epsilon(1e-6)
  assert delta_total == pytest.approx(1e-6 + (1 + math.exp(eps)) * 5e-9)
  with pytest.raises(ValueError, match="overflow_probability"):
    ledger.record(a, overflow_probability=2.0)
  with pytest.raises(TypeError, match="event"):
    ledger.record("round 5")


def test_ledger_state_dict_round_trips_through_json():
  every_type = dp_accounting.ComposedDpEvent([
      dp_accounting.NoOpDpEvent(),
      accounting.user_level_event(0.9, 3, "fixed", 500, 25),
      dp_accounting.PoissonSampledDpEvent(
          0.25, dp_accounting.GaussianDpEvent(np.float64(3.0))
      ),
  ])
  ledger = accounting.PrivacyLedger()
  ledger.record(every_type, 1e-12)
  for _ in range(5):
    ledger.record(accounting.user_level_event(0.9, 1, "fixed", 500, 25), 2e-12)
  state = ledger.state_dict()
  restored = accounting.PrivacyLedger.from_state_dict(
      json.loads(json.dumps(state))
  )
  assert restored.state_dict() == state
  assert restored.event == ledger.event
  assert restored.rounds == ledger.rounds == 6
  assert restored.overflow_probability_total == ledger.overflow_probability_total

  fixed_only = accounting.PrivacyLedger()
  for _ in range(3):
    fixed_only.record(accounting.user_level_event(0.9, 1, "fixed", 500, 25), 1e-12)
  again = accounting.PrivacyLedger.from_state_dict(
      json.loads(json.dumps(fixed_only.state_dict()))
  )
  assert again.epsilon(1e-5) == fixed_only.epsilon(1e-5)


def test_ledger_serialisation_rejects_unknown_events():
  ledger = accounting.PrivacyLedger()
  ledger.record(dp_accounting.LaplaceDpEvent(1.0))
  with pytest.raises(ValueError, match="LaplaceDpEvent"):
    ledger.state_dict()
  state = {
      "version": 1,
      "runs": [{"event": {"type": "LaplaceDpEvent"}, "count": 1}],
      "overflow_probability_total": 0.0,
  }
  with pytest.raises(ValueError, match="LaplaceDpEvent"):
    accounting.PrivacyLedger.from_state_dict(state)
  with pytest.raises(ValueError, match="version"):
    accounting.PrivacyLedger.from_state_dict({**state, "version": 2})
  empty = accounting.PrivacyLedger()
  assert empty.rounds == 0
  assert empty.epsilon(1e-5) == (0.0, 1e-5)


# ---------------------------------------------------------------------------
# Heterogeneous rounds, sampling options, tree aggregation, budgets.


# A short grid of orders keeps these many-call tests fast; ε is still an
# upper bound, only less tight.
FEW_ORDERS = (1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def _direct_epsilon(events, relation, accountant, delta):
  """ε from dp_accounting itself, composing the rounds one at a time."""
  if accountant == "rdp":
    acct = rdp_privacy_accountant.RdpAccountant(list(FEW_ORDERS), relation)
  else:
    acct = pld_privacy_accountant.PLDAccountant(
        relation, value_discretization_interval=accounting.DEFAULT_PLD_DISCRETIZATION)
  for event in events:
    acct.compose(event)
  return acct.get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_ledger_composes_rounds_with_changing_sigma_and_cohort(accountant):
  # Poisson rounds whose σ and expected cohort change mid-run (e.g. a
  # schedule), recorded one per round.
  schedule = [(1.2, 50)] * 6 + [(0.9, 100)] * 4 + [(2.0, 20)] * 3 + [(1.2, 50)] * 2
  rounds = [accounting.user_level_event(s, 1, "poisson", 5000, m) for s, m in schedule]
  ledger = accounting.PrivacyLedger()
  for event in rounds:
    ledger.record(event)
  assert ledger.rounds == len(schedule)
  eps, _ = ledger.epsilon(1e-6, accountant, orders=FEW_ORDERS)
  direct = _direct_epsilon(rounds, dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                           accountant, 1e-6)
  # PLD discretises runs and single rounds on slightly different grids.
  assert eps == pytest.approx(direct, rel=1e-9 if accountant == "rdp" else 1e-6)
  # The heterogeneous run sits between its cheapest and dearest uniform runs.
  cheapest = accounting.compute_epsilon(
      accounting.user_level_event(2.0, 15, "poisson", 5000, 20), 1e-6, accountant,
      orders=FEW_ORDERS)
  dearest = accounting.compute_epsilon(
      accounting.user_level_event(0.9, 15, "poisson", 5000, 100), 1e-6, accountant,
      orders=FEW_ORDERS)
  assert cheapest < eps < dearest


def test_ledger_composes_fixed_cohorts_of_changing_size():
  schedule = [(1.0, 20)] * 5 + [(1.5, 40)] * 4 + [(0.8, 10)] * 3
  rounds = [accounting.user_level_event(s, 1, "fixed", 1000, m) for s, m in schedule]
  ledger = accounting.PrivacyLedger()
  for event in rounds:
    ledger.record(event)
  eps, _ = ledger.epsilon(1e-5, orders=FEW_ORDERS)
  direct = _direct_epsilon(rounds, dp_accounting.NeighboringRelation.REPLACE_ONE, "rdp", 1e-5)
  assert eps == pytest.approx(direct, rel=1e-9)


def test_fixed_as_poisson_is_opt_in_and_warns():
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # The default path must stay silent.
    exact = accounting.user_level_event(1.0, 10, "fixed", 1000, 50)
  with pytest.warns(UserWarning, match="approximation.*Poisson|Poisson.*approximation"):
    approx = accounting.user_level_event(1.0, 10, "fixed", 1000, 50, fixed_as_poisson=True)
  assert approx == accounting.user_level_event(1.0, 10, "poisson", 1000, 50)
  assert exact != approx
  with pytest.raises(ValueError, match="fixed_as_poisson"):
    accounting.user_level_event(1.0, 10, "poisson", 1000, 50, fixed_as_poisson=True)


def test_tree_aggregation_event_structure_and_rdp():
  tree = dp_accounting.SingleEpochTreeAggregationDpEvent
  assert accounting.tree_aggregation_event(2.0, 30, 10) == (
      dp_accounting.SelfComposedDpEvent(tree(2.0, 10), 3))
  assert accounting.tree_aggregation_event(2.0, 25, 10) == dp_accounting.ComposedDpEvent(
      [dp_accounting.SelfComposedDpEvent(tree(2.0, 10), 2), tree(2.0, 5)])
  assert accounting.tree_aggregation_event(2.0, 7, 10) == tree(2.0, 7)
  assert accounting.tree_aggregation_event(2.0, 0, 10) == dp_accounting.NoOpDpEvent()
  # E epochs of T = 10 rounds: each epoch is a Gaussian of multiplier
  # σ/√⌈log2(11)⌉ = σ/2, so E epochs are one Gaussian of σ/(2√E).
  sigma, epochs = 6.0, 4
  eps = accounting.compute_epsilon(accounting.tree_aggregation_event(sigma, 40, 10), 1e-5)
  gaussian = accounting.compute_epsilon(
      dp_accounting.GaussianDpEvent(sigma / (2 * math.sqrt(epochs))), 1e-5)
  assert eps == pytest.approx(gaussian, rel=1e-12)
  with pytest.raises(ValueError, match="REPLACE_SPECIAL"):
    accounting.compute_epsilon(dp_accounting.ComposedDpEvent(
        [accounting.tree_aggregation_event(1.0, 5, 5), _poisson(1.0, 3)]), 1e-5)
  with pytest.raises(ValueError, match="'pld'"):
    accounting.compute_epsilon(accounting.tree_aggregation_event(1.0, 5, 5), 1e-5, "pld")
  with pytest.raises(ValueError, match="restart_every"):
    accounting.tree_aggregation_event(1.0, 5, 0)


def test_steps_within_budget_is_the_last_step_under_target():
  def make_event(t):
    return _poisson(1.0, t)

  def eps(t):
    return accounting.compute_epsilon(make_event(t), 1e-5, orders=FEW_ORDERS)

  def fits(target, max_steps):
    return accounting.steps_within_budget(make_event, target, 1e-5, max_steps, orders=FEW_ORDERS)

  last = fits(2.0, 10_000)
  assert 0 < last < 10_000
  assert eps(last) <= 2.0 < eps(last + 1)
  assert fits(2.0, last // 2) == last // 2
  assert fits(1e-3, 100) == 0
  with pytest.raises(ValueError, match="max_steps"):
    fits(2.0, -1)
  with pytest.raises(ValueError, match="target_epsilon"):
    fits(0.0, 10)


def test_ledger_rounds_within_budget_counts_what_was_spent():
  per_round = accounting.user_level_event(1.0, 1, "poisson", 10_000, 100)

  def left(ledger):
    return ledger.rounds_within_budget(per_round, 2.0, 1e-5, 10_000, orders=FEW_ORDERS)

  fresh = left(accounting.PrivacyLedger())
  ledger = accounting.PrivacyLedger()
  for _ in range(100):
    ledger.record(per_round)
  remaining = left(ledger)
  assert remaining == fresh - 100
  for _ in range(remaining):
    ledger.record(per_round)
  assert ledger.epsilon(1e-5, orders=FEW_ORDERS)[0] <= 2.0
  assert left(ledger) == 0


def test_ledger_serialises_tree_events():
  ledger = accounting.PrivacyLedger()
  ledger.record(accounting.tree_aggregation_event(3.0, 25, 10))
  ledger.record(dp_accounting.SingleEpochTreeAggregationDpEvent(3.0, [4, 6]))
  restored = accounting.PrivacyLedger.from_state_dict(json.loads(json.dumps(ledger.state_dict())))
  assert restored.event == ledger.event
  assert restored.epsilon(1e-5) == ledger.epsilon(1e-5)


def test_ledger_epsilon_is_computed_once_per_state(monkeypatch):
  calls = []
  real = ledger_lib.compute_epsilon
  monkeypatch.setattr(ledger_lib, "compute_epsilon",
                      lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs))
  ledger = accounting.PrivacyLedger()
  ledger.record(dp_accounting.GaussianDpEvent(2.0), 1e-9)
  first = ledger.epsilon(1e-5)
  assert ledger.epsilon(1e-5) == first and len(calls) == 1
  ledger.epsilon(1e-6)
  assert len(calls) == 2  # Other arguments: computed.
  ledger.record(dp_accounting.GaussianDpEvent(2.0))
  second = ledger.epsilon(1e-5)
  assert len(calls) == 3 and second[0] > first[0]  # A new round: recomputed, and larger.
