"""Truncated Poisson cohorts accounted as such under PLD (issue 14, item 4).

`participation.Poisson` truncates a cohort larger than its static capacity
to a uniformly random subset. Under the PLD accountant a Gaussian sum's round
is `TruncatedSubsampledGaussianDpEvent` (arXiv:2508.15089) and nothing is
charged to delta; everywhere else the Poisson event and the overflow charge
stay. The epsilons here are checked against dp_accounting's own PLD
accountant, built from plain numbers, not from the library's objects.
"""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

from fedjax_priv.data.sampling import PoissonSampler
from fedjax_priv.experiment import user_plan
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy import transforms as T
from fedjax_priv.privacy.aggregation import (ADD_OR_REMOVE, REPLACE_ONE, RoundPrivacy,
                                             dp_mean, gaussian_sum_privacy)
from fedjax_priv.privacy.events import event_from_json, event_to_json
from fedjax_priv.privacy.ledger import PrivacyLedger
from fedjax_priv.privacy.local_dp import gaussian_local_dp
from fedjax_priv.secure import distributed_dp as ddp
from fedjax_priv.simulation.participation import Full, FixedSize, Poisson

N, M, DELTA, CLIP = 100, 20, 1e-5, 1.0


def _default_capacity(num_clients, q, overflow=1e-12):
  """The sampler's default capacity, recomputed here: the smallest c with P[Bin(N + 1, q) > c] <= 1e-12."""
  return next(c for c in range(num_clients + 2)
              if stats.binom.sf(c, num_clients + 1, q) <= overflow)


def _pld_epsilon(event, rounds, delta=DELTA):
  """dp_accounting's PLD accountant on its own, at the library's discretisation."""
  acct = pld_privacy_accountant.PLDAccountant(
      value_discretization_interval=accounting.DEFAULT_PLD_DISCRETIZATION)
  acct.compose(event, rounds)
  return acct.get_epsilon(delta)


@pytest.mark.parametrize("sigma,capacity", [(0.5, None), (1.0, None), (1.0, 25)])
def test_pld_round_is_the_truncated_event_with_dp_accountings_epsilon(sigma, capacity):
  rounds = 50
  participation = Poisson(N, M, capacity)
  plan = user_plan(dp_mean(CLIP, sigma, M), participation, "pld")
  capacity = capacity or _default_capacity(N, M / N)
  expected = dp_accounting.TruncatedSubsampledGaussianDpEvent(
      dataset_size=N + 1, sampling_probability=M / N, truncated_batch_size=capacity,
      noise_multiplier=sigma)
  assert plan.event_at(0) == plan.event_at(rounds - 1) == expected
  assert plan.overflow_probability_per_round == 0.0
  ledger = PrivacyLedger()
  for r in range(rounds):
    ledger.record(plan.event_at(r), plan.overflow_probability_per_round)
  epsilon, delta_total = ledger.epsilon(DELTA, "pld")
  assert epsilon == pytest.approx(_pld_epsilon(expected, rounds), rel=1e-6)
  assert delta_total == DELTA
  assert "TruncatedSubsampledGaussianDpEvent" in repr(ledger.event)


def test_rdp_keeps_the_poisson_event_and_charges_the_overflow():
  participation = Poisson(N, M)
  plan = user_plan(dp_mean(CLIP, 1.0, M), participation, "rdp")
  assert plan.event_at(0) == dp_accounting.PoissonSampledDpEvent(
      M / N, dp_accounting.GaussianDpEvent(1.0))
  assert plan.overflow_probability_per_round == participation.overflow_probability_per_round > 0
  ledger = PrivacyLedger()
  for _ in range(10):
    ledger.record(plan.event_at(0), plan.overflow_probability_per_round)
  epsilon, delta_total = ledger.epsilon(DELTA, "rdp")
  assert delta_total > DELTA
  assert delta_total == pytest.approx(
      DELTA + (1 + math.exp(epsilon)) * 10 * participation.overflow_probability_per_round)
  # The default argument is the plan valid under both accountants.
  assert user_plan(dp_mean(CLIP, 1.0, M), participation).event_at(0) == plan.event_at(0)


