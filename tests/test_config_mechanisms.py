"""The config's user-level noise (privacy.noise) and participation (simulation.sampling).

Each sampling value builds its participation object; each noise value builds
the aggregator the open API would build by hand with the same parameters, and
the run is accounted as that aggregator's own event wrapped by the
participation (compared with the ledger's epsilon and with the reference
event); combinations no participation can account are refused at config time,
naming both keys.
"""

import json
import math
import re
from pathlib import Path

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv import (BallsInBins, Cyclic, CyclicPoisson, FixedSize, Full, MinSeparation, Poisson,
                         RunSettings, ShuffledEpochs, assemble)
from fedjax_priv import config as config_lib
from fedjax_priv import runner
from fedjax_priv.config import ConfigError
from fedjax_priv.experiment import PARTICIPATIONS, build, participation_of, user_plan
from fedjax_priv.privacy import accounting, dp_mean, mf_mean
from fedjax_priv.privacy import matrix_factorization as mf
from fedjax_priv.privacy.aggregation import RoundContext
from fedjax_priv.privacy.dp_ftrl import dp_ftrl_aggregator
from fedjax_priv.privacy.ledger import PrivacyLedger
from fedjax_priv.sweep import _epsilon_curve

# The strategy optimisers compile once; the hand-built copies hit the cache.
pytestmark = pytest.mark.usefixtures("module_compilation_cache")

N, K, ROUNDS, SIGMA, CLIP, DELTA = 12, 4, 6, 0.8, 0.5, 1e-5
B = N // K                       # Cyclic: 3 rounds between a user's participations
PARTS = math.ceil(ROUNDS / B)    # k = 2 participations in 6 rounds
TINY = ["model.name=logistic_regression", "client.local_steps=1", "client.batch_size=4",
        f"data.num_clients={N}", f"simulation.cohort_size={K}", f"simulation.rounds={ROUNDS}",
        f"simulation.eval_every={ROUNDS}", "simulation.backend=vmap", 'simulation.log_to=["csv"]',
        "privacy.unit=user", f"privacy.noise_multiplier={SIGMA}", f"privacy.clip_norm={CLIP}"]


def _config(*overrides):
  return config_lib.load(None, TINY + list(overrides))


def _epsilon(plan, accountant="rdp"):
  ledger = PrivacyLedger()
  plan.charge(ledger, 0, ROUNDS)
  return ledger.epsilon(DELTA, accountant)[0]


# --------------------------------------------------------------------------
# simulation.sampling -> participation.


@pytest.mark.parametrize("sampling, cohort, expected", [
    ("cyclic", K, Cyclic(N, K)),
    ("shuffled_epochs", K, ShuffledEpochs(N, K)),
    ("poisson", K, Poisson(N, float(K))),
    ("fixed", K, FixedSize(N, K)),
    ("fixed", N, Full(N)),
    ("cyclic_poisson", K, CyclicPoisson(N, B, float(K))),
    ("balls_in_bins", K, BallsInBins(N, B)),
    ("min_separation", K, MinSeparation(N, B, 1.0)),
    # b = 2 of N = 12 with K = 4 expected: p = 1 / (12 / 4 - 2 + 1).
    ("min_separation --b 2", K, MinSeparation(N, 2, 0.5)),
    ("cyclic_poisson --b 2", K, CyclicPoisson(N, 2, float(K))),
])
def test_each_sampling_builds_its_participation(sampling, cohort, expected):
  sampling, _, b = sampling.partition(" --b ")
  overrides = [f"simulation.min_separation={b}"] if b else []
  config = _config(f"simulation.sampling={sampling}", f"simulation.cohort_size={cohort}",
                   *overrides)
  participation = participation_of(config, N)
  assert participation == expected
  assert participation.expected_cohort_size == pytest.approx(
      N / B if sampling == "balls_in_bins" else cohort, rel=1e-12)


