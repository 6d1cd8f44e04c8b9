"""Progress: blocks are cut so the display moves, plain lines carry no carriage returns."""

import io

import pytest

from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv import progress, runner

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

TINY = ["model.name=logistic_regression", "client.local_steps=2", "data.num_clients=6",
        "simulation.cohort_size=3", "simulation.rounds=8", "simulation.eval_every=4",
        "privacy.unit=user", "privacy.noise_multiplier=1.0", "simulation.log_to=[]"]


def test_pacer_cuts_slow_blocks_only_after_timing_one():
  pacer, done = progress.BlockPacer(seconds=10.0), [0]
  ends = []
  for end in pacer.ends([4, 8, 12], lambda: done[0]):
    ends.append(end)
    pacer.observe(end - done[0], 25.0 * (end - done[0]))  # 25 s per round.
    done[0] = end
  assert ends == [4, 5, 6, 7, 8, 9, 10, 11, 12] and pacer.cap == 1
  fast, done = progress.BlockPacer(seconds=10.0), [0]
  ends = []
  for end in fast.ends([4, 8], lambda: done[0]):
    ends.append(end)
    fast.observe(end - done[0], 0.5)
    done[0] = end
  assert ends == [4, 8] and fast.cap is None


def test_cut_blocks_give_the_same_run(tmp_path, monkeypatch):
  config = config_lib.load(None, TINY)
  whole = runner.run(config, tmp_path / "whole", progress=False)
  calls = []
  original = runner._Trainer.run

  def counting(self, state, keys, cohorts):
    calls.append(len(cohorts))
    return original(self, state, keys, cohorts)

  monkeypatch.setattr(runner._Trainer, "run", counting)
  monkeypatch.setattr(runner, "BLOCK_SECONDS", 1e-9)
  cut = runner.run(config, tmp_path / "cut", progress=False)
  assert calls == [4, 1, 1, 1, 1]  # Timed once, then one round per device call.
  assert cut["test_accuracy"] == pytest.approx(whole["test_accuracy"], abs=1e-6)
  assert cut["test_loss"] == pytest.approx(whole["test_loss"], rel=1e-5)
  assert cut["privacy"]["epsilon"] == whole["privacy"]["epsilon"]
  logs = [ckpt.MetricsLog(tmp_path / d / "metrics.jsonl").read() for d in ("whole", "cut")]
  assert [r["round"] for r in logs[1]] == [r["round"] for r in logs[0]] == [4, 8]
  # A metrics line averages every round since the last evaluation, cut or not.
  for got, want in zip(*logs[::-1]):
    assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-5)
    assert got["clients"] == want["clients"]


def test_plain_lines_one_per_evaluation_without_carriage_returns():
  stream = io.StringIO()
  display = progress.Progress(total=8, bar=None, stream=stream)  # Not a terminal: lines.
  assert display.bar is None
  display.advance(4)
  display.evaluation({"round": 4, "test_accuracy": 0.5, "test_loss": 1.25, "epsilon": 2.0,
                      "delta_total": 1e-5, "wall_time_s": 3.0, "eval_time_s": 0.5})
  display.close()
  text = stream.getvalue()
  assert "\r" not in text
  assert text == ("round 4/8  test_acc 0.5000  test_loss 1.2500  eps 2 (delta 1e-05)  "
                  "train 3.0 s  eval 0.5 s\n")