def test_the_rdp_accountant_refuses_the_truncated_event_and_says_why():
  event = Poisson(N, M).round_event(dp_mean(CLIP, 1.0, M).privacy, 0, "pld")
  with pytest.raises(ValueError, match='TruncatedSubsampledGaussianDpEvent.*accountant="pld"'):
    accounting.compute_epsilon(event, DELTA, "rdp")


def test_truncation_matters_only_where_cohorts_overflow():
  """With a small capacity epsilon is larger than the untruncated Poisson one; with the
  default (overflow ~1e-12 per round) it is the same up to PLD round-off."""
  rounds, sigma = 50, 1.0
  poisson = _pld_epsilon(dp_accounting.PoissonSampledDpEvent(
      M / N, dp_accounting.GaussianDpEvent(sigma)), rounds)
  default = Poisson(N, M).round_event(gaussian_sum_privacy(sigma, ""), 0, "pld")
  small = Poisson(N, M, capacity=22).round_event(gaussian_sum_privacy(sigma, ""), 0, "pld")
  assert _pld_epsilon(default, rounds) == pytest.approx(poisson, rel=1e-6)
  assert _pld_epsilon(small, rounds) > 1.2 * poisson


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_dataset_size_n_plus_one_bounds_both_add_remove_pairs(sigma):
  """The event is stated for the pair (dataset_size, dataset_size - 1). An N-client run has the
  pairs (N, N - 1) and (N + 1, N); the event's epsilon grows with dataset_size, so N + 1, which
  the participation uses, bounds both."""
  q, capacity, rounds = M / N, 25, 20
  epsilons = [_pld_epsilon(dp_accounting.TruncatedSubsampledGaussianDpEvent(n, q, capacity, sigma),
                           rounds) for n in (N - 1, N, N + 1, N + 2)]
  assert epsilons == sorted(epsilons)
  assert Poisson(N, M, capacity).round_event(
      gaussian_sum_privacy(sigma, ""), 0, "pld").dataset_size == N + 1


def test_the_sampler_truncates_to_a_uniform_subset_as_the_event_assumes():
  """The event's truncation keeps a uniformly random subset of the Poisson sample: every
  client is kept with probability q E[min(1, B / (1 + Binomial(N - 1, q)))]."""
  num_clients, q, capacity, rounds = 8, 0.5, 3, 20_000
  sampler = PoissonSampler(num_clients, q, seed=0, capacity=capacity)
  counts = np.zeros(num_clients)
  for r in range(rounds):
    cohort = sampler.sample(r)
    counts[cohort.indices[cohort.mask > 0]] += 1
  others = np.arange(num_clients)
  kept = q * np.sum(stats.binom.pmf(others, num_clients - 1, q)
                    * np.minimum(1.0, capacity / (1 + others)))
  std = math.sqrt(kept * (1 - kept) / rounds)
  np.testing.assert_array_less(np.abs(counts / rounds - kept), 5 * std)


def _replace_weaker():
  """A Gaussian under add/remove whose replace-one statement is weaker than sigma / 2."""
  events = {ADD_OR_REMOVE: dp_accounting.GaussianDpEvent(1.0),
            REPLACE_ONE: dp_accounting.GaussianDpEvent(0.4)}
  return RoundPrivacy(events.__getitem__, (ADD_OR_REMOVE, REPLACE_ONE))


def _add_remove_only():
  return RoundPrivacy(lambda relation: dp_accounting.GaussianDpEvent(1.0), (ADD_OR_REMOVE,))


# Mechanisms for which the truncated event's assumptions (a Gaussian on a sum of contributions
# clipped to C: multiplier sigma under add/remove, sigma / 2 under replace-one) do not hold or
# are not stated: they keep the Poisson event and the overflow charge, even under PLD.
NOT_A_GAUSSIAN_SUM = {
    "laplace": T.as_aggregator(T.chain(T.clip_l1(CLIP), T.sum_units(), T.laplace(1.0),
                                       T.mean(M))).privacy,
    "two_noise_stages": T.as_aggregator(T.chain(T.clip_l2(CLIP), T.sum_units(), T.gaussian(2.0),
                                                T.gaussian(2.0), T.mean(M))).privacy,
    "replace_one_weaker_than_half": _replace_weaker(),
    "no_replace_one_statement": _add_remove_only(),
    "traced_sigma": gaussian_sum_privacy(math.nan, "traced"),
}


