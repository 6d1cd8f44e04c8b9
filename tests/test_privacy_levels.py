"""Privacy levels, budgets and calibration through `experiment` and `runner`.

unit = both runs DP-SGD inside clients and a DP mean at the server in one
jitted round and reports both epsilons; privacy.epsilon_budget stops training
before the round that would exceed it; `calibrate` returns a config that meets
its target; fixed-size cohorts are accounted as Poisson only behind a warned
opt-in. All runs are tiny (logistic regression, 6 clients, <= 8 rounds).
"""

import json
import re
import warnings

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv import config as config_lib
from fedjax_priv import runner
from fedjax_priv.experiment import build, calibrate
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.aggregation import RoundContext

BASE = [
    "model.name=logistic_regression",
    "client.learning_rate=0.5",
    "client.local_steps=2",
    "client.batch_size=8",
    "data.num_clients=6",
    "simulation.cohort_size=3",
    "simulation.rounds=8",
    "simulation.eval_every=4",
    "simulation.backend=vmap",
]
BOTH = BASE + [
    "privacy.unit=both",
    "privacy.clip_norm=0.5",
    "privacy.noise_multiplier=1.1",
    "privacy.example_clip_norm=2.0",
    "privacy.example_noise_multiplier=1.3",
]


def _config(*overrides):
  return config_lib.load(None, list(overrides))


def _epsilon(event, rounds, delta=1e-5):
  return accounting.compute_epsilon(dp_accounting.SelfComposedDpEvent(event, rounds), delta)


@pytest.fixture(scope="module")
def both_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("both")
  return runner.run(_config(*BOTH), out, progress=False), out


def test_both_levels_build_both_mechanisms():
  """unit = both: DP-SGD (example C, sigma) in clients, dp_mean (user C, sigma) at the server."""
  exp = build(_config(*BOTH))
  assert [plan.unit for plan in exp.levels] == ["user", "example"]
  user, example = exp.levels
  assert (user.clip_norm, user.noise_multiplier) == (0.5, 1.1)
  assert (example.clip_norm, example.noise_multiplier) == (2.0, 1.3)
  assert exp.privacy is user
  assert exp.batching.mode == "poisson"  # DP-SGD's Poisson batches inside clients.
  # Example level: a client with no examples still releases DP-SGD noise,
  # lr * sigma * C / b per coordinate and step.
  params = exp.model.init(jax.random.key(0))
  steps, capacity = exp.batching.num_steps, exp.batching.batch_size
  x = jnp.zeros((steps, capacity, *exp.train.feature_shape))
  y = jnp.zeros((steps, capacity), jnp.int32)
  delta, _ = jax.jit(exp.client_update)(params, x, y, jnp.zeros((steps, capacity)),
                                        jax.random.key(1))
  flat = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(delta)])
  expected = 0.5 * 1.3 * 2.0 / 8 * np.sqrt(steps)
  np.testing.assert_allclose(flat.std(), expected, rtol=0.1)
  # User level: the aggregator adds sigma * C / m after the mean.
  mask = jnp.ones(3)
  ctx = RoundContext(jax.random.key(0), jax.random.key(1), mask, mask)
  _, _, stats = exp.aggregator.finalize((), {"w": jnp.zeros(3)}, 1.0, ctx)
  assert float(stats["noise_stddev"]) == pytest.approx(1.1 * 0.5 / 3)


def test_both_levels_reported_with_their_own_accounting(both_run):
  """summary.privacy.levels holds each level's epsilon, equal to a direct computation."""
  summary, out = both_run
  exp = build(_config(*BOTH))
  levels = summary["privacy"]["levels"]
  assert set(levels) == {"user", "example"}
  for plan in exp.levels:
    assert levels[plan.unit]["epsilon"] == pytest.approx(_epsilon(plan.round_event, 8), rel=1e-9)
    assert levels[plan.unit]["noise_multiplier"] == plan.noise_multiplier
  assert summary["privacy"]["unit"] == "both"
  assert summary["privacy"]["epsilon"] == levels["user"]["epsilon"]
  assert levels["example"]["neighbouring_relation"].startswith("add/remove one example")
  assert levels["user"]["neighbouring_relation"].startswith("replace one user")
  last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
  assert last["epsilon"] == pytest.approx(levels["user"]["epsilon"])
  assert last["example_epsilon"] == pytest.approx(levels["example"]["epsilon"])


def test_budget_stops_before_the_round_that_would_exceed_it(tmp_path):
  """epsilon_budget between eps(3 rounds) and eps(4 rounds): exactly 3 rounds run."""
  config = _config(*BASE, "privacy.unit=user", "privacy.noise_multiplier=1.0")
  event = build(config).privacy.round_event
  budget = 0.5 * (_epsilon(event, 3) + _epsilon(event, 4))
  summary = runner.run(_config(*BASE, "privacy.unit=user", "privacy.noise_multiplier=1.0",
                               f"privacy.epsilon_budget={budget}"), tmp_path, progress=False)
  assert summary["rounds"] == 3 and summary["rounds_planned"] == 8
  assert summary["privacy"]["stopped_by_budget"] is True
  assert summary["privacy"]["epsilon"] == pytest.approx(_epsilon(event, 3), rel=1e-9)
  assert summary["privacy"]["epsilon"] <= budget
  metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["round"] == 3


def test_budget_that_the_first_round_exceeds_refuses_to_start(tmp_path):
  config = _config(*BASE, "privacy.unit=user", "privacy.noise_multiplier=0.5",
                   "privacy.epsilon_budget=0.01")
  with pytest.raises(ValueError, match="epsilon_budget"):
    runner.run(config, tmp_path, progress=False)
  assert not (tmp_path / "checkpoint.npz").exists()


