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
exactly as `runner.run` would report for the same config, and the runner's
planned-δ rule (`budget.check_delta_total`: warn above 1.1·δ, refuse above
10·δ unless privacy.allow_delta_overflow) is applied to every run before
anything compiles.

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

from fedjax_priv import budget
from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv import plots
from fedjax_priv.config import Config, ConfigError
from fedjax_priv.data.packing import pad_population
from fedjax_priv.experiment import (Experiment, Hyperparameters, build, hyperparameters,
                                    make_training, privacy_levels, settings_of)
from fedjax_priv.privacy.accounting import PrivacyLedger
from fedjax_priv.runner import make_evaluator
from fedjax_priv.simulation.sweep import evaluation_rounds, make_sweep_program

# Config keys a sweep traces (vmaps over) rather than recompiling for.
TRACED = ("client.learning_rate", "server.learning_rate", "privacy.clip_norm",
          "privacy.noise_multiplier", "privacy.target_epsilon", "privacy.example_clip_norm",
          "privacy.example_noise_multiplier", "privacy.example_target_epsilon",
          "simulation.seed")


class SweepResult(NamedTuple):
  """rows: one dict per run (grid values, sigma, epsilon, delta, accuracy, ...);
  traced / outer: the grid keys vmapped over / looped over (one compile per outer value);
  compile_s / wall_s: XLA compile time and total wall time of the training programs;
  curves: per row, its evaluations as metrics.jsonl would hold them (round,
  test_accuracy, test_loss, epsilon, delta_total), every eval_every rounds."""
  rows: list[dict[str, Any]]
  traced: tuple[str, ...]
  outer: tuple[str, ...]
  compile_s: float
  wall_s: float
  curves: list[list[dict[str, Any]]] = []


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


def _epsilon_curve(plan, settings, rounds: list[int], known: dict
                   ) -> list[tuple[float, float]]:
  """(epsilon, delta_total) of `plan` after each of `rounds` (as the runner reports them).

  `known` maps an accounting question to its answer within one sweep: runs
  that differ only in learning rates or seeds share their epsilon, and
  composing the events is the slow part.
  """
  # The question holds every round's event, not round 0's alone: plans with
  # the same first event may charge later rounds differently (independent
  # noise under Cyclic once per cycle, a matrix factorization once per run).
  question = (tuple(plan.event_at(r) for r in range(rounds[-1])),
              plan.overflow_probability_per_round, tuple(rounds), settings.delta,
              settings.accountant)
  if question not in known:
    ledger, answers, done = PrivacyLedger(), [], 0
    for r in rounds:
      plan.charge(ledger, done, r)
      answers.append(ledger.epsilon(settings.delta, settings.accountant))
      done = r
    known[question] = answers
  return known[question]


def _privacy_columns(levels, settings, known: dict) -> tuple[dict[str, Any], list]:
  """Each level's sigma, epsilon and delta_total after settings.rounds rounds, and the
  primary level's (epsilon, delta_total) at every evaluation (inf without privacy)."""
  columns: dict[str, Any] = {"delta": settings.delta if levels else None}
  evaluated = evaluation_rounds(settings.rounds, settings.eval_every)
  curve = [(float("inf"), None)] * len(evaluated)
  for i, plan in enumerate(levels):
    answers = _epsilon_curve(plan, settings, evaluated, known)
    epsilon, delta_total = answers[-1]
    prefix = "" if i == 0 else f"{plan.unit}_"
    columns.update({f"{prefix}noise_multiplier": plan.noise_multiplier,
                    f"{prefix}epsilon": epsilon, f"{prefix}delta_total": delta_total})
    curve = answers if i == 0 else curve
  if not levels:
    columns.update(noise_multiplier=0.0, epsilon=float("inf"))
  return columns, curve


