"""Sweeps: many private-FL configurations trained as one vmapped program, each with its own epsilon.

`sweep(config, grid)` trains every combination of the grid's values. Keys
whose values are plain numbers inside the round (learning rates, clip norms,
noise multipliers or the epsilon they are calibrated to, seeds: `TRACED`) are
stacked along a leading axis and trained together by one jitted, vmapped
program (`simulation.sweep`), compiled once. Every other key changes shapes
or structure (cohort size, model, local steps, ...): its values are swept by
an outer Python loop, one compile per value, and the result says which keys
went which way. Each run keeps its own accounting: its epsilon is computed on
the host from the events its own noise multiplier and sampling produce,
exactly as `runner.run` would report for the same config.

`sweep_experiment(make_experiment, grid)` does the same for the open API:
any `Experiment` that `assemble` builds from numbers (a noise multiplier, a
clip norm, a learning rate) sweeps over them as one program.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv.config import Config, ConfigError
from fedjax_priv.data.packing import pad_population
from fedjax_priv.experiment import (Experiment, Hyperparameters, build, hyperparameters,
                                    make_training, privacy_levels, settings_of)
from fedjax_priv.privacy.accounting import PrivacyLedger
from fedjax_priv.runner import make_evaluator
from fedjax_priv.simulation.sweep import make_sweep_program

# Config keys a sweep traces (vmaps over) rather than recompiling for.
TRACED = ("client.learning_rate", "server.learning_rate", "privacy.clip_norm",
          "privacy.noise_multiplier", "privacy.target_epsilon", "privacy.example_clip_norm",
          "privacy.example_noise_multiplier", "privacy.example_target_epsilon",
          "simulation.seed")


class SweepResult(NamedTuple):
  """rows: one dict per run (grid values, sigma, epsilon, accuracy, ...);
  traced / outer: the grid keys vmapped over / looped over (one compile per outer value);
  compile_s / wall_s: XLA compile time and total wall time of the training programs."""
  rows: list[dict[str, Any]]
  traced: tuple[str, ...]
  outer: tuple[str, ...]
  compile_s: float
  wall_s: float


def parse_grid(texts: Sequence[str]) -> dict[str, list[Any]]:
  """['privacy.noise_multiplier=0.5,1,2', ...] -> {'privacy.noise_multiplier': [0.5, 1, 2]}.

  Each value is read as TOML (numbers, booleans), else kept as a string.
  """
  grid: dict[str, list[Any]] = {}
  for text in texts:
    if "=" not in text:
      raise ConfigError(f"--grid expects key=v1,v2,..., got {text!r}")
    key, values = text.split("=", 1)
    key = key.strip()
    if key in grid:
      raise ConfigError(f"--grid names {key} twice")
    grid[key] = [config_lib.parse_override(f"{key}={value}")[1] for value in values.split(",")]
    if not grid[key] or any(value == "" for value in grid[key]):
      raise ConfigError(f"--grid {key} has an empty value in {values!r}")
  return grid


def _with(config: Config, values: dict[str, Any]) -> Config:
  """`config` with `values` set, validated as a whole (errors name the key)."""
  raw = config_lib.to_dict(config)
  for key in values:
    section, _, name = key.partition(".")
    if key.count(".") != 1 or section not in raw or name not in raw[section]:
      raise ConfigError(f"unknown config key '{key}' in the sweep grid")
  return config_lib.from_dict(config_lib.with_values(raw, values))


def _stack(points: list[Hyperparameters]) -> Hyperparameters:
  return Hyperparameters(*(jnp.asarray([float(v) for v in column], jnp.float32)
                           for column in zip(*points)))


def _cohorts(sampler, rounds: int) -> tuple[np.ndarray, np.ndarray]:
  cohorts = [sampler.sample(r) for r in range(rounds)]
  return (np.stack([c.indices for c in cohorts]).astype(np.int32),
          np.stack([c.mask for c in cohorts]).astype(np.float32))


def _privacy_columns(levels, settings, known: dict) -> dict[str, Any]:
  """Each level's sigma and epsilon after settings.rounds rounds (as the runner reports).

  `known` maps an accounting question to its answer within one sweep: runs
  that differ only in learning rates or seeds share their epsilon, and
  composing the events is the slow part.
  """
  columns: dict[str, Any] = {"delta": settings.delta if levels else None}
  for i, plan in enumerate(levels):
    question = (plan.round_event, plan.sampling, plan.overflow_probability_per_round,
                settings.rounds, settings.delta, settings.accountant)
    if question not in known:
      ledger = PrivacyLedger()
      for r in range(settings.rounds):
        ledger.record(plan.event_at(r), plan.overflow_probability_per_round)
      known[question] = ledger.epsilon(settings.delta, settings.accountant)
    epsilon, delta_total = known[question]
    prefix = "" if i == 0 else f"{plan.unit}_"
    columns.update({f"{prefix}noise_multiplier": plan.noise_multiplier,
                    f"{prefix}epsilon": epsilon, f"{prefix}delta_total": delta_total})
  if not levels:
    columns.update(noise_multiplier=0.0, epsilon=float("inf"))
  return columns


class _Runs(NamedTuple):
  """The runs of one program: hyper-parameters ([G] leaves), seeds and cohorts of each."""
  hp: Any
  seeds: jax.Array
  indices: np.ndarray
  masks: np.ndarray


def _train(exp: Experiment, make_training, runs: _Runs, max_parallel: int | None
           ) -> tuple[list[dict[str, float]], float, float]:
  """Trains `runs` as one program shaped like `exp`: (metrics per run, compile s, wall s)."""
  population = jax.device_put(pad_population(exp.train))
  program = jax.jit(make_sweep_program(exp, make_training, make_evaluator(exp), max_parallel))
  args = (runs.hp, runs.seeds, population, runs.indices, runs.masks)
  tic = time.perf_counter()
  compiled = program.lower(*args).compile()
  compile_s = time.perf_counter() - tic
  tic = time.perf_counter()
  out = jax.device_get(compiled(*args))
  wall_s = time.perf_counter() - tic
  metrics = [{name: float(values[n]) for name, values in out.items()}
             for n in range(len(runs.seeds))]
  return metrics, compile_s, wall_s


def sweep(config: Config, grid: dict[str, Sequence[Any]],
          max_parallel: int | None = None) -> SweepResult:
  """Trains every combination of `grid` (over `config`); see the module docstring.

  Args:
    config: the base configuration.
    grid: config key -> values, e.g. {"privacy.noise_multiplier": [0.5, 1.0]}.
    max_parallel: the most runs vmapped at once (memory grows with it); the
      runs of one outer value stay one program, which scans over groups of
      this many (`simulation.sweep.make_sweep_program`). None: all at once.

  Returns:
    A SweepResult whose rows follow itertools.product order of the grid.

  Raises:
    ConfigError: a key or value is invalid (named), before anything compiles.
  """
  if not grid:
    raise ConfigError("a sweep needs at least one --grid key")
  if config.data.stream:
    raise ConfigError("a sweep keeps the population on the device and cannot stream it: set "
                      "data.stream = false")
  if max_parallel is not None and max_parallel < 1:
    raise ConfigError(f"max_parallel must be >= 1, got {max_parallel}")
  traced = tuple(key for key in grid if key in TRACED)
  outer = tuple(key for key in grid if key not in TRACED)
  # Every configuration is validated before anything is built or compiled.
  outer_points = [dict(zip(outer, values)) for values in itertools.product(
      *(grid[key] for key in outer))]
  traced_points = [dict(zip(traced, values)) for values in itertools.product(
      *(grid[key] for key in traced))]
  configs = {i: [_with(config, {**o, **t}) for t in traced_points]
             for i, o in enumerate(outer_points)}

  rows, compile_s, wall_s, known_epsilons = [], 0.0, 0.0, {}
  for i, outer_values in enumerate(outer_points):
    base = _with(config, outer_values)
    exp = build(base)
    points, seeds, indices, masks, privacy = [], [], [], [], []
    for run_config in configs[i]:
      levels = privacy_levels(run_config, exp.train, exp.participation, exp.batching)
      points.append(hyperparameters(run_config, levels))
      seeds.append(run_config.simulation.seed)
      cohort_indices, cohort_masks = _cohorts(
          exp.participation.sampler(run_config.simulation.seed), run_config.simulation.rounds)
      indices.append(cohort_indices)
      masks.append(cohort_masks)
      privacy.append(_privacy_columns(levels, settings_of(run_config), known_epsilons))
    training = functools.partial(make_training, base, exp.model, exp.participation)
    runs = _Runs(_stack(points), jnp.asarray(seeds, jnp.int32), np.stack(indices),
                 np.stack(masks))
    metrics, compiled, trained = _train(exp, training, runs, max_parallel)
    compile_s, wall_s = compile_s + compiled, wall_s + trained
    for t, m, p in zip(traced_points, metrics, privacy):
      rows.append({**outer_values, **t, **p, **m})
  return SweepResult(rows, traced, outer, compile_s, wall_s)


def sweep_experiment(make_experiment: Callable[..., Experiment],
                     grid: dict[str, Sequence[float]],
                     max_parallel: int | None = None) -> SweepResult:
  """The open API's sweep: `make_experiment(**point)` for every grid point, as one program.

  `make_experiment` builds an `Experiment` (usually with `assemble`) from
  keyword arguments that are plain numbers inside the round: a noise
  multiplier, a clip norm, a learning rate. It is called once per point with
  Python floats, which gives each run its own accounting, seed and cohorts,
  and once more with traced scalars, which gives the one vmapped program
  that trains every run; so the arguments must not change shapes or
  structure (loop over such values in Python). Each row equals
  `runner.run_experiment(make_experiment(**point), ...)`'s final evaluation.

  Args:
    make_experiment: keyword arguments -> Experiment, e.g.
      `lambda sigma: assemble(model, train, test, dp_mean(0.5, sigma, 20), ...)`.
    grid: argument name -> values; every combination is trained.
    max_parallel: as for `sweep`.

  Returns:
    A SweepResult: one row per point (its values, each level's sigma, epsilon
    and delta_total at settings.delta, test accuracy and loss, mean train loss).

  Raises:
    ValueError: an empty grid, or points whose experiments differ in
      rounds (each program trains one number of rounds).
  """
  if not grid or any(len(values) == 0 for values in grid.values()):
    raise ValueError(f"grid needs at least one name with at least one value, got {grid!r}")
  names = tuple(grid)
  points = [dict(zip(names, (float(v) for v in values)))
            for values in itertools.product(*(grid[name] for name in names))]
  exps = [make_experiment(**point) for point in points]
  rounds = {exp.settings.rounds for exp in exps}
  if len(rounds) != 1:
    raise ValueError(f"every point must train the same number of rounds, got {sorted(rounds)}")
  known: dict = {}
  privacy = [_privacy_columns(exp.levels, exp.settings, known) for exp in exps]
  cohorts = [_cohorts(exp.sampler, exp.settings.rounds) for exp in exps]
  runs = _Runs({name: jnp.asarray([p[name] for p in points], jnp.float32) for name in names},
               jnp.asarray([exp.settings.seed for exp in exps], jnp.int32),
               np.stack([c[0] for c in cohorts]), np.stack([c[1] for c in cohorts]))
  metrics, compile_s, wall_s = _train(exps[0], lambda hp: make_experiment(**hp), runs,
                                      max_parallel)
  rows = [{**point, **p, **m} for point, p, m in zip(points, privacy, metrics)]
  return SweepResult(rows, names, (), compile_s, wall_s)


def write_results(result: SweepResult, out_dir: str | Path) -> dict[str, Path]:
  """Writes results.csv, results.json and (with matplotlib) accuracy_vs_epsilon.png atomically."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  columns = list(dict.fromkeys(key for row in result.rows for key in row))
  text = io.StringIO()
  writer = csv.DictWriter(text, columns)
  writer.writeheader()
  writer.writerows(result.rows)
  paths = {"csv": out / "results.csv", "json": out / "results.json"}
  ckpt.write_atomic(paths["csv"], text.getvalue().encode())
  ckpt.write_json(paths["json"], {
      "traced": list(result.traced), "outer": list(result.outer),
      "compile_s": result.compile_s, "wall_s": result.wall_s,
      "rows": [{k: (v if not isinstance(v, float) or np.isfinite(v) else str(v))
                for k, v in row.items()} for row in result.rows]})
  try:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
  except ImportError:
    return paths
  fig, ax = plt.subplots(figsize=(5, 3.5))
  finite = [row for row in result.rows if np.isfinite(row["epsilon"])]
  ax.scatter([row["epsilon"] for row in finite], [row["test_accuracy"] for row in finite])
  ax.set_xlabel("epsilon (accountant)")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"{len(result.rows)} runs; traced: {', '.join(result.traced) or '-'}", fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  paths["png"] = out / "accuracy_vs_epsilon.png"
  ckpt.write_atomic(paths["png"], buffer.getvalue())
  return paths