def test_banded_mf_with_cyclic_poisson_is_accounted_as_amplified_bandmf():
  # b = 2 groups of 6, q = 4 / 6; mf_bands defaults to b, so the theorem applies.
  exp = build(_config("privacy.noise=banded_mf", "simulation.sampling=cyclic_poisson",
                      "simulation.min_separation=2"))
  sigma_1 = exp.aggregator.privacy.banded[1]
  assert exp.aggregator.privacy.banded[0] == 2 and math.isfinite(sigma_1)
  reference = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      K / 6, dp_accounting.GaussianDpEvent(sigma_1)), math.ceil(ROUNDS / 2))
  assert _epsilon(exp.privacy) == pytest.approx(accounting.compute_epsilon(reference, DELTA),
                                                rel=1e-9)


@pytest.mark.parametrize("overrides, message", [
    (["simulation.sampling=fixed", "simulation.min_separation=2"],
     "simulation.min_separation applies to simulation.sampling"),
    (["simulation.sampling=cyclic_poisson", "simulation.min_separation=4"],
     r"simulation.min_separation \(4\) x simulation.cohort_size \(4\) must be <= "
     r"data.num_clients \(12\)"),
    (["simulation.sampling=balls_in_bins", f"simulation.min_separation={N + 1}"],
     "simulation.min_separation = 13 must be in"),
])
def test_bad_min_separation_is_refused_naming_it(overrides, message):
  with pytest.raises(ConfigError, match=message):
    _config(*overrides)


def test_every_sampling_choice_has_a_participation():
  assert set(PARTICIPATIONS) == set(config_lib.CHOICES["simulation.sampling"])


@pytest.mark.parametrize("sampling", ["cyclic", "shuffled_epochs"])
def test_cohort_larger_than_the_population_is_refused(sampling):
  with pytest.raises(ConfigError, match="simulation.cohort_size.*data.num_clients"):
    _config(f"simulation.sampling={sampling}", f"simulation.cohort_size={N + 1}")


@pytest.mark.parametrize("sampling", ["cyclic", "shuffled_epochs"])
def test_pld_accounts_cyclic_and_shuffled_cohorts(sampling):
  """No sampling is claimed: dp_mean's Gaussian(sigma) is charged once per cycle / epoch of
  b rounds, k = 2 times in 6 rounds, which the PLD accountant composes to a finite epsilon."""
  exp = build(_config(f"simulation.sampling={sampling}", "privacy.accountant=pld"))
  reference = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(SIGMA), PARTS)
  epsilon = _epsilon(exp.privacy, "pld")
  assert math.isfinite(epsilon)
  assert epsilon == pytest.approx(accounting.compute_epsilon(reference, DELTA, "pld"), rel=1e-9)


# --------------------------------------------------------------------------
# privacy.noise -> the aggregator the open API would build.


def _by_hand(noise, sampling):
  """(aggregator, participation, reference event of the run) as the open API builds them."""
  if sampling == "shuffled_epochs":
    # DP-FTRL with one tree per epoch of b rounds, charged once per epoch.
    return (dp_ftrl_aggregator(CLIP, SIGMA, K, restart_every=B), ShuffledEpochs(N, K),
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.SingleEpochTreeAggregationDpEvent(SIGMA, B), PARTS))
  participation = Cyclic(N, K)
  if noise == "independent":
    return (dp_mean(CLIP, SIGMA, K), participation,
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(SIGMA), PARTS))
  strategy = {"banded_mf": lambda: mf.optimize_banded_toeplitz(
                  mf.Workload(ROUNDS), bands=B, max_participations=PARTS, min_separation=B),
              "blt": lambda: mf.optimize_blt(mf.Workload(ROUNDS), 4, max_participations=PARTS,
                                             min_separation=B),
              "tree": lambda: mf.binary_tree_strategy(ROUNDS)}[noise]()
  # The whole run is one Gaussian mechanism of multiplier sigma.
  return (mf_mean(strategy, CLIP, SIGMA, K, ROUNDS, PARTS, B), participation,
          dp_accounting.GaussianDpEvent(SIGMA))


@pytest.mark.parametrize("noise, sampling", [
    ("independent", "cyclic"), ("banded_mf", "cyclic"), ("blt", "cyclic"), ("tree", "cyclic"),
    ("tree", "shuffled_epochs")])
