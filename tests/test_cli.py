"""Tests of the `fedjax-priv` command: config errors, outputs, the reported ε.

Runs are tiny (6 clients, logistic regression, 4 rounds) so the whole file
stays within a few seconds of compilation per run. One test family runs the
installed console script in a subprocess; the others call `cli.main` in
process.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from fedjax_priv import cli
from fedjax_priv.data import federated_digits
from fedjax_priv.privacy import accounting

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.toml"
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"

TINY_TOML = """
[data]
num_clients = 6
partition = "dirichlet"
dirichlet_alpha = 0.5

[model]
name = "logistic_regression"

[client]
learning_rate = 0.5
local_steps = 2
batch_size = 8

[privacy]
unit = "example"
clip_norm = 1.0
noise_multiplier = 1.1
delta = 1e-5

[simulation]
backend = "chunked"
client_chunk_size = 2
rounds = 4
eval_every = 2
cohort_size = 3
"""

SUMMARY_KEYS = ("test_accuracy", "test_loss", "rounds", "wall_time_s", "compile_time_s",
                "backend", "privacy")
PRIVACY_KEYS = ("unit", "accountant", "delta", "epsilon", "noise_multiplier", "sampling",
                "sampling_rate", "dp_event", "delta_total")


def _main(argv, cache_dir):
  """`cli.main` in process, its XLA cache in `cache_dir`; then JAX's cache state is restored.

  `cli.main` turns on JAX's persistent compilation cache for the process;
  afterwards the config is put back and the cache reset, so that tests run
  later in the same pytest process see JAX as they would without this file.
  """
  saved_env = os.environ.get("FEDJAX_PRIV_CACHE")
  saved = {name: getattr(jax.config, name) for name in
           ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  os.environ["FEDJAX_PRIV_CACHE"] = str(cache_dir)
  try:
    return cli.main([str(a) for a in argv])
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
    if saved_env is None:
      os.environ.pop("FEDJAX_PRIV_CACHE", None)
    else:
      os.environ["FEDJAX_PRIV_CACHE"] = saved_env


def _read_outputs(out):
  summary = json.loads((out / "summary.json").read_text())
  lines = (out / "metrics.jsonl").read_text().splitlines()
  return summary, [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  (root / "tiny.toml").write_text(TINY_TOML)
  (root / "xla_cache").mkdir()
  return root


@pytest.fixture(scope="module")
def example_run(workdir):
  """The console script, end to end, in a subprocess: example-level DP-SGD."""
  script = Path(sys.executable).with_name("fedjax-priv")
  assert script.exists(), f"console script not installed at {script}"
  out = workdir / "example_out"
  env = {**os.environ, "FEDJAX_PRIV_CACHE": str(workdir / "xla_cache")}
  proc = subprocess.run(
      [str(script), "run", str(workdir / "tiny.toml"), "--out", str(out), "--no-progress"],
      cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
  return proc, out


@pytest.fixture(scope="module")
def user_run(workdir):
  """In process: user-level DP-FedAvg with Poisson cohorts."""
  out = workdir / "user_out"
  code = _main(["run", workdir / "tiny.toml", "--out", out, "--no-progress",
                "--set", "privacy.unit=user", "--set", "simulation.sampling=poisson"],
               workdir / "xla_cache")
  return code, out


# --------------------------------------------------------------------------
# Config errors: exit 2, message names the key, nothing compiled or written.


class _CompileCounter:

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    if event == BACKEND_COMPILE:
      self.count += 1


@pytest.fixture
def compile_counter():
  counter = _CompileCounter()
  jax.monitoring.register_event_duration_secs_listener(counter)
  try:
    yield counter
  finally:
    jax.monitoring.unregister_event_duration_listener(counter)


def test_compile_counter_sees_compilations(compile_counter):
  # Control: the counter does count a fresh compilation, so a 0 below means something.
  jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)(jnp.arange(13.0)).block_until_ready()
  assert compile_counter.count >= 1


def test_unknown_key_fails_before_compilation(workdir, tmp_path, capsys, compile_counter):
  out = tmp_path / "never_written"
  code = _main(["run", workdir / "tiny.toml", "--out", out, "--set", "privacy.nosie=1"],
               workdir / "xla_cache")
  assert code == 2
  captured = capsys.readouterr()
  assert "privacy.nosie" in captured.err
  assert "config error" in captured.err
  assert captured.out == ""
  assert compile_counter.count == 0
  assert not out.exists()


@pytest.mark.parametrize("override, key", [
    ("simulation.rounds=1.5", "simulation.rounds"),
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
    ("simulation.backend=gpu", "simulation.backend"),
    ("simulation.cohort_size=7", "simulation.cohort_size"),
    ("privacy.delta=1", "privacy.delta"),
])
def test_bad_values_fail_before_compilation(workdir, tmp_path, capsys, compile_counter,
                                            override, key):
  out = tmp_path / "never_written"
  code = _main(["run", workdir / "tiny.toml", "--out", out, "--set", override],
               workdir / "xla_cache")
  assert code == 2
  assert key in capsys.readouterr().err
  assert compile_counter.count == 0
  assert not out.exists()


def test_malformed_set_and_missing_file(workdir, tmp_path, capsys):
  out = tmp_path / "never_written"
  assert _main(["run", workdir / "tiny.toml", "--out", out, "--set", "simulation.rounds"],
               workdir / "xla_cache") == 2
  assert "key=value" in capsys.readouterr().err
  missing = tmp_path / "missing.toml"
  assert _main(["run", missing, "--out", out], workdir / "xla_cache") == 2
  err = capsys.readouterr().err
  assert "not found" in err and str(missing) in err
  assert not out.exists()


def test_config_directory_is_a_config_error(workdir, tmp_path, capsys):
  # A directory given as CONFIG must be reported (exit 2), not crash with a traceback.
  out = tmp_path / "never_written"
  assert _main(["run", tmp_path, "--out", out], workdir / "xla_cache") == 2
  assert str(tmp_path) in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main([])
  assert info.value.code == 2
  with pytest.raises(SystemExit) as info:
    cli.main(["train", "x.toml"])
  assert info.value.code == 2
  assert "invalid choice" in capsys.readouterr().err


# --------------------------------------------------------------------------
# End to end.


def _check_outputs(out, unit, rounds=4, eval_every=2):
  summary, metrics = _read_outputs(out)
  for key in SUMMARY_KEYS:
    assert key in summary, key
  privacy = summary["privacy"]
  for key in PRIVACY_KEYS:
    assert key in privacy, key
  assert summary["rounds"] == rounds
  assert summary["backend"] == "chunked"
  assert 0.0 <= summary["test_accuracy"] <= 1.0
  assert math.isfinite(summary["test_loss"]) and summary["test_loss"] > 0
  assert summary["wall_time_s"] >= 0 and summary["compile_time_s"] > 0
  assert privacy["unit"] == unit
  assert privacy["accountant"] == "rdp"
  assert privacy["delta"] == 1e-5
  assert privacy["noise_multiplier"] == pytest.approx(1.1)
  assert isinstance(privacy["dp_event"], str)
  assert privacy["dp_event"].startswith("ComposedDpEvent")
  assert isinstance(privacy["epsilon"], float)
  assert 0 < privacy["epsilon"] < math.inf
  assert 0 < privacy["sampling_rate"] <= 1
  assert privacy["delta_total"] >= privacy["delta"]

  assert [m["round"] for m in metrics] == list(range(eval_every, rounds + 1, eval_every))
  for m in metrics:
    for key in ("round", "test_accuracy", "epsilon"):
      assert key in m, key
    assert isinstance(m["epsilon"], float) and m["epsilon"] > 0
  epsilons = [m["epsilon"] for m in metrics]
  assert epsilons == sorted(epsilons)
  assert epsilons[0] < epsilons[-1]  # More rounds, more privacy spent.
  assert metrics[-1]["epsilon"] == pytest.approx(privacy["epsilon"], rel=1e-12)
  assert metrics[-1]["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-12)
  assert json.loads((out / "config.json").read_text())["privacy"]["unit"] == unit
  assert (out / "checkpoint.npz").exists()
  return summary, metrics


def test_console_script_end_to_end_example_level(example_run):
  proc, out = example_run
  assert proc.returncode == 0, proc.stderr
  summary, _ = _check_outputs(out, "example")
  assert summary["privacy"]["sampling"] == "poisson"  # DP-SGD batches are Poisson.
  printed = json.loads(proc.stdout[:proc.stdout.index("}") + 1])
  assert printed["test_accuracy"] == pytest.approx(summary["test_accuracy"])
  assert "privacy: (" in proc.stdout and "per example" in proc.stdout
  assert f"wrote {out}/summary.json" in proc.stdout


def test_cli_end_to_end_user_level(user_run, capsys):
  code, out = user_run
  assert code == 0
  summary, _ = _check_outputs(out, "user")
  assert summary["privacy"]["sampling"] == "poisson"
  assert summary["privacy"]["sampling_rate"] == pytest.approx(3 / 6)


# --------------------------------------------------------------------------
# The reported ε is the ε of what ran, recomputed independently.


def test_user_level_epsilon_matches_independent_accounting(user_run):
  _, out = user_run
  summary, metrics = _read_outputs(out)
  rounds, sigma, n, cohort, delta = 4, 1.1, 6, 3, 1e-5
  expected = accounting.compute_epsilon(
      accounting.user_level_event(sigma, rounds, "poisson", n, cohort), delta)
  assert summary["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-6)
  # And after 2 rounds (the first evaluation).
  expected_2 = accounting.compute_epsilon(
      accounting.user_level_event(sigma, 2, "poisson", n, cohort), delta)
  assert metrics[0]["epsilon"] == pytest.approx(expected_2, rel=1e-6)


def test_example_level_epsilon_matches_independent_accounting(example_run):
  proc, out = example_run
  assert proc.returncode == 0, proc.stderr
  summary, _ = _read_outputs(out)
  train, _, _ = federated_digits(6, "dirichlet", 0.5, 0, 0.2)
  q = 8 / int(train.client_sizes.min())
  assert summary["privacy"]["sampling_rate"] == pytest.approx(q, rel=1e-12)
  rounds, local_steps, sigma, delta = 4, 2, 1.1, 1e-5
  expected = accounting.compute_epsilon(
      accounting.example_level_event(sigma, rounds * local_steps, q), delta)
  assert summary["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-6)


def test_target_epsilon_is_met(workdir, tmp_path, monkeypatch):
  # Also: without --out, the run goes to runs/<config name> under the cwd.
  monkeypatch.chdir(tmp_path)
  code = _main(["run", workdir / "tiny.toml", "--no-progress",
                "--set", "privacy.unit=user", "--set", "simulation.sampling=poisson",
                "--set", "privacy.target_epsilon=3"], workdir / "xla_cache")
  assert code == 0
  summary, metrics = _read_outputs(tmp_path / "runs" / "tiny")
  epsilon = summary["privacy"]["epsilon"]
  assert 2.9 <= epsilon <= 3.0
  assert metrics[-1]["epsilon"] == pytest.approx(epsilon, rel=1e-12)
  sigma = summary["privacy"]["noise_multiplier"]
  assert sigma != pytest.approx(1.1)  # Calibrated, not the configured value.
  assert accounting.compute_epsilon(
      accounting.user_level_event(sigma, 4, "poisson", 6, 3), 1e-5) == pytest.approx(epsilon)


def test_resume_with_changed_privacy_exits_2(user_run, workdir, tmp_path, capsys):
  _, out = user_run
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  code = _main(["run", workdir / "tiny.toml", "--out", copy, "--resume", "--no-progress",
                "--set", "privacy.unit=user", "--set", "simulation.sampling=poisson",
                "--set", "privacy.noise_multiplier=2.0"], workdir / "xla_cache")
  assert code == 2
  assert "privacy.noise_multiplier" in capsys.readouterr().err
  # The run's files are untouched.
  assert (copy / "summary.json").read_text() == (out / "summary.json").read_text()
  assert (copy / "config.json").read_text() == (out / "config.json").read_text()


# --------------------------------------------------------------------------
# The demo.


def test_demo_trains(workdir, tmp_path):
  out = tmp_path / "demo"
  code = _main(["run", DEMO, "--out", out, "--no-progress", "--set", "simulation.rounds=10"],
               workdir / "xla_cache")
  assert code == 0
  summary, metrics = _read_outputs(out)
  assert summary["test_accuracy"] > 0.5
  assert summary["privacy"]["unit"] == "example"
  assert math.isfinite(summary["privacy"]["epsilon"])
  assert summary["privacy"]["epsilon"] <= 5.0
  assert [m["round"] for m in metrics] == [10]
