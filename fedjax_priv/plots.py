"""Learning curves of runs and sweeps: accuracy and loss against round and against epsilon.

`curves(paths)` reads run directories (`fedjax-priv run`: metrics.jsonl and
config.json) and sweep directories (`fedjax-priv sweep`: curves.json), groups
the runs that differ only in simulation.seed, and averages them: each
`Series` holds the mean over seeds and the band between the lowest and the
highest seed (with few seeds a min-max band hides less than a standard
error would). `plot(paths, png)` draws the series in four panels and returns
them, so what is drawn can be checked without reading pixels.

Every epsilon axis names the delta it is stated at; where the series were
run at different deltas, each legend entry names its own.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from fedjax_priv import checkpoint as ckpt

METRICS = ("test_accuracy", "test_loss")
SEED_KEY = "simulation.seed"


class Curve(NamedTuple):
  """One run's evaluations. `settings` are the config keys that tell it apart (flat 'a.b' keys)."""
  settings: dict[str, Any]
  rounds: np.ndarray          # [n] rounds evaluated
  test_accuracy: np.ndarray   # [n]
  test_loss: np.ndarray       # [n]
  epsilon: np.ndarray         # [n], inf without privacy
  delta: float | None         # the delta epsilon is stated at (privacy.delta), None without privacy
  delta_total: float | None   # the delta spent by the last evaluation (>= delta: truncation)


class Series(NamedTuple):
  """Runs differing only in their seed, averaged over the rounds all of them evaluated.

  `mean`, `low`, `high` map a metric name (`METRICS`) to [n] arrays; low and
  high are the smallest and largest seed's value.
  """
  label: str
  seeds: tuple[int, ...]
  rounds: np.ndarray
  epsilon: np.ndarray
  delta: float | None
  delta_total: float | None
  mean: dict[str, np.ndarray]
  low: dict[str, np.ndarray]
  high: dict[str, np.ndarray]


def _flat(config: dict[str, Any]) -> dict[str, Any]:
  return {f"{section}.{name}": (tuple(value) if isinstance(value, list) else value)
          for section, values in config.items() if isinstance(values, dict)
          for name, value in values.items()}


def _curve(settings: dict[str, Any], records: list[dict[str, Any]], delta) -> Curve:
  # float() also reads the "inf" strings strict JSON holds for infinite epsilons.
  column = lambda name, default: np.array([float(r.get(name, default)) for r in records])
  spent = records[-1].get("delta_total")
  return Curve(settings, column("round", 0).astype(int), column("test_accuracy", math.nan),
               column("test_loss", math.nan), column("epsilon", math.inf), delta,
               None if spent is None else float(spent))


def read_run(run_dir: str | Path) -> Curve:
  """The curve of a `fedjax-priv run` directory (every setting of its config.json)."""
  run_dir = Path(run_dir)
  config = json.loads((run_dir / "config.json").read_text())
  records = ckpt.MetricsLog(run_dir / "metrics.jsonl").read()
  if not records:
    raise ValueError(f"{run_dir}/metrics.jsonl holds no evaluation yet")
  settings = _flat(config)
  private = settings.get("privacy.unit", "none") != "none"
  return _curve(settings, records, settings.get("privacy.delta") if private else None)


def read_sweep(sweep_dir: str | Path) -> list[Curve]:
  """The curve of every run of a `fedjax-priv sweep` directory (its curves.json)."""
  data = json.loads((Path(sweep_dir) / "curves.json").read_text())
  return [_curve(run["settings"], run["evaluations"], run["delta"]) for run in data["runs"]]


def read(paths: Sequence[str | Path]) -> list[Curve]:
  """Curves of run and sweep directories, in order."""
  found = []
  for path in map(Path, paths):
    if (path / "curves.json").exists():
      found.extend(read_sweep(path))
    elif (path / "metrics.jsonl").exists():
      found.append(read_run(path))
    else:
      raise ValueError(f"{path} is neither a run directory (metrics.jsonl) nor a sweep "
                       "directory (curves.json)")
  return found


