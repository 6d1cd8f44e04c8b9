"""Cyclic Poisson, balls-in-bins and b-min-sep participation: samplers and accounting.

Samplers: deterministic per (seed, round), the participation pattern they
promise (groups, bins, minimum separation), and their sampling statistics.
Accounting: each scheme's epsilon equals the event built here from the
published analysis: amplified BandMF (Choquette-Choo et al. 2023b, Thm. 4;
jax_privacy's `amplified_bandmf_event` when it is importable) for cyclic
Poisson, and the (k, b) bound without amplification for the others.
"""

import math

import dp_accounting
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_priv import (BallsInBins, Cyclic, CyclicPoisson, MinSeparation, RunSettings, assemble,
                         run_experiment)
from fedjax_priv.data import federated_digits
from fedjax_priv.data.sampling import (BallsInBinsSampler, CyclicPoissonSampler,
                                       MinSeparationSampler)
from fedjax_priv.experiment import total_event, user_plan
from fedjax_priv.models import logistic_regression
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy import matrix_factorization as mf
from fedjax_priv.privacy.aggregation import dp_mean
from fedjax_priv.privacy.mf_aggregator import mf_mean, mf_sensitivity

DELTA = 1e-5


def _rounds_of_each_client(sampler, rounds):
  seen = {}
  for r in range(rounds):
    cohort = sampler.sample(r)
    for i in cohort.indices[cohort.mask > 0]:
      seen.setdefault(int(i), []).append(r)
  return seen


# ----------------------------------------------------------------------------- samplers


