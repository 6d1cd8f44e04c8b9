"""Per-round metrics for the tools researchers read: CSV, TensorBoard, and optionally W&B / MLflow.

The runner hands every writer two kinds of records:

* `write_rounds(first_round, metrics)`: the training metrics of a block of
  rounds, one [R] array per name (train_loss, clipped_fraction, ...); row r
  belongs to round `first_round + r + 1` (rounds are counted from 1, like
  the `round` of metrics.jsonl: round n is the state after n rounds).
* `write_evaluation(record)`: one evaluation, the same dict as a line of
  metrics.jsonl (test accuracy and loss, epsilon and delta_total, times).

Sinks (`simulation.log_to`):

* "csv": `rounds.csv`, one row per round, and `metrics.csv`, the evaluations
  of metrics.jsonl as a table. Spreadsheets and pandas read both.
* "tensorboard": event files under `tensorboard/`, written with tensorboardX
  (scalars `train/<name>` every round, `eval/<name>` at evaluations). Chosen
  over clu's metric writers because tensorboardX is a small pure-Python
  package kept up by its authors (protobuf is its only heavy dependency),
  while clu's TensorBoard writer pulls in TensorFlow. On resume the writer is
  opened with `purge_step`, so TensorBoard drops the events of rounds the
  checkpoint does not hold instead of drawing them twice.
* "wandb", "mlflow": off unless named, and only if the package is installed;
  they log the same scalars with the round as the step.

A sink whose package is missing is reported once and skipped (`open_writers`),
so a run never fails for want of a logger.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from fedjax_priv import checkpoint as ckpt
from fedjax_priv.config import LOG_SINKS as SINKS
# The package each sink needs, and how to get it.
_PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


class MetricWriter(Protocol):
  def write_rounds(self, first_round: int, metrics: dict[str, np.ndarray]) -> None: ...
  def write_evaluation(self, record: dict[str, Any]) -> None: ...
  def close(self) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
  """The finite numbers of a record (strings such as "inf" and non-numbers left out)."""
  return {name: float(value) for name, value in record.items()
          if isinstance(value, (int, float)) and not isinstance(value, bool)
          and name != "round" and math.isfinite(value)}


def _per_round(first_round: int, metrics: dict[str, np.ndarray]):
  """Yields (round, {name: value}) for each round of a block."""
  arrays = {name: np.asarray(values, np.float64).reshape(len(values), -1).mean(axis=1)
            for name, values in metrics.items()}
  length = len(next(iter(arrays.values()))) if arrays else 0
  for r in range(length):
    yield first_round + r + 1, {name: float(values[r]) for name, values in arrays.items()}


class CsvWriter:
  """`rounds.csv` (one row per round) and `metrics.csv` (one row per evaluation).

  Each opens by rewriting its file (atomically) from the rows it keeps, so a
  resumed run (which truncates to the checkpoint's round) never holds a
  round twice, then grows by appending (`_CsvTable`).
  """

  def __init__(self, out_dir: Path, start_round: int, evaluations: list[dict[str, Any]]):
    rounds_path = out_dir / "rounds.csv"
    kept = [row for row in _read_csv(rounds_path) if row["round"] <= start_round]
    self.rounds = _CsvTable(rounds_path, kept)
    self.evaluations = _CsvTable(out_dir / "metrics.csv", list(evaluations))

  def write_rounds(self, first_round, metrics):
    self.rounds.append([{"round": r, **values} for r, values in _per_round(first_round, metrics)])

  def write_evaluation(self, record):
    self.evaluations.append([record])

  def close(self):
    pass


class _CsvTable:
  """A CSV file grown by appending rows; rewritten whole only when its columns change.

  Appending keeps a run's cost linear in its rounds: rewriting the whole file
  at every block made a 5,000-round run that evaluates every 10 rounds spend
  15 s on it, growing with the square of the rounds. An append is one write
  of the block's rows, flushed to disk. A kill inside it can leave a partial
  last row, of rounds the checkpoint does not hold (the runner checkpoints
  after writing a block's rows): the next session drops those rounds and
  rewrites the file from the rows it keeps before appending again.
  """

  def __init__(self, path: Path, rows: list[dict[str, Any]]):
    self.path, self.rows, self.columns = path, rows, None
    if path.exists():
      self._rewrite()

  def append(self, rows: list[dict[str, Any]]) -> None:
    self.rows.extend(rows)
    columns = dict.fromkeys(key for row in rows for key in row)
    if self.columns is None or not columns.keys() <= set(self.columns):
      self._rewrite()
      return
    text = io.StringIO()
    csv.DictWriter(text, self.columns, lineterminator="\n").writerows(rows)
    try:
      with open(self.path, "a", newline="") as handle:
        handle.write(text.getvalue())
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as error:
      raise ckpt.WriteError(self.path, error) from None

  def _rewrite(self) -> None:
    self.columns = list(dict.fromkeys(key for row in self.rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, self.columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(self.rows)
    ckpt.write_atomic(self.path, text.getvalue().encode())


def _read_csv(path: Path) -> list[dict[str, Any]]:
  """The rows of a `rounds.csv`, up to the first that is not whole (a kill's partial row)."""
  if not path.exists():
    return []
  rows = []
  with open(path, newline="") as handle:
    for row in csv.DictReader(handle):
      if None in row or None in row.values():  # Too many or too few fields.
        break
      try:
        rows.append({name: (int(value) if name == "round" else float(value))
                     for name, value in row.items() if value != ""})
      except ValueError:
        break
  return rows


class TensorBoardWriter:
  """Scalars `train/<name>` per round and `eval/<name>` per evaluation, via tensorboardX."""

  def __init__(self, out_dir: Path, start_round: int, resume: bool):
    from tensorboardX import SummaryWriter
    if not resume:  # A fresh run (or --overwrite) must not show the replaced run's events.
      shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    # purge_step: TensorBoard hides events at or after it written before the resume.
    self.writer = SummaryWriter(str(out_dir / "tensorboard"),
                                purge_step=start_round + 1 if resume else None)

  def write_rounds(self, first_round, metrics):
    for round_index, values in _per_round(first_round, metrics):
      for name, value in values.items():
        if math.isfinite(value):
          self.writer.add_scalar(f"train/{name}", value, round_index)
    self.writer.flush()

  def write_evaluation(self, record):
    for name, value in _scalars(record).items():
      self.writer.add_scalar(f"eval/{name}", value, record["round"])
    self.writer.flush()

  def close(self):
    self.writer.close()


class WandbWriter:
  """Weights & Biases: one run per run directory, the round as the step."""

  def __init__(self, out_dir: Path, description: dict[str, Any]):
    import wandb
    self.wandb = wandb
    self.run = wandb.init(name=out_dir.name, dir=str(out_dir), config=description,
                          resume="allow")

  def write_rounds(self, first_round, metrics):
    for round_index, values in _per_round(first_round, metrics):
      self.run.log({f"train/{k}": v for k, v in values.items()}, step=round_index)

  def write_evaluation(self, record):
    self.run.log({f"eval/{k}": v for k, v in _scalars(record).items()}, step=record["round"])

  def close(self):
    self.run.finish()


class MlflowWriter:
  """MLflow: one run named after the run directory, the round as the step."""

  def __init__(self, out_dir: Path, description: dict[str, Any]):
    import mlflow
    self.mlflow = mlflow
    self.run = mlflow.start_run(run_name=out_dir.name)
    mlflow.log_params({f"{section}.{name}": value for section, values in description.items()
                       if isinstance(values, dict) for name, value in values.items()})

  def write_rounds(self, first_round, metrics):
    for round_index, values in _per_round(first_round, metrics):
      self.mlflow.log_metrics({f"train/{k}": v for k, v in values.items()
                               if math.isfinite(v)}, step=round_index)

  def write_evaluation(self, record):
    self.mlflow.log_metrics({f"eval/{k}": v for k, v in _scalars(record).items()},
                            step=record["round"])

  def close(self):
    self.mlflow.end_run()


class Writers:
  """All open writers as one; what the runner calls."""

  def __init__(self, writers: list[MetricWriter]):
    self.writers = writers

  def write_rounds(self, first_round: int, metrics: dict[str, np.ndarray]) -> None:
    if metrics:
      for writer in self.writers:
        writer.write_rounds(first_round, metrics)

  def write_evaluation(self, record: dict[str, Any]) -> None:
    for writer in self.writers:
      writer.write_evaluation(record)

  def close(self) -> None:
    for writer in self.writers:
      writer.close()


def available(sink: str) -> bool:
  """Whether the package `sink` needs is importable (csv needs none)."""
  package = _PACKAGES.get(sink)
  if package is None:
    return True
  import importlib.util
  return importlib.util.find_spec(package) is not None


def open_writers(sinks: tuple[str, ...], out_dir: Path, start_round: int, resume: bool,
                 evaluations: list[dict[str, Any]], description: dict[str, Any],
                 warn: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
                 ) -> Writers:
  """Opens the writers `sinks` names; one whose package is missing is reported with `warn`.

  Args:
    sinks: names from `SINKS` (simulation.log_to).
    out_dir: the run directory.
    start_round: the round the run starts (or resumes) from.
    resume: whether the run continues a checkpoint (TensorBoard purges later events).
    evaluations: the records of metrics.jsonl kept so far (metrics.csv is rebuilt from them).
    description: the run's resolved config (W&B / MLflow parameters).

  Raises:
    ValueError: a sink not in `SINKS`, naming simulation.log_to.
  """
  writers: list[MetricWriter] = []
  for sink in sinks:
    if sink not in SINKS:
      raise ValueError(f"simulation.log_to: unknown sink {sink!r}; choose from {SINKS}")
    if not available(sink):
      warn(f"simulation.log_to names {sink}, but {_PACKAGES[sink]} is not installed "
           f"(pip install {_PACKAGES[sink]}); not logging to {sink}")
      continue
    if sink == "csv":
      writers.append(CsvWriter(out_dir, start_round, evaluations))
    elif sink == "tensorboard":
      writers.append(TensorBoardWriter(out_dir, start_round, resume))
    elif sink == "wandb":
      writers.append(WandbWriter(out_dir, description))
    else:
      writers.append(MlflowWriter(out_dir, description))
  return Writers(writers)