def _check_planned_delta(levels, settings, known: dict, run: str) -> None:
  """The runner's planned-δ rule (`budget.check_delta_total`) for one run of a sweep.

  Sweeps train every round (no budget stop), so the plan is settings.rounds
  rounds; the (ε, δ_total) is the one the run's row reports (`known` caches
  it, so nothing is composed twice).

  Raises:
    ValueError: a level's δ_total exceeds 10·δ without privacy.allow_delta_overflow,
      naming `run`.
  """
  evaluated = evaluation_rounds(settings.rounds, settings.eval_every)
  for plan in levels:
    epsilon, delta_total = _epsilon_curve(plan, settings, evaluated, known)[-1]
    budget.check_delta_total(plan, epsilon, delta_total, settings.rounds, settings, run)


def _run_name(values: dict[str, Any]) -> str:
  return "the sweep run " + ", ".join(f"{key}={value}" for key, value in values.items())


class _Runs(NamedTuple):
  """The runs of one program: hyper-parameters ([G] leaves), seeds and cohorts of each."""
  hp: Any
  seeds: jax.Array
  indices: np.ndarray
  masks: np.ndarray


def _train(exp: Experiment, make_training, runs: _Runs, epsilons: list, max_parallel: int | None
           ) -> tuple[list[dict[str, float]], list[list[dict[str, Any]]], float, float]:
  """Trains `runs` as one program shaped like `exp`.

  Returns (final metrics per run, evaluations per run with `epsilons`' (epsilon,
  delta_total) at each, compile s, wall s).
  """
  population = jax.device_put(pad_population(exp.train))
  program = jax.jit(make_sweep_program(exp, make_training, make_evaluator(exp), max_parallel))
  args = (runs.hp, runs.seeds, population, runs.indices, runs.masks)
  tic = time.perf_counter()
  compiled = program.lower(*args).compile()
  compile_s = time.perf_counter() - tic
  tic = time.perf_counter()
  out = jax.device_get(compiled(*args))
  wall_s = time.perf_counter() - tic
  metrics = [{name: float(values[n]) for name, values in out.items()
              if not name.startswith("curve_")} for n in range(len(runs.seeds))]
  evaluated = evaluation_rounds(exp.settings.rounds, exp.settings.eval_every)
  curves = [[{"round": r, "test_accuracy": float(out["curve_test_accuracy"][n][e]),
              "test_loss": float(out["curve_test_loss"][n][e]),
              "epsilon": epsilons[n][e][0], "delta_total": epsilons[n][e][1]}
             for e, r in enumerate(evaluated)] for n in range(len(runs.seeds))]
  return metrics, curves, compile_s, wall_s


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
    ValueError: a run's planned delta_total exceeds 10 x privacy.delta
      (`budget.check_delta_total`; naming the run's grid values), before
      anything compiles.
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

  # Every run is built and accounted, and the planned-delta rule applied to
  # it, before the first program compiles.
  prepared, known_epsilons = [], {}
  for i, outer_values in enumerate(outer_points):
    base = _with(config, outer_values)
    exp = build(base)
    points, seeds, indices, masks, privacy, epsilons = [], [], [], [], [], []
    for traced_values, run_config in zip(traced_points, configs[i]):
      levels = privacy_levels(run_config, exp.train, exp.participation, exp.batching)
      points.append(hyperparameters(run_config, levels))
      seeds.append(run_config.simulation.seed)
      cohort_indices, cohort_masks = _cohorts(
          exp.participation.sampler(run_config.simulation.seed), run_config.simulation.rounds)
      indices.append(cohort_indices)
      masks.append(cohort_masks)
      settings = settings_of(run_config)
      columns, curve = _privacy_columns(levels, settings, known_epsilons)
      _check_planned_delta(levels, settings, known_epsilons,
                           _run_name({**outer_values, **traced_values}))
      privacy.append(columns)
      epsilons.append(curve)
    prepared.append((outer_values, base, exp, points, seeds, indices, masks, privacy, epsilons))

  rows, curves, compile_s, wall_s = [], [], 0.0, 0.0
  for outer_values, base, exp, points, seeds, indices, masks, privacy, epsilons in prepared:
    training = functools.partial(make_training, base, exp.model, exp.participation)
    runs = _Runs(_stack(points), jnp.asarray(seeds, jnp.int32), np.stack(indices),
                 np.stack(masks))
    metrics, run_curves, compiled, trained = _train(exp, training, runs, epsilons, max_parallel)
    compile_s, wall_s = compile_s + compiled, wall_s + trained
    for t, m, p in zip(traced_points, metrics, privacy):
      rows.append({**outer_values, **t, **p, **m})
    curves.extend(run_curves)
  return SweepResult(rows, traced, outer, compile_s, wall_s, curves)


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
    ValueError: an empty grid, points whose experiments differ in rounds
      or eval_every (each program trains and evaluates one schedule), or a
      point whose planned delta_total exceeds 10 x its settings.delta
      (`budget.check_delta_total`, naming the point), before anything
      compiles.
  """
  if not grid or any(len(values) == 0 for values in grid.values()):
    raise ValueError(f"grid needs at least one name with at least one value, got {grid!r}")
  names = tuple(grid)
  points = [dict(zip(names, (float(v) for v in values)))
            for values in itertools.product(*(grid[name] for name in names))]
  exps = [make_experiment(**point) for point in points]
  schedules = {(exp.settings.rounds, exp.settings.eval_every) for exp in exps}
  if len(schedules) != 1:
    raise ValueError("every point must train the same rounds with the same eval_every, got "
                     f"(rounds, eval_every) {sorted(schedules)}")
  known: dict = {}
  privacy, epsilons = zip(*(_privacy_columns(exp.levels, exp.settings, known) for exp in exps))
  for point, exp in zip(points, exps):
    _check_planned_delta(exp.levels, exp.settings, known, _run_name(point))
  cohorts = [_cohorts(exp.sampler, exp.settings.rounds) for exp in exps]
  runs = _Runs({name: jnp.asarray([p[name] for p in points], jnp.float32) for name in names},
               jnp.asarray([exp.settings.seed for exp in exps], jnp.int32),
               np.stack([c[0] for c in cohorts]), np.stack([c[1] for c in cohorts]))
  metrics, curves, compile_s, wall_s = _train(exps[0], lambda hp: make_experiment(**hp), runs,
                                              list(epsilons), max_parallel)
  rows = [{**point, **p, **m} for point, p, m in zip(points, privacy, metrics)]
  return SweepResult(rows, names, (), compile_s, wall_s, curves)


def _json_safe(value: Any) -> Any:
  return value if not isinstance(value, float) or np.isfinite(value) else str(value)


def write_results(result: SweepResult, out_dir: str | Path) -> dict[str, Path]:
  """Writes results.csv, results.json, curves.json and curves.png atomically.

  curves.json holds every run's evaluations (`plots.read_sweep` reads it);
  curves.png draws accuracy and loss against round and epsilon, the runs
  that differ only in simulation.seed averaged with a band, delta on the
  epsilon axis (`plots.plot`).
  """
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
      "rows": [{k: _json_safe(v) for k, v in row.items()} for row in result.rows]})
  grid_keys = result.outer + result.traced
  paths["curves"] = out / "curves.json"
  ckpt.write_json(paths["curves"], {"runs": [
      {"settings": {key: row[key] for key in grid_keys}, "delta": row["delta"],
       "evaluations": [{k: _json_safe(v) for k, v in record.items()} for record in curve]}
      for row, curve in zip(result.rows, result.curves)]})
  paths["png"] = out / "curves.png"
  plots.plot([out], paths["png"], title=f"{len(result.rows)} runs; traced: "
             f"{', '.join(result.traced) or '-'}; outer: {', '.join(result.outer) or '-'}")
  return paths