def _label(differing: dict[str, Any]) -> str:
  return ", ".join(f"{key.split('.')[-1]}={value}" for key, value in differing.items()) or "run"


def group(found: Sequence[Curve]) -> list[Series]:
  """Averages the curves that differ only in simulation.seed; one Series per other setting.

  The label names the settings in which the series differ from each other.
  """
  keys = sorted({key for curve in found for key in curve.settings} - {SEED_KEY})
  varying = [key for key in keys if len({repr(c.settings.get(key)) for c in found}) > 1]
  groups: dict[tuple, list[Curve]] = {}
  for curve in found:
    groups.setdefault(tuple(repr(curve.settings.get(k)) for k in varying), []).append(curve)
  series = []
  for members in groups.values():
    rounds = sorted(set.intersection(*(set(c.rounds.tolist()) for c in members)))
    picks = [np.searchsorted(c.rounds, rounds) for c in members]
    stacked = {name: np.stack([getattr(c, name)[p] for c, p in zip(members, picks)])
               for name in METRICS + ("epsilon",)}
    first = members[0]
    series.append(Series(
        _label({k: first.settings.get(k) for k in varying}),
        tuple(int(c.settings.get(SEED_KEY, 0)) for c in members), np.asarray(rounds),
        # Seeds do not change the accounting: every member has the same epsilon.
        stacked["epsilon"][0], first.delta, first.delta_total,
        {name: stacked[name].mean(axis=0) for name in METRICS},
        {name: stacked[name].min(axis=0) for name in METRICS},
        {name: stacked[name].max(axis=0) for name in METRICS}))
  return series


def _delta_text(delta: float | None, delta_total: float | None = None) -> str:
  """"δ = 1e-05", or with the delta actually spent where truncation made it larger."""
  if delta is None:
    return "no privacy"
  if delta_total is not None and delta_total > delta * (1 + 1e-3):
    return f"δ = {delta:.3g}, spent δ_total = {delta_total:.3g}"
  return f"δ = {delta:.3g}"


def plot(paths_or_curves: Sequence[str | Path | Curve], png: str | Path,
         title: str = "") -> list[Series]:
  """Draws accuracy and loss against round and against epsilon; returns the series drawn.

  Args:
    paths_or_curves: run or sweep directories (or curves already read).
    png: where the figure is written (atomically).
    title: the figure's title.

  Returns:
    The `Series` of the figure: mean over seeds with a min-max band.
  """
  # The object-oriented API, not pyplot: drawing leaves the caller's backend
  # (e.g. a notebook's) and open figures alone.
  from matplotlib.figure import Figure

  series = group([c for c in paths_or_curves if isinstance(c, Curve)] +
                 read([p for p in paths_or_curves if not isinstance(p, Curve)]))
  deltas = {_delta_text(s.delta, s.delta_total) for s in series}
  one_delta = len(deltas) == 1
  fig = Figure(figsize=(10, 7))
  axes = fig.subplots(2, 2, squeeze=False)
  for s in series:
    label = s.label + (f" (n={len(s.seeds)} seeds)" if len(s.seeds) > 1 else "")
    if not one_delta:
      label += f", {_delta_text(s.delta, s.delta_total)}"
    finite = np.isfinite(s.epsilon)
    for row, name in enumerate(METRICS):
      for column, (x, keep) in enumerate(((s.rounds, slice(None)), (s.epsilon, finite))):
        ax = axes[row][column]
        line, = ax.plot(x[keep], s.mean[name][keep], marker=".", label=label)
        if len(s.seeds) > 1:
          ax.fill_between(x[keep], s.low[name][keep], s.high[name][keep],
                          color=line.get_color(), alpha=0.2)
  epsilon_label = "ε" + (f" ({next(iter(deltas))})" if one_delta else "")
  for row, name in enumerate(METRICS):
    for column, xlabel in enumerate(("round", epsilon_label)):
      ax = axes[row][column]
      ax.set_xlabel(xlabel)
      ax.set_ylabel(name.replace("_", " "))
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title or "mean over seeds, band: lowest to highest seed", fontsize=9)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  ckpt.write_atomic(png, buffer.getvalue())
  return series
