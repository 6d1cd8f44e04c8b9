"""Tests of fedjax_priv.privacy.accounting.

Published values are asserted to the digits their source prints. Where a
source used an older RDP → (ε, δ) conversion than `dp_accounting` does today,
the test rebuilds the RDP curve of our event and applies that source's
conversion, so the event (what this module builds) is what is being checked.
"""

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize, special

from fedjax_priv.privacy import accounting

# RDP orders of the TF Privacy MNIST tutorials (mnist_dpsgd_tutorial.py).
TF_TUTORIAL_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
# RDP orders of TF Privacy's compute_dp_sgd_privacy_lib.compute_dp_sgd_privacy.
TF_LIB_ORDERS = (
    [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5]
    + list(range(5, 64))
    + [128, 256, 512]
)


def classic_rdp_epsilon(event, delta, orders):
  """ε = min_α RDP(α) + log(1/δ)/(α - 1) (Mironov 2017, Prop. 3).

  The conversion of Abadi et al.'s moments accountant and of TF Privacy's
  rdp_accountant.get_privacy_spent before it adopted the tighter bound.
  """
  acct = rdp_privacy_accountant.RdpAccountant(orders).compose(event)
  orders = np.asarray(orders, dtype=float)
  return float(np.min(acct.rdp + math.log(1 / delta) / (orders - 1)))


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


# ---------------------------------------------------------------------------
# Published values.


def test_abadi_et_al_2016_moments_accountant_example():
  # Abadi et al. 2016, "Deep Learning with Differential Privacy", Sec. 3.1:
  # L = 0.01N, σ = 4, δ = 1e-5, T = 10000 → "ε ≈ 1.26 using the moments
  # accountant". Their accountant evaluates integer moments λ <= 32 (RDP
  # orders λ + 1) with the classic tail bound.
  event = accounting.example_level_event(4.0, 10_000, 0.01)
  assert round(classic_rdp_epsilon(event, 1e-5, range(2, 34)), 2) == 1.26
  # The tighter conversion and denser orders we use can only do better.
  assert accounting.compute_epsilon(event, 1e-5) < 1.26


@pytest.mark.parametrize(
    "noise_multiplier, epochs, published",
    [
        (1.1, 60, 3.01),  # also compute_dp_sgd_privacy's worked example
        (1.3, 15, 1.19),
        (0.7, 45, 7.10),
    ],
)
def test_tf_privacy_tutorial_table(noise_multiplier, epochs, published):
  # tensorflow/privacy tutorials/README.md ("Select Parameters" table and
  # "compute_dp_sgd_privacy.py --N=60000 --batch_size=256
  # --noise_multiplier=1.1 --epochs=60 --delta=1e-5 ... eps = 3.01"),
  # MNIST N = 60000, batch 256, δ = 1e-5, steps = ceil(epochs·N / batch).
  # Printed with the classic conversion of that time.
  steps = math.ceil(epochs * 60_000 / 256)
  event = accounting.example_level_event(noise_multiplier, steps, 256 / 60_000)
  assert round(classic_rdp_epsilon(event, 1e-5, TF_TUTORIAL_ORDERS), 2) == published
  ours = accounting.compute_epsilon(event, 1e-5, orders=TF_TUTORIAL_ORDERS)
  assert ours < published


@pytest.mark.parametrize(
    "n, batch_size, noise_multiplier, epochs, delta, published",
    [
        (60_000, 150, 1.3, 15, 1e-5, 0.7242234026109595),
        (100_000, 100, 1.0, 30, 1e-7, 1.4154988495444842),
    ],
)
def test_tf_privacy_compute_dp_sgd_privacy(
    n, batch_size, noise_multiplier, epochs, delta, published
):
  # tensorflow/privacy compute_dp_sgd_privacy_test.py, test_compute_dp_sgd_
  # privacy (Test0, Test1): dp_accounting RDP with TF_LIB_ORDERS.
  steps = math.ceil(epochs * n / batch_size)
  event = accounting.example_level_event(noise_multiplier, steps, batch_size / n)
  eps = accounting.compute_epsilon(event, delta, orders=TF_LIB_ORDERS)
  assert eps == pytest.approx(published, abs=1e-9)


@pytest.mark.parametrize(
    "sampling_rate, steps, accountant, published",
    [
        (None, 2, "rdp", 10.8602036),
        (None, 2, "pld", 10.1224946),
        (1e-2, 120, "rdp", 3.2392676),
        (1e-2, 120, "pld", 2.4612381),
    ],
)
def test_tf_privacy_example_privacy(sampling_rate, steps, accountant, published):
  # tensorflow/privacy compute_dp_sgd_privacy_test.py,
  # test_compute_dp_sgd_example_privacy, no-microbatching cases: σ = 0.7,
  # 1.2 epochs, δ = 1e-5, dp_accounting default RDP orders / PLD grid 1e-4.
  # Without sampling one step per epoch (ceil(1.2) = 2); with q = 0.01,
  # ceil(1.2 / q) = 120 steps.
  q = 1.0 if sampling_rate is None else sampling_rate
  event = accounting.example_level_event(0.7, steps, q)
  eps = accounting.compute_epsilon(
      event,
      1e-5,
      accountant,
      orders=rdp_privacy_accountant.DEFAULT_RDP_ORDERS,
      value_discretization_interval=1e-4,
  )
  assert eps == pytest.approx(published, abs=5e-8)


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


def test_pld_refuses_sampling_without_replacement():
  event = accounting.user_level_event(1.0, 10, "fixed", 100, 10)
  with pytest.raises(ValueError) as info:
    accounting.compute_epsilon(event, 1e-5, "pld")
  message = str(info.value)
  assert "'pld'" in message
  assert "SampledWithoutReplacementDpEvent" in message
  assert '"rdp"' in message


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