def test_noise_builds_the_open_api_mechanism(noise, sampling):
  exp = build(_config(f"privacy.noise={noise}", f"simulation.sampling={sampling}"))
  aggregator, participation, reference = _by_hand(noise, sampling)
  hand = assemble(exp.model, exp.train, (exp.x_test, exp.y_test), aggregator, participation,
                  RunSettings(rounds=ROUNDS))
  assert exp.participation == participation
  # The same mechanism (its strategy's sensitivity, k, b, rounds are in the description), and
  # the one that trains is the one accounted.
  assert exp.privacy.description.endswith(hand.privacy.description)
  assert exp.aggregator.privacy.description == exp.privacy.description
  assert exp.privacy.neighbouring == hand.privacy.neighbouring
  epsilon = _epsilon(exp.privacy)
  assert epsilon == pytest.approx(_epsilon(hand.privacy), rel=1e-9)
  assert epsilon == pytest.approx(accounting.compute_epsilon(reference, DELTA), rel=1e-9)


def test_banded_mf_records_the_bands_it_ran():
  """mf_bands = 0 runs b bands; config.json (the resolved config) says how many."""
  exp = build(_config("privacy.noise=banded_mf", "simulation.sampling=cyclic"))
  assert exp.config.privacy.mf_bands == B
  assert exp.privacy.description.startswith(f"banded_mf ({B} bands): mf_mean(BandedToeplitz")
  assert exp.settings.description["privacy"]["mf_bands"] == B


def test_target_epsilon_calibrates_the_whole_run_gaussian():
  """BandMF's run is GaussianDpEvent(sigma), whichever strategy: the calibrated sigma is that
  of one Gaussian mechanism at the target."""
  untargeted = [o for o in TINY if not o.startswith("privacy.noise_multiplier")]
  exp = build(config_lib.load(None, untargeted + [
      "privacy.noise=banded_mf", "simulation.sampling=cyclic", "privacy.target_epsilon=3"]))
  expected = accounting.calibrate_noise_multiplier(dp_accounting.GaussianDpEvent, 3.0, DELTA)
  assert exp.privacy.noise_multiplier == pytest.approx(expected, rel=1e-9)
  assert exp.config.privacy.noise_multiplier == exp.privacy.noise_multiplier
  assert _epsilon(exp.privacy) <= 3.0


# --------------------------------------------------------------------------
# Refused combinations: one line naming the keys and what to use.


SEPARATED = "cyclic or cyclic_poisson or balls_in_bins or min_separation"


@pytest.mark.parametrize("noise, sampling, use", [
    ("banded_mf", "poisson", SEPARATED), ("banded_mf", "fixed", SEPARATED),
    ("blt", "shuffled_epochs", SEPARATED), ("blt", "poisson", SEPARATED),
    ("tree", "fixed", SEPARATED + " or shuffled_epochs"),
    ("tree", "poisson", SEPARATED + " or shuffled_epochs")])
def test_unaccountable_noise_and_sampling_are_refused(noise, sampling, use):
  with pytest.raises(ConfigError) as error:
    _config(f"privacy.noise={noise}", f"simulation.sampling={sampling}")
  message = str(error.value)
  assert "\n" not in message
  assert f"privacy.noise = {noise}" in message and f"simulation.sampling = {sampling}" in message
  assert message.endswith(f"use simulation.sampling = {use}")


@pytest.mark.parametrize("overrides, keys", [
    (["privacy.noise=tree", "simulation.sampling=shuffled_epochs", "privacy.accountant=pld"],
     ("privacy.noise", "simulation.sampling", "privacy.accountant = rdp")),
    (["privacy.noise=banded_mf", "simulation.sampling=cyclic", "privacy.unit=example"],
     ("privacy.noise", "privacy.unit")),
    (["privacy.noise=blt", "simulation.sampling=cyclic", "privacy.unit=none",
      "privacy.noise_multiplier=1"], ("privacy.noise", "privacy.unit")),
    ([f"privacy.mf_bands={ROUNDS + 1}"], ("privacy.mf_bands", "simulation.rounds")),
    (["privacy.mf_bands=-1"], ("privacy.mf_bands",)),
    (["privacy.blt_buffers=0"], ("privacy.blt_buffers",)),
    (["privacy.noise=gaussian"], ("privacy.noise",)),
    (["privacy.noise=tree", "simulation.sampling=cyclic", "simulation.rounds=300000"],
     ("simulation.rounds", "tree strategy")),
])
def test_bad_noise_settings_name_their_keys(overrides, keys):
  with pytest.raises(ConfigError) as error:
    _config(*overrides)
  for key in keys:
    assert key in str(error.value)


