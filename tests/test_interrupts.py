"""SIGINT / SIGTERM during `fedjax-priv run`: a checkpoint, one resume line, exit 130 / 143.

The run is a subprocess of the real command (the signal handling is the
point), long enough in rounds that the signal lands while it trains; it is
sent once the first evaluation line exists, so training is under way.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedjax_priv import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
[data]
num_clients = 6
[model]
name = "logistic_regression"
[client]
local_steps = 1
batch_size = 8
[privacy]
unit = "user"
noise_multiplier = 1.0
[simulation]
rounds = 100000
cohort_size = 3
eval_every = 1
checkpoint_every = 0
log_to = ["csv"]
"""


def _run_and_signal(tmp_path, signum):
  config = tmp_path / "long.toml"
  config.write_text(CONFIG)
  out = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": str(REPO), "FEDJAX_PRIV_CACHE": str(tmp_path / "xla")}
  proc = subprocess.Popen([sys.executable, "-m", "fedjax_priv.cli", "run", str(config),
                           "--out", str(out), "--no-progress", "--set", "client.learning_rate=0.3"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          cwd=tmp_path)
  metrics = out / "metrics.jsonl"
  deadline = time.monotonic() + 120
  while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
    assert proc.poll() is None, proc.communicate()
    assert time.monotonic() < deadline, "the run never logged an evaluation"
    time.sleep(0.05)
  proc.send_signal(signum)
  stdout, stderr = proc.communicate(timeout=120)
  return proc.returncode, stdout, stderr, out, config


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_names_the_resume_command(tmp_path, signum, status):
  returncode, _, stderr, out, config = _run_and_signal(tmp_path, signum)
  assert returncode == status, stderr
  assert "Traceback" not in stderr
  resume_lines = [line for line in stderr.splitlines() if "resume with:" in line]
  assert len(resume_lines) == 1, stderr
  line = resume_lines[0]
  assert signal.Signals(signum).name in line
  assert (f"fedjax-priv run {config} --out {out} --resume "
          "--set client.learning_rate=0.3 --no-progress") in line
  # checkpoint_every = 0: only the signal can have written a checkpoint
  # before the end, and it holds the rounds the line names.
  assert (out / "checkpoint.npz").exists()
  with __import__("numpy").load(out / "checkpoint.npz") as data:
    extra = json.loads(data["extra_json"].tobytes().decode())
  assert 0 < extra["round"] < 100000
  assert f"checkpoint at round {extra['round']} " in line
  # The log holds exactly the evaluated rounds up to the checkpoint.
  rounds = [r["round"] for r in ckpt.MetricsLog(out / "metrics.jsonl").read()]
  assert rounds == list(range(1, extra["round"] + 1))
  assert not (out / "summary.json").exists()


pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.mark.parametrize("seconds, saved", [(0.0, [6]), (1e-9, [2, 4, 6])])
def test_checkpoint_seconds_bounds_the_work_a_kill_loses(tmp_path, monkeypatch, seconds, saved):
  from fedjax_priv import config as config_lib
  from fedjax_priv import runner
  rounds = []
  original = runner._save
  monkeypatch.setattr(runner, "_save", lambda path, state, round_index, *rest: (
      rounds.append(round_index), original(path, state, round_index, *rest)))
  config = config_lib.load(None, [
      "model.name=logistic_regression", "client.local_steps=1", "data.num_clients=6",
      "simulation.cohort_size=3", "simulation.rounds=6", "simulation.eval_every=2",
      "simulation.checkpoint_every=0", f"simulation.checkpoint_seconds={seconds}",
      "simulation.log_to=[]"])
  runner.run(config, tmp_path, progress=False)
  assert rounds == saved
