"""Tests of `fedjax_priv.sweep`: a grid trained as one vmapped program equals separate runs.

Tiny runs: logistic regression, 8 clients, cohorts of 4, 4 rounds.
"""

import dataclasses
import json

import dp_accounting
import numpy as np
import pytest

from fedjax_priv import cli
from fedjax_priv import config as config_lib
from fedjax_priv import experiment, runner, sweep
from fedjax_priv.privacy import accounting

BASE = [
    "model.name=logistic_regression",
    "data.num_clients=8",
    "simulation.cohort_size=4",
    "simulation.rounds=4",
    "simulation.eval_every=4",
    "client.local_steps=2",
    "client.batch_size=8",
    "simulation.backend=vmap",
    "privacy.unit=user",
]


def _config(*overrides):
  return config_lib.load(None, BASE + list(overrides))


@pytest.fixture(scope="module")
def grid_result():
  grid = {"privacy.noise_multiplier": [0.5, 2.0], "simulation.seed": [0, 3],
          "client.learning_rate": [0.1, 0.4]}
  return sweep.sweep(_config(), grid, max_parallel=3), grid


def test_every_run_equals_the_runner_on_its_config(grid_result, tmp_path):
  """Same keys, cohorts and data as `runner.run`: the same accuracy, loss and epsilon."""
  result, grid = grid_result
  assert result.traced == tuple(grid) and result.outer == ()
  assert len(result.rows) == 8
  for i, row in enumerate((result.rows[0], result.rows[-3])):
    overrides = [f"{key}={row[key]}" for key in grid]
    # One directory per run: a run directory holds one run (run_directory).
    summary = runner.run(_config(*overrides), tmp_path / str(i), progress=False)
    assert row["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1.5 / 360)
    assert row["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
    assert row["epsilon"] == pytest.approx(summary["privacy"]["epsilon"], rel=1e-9)


def test_runs_differ_and_keep_their_own_accounting(grid_result):
  """Each row's epsilon is its own sigma's; different hyper-parameters train differently."""
  result, _ = grid_result
  exp_eps = {}
  for sigma in (0.5, 2.0):
    event = accounting.user_level_event(sigma, 1, "fixed", 8, 4)
    ledger = accounting.PrivacyLedger()
    for _ in range(4):
      ledger.record(event)
    exp_eps[sigma] = ledger.epsilon(1e-5)[0]
  for row in result.rows:
    assert row["noise_multiplier"] == row["privacy.noise_multiplier"]
    assert row["epsilon"] == pytest.approx(exp_eps[row["privacy.noise_multiplier"]], rel=1e-9)
  losses = {row["test_loss"] for row in result.rows}
  assert len(losses) == len(result.rows)


def test_grouping_does_not_change_results(grid_result):
  """max_parallel vmaps groups of runs and scans over them in one program; results are unchanged."""
  result, grid = grid_result
  sub = {key: grid[key] for key in ("privacy.noise_multiplier", "simulation.seed")}
  sub["client.learning_rate"] = grid["client.learning_rate"][:1]
  together = sweep.sweep(_config(), sub)
  expected = [row for row in result.rows if row["client.learning_rate"] == 0.1]
  for got, want in zip(together.rows, expected):
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-5)


def test_target_epsilon_is_calibrated_per_run():
  """Sweeping privacy.target_epsilon calibrates sigma on the host for every run."""
  result = sweep.sweep(_config(), {"privacy.target_epsilon": [2.0, 8.0]})
  sigmas = [row["noise_multiplier"] for row in result.rows]
  assert sigmas[0] > sigmas[1]
  for row in result.rows:
    assert 0.99 * row["privacy.target_epsilon"] < row["epsilon"] <= row["privacy.target_epsilon"]


def test_shape_changing_keys_go_to_the_outer_loop():
  result = sweep.sweep(_config(), {"simulation.cohort_size": [2, 4],
                                   "privacy.noise_multiplier": [1.0, 3.0]})
  assert result.outer == ("simulation.cohort_size",)
  assert result.traced == ("privacy.noise_multiplier",)
  assert [(r["simulation.cohort_size"], r["privacy.noise_multiplier"]) for r in result.rows] == [
      (2, 1.0), (2, 3.0), (4, 1.0), (4, 3.0)]
  assert result.rows[0]["epsilon"] != result.rows[2]["epsilon"]  # q differs.


@pytest.mark.parametrize("grid,message", [
    ({"privacy.noise_multiplier": [1.0, -1.0]}, "privacy.noise_multiplier"),
    ({"privacy.nois_multiplier": [1.0]}, "privacy.nois_multiplier"),
    ({"simulation.cohort_size": [4, 99]}, "simulation.cohort_size"),
    ({}, "grid"),
])
def test_bad_grids_fail_before_compiling(grid, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    sweep.sweep(_config(), grid)


def test_streamed_population_is_refused():
  config = dataclasses.replace(_config(), data=dataclasses.replace(_config().data, stream=True))
  with pytest.raises(config_lib.ConfigError, match="data.stream"):
    sweep.sweep(config, {"privacy.noise_multiplier": [1.0]})


def test_parse_grid():
  assert sweep.parse_grid(["privacy.clip_norm=0.5,1", "simulation.backend=vmap,loop"]) == {
      "privacy.clip_norm": [0.5, 1], "simulation.backend": ["vmap", "loop"]}
  for bad in (["privacy.clip_norm"], ["a.b=1", "a.b=2"], ["a.b=1,,2"]):
    with pytest.raises(config_lib.ConfigError):
      sweep.parse_grid(bad)


def test_cli_sweep_writes_csv_json_and_plot(tmp_path, capsys):
  config = tmp_path / "base.toml"
  config.write_text("\n".join([
      "[model]", 'name = "logistic_regression"',
      "[data]", "num_clients = 6",
      "[client]", "local_steps = 1", "batch_size = 8",
      "[privacy]", 'unit = "user"',
      "[simulation]", "cohort_size = 3", "rounds = 2", 'backend = "vmap"']))
  out = tmp_path / "out"
  code = cli.main(["sweep", str(config), "--grid", "privacy.noise_multiplier=0.8,1.6",
                   "--out", str(out)])
  assert code == 0
  printed = capsys.readouterr().out
  assert "traced (one program, vmapped): privacy.noise_multiplier" in printed
  assert "outer loop (one compile each): -" in printed
  report = json.loads((out / "results.json").read_text())
  assert [row["privacy.noise_multiplier"] for row in report["rows"]] == [0.8, 1.6]
  lines = (out / "results.csv").read_text().splitlines()
  assert len(lines) == 3 and "epsilon" in lines[0]
  assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
  header = next(line for line in printed.splitlines() if "epsilon" in line).split()
  assert header[-4:] == ["epsilon", "delta", "delta_total", "test_acc"]
  assert np.isfinite(report["rows"][0]["epsilon"])
  assert cli.main(["sweep", str(config), "--grid", "privacy.bogus=1"]) == 2


def test_example_level_noise_is_traced_too():
  """DP-SGD's sigma and clip norm vmap like the user level's (one compile, own epsilons)."""
  result = sweep.sweep(_config("privacy.unit=example"),
                       {"privacy.noise_multiplier": [0.8, 3.0], "privacy.clip_norm": [0.5, 2.0]})
  assert result.outer == () and len(result.rows) == 4
  eps = {row["privacy.noise_multiplier"]: row["epsilon"] for row in result.rows}
  assert eps[0.8] > eps[3.0]
  assert len({row["test_loss"] for row in result.rows}) == 4


# Issue 14: 100 clients, Poisson cohorts of 20 expected (default capacity 52), sigma = 0.5.
# Under RDP the truncation is charged to delta: after 10 rounds delta_total is ~460 x delta.
POISSON_100 = ["data.num_clients=100", "simulation.cohort_size=20", "simulation.sampling=poisson",
               "simulation.rounds=10", "simulation.eval_every=10", "client.local_steps=1"]


def _no_training(*args, **kwargs):
  raise AssertionError("a refused sweep must not build or compile a program")


def test_poisson_sweep_at_sigma_half_keeps_delta_or_is_refused_saying_why(monkeypatch):
  """PLD accounts the truncated cohorts exactly (delta_total = delta); RDP charges the
  overflow to delta, and a delta_total above 10 x delta is refused before anything compiles,
  naming the run, unless privacy.allow_delta_overflow."""
  grid = {"privacy.noise_multiplier": [0.5]}
  pld = sweep.sweep(_config(*POISSON_100, "privacy.accountant=pld"), grid)
  row = pld.rows[0]
  assert row["delta_total"] == row["delta"] == 1e-5
  assert all(point["delta_total"] == 1e-5 for point in pld.curves[0])
  config = _config(*POISSON_100, "privacy.accountant=pld", "privacy.noise_multiplier=0.5")
  plan = experiment.build(config).privacy
  event = plan.event_at(0)
  assert type(event).__name__ == "TruncatedSubsampledGaussianDpEvent"
  assert row["epsilon"] == pytest.approx(accounting.compute_epsilon(
      dp_accounting.SelfComposedDpEvent(event, 10), 1e-5, "pld"), rel=1e-9)

  monkeypatch.setattr(sweep, "_train", _no_training)
  rdp = _config(*POISSON_100, "privacy.accountant=rdp")
  with pytest.raises(ValueError) as info:
    sweep.sweep(rdp, {"privacy.noise_multiplier": [2.0, 0.5]})
  message = str(info.value)
  for words in ("privacy.noise_multiplier=0.5", "delta_total", "truncated Poisson",
                "privacy.accountant = pld", "allow_delta_overflow"):
    assert words in message
  assert "privacy.noise_multiplier=2.0" not in message and "\n" not in message


def test_open_api_sweep_applies_the_same_delta_rule(monkeypatch):
  from fedjax_priv import Poisson, RunSettings, assemble
  from fedjax_priv.data import federated_digits
  from fedjax_priv.models import logistic_regression
  from fedjax_priv.privacy.aggregation import dp_mean
  train, x_test, y_test = federated_digits(num_clients=100, partition="iid", seed=0)
  model = logistic_regression(train.feature_shape, 10)

  def make(accountant, allow=False):
    return lambda sigma: assemble(
        model, train, (x_test, y_test), dp_mean(1.0, sigma, 20), Poisson(100, 20),
        RunSettings(rounds=10, eval_every=10, accountant=accountant, allow_delta_overflow=allow),
        local_steps=1, batch_size=8)

  monkeypatch.setattr(sweep, "_train", _no_training)
  with pytest.raises(ValueError, match=r"the sweep run sigma=0\.5: the user level's delta_total"):
    sweep.sweep_experiment(make("rdp"), {"sigma": [0.5]})
  # Opted in, or accounted by PLD, the sweep goes on to training (stubbed here).
  for accountant, allow in (("rdp", True), ("pld", False)):
    with pytest.raises(AssertionError, match="must not build"):
      sweep.sweep_experiment(make(accountant, allow), {"sigma": [0.5]})