def test_budget_checks_every_level():
  """Under unit = both the budget binds on whichever level spends faster."""
  config = _config(*BOTH)
  exp = build(config)
  spent = {plan.unit: _epsilon(plan.round_event, 5) for plan in exp.levels}
  budget = max(spent.values()) * 0.999
  limited = build(_config(*BOTH, f"privacy.epsilon_budget={budget}"))
  ledgers = {plan.unit: accounting.PrivacyLedger() for plan in limited.levels}
  assert runner.rounds_within_budget(limited, ledgers, 0) == 4
  for plan in limited.levels:  # Two rounds already spent: two more fit.
    ledgers[plan.unit].record(plan.round_event)
    ledgers[plan.unit].record(plan.round_event)
  assert runner.rounds_within_budget(limited, ledgers, 2) == 4


def test_calibrate_returns_a_config_that_meets_the_target():
  """calibrate() fills in sigma for every targeted level and clears the targets."""
  targets = [o for o in BOTH if "noise_multiplier" not in o]
  config = _config(*targets, "privacy.target_epsilon=4.0", "privacy.example_target_epsilon=6.0")
  calibrated = calibrate(config)
  assert calibrated.privacy.target_epsilon == 0.0
  assert calibrated.privacy.example_target_epsilon == 0.0
  exp = build(calibrated)
  user, example = exp.levels
  assert user.noise_multiplier == calibrated.privacy.noise_multiplier
  eps_user, eps_example = _epsilon(user.round_event, 8), _epsilon(example.round_event, 8)
  assert 4.0 * 0.99 < eps_user <= 4.0
  assert 6.0 * 0.99 < eps_example <= 6.0
  # The rest of the config is untouched.
  assert calibrated.simulation == config.simulation and calibrated.model == config.model


def test_fixed_as_poisson_is_an_explicit_warned_opt_in():
  """Fixed cohorts are accounted without replacement unless the user opts in, with a warning."""
  base = (*BASE, "privacy.unit=user", "privacy.noise_multiplier=1.0")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    exact = build(_config(*base))
  with pytest.warns(UserWarning, match="(?i)poisson"):
    approx = build(_config(*base, "privacy.fixed_as_poisson=true"))
  assert "approximation" in approx.privacy.neighbouring
  assert exact.privacy.round_event != approx.privacy.round_event
  assert "PoissonSampledDpEvent" in repr(approx.privacy.round_event)
  assert "PoissonSampledDpEvent" not in repr(exact.privacy.round_event)


@pytest.mark.parametrize("overrides,key", [
    (["privacy.unit=none", "privacy.epsilon_budget=3"], "privacy.epsilon_budget"),
    (["privacy.unit=user", "privacy.example_target_epsilon=3"], "privacy.example_target_epsilon"),
    (["privacy.unit=example", "privacy.fixed_as_poisson=true"], "privacy.fixed_as_poisson"),
    (["privacy.unit=both", "privacy.example_clip_norm=0"], "privacy.example_clip_norm"),
    (["privacy.unit=both", "privacy.epsilon_budget=-1"], "privacy.epsilon_budget"),
])
def test_bad_privacy_settings_name_the_key(overrides, key):
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    _config(*BASE, *overrides)


def test_cli_calibrate_prints_the_noise_multipliers(tmp_path, capsys):
  """`fedjax-priv calibrate` prints --set lines equal to calibrate()'s values."""
  from fedjax_priv import cli
  config = tmp_path / "c.toml"
  config.write_text('[privacy]\nunit = "both"\ntarget_epsilon = 4.0\n'
                    'example_target_epsilon = 6.0\n')
  overrides = [item for text in BASE for item in ("--set", text)]
  assert cli.main(["calibrate", str(config), *overrides]) == 0
  lines = capsys.readouterr().out.splitlines()
  calibrated = calibrate(config_lib.load(config, BASE))
  expected = calibrated.privacy
  assert lines[-2:] == [f"--set privacy.noise_multiplier={expected.noise_multiplier:.6g}",
                        "--set privacy.example_noise_multiplier="
                        f"{expected.example_noise_multiplier:.6g}"]
  # Each level: its sigma with the epsilon it reaches and what that is stated at.
  levels = build(calibrated).levels
  rounds = config_lib.load(config, BASE).simulation.rounds
  for line, plan, target in zip(lines[:2], levels, (4.0, 6.0)):
    epsilon = float(re.search(r"gives epsilon (\S+) ", line).group(1))
    assert line.startswith(f"{plan.unit} level: noise_multiplier {plan.noise_multiplier:.6g}")
    assert target * 0.99 < epsilon <= target * 1.0001
    for text in ("at delta 1e-05", "delta_total ", f"rate {plan.sampling_rate:.4g}",
                 f"{rounds} rounds", "rdp accountant"):
      assert text in line, (text, line)


@pytest.mark.parametrize("extra", [[], ["privacy.unit=user"],
                                   ["privacy.unit=user", "privacy.noise_multiplier=2"]])
def test_cli_calibrate_without_a_target_exits_2(capsys, extra):
  from fedjax_priv import cli
  overrides = [item for text in BASE + extra for item in ("--set", text)]
  assert cli.main(["calibrate", "/dev/null", *overrides]) == 2
  assert "calibrate needs a target: set privacy.target_epsilon" in capsys.readouterr().err