# --------------------------------------------------------------------------
# Sweeps: traced hyper-parameters, each run's own accounting.


@pytest.mark.parametrize("make", [
    lambda clip, sigma: mf_mean(mf.banded_square_root(2), clip, sigma, K, ROUNDS, PARTS, B),
    lambda clip, sigma: dp_ftrl_aggregator(clip, sigma, K, restart_every=B)],
    ids=["mf_mean", "dp_ftrl"])
def test_correlated_noise_takes_traced_hyperparameters(make):
  """A sweep vmaps the aggregator over sigma and C: with one key, the noise scales with both."""
  sigmas, clips = jnp.asarray([0.5, 2.0]), jnp.asarray([1.0, 0.25])

  def first_update(sigma, clip):
    aggregator = make(clip, sigma)
    zeros = jnp.zeros(8)
    ctx = RoundContext(jax.random.key(3), jax.random.key(4), jnp.ones(K), jnp.ones(K))
    update, _, stats = aggregator.finalize(aggregator.init(zeros), zeros, jnp.float32(K), ctx)
    return update, stats["noise_stddev"]

  updates, stddevs = jax.jit(jax.vmap(first_update))(sigmas, clips)
  # sigma * C is 0.5 and 0.5: the same noise; the concrete build states the same std.
  np.testing.assert_allclose(updates[0], updates[1], rtol=1e-6)
  assert np.all(np.abs(updates[0]) > 0)
  _, concrete = first_update(0.5, 1.0)
  np.testing.assert_allclose(stddevs, float(concrete), rtol=1e-6)


def test_sweep_accounting_tells_plans_with_the_same_first_event_apart():
  """Independent noise under Cyclic charges Gaussian(sigma) every cycle, a matrix
  factorization once per run: the same round-0 event, different epsilons."""
  participation = Cyclic(N, K)
  independent = user_plan(dp_mean(CLIP, SIGMA, K), participation)
  correlated = user_plan(mf_mean(mf.BandedToeplitz(np.ones(1)), CLIP, SIGMA, K, ROUNDS, PARTS,
                                 B), participation)
  assert independent.round_event == correlated.round_event
  settings, known = RunSettings(rounds=ROUNDS, delta=DELTA), {}
  first = _epsilon_curve(independent, settings, [ROUNDS], known)[-1][0]
  second = _epsilon_curve(correlated, settings, [ROUNDS], known)[-1][0]
  assert first == pytest.approx(_epsilon(independent), rel=1e-12)
  assert second == pytest.approx(_epsilon(correlated), rel=1e-12)
  assert second < first


# --------------------------------------------------------------------------
# End to end.


def test_banded_mf_with_cyclic_runs_end_to_end(tmp_path):
  config = _config("privacy.noise=banded_mf", "simulation.sampling=cyclic")
  summary = runner.run(config, tmp_path, progress=False)
  privacy = summary["privacy"]
  assert summary["rounds"] == ROUNDS and math.isfinite(summary["test_loss"])
  assert privacy["sampling"] == "cyclic"
  assert privacy["mechanism"].startswith(f"banded_mf ({B} bands): mf_mean(BandedToeplitz")
  assert privacy["epsilon"] == pytest.approx(
      accounting.compute_epsilon(dp_accounting.GaussianDpEvent(SIGMA), DELTA), rel=1e-9)
  recorded = json.loads((tmp_path / "config.json").read_text())["privacy"]
  assert (recorded["noise"], recorded["mf_bands"]) == ("banded_mf", B)


def test_the_docs_toml_example_is_a_valid_config(tmp_path):
  """docs/matrix_factorization.md's TOML block (not executed by the docs tests) validates."""
  page = (Path(__file__).resolve().parents[1] / "docs" / "matrix_factorization.md").read_text()
  (block,) = re.findall(r"```toml\n(.*?)```", page, re.S)
  path = tmp_path / "mf.toml"
  path.write_text(block)
  config = config_lib.load(path)
  assert (config.privacy.noise, config.simulation.sampling) == ("banded_mf", "cyclic")
  assert participation_of(config, config.data.num_clients) == Cyclic(100, 10)
