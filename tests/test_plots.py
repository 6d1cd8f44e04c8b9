"""`fedjax-priv plot` and the curves runs and sweeps keep: the data behind each figure."""


import numpy as np
import pytest

from fedjax_priv import cli
from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv import plots, runner, sweep

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

BASE = ["model.name=logistic_regression", "data.num_clients=6", "simulation.cohort_size=3",
        "simulation.rounds=4", "simulation.eval_every=2", "client.local_steps=2",
        "client.batch_size=8", "simulation.backend=vmap", "privacy.unit=user",
        "simulation.log_to=[]"]
GRID = {"privacy.noise_multiplier": [0.5, 2.0], "simulation.seed": [0, 1]}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("sweep")
  result = sweep.sweep(config_lib.load(None, BASE), GRID)
  sweep.write_results(result, out)
  return out, result


def test_sweep_keeps_every_runs_curve_as_the_runner_logs_it(sweep_dir, tmp_path):
  out, result = sweep_dir
  assert len(result.curves) == 4
  for row, curve in zip(result.rows, result.curves):
    assert [r["round"] for r in curve] == [2, 4]
    assert curve[-1]["test_accuracy"] == row["test_accuracy"]
    assert curve[-1]["epsilon"] == row["epsilon"]
    assert curve[0]["epsilon"] < curve[1]["epsilon"]
  row, curve = result.rows[3], result.curves[3]
  overrides = [f"{key}={row[key]}" for key in GRID]
  runner.run(config_lib.load(None, BASE + overrides), tmp_path, progress=False)
  logged = ckpt.MetricsLog(tmp_path / "metrics.jsonl").read()
  for got, want in zip(curve, logged):
    assert got["round"] == want["round"]
    assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-4)
    assert got["epsilon"] == pytest.approx(want["epsilon"], rel=1e-9)
    assert got["delta_total"] == want["delta_total"]


def test_plot_of_a_sweep_averages_seeds_with_a_band(sweep_dir, tmp_path):
  out, result = sweep_dir
  png = tmp_path / "plot.png"
  series = plots.plot([out], png)
  assert png.read_bytes()[:4] == b"\x89PNG"
  assert sorted(s.label for s in series) == ["noise_multiplier=0.5", "noise_multiplier=2.0"]
  for s in series:
    sigma = float(s.label.split("=")[1])
    members = [c for r, c in zip(result.rows, result.curves)
               if r["privacy.noise_multiplier"] == sigma]
    assert s.seeds == (0, 1) and s.delta == 1e-5
    assert list(s.rounds) == [2, 4]
    for name in plots.METRICS:
      values = np.array([[point[name] for point in c] for c in members])
      np.testing.assert_allclose(s.mean[name], values.mean(axis=0), rtol=1e-12)
      np.testing.assert_allclose(s.low[name], values.min(axis=0), rtol=1e-12)
      np.testing.assert_allclose(s.high[name], values.max(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.epsilon, [point["epsilon"] for point in members[0]])


def test_plot_command_on_run_directories(tmp_path, capsys):
  runs = []
  for seed in (0, 1):
    runs.append(tmp_path / f"seed{seed}")
    runner.run(config_lib.load(None, BASE + [f"simulation.seed={seed}",
                                             "privacy.noise_multiplier=1.0"]), runs[-1],
               progress=False)
    assert (runs[-1] / "curves.png").exists()  # Every run draws its own.
  png = tmp_path / "both.png"
  assert cli.main(["plot", *map(str, runs), "--out", str(png)]) == 0
  assert png.read_bytes()[:4] == b"\x89PNG"
  printed = capsys.readouterr().out
  assert "2 seeds" in printed and "at delta 1e-05" in printed
  series = plots.plot(runs, tmp_path / "again.png")
  assert len(series) == 1 and series[0].seeds == (0, 1)
  logged = [ckpt.MetricsLog(run / "metrics.jsonl").read() for run in runs]
  accuracy = np.mean([[r["test_accuracy"] for r in log] for log in logged], axis=0)
  np.testing.assert_allclose(series[0].mean["test_accuracy"], accuracy, rtol=1e-12)
  assert cli.main(["plot", str(tmp_path / "missing")]) == 2


def test_delta_is_named_and_delta_total_when_it_exceeds_delta(tmp_path):
  def curve(sigma, delta_total):
    return plots.Curve({"privacy.noise_multiplier": sigma}, np.array([1, 2]),
                       np.array([0.5, 0.6]), np.array([1.0, 0.9]), np.array([1.0, 2.0]),
                       1e-5, delta_total)

  assert plots._delta_text(1e-5, 1e-5) == "δ = 1e-05"
  assert plots._delta_text(1e-5, 3e-5) == "δ = 1e-05, spent δ_total = 3e-05"
  assert plots._delta_text(None) == "no privacy"
  series = plots.plot([curve(0.5, 3e-5), curve(1.0, 1e-5)], tmp_path / "p.png")
  assert [s.delta_total for s in series] == [3e-5, 1e-5]
  assert (tmp_path / "p.png").exists()