def test_cyclic_poisson_sampler_samples_each_group_in_its_rounds_at_rate_q():
  n, b, q, rounds = 240, 4, 0.25, 800
  sampler = CyclicPoissonSampler(n, b, q, seed=3)
  again = CyclicPoissonSampler(n, b, q, seed=3)
  assert np.array_equal(sampler.sample(17).indices, again.sample(17).indices)
  seen = _rounds_of_each_client(sampler, rounds)
  groups = {i: {r % b for r in rs} for i, rs in seen.items()}
  assert all(len(g) == 1 for g in groups.values())  # Each client only in its group's rounds.
  # Every client is eligible rounds / b = 200 times; inclusion ~ Binomial(200, q) per client.
  counts = np.array([len(seen.get(i, [])) for i in range(n)])
  assert abs(counts.mean() - q * rounds / b) < 4 * math.sqrt(q * (1 - q) * rounds / b / n)
  assert stats.kstest(counts, stats.binom(rounds // b, q).cdf).statistic < 0.12
  assert sampler.capacity >= stats.binom.ppf(1 - 1e-12, n // b, q)


def test_cyclic_poisson_sampler_truncates_to_a_uniform_subset():
  sampler = CyclicPoissonSampler(40, 2, 0.5, seed=0, capacity=8)
  cohorts = [sampler.sample(r) for r in range(400)]
  assert all(c.mask.sum() == min(8, c.mask.sum() + c.overflow) for c in cohorts)
  assert sum(c.overflow for c in cohorts) > 0
  # Truncation keeps every group member equally often.
  seen = _rounds_of_each_client(sampler, 400)
  counts = np.array([len(seen.get(i, [])) for i in range(40)])
  assert counts.min() > 0.6 * counts.mean()


def test_balls_in_bins_puts_every_client_in_one_bin_every_b_rounds():
  n, b = 203, 7
  sampler = BallsInBinsSampler(n, b, seed=5)
  seen = _rounds_of_each_client(sampler, 3 * b)
  assert sorted(seen) == list(range(n))  # Everyone takes part...
  assert all(rs == [rs[0], rs[0] + b, rs[0] + 2 * b] for rs in seen.values())  # ...every b rounds.
  sizes = [int(sampler.sample(r).mask.sum()) for r in range(b)]
  assert sum(sizes) == n and sampler.capacity == max(sizes)
  assert len(set(sizes)) > 1  # Bin sizes vary (Binomial(N, 1/b)).
  assert all(sampler.sample(r).overflow == 0 for r in range(b))
  assert not np.array_equal(BallsInBinsSampler(n, b, seed=6).sample(0).indices,
                            sampler.sample(0).indices)


def test_min_separation_sampler_keeps_participations_b_apart_and_replays_exactly():
  n, b, p, rounds = 300, 5, 0.3, 400
  sampler = MinSeparationSampler(n, b, p, seed=1)
  cohorts = [sampler.sample(r) for r in range(rounds)]
  seen = _rounds_of_each_client(MinSeparationSampler(n, b, p, seed=1), rounds)
  assert min(np.diff(rs).min() for rs in seen.values() if len(rs) > 1) >= b
  # Warm start: the expected cohort N / (b - 1 + 1/p) from round 0 on.
  expected = n / (b - 1 + 1 / p)
  sizes = np.array([c.mask.sum() + c.overflow for c in cohorts])
  assert abs(sizes[:50].mean() - expected) < 0.1 * expected
  assert abs(sizes.mean() - expected) < 0.05 * expected
  # Any round, asked out of order, is the round a sequential run drew.
  for r in (250, 3, 399, 0):
    assert np.array_equal(sampler.sample(r).indices, cohorts[r].indices)
  fresh = MinSeparationSampler(n, b, p, seed=1)
  assert np.array_equal(fresh.sample(123).indices, cohorts[123].indices)


def test_samplers_refuse_bad_arguments_naming_them():
  with pytest.raises(ValueError, match="num_groups"):
    CyclicPoissonSampler(10, 11, 0.5, 0)
  with pytest.raises(ValueError, match="sampling_rate"):
    CyclicPoissonSampler(10, 2, 1.5, 0)
  with pytest.raises(ValueError, match="num_bins"):
    BallsInBinsSampler(10, 0, 0)
  with pytest.raises(ValueError, match="min_separation"):
    MinSeparationSampler(10, 0, 0.5, 0)
  with pytest.raises(ValueError, match="expected_cohort_size"):
    CyclicPoisson(100, 4, 30.0)


# ----------------------------------------------------------------------------- accounting


# PLD: the same events as RDP here, and much faster for Poisson-sampled Gaussians.
def _epsilon(plan, rounds):
  return accounting.compute_epsilon(total_event(plan, rounds), DELTA, "pld")


def _reference(event, count):
  return accounting.compute_epsilon(dp_accounting.SelfComposedDpEvent(event, count), DELTA, "pld")


def test_cyclic_poisson_charges_a_poisson_sampled_gaussian_per_cycle():
  participation = CyclicPoisson(1000, 4, 25.0)  # groups of 250, q = 0.1
  plan = user_plan(dp_mean(1.0, 1.2, 25.0), participation)
  for rounds in (1, 5, 40):
    reference = _reference(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.2)), math.ceil(rounds / 4))
    assert _epsilon(plan, rounds) == pytest.approx(reference, rel=1e-9)
  overflow = participation.sampler(0).overflow_probability_per_round
  assert plan.overflow_probability_per_round == overflow > 0


def _banded(bands, rounds, b, sigma=1.0):
  strategy = mf.banded_square_root(bands)
  k = math.ceil(rounds / b)
  return mf_mean(strategy, 1.0, sigma, 10.0, rounds, k, b), strategy, k


def test_cyclic_poisson_with_banded_mf_is_amplified_bandmf():
  rounds, b, q = 48, 6, 0.2
  aggregator, strategy, k = _banded(6, rounds, b)
  participation = CyclicPoisson(600, b, 100 * q)
  plan = user_plan(aggregator, participation)
  # sigma_1: the noise over one participation's sensitivity, the largest column norm.
  column = np.linalg.norm(mf.strategy_matrix(strategy, rounds), axis=0).max()
  sigma_1 = 1.0 * mf_sensitivity(strategy, rounds, k, b).value / column
  assert aggregator.privacy.banded == (6, pytest.approx(sigma_1, rel=1e-12))
  reference = _reference(dp_accounting.PoissonSampledDpEvent(
      q, dp_accounting.GaussianDpEvent(sigma_1)), math.ceil(rounds / b))
  assert _epsilon(plan, rounds) == pytest.approx(reference, rel=1e-9)
  # The same mechanism on Cyclic (no sampling) is charged the whole-run Gaussian: larger.
  cyclic = user_plan(aggregator, Cyclic(600, 100))
  assert _epsilon(cyclic, rounds) == pytest.approx(
      accounting.compute_epsilon(dp_accounting.GaussianDpEvent(1.0), DELTA, "pld"), rel=1e-9)
  assert _epsilon(plan, rounds) < _epsilon(cyclic, rounds)


def test_amplified_bandmf_matches_jax_privacy():
  jp_accounting = pytest.importorskip("jax_privacy.experimental.accounting")
  rounds, b, q = 48, 6, 0.2
  aggregator, _, _ = _banded(6, rounds, b)
  sigma_1 = aggregator.privacy.banded[1]
  theirs = jp_accounting.amplified_bandmf_event(sigma_1, rounds, num_bands=b, sampling_prob=q)
  plan = user_plan(aggregator, CyclicPoisson(600, b, 100 * q))
  assert _epsilon(plan, rounds) == pytest.approx(
      accounting.compute_epsilon(theirs, DELTA, "pld"), rel=1e-6)


def test_cyclic_poisson_falls_back_to_the_unamplified_bound_where_the_theorem_does_not_apply():
  rounds, b = 48, 6
  # More bands than groups: participations could share a band.
  too_wide, _, _ = _banded(8, rounds, b)
  assert too_wide.privacy.banded[0] == 8
  # BLT: C is not banded at all.
  blt = mf_mean(mf.BufferedToeplitz([0.9, 0.5], [0.3, 0.2]), 1.0, 1.0, 10.0, rounds,
                math.ceil(rounds / b), b)
  assert blt.privacy.banded is None
  whole_run = accounting.compute_epsilon(dp_accounting.GaussianDpEvent(1.0), DELTA, "pld")
  for aggregator in (too_wide, blt):
    plan = user_plan(aggregator, CyclicPoisson(600, b, 20.0))
    assert _epsilon(plan, rounds) == pytest.approx(whole_run, rel=1e-9)
    assert plan.overflow_probability_per_round == 0.0  # Truncation is the same on both sides.


@pytest.mark.parametrize("participation", [BallsInBins(500, 10), MinSeparation(500, 10, 0.2)],
                         ids=["balls_in_bins", "min_separation"])
def test_separated_schemes_charge_the_mechanism_once_per_window_of_b_rounds(participation):
  plan = user_plan(dp_mean(1.0, 2.0, 50.0), participation)
  for rounds in (1, 10, 11, 35):
    reference = _reference(dp_accounting.GaussianDpEvent(2.0), math.ceil(rounds / 10))
    assert _epsilon(plan, rounds) == pytest.approx(reference, rel=1e-9)
  assert plan.overflow_probability_per_round == 0.0
  # A matrix-factorization mechanism built for (k, b) = (4, 10) runs; one built for b = 12 not.
  fits = mf_mean(mf.banded_square_root(10), 1.0, 1.0, 50.0, 40, 4, 10)
  assert _epsilon(user_plan(fits, participation), 40) == pytest.approx(
      accounting.compute_epsilon(dp_accounting.GaussianDpEvent(1.0), DELTA, "pld"), rel=1e-9)
  too_sparse = mf_mean(mf.banded_square_root(10), 1.0, 1.0, 50.0, 40, 4, 12)
  with pytest.raises(ValueError, match="b=12 apart.*gives k=4 participations b=10 apart"):
    user_plan(too_sparse, participation)


def test_largest_column_and_bands_are_the_strategy_matrixs():
  rng = np.random.default_rng(0)
  for bands, rounds in ((3, 10), (10, 6), (1, 5)):
    strategy = mf.BandedToeplitz(np.abs(rng.normal(size=bands)) + 0.1)
    aggregator = mf_mean(strategy, 1.0, 1.0, 5.0, rounds, 1, 1)
    matrix = mf.strategy_matrix(strategy, rounds)
    rows, cols = np.nonzero(matrix)
    assert aggregator.privacy.banded[0] == int(np.max(rows - cols)) + 1
    # k = 1: the sensitivity is the largest column norm, so sigma_1 = sigma.
    assert aggregator.privacy.banded[1] == pytest.approx(1.0, rel=1e-9)


def test_a_cyclic_poisson_run_reports_amplified_bandmf(tmp_path):
  n, b, rounds = 12, 3, 6
  train, x_test, y_test = federated_digits(num_clients=n, partition="iid", seed=0)
  model = logistic_regression(train.feature_shape, 10)
  strategy = mf.banded_square_root(b)
  aggregator = mf_mean(strategy, 0.5, 1.5, 2.0, rounds, rounds // b, b)
  exp = assemble(model, train, (x_test, y_test), aggregator, CyclicPoisson(n, b, 2.0),
                 RunSettings(rounds=rounds, eval_every=rounds, delta=DELTA, accountant="pld"),
                 client_optimizer=optax.sgd(0.1), local_steps=2, batch_size=8)
  privacy = run_experiment(exp, tmp_path, progress=False)["privacy"]
  reference = _reference(dp_accounting.PoissonSampledDpEvent(
      0.5, dp_accounting.GaussianDpEvent(aggregator.privacy.banded[1])), rounds // b)
  assert privacy["epsilon"] == pytest.approx(reference, rel=1e-9)
  assert privacy["sampling"] == "cyclic_poisson"