@pytest.mark.parametrize("name", sorted(NOT_A_GAUSSIAN_SUM))
def test_other_mechanisms_keep_the_charged_delta_under_pld(name):
  privacy = NOT_A_GAUSSIAN_SUM[name]
  participation = Poisson(N, M)
  assert participation.truncation_event(privacy, "pld") is None
  event = participation.round_event(privacy, 0, "pld")
  assert isinstance(event, dp_accounting.PoissonSampledDpEvent)
  assert (participation.charged_overflow_probability(privacy, "pld")
          == participation.overflow_probability_per_round > 0)


def test_local_noise_and_zero_out_mechanisms_are_never_truncated_events():
  participation = Poisson(N, M)
  local = T.as_aggregator(gaussian_local_dp(CLIP, 1.0, M)).privacy  # not amplified
  config = ddp.DistributedDPConfig(CLIP, 1.0, N, 10, bits=20)
  distributed = ddp.distributed_discrete_gaussian_mean(config).privacy  # zero-out, RDP curve
  for privacy in (local, distributed):
    assert participation.truncation_event(privacy, "pld") is None
    assert not isinstance(participation.round_event(privacy, 0, "pld"),
                          dp_accounting.TruncatedSubsampledGaussianDpEvent)


def test_only_poisson_cohorts_that_can_truncate_use_the_event():
  privacy = dp_mean(CLIP, 1.0, M).privacy
  # Fixed-size cohorts never truncate; accounted as Poisson they stay an (approximate) Poisson event.
  with pytest.warns(UserWarning):
    as_poisson = FixedSize(N, M, account_as_poisson=True)
  for participation in (Full(N), FixedSize(N, M), as_poisson):
    event = participation.round_event(privacy, 0, "pld")
    assert "Truncated" not in repr(event)
    assert participation.charged_overflow_probability(privacy, "pld") == 0.0
  # A capacity of N + 1 cannot truncate: the Poisson event is exact and nothing is charged.
  roomy = Poisson(N, M, capacity=N + 1)
  assert roomy.round_event(privacy, 0, "pld") == dp_accounting.PoissonSampledDpEvent(
      M / N, dp_accounting.GaussianDpEvent(1.0))
  assert roomy.charged_overflow_probability(privacy, "pld") == 0.0
  # Under RDP, never (it cannot process the event).
  assert Poisson(N, M).truncation_event(privacy, "rdp") is None
  with pytest.raises(ValueError, match="accountant must be one of"):
    Poisson(N, M).round_event(privacy, 0, "moments")


def test_full_participation_with_a_capacity_below_the_population_is_truncated_too():
  """q = 1 with capacity < N + 1 always truncates (dp_accounting's "always truncate" case)."""
  event = Poisson(N, N, capacity=N // 2).round_event(dp_mean(CLIP, 1.0, M).privacy, 0, "pld")
  assert event == dp_accounting.TruncatedSubsampledGaussianDpEvent(N + 1, 1.0, N // 2, 1.0)


def test_the_event_survives_a_checkpointed_ledger():
  event = Poisson(N, M, capacity=25).round_event(dp_mean(CLIP, 0.7, M).privacy, 0, "pld")
  assert event_from_json(event_to_json(event)) == event
  ledger = PrivacyLedger()
  for _ in range(3):
    ledger.record(event)
  restored = PrivacyLedger.from_state_dict(ledger.state_dict())
  assert restored.event == ledger.event
  assert restored.epsilon(DELTA, "pld") == ledger.epsilon(DELTA, "pld")


def test_a_traced_sigma_builds_the_program_and_is_accounted_elsewhere():
  """`sweep_experiment` builds its vmapped program from traced sigmas; that build's event is
  never accounted (each point's host build is), so it must build, not convert the tracer."""
  import jax
  chain = lambda s: T.as_aggregator(T.chain(T.clip_l2(CLIP), T.sum_units(), T.gaussian(s),
                                            T.mean(M)))

  def build(sigma):
    event = Poisson(N, M).round_event(chain(sigma).privacy, 0, "pld")
    assert isinstance(event, dp_accounting.PoissonSampledDpEvent)
    return sigma

  jax.vmap(build)(jax.numpy.array([0.5, 1.0]))
