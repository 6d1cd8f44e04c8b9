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
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv import plots
from fedjax_priv.config import Config, ConfigError
from fedjax_priv.data.packing import pad_population
from fedjax_priv.experiment import (Hyperparameters, build, hyperparameters, make_sampler,
                                    make_training, privacy_levels)
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


def _cohorts(config: Config, num_clients: int) -> tuple[np.ndarray, np.ndarray]:
  sampler = make_sampler(config, num_clients)
  cohorts = [sampler.sample(r) for r in range(config.simulation.rounds)]
  return (np.stack([c.indices for c in cohorts]).astype(np.int32),
          np.stack([c.mask for c in cohorts]).astype(np.float32))


def _epsilon_curve(config: Config, plan, rounds: list[int], known: dict
                   ) -> list[tuple[float, float]]:
  """(epsilon, delta_total) of `plan` after each of `rounds` (as the runner reports them).

  `known` maps an accounting question to its answer within one sweep: runs
  that differ only in learning rates or seeds share their epsilon, and
  composing the events is the slow part.
  """
  privacy = config.privacy
  question = (plan.round_event, plan.sampling, plan.overflow_probability_per_round,
              tuple(rounds), privacy.delta, privacy.accountant)
  if question not in known:
    ledger, answers = PrivacyLedger(), []
    for r in range(rounds[-1]):
      ledger.record(plan.event_at(r), plan.overflow_probability_per_round)
      if r + 1 in rounds:
        answers.append(ledger.epsilon(privacy.delta, privacy.accountant))
    known[question] = answers
  return known[question]


def _privacy_columns(config: Config, levels, known: dict) -> tuple[dict[str, Any], list]:
  """Each level's sigma, epsilon and delta_total after simulation.rounds rounds, and the
  primary level's (epsilon, delta_total) at every evaluation (None without privacy)."""
  privacy, sim = config.privacy, config.simulation
  columns: dict[str, Any] = {"delta": privacy.delta if levels else None}
  evaluated = evaluation_rounds(sim.rounds, sim.eval_every)
  curve = [(float("inf"), None)] * len(evaluated)
  for i, plan in enumerate(levels):
    answers = _epsilon_curve(config, plan, evaluated, known)
    epsilon, delta_total = answers[-1]
    prefix = "" if i == 0 else f"{plan.unit}_"
    columns.update({f"{prefix}noise_multiplier": plan.noise_multiplier,
                    f"{prefix}epsilon": epsilon, f"{prefix}delta_total": delta_total})
    curve = answers if i == 0 else curve
  if not levels:
    columns.update(noise_multiplier=0.0, epsilon=float("inf"))
  return columns, curve


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

  rows, curves, compile_s, wall_s, known_epsilons = [], [], 0.0, 0.0, {}
  for i, outer_values in enumerate(outer_points):
    base = _with(config, outer_values)
    evaluated = evaluation_rounds(base.simulation.rounds, base.simulation.eval_every)
    exp = build(base)
    population = jax.device_put(pad_population(exp.train))
    points, seeds, indices, masks, privacy, epsilons = [], [], [], [], [], []
    for run_config in configs[i]:
      levels = privacy_levels(run_config, exp.train, exp.participation, exp.batching)
      points.append(hyperparameters(run_config, levels))
      seeds.append(run_config.simulation.seed)
      cohort_indices, cohort_masks = _cohorts(run_config, exp.train.num_clients)
      indices.append(cohort_indices)
      masks.append(cohort_masks)
      columns, curve = _privacy_columns(run_config, levels, known_epsilons)
      privacy.append(columns)
      epsilons.append(curve)
    training = functools.partial(make_training, base, exp.model, exp.participation)
    program = jax.jit(make_sweep_program(exp, training, make_evaluator(exp), max_parallel))
    args = (_stack(points), jnp.asarray(seeds, jnp.int32), population, np.stack(indices),
            np.stack(masks))
    tic = time.perf_counter()
    compiled = program.lower(*args).compile()
    compile_s += time.perf_counter() - tic
    tic = time.perf_counter()
    out = jax.device_get(compiled(*args))
    wall_s += time.perf_counter() - tic
    metrics = [{name: float(values[n]) for name, values in out.items()
                if not name.startswith("curve_")} for n in range(len(points))]
    for n, (t, m, p) in enumerate(zip(traced_points, metrics, privacy)):
      rows.append({**outer_values, **t, **p, **m})
      curves.append([{"round": r, "test_accuracy": float(out["curve_test_accuracy"][n][e]),
                      "test_loss": float(out["curve_test_loss"][n][e]),
                      "epsilon": epsilons[n][e][0], "delta_total": epsilons[n][e][1]}
                     for e, r in enumerate(evaluated)])
  return SweepResult(rows, traced, outer, compile_s, wall_s, curves)


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
