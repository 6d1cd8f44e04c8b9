"""Per-round metrics reach CSV, TensorBoard event files and (faked) W&B as the run computed them."""

import csv
import struct
import sys
import types

import numpy as np
import pytest

from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv import metric_writers
from fedjax_priv import runner

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

ROUNDS = 4
TINY = ["model.name=logistic_regression", "client.local_steps=2", "data.num_clients=6",
        "simulation.cohort_size=3", f"simulation.rounds={ROUNDS}", "simulation.eval_every=2",
        "privacy.unit=user", "privacy.noise_multiplier=1.0", "privacy.clip_norm=0.2"]


def _read_events(directory):
  """Every (tag, step, value) scalar in the TFRecord event files under `directory`.

  Parses the records by hand (u64 length, u32 crc, payload, u32 crc) and
  decodes each payload with tensorboardX's Event proto.
  """
  event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
  scalars = []
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars.append((value.tag, event.step, value.simple_value))
  return scalars


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  pytest.importorskip("tensorboardX")
  out = tmp_path_factory.mktemp("run")
  runner.run(config_lib.load(None, TINY), out, progress=False)
  return out


def test_tensorboard_holds_every_rounds_scalars(run_dir):
  scalars = _read_events(run_dir / "tensorboard")
  with open(run_dir / "rounds.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
  assert [int(row["round"]) for row in rows] == list(range(1, ROUNDS + 1))
  for name in ("train_loss", "clipped_fraction", "delta_norm"):
    logged = {step: value for tag, step, value in scalars if tag == f"train/{name}"}
    assert sorted(logged) == list(range(1, ROUNDS + 1)), name
    for row in rows:
      assert logged[int(row["round"])] == pytest.approx(float(row[name]), rel=1e-6)
  evaluations = ckpt.MetricsLog(run_dir / "metrics.jsonl").read()
  for name in ("test_accuracy", "epsilon"):
    logged = {step: value for tag, step, value in scalars if tag == f"eval/{name}"}
    assert logged == pytest.approx({r["round"]: r[name] for r in evaluations}, rel=1e-6)


def test_metrics_csv_mirrors_metrics_jsonl(run_dir):
  evaluations = ckpt.MetricsLog(run_dir / "metrics.jsonl").read()
  with open(run_dir / "metrics.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
  assert [int(r["round"]) for r in rows] == [e["round"] for e in evaluations] == [2, 4]
  for row, record in zip(rows, evaluations):
    assert float(row["test_loss"]) == record["test_loss"]
    assert float(row["delta_total"]) == record["delta_total"]


def test_wandb_hook_logs_the_same_scalars_when_named(tmp_path, monkeypatch):
  logged = []

  class FakeRun:
    def log(self, values, step):
      logged.append((step, dict(values)))

    def finish(self):
      logged.append("finished")

  fake = types.ModuleType("wandb")
  fake.init = lambda **kwargs: FakeRun()
  fake.__spec__ = types.SimpleNamespace(name="wandb")
  monkeypatch.setitem(sys.modules, "wandb", fake)
  monkeypatch.setattr(metric_writers, "available", lambda sink: True)
  runner.run(config_lib.load(None, TINY + ['simulation.log_to=["wandb"]']), tmp_path,
             progress=False)
  steps = [entry[0] for entry in logged if entry != "finished" and "train/train_loss" in entry[1]]
  assert steps == list(range(1, ROUNDS + 1))
  assert [entry[0] for entry in logged if entry != "finished" and
          "eval/test_accuracy" in entry[1]] == [2, 4]
  assert logged[-1] == "finished"
  assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "rounds.csv").exists()


def test_missing_package_is_reported_not_fatal(tmp_path, monkeypatch):
  warnings = []
  monkeypatch.setattr(metric_writers, "available", lambda sink: sink == "csv")
  writers = metric_writers.open_writers(("csv", "mlflow"), tmp_path, 0, False, [], {},
                                        warn=warnings.append)
  assert len(writers.writers) == 1 and len(warnings) == 1 and "mlflow" in warnings[0]
  writers.write_rounds(0, {"train_loss": np.array([1.0, 2.0])})
  assert (tmp_path / "rounds.csv").read_text().splitlines() == ["round,train_loss",
                                                                 "1,1.0", "2,2.0"]


def test_resumed_run_writes_each_round_once(run_dir, tmp_path, monkeypatch,
                                            fail_trainer_at_block):
  """Interrupted after the first block, then resumed: rounds.csv and metrics.csv equal the
  straight run's (the rows of rounds past the checkpoint are not kept twice)."""
  fail_trainer_at_block(monkeypatch, 2)
  config = config_lib.load(None, TINY)
  with pytest.raises(KeyboardInterrupt):
    runner.run(config, tmp_path, progress=False)
  monkeypatch.undo()
  runner.run(config, tmp_path, resume=True, progress=False)
  for name in ("rounds.csv", "metrics.csv"):
    with open(tmp_path / name, newline="") as a, open(run_dir / name, newline="") as b:
      got, want = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["round"] for r in got] == [r["round"] for r in want], name
    for g, w in zip(got, want):
      for key in ("train_loss", "test_accuracy", "epsilon"):
        if key in w:
          assert float(g[key]) == pytest.approx(float(w[key]), rel=1e-5), (name, key)


def _block(first, count, **extra):
  names = {"train_loss": np.arange(first, first + count) / 10.0, **extra}
  return {name: np.asarray(values, np.float32) for name, values in names.items()}


def _csv_rows(path):
  with open(path, newline="") as handle:
    return list(csv.DictReader(handle))


def test_rounds_csv_grows_by_appending_and_drops_a_killed_partial_row(tmp_path):
  """Blocks are appended to the same file (no rewrite: its inode stays); a partial last row,
  as a kill inside an append leaves it, and every round past the checkpoint are dropped when
  the next session opens the file, which then appends whole rows again."""
  writer = metric_writers.CsvWriter(tmp_path, 0, [])
  writer.write_rounds(0, _block(0, 5))
  inode = (tmp_path / "rounds.csv").stat().st_ino
  writer.write_rounds(5, _block(5, 5))
  assert (tmp_path / "rounds.csv").stat().st_ino == inode
  assert [int(r["round"]) for r in _csv_rows(tmp_path / "rounds.csv")] == list(range(1, 11))
  for torn in ("11,1.", "1"):  # Cut inside a value; cut inside the round itself.
    with open(tmp_path / "rounds.csv", "a") as handle:
      handle.write(torn)
    resumed = metric_writers.CsvWriter(tmp_path, 8, [])  # The checkpoint holds 8 rounds.
    assert [int(r["round"]) for r in _csv_rows(tmp_path / "rounds.csv")] == list(range(1, 9))
    resumed.write_rounds(8, _block(8, 2))
    rows = _csv_rows(tmp_path / "rounds.csv")
    assert [int(r["round"]) for r in rows] == list(range(1, 11))
    assert float(rows[-1]["train_loss"]) == pytest.approx(0.9)


def test_a_new_column_rewrites_the_file_with_every_column(tmp_path):
  writer = metric_writers.CsvWriter(tmp_path, 0, [])
  writer.write_rounds(0, _block(0, 2))
  writer.write_rounds(2, _block(2, 2, secagg_failed=[0.0, 1.0]))
  rows = _csv_rows(tmp_path / "rounds.csv")
  assert list(rows[0]) == ["round", "train_loss", "secagg_failed"]
  assert [r["secagg_failed"] for r in rows] == ["", "", "0.0", "1.0"]
