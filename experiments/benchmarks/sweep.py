"""A 16-configuration sweep as one vmapped program against 16 sequential runs.

What is timed
  User-level DP-FedAvg of an MLP 64-200-200-10 on scikit-learn's digits, 100
  clients (Dirichlet 0.5), fixed cohorts of 20, --rounds rounds (default 50),
  5 local SGD steps of batch 16, clip 1.0; the grid is 4 noise multipliers x 4
  client learning rates = 16 configurations. Side by side, in one process:
    sweep         `fedjax_priv.sweep.sweep(config, grid)`: all 16 runs vmapped
                  in one jitted program (one compile, one call);
    sweep/4, sweep/1  the same single program with max_parallel = 4 or 1: it
                  vmaps 4 runs (or 1) at a time and scans over the groups
                  (`jax.lax.map`), one compile and one call (isolates what
                  the vmap width buys);
    sequential    16 calls of `fedjax_priv.runner.run`, one per configuration,
                  what a user gets from 16 `fedjax-priv run` invocations in one
                  process (each configuration compiles its own program; the
                  persistent compilation cache is off).
  Every contender trains the same 16 runs (same keys, cohorts and data); the
  script checks that their epsilons are equal and their test accuracies agree
  within 2 points (vmapping runs changes float rounding, and 50 noisy rounds
  amplify it: seen 1.1 points).

Usage
  python experiments/benchmarks/sweep.py [--rounds 50] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import jax

from fedjax_priv import config as config_lib
from fedjax_priv import runner, sweep

BASE = [
    "model.name=mlp", "model.hidden=[200, 200]", "data.num_clients=100",
    "simulation.cohort_size=20", "client.local_steps=5", "client.batch_size=16",
    "privacy.unit=user", "privacy.clip_norm=1.0", "simulation.backend=vmap",
]
GRID = {"privacy.noise_multiplier": [0.5, 1.0, 2.0, 4.0],
        "client.learning_rate": [0.05, 0.1, 0.2, 0.4]}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=50)
  parser.add_argument("--json", type=Path, help="write the results to this file")
  args = parser.parse_args(argv)
  config = config_lib.load(None, BASE + [f"simulation.rounds={args.rounds}",
                                         f"simulation.eval_every={args.rounds}"])
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {jax.default_backend()} ({device.device_kind}); "
        f"python {platform.python_version()}; 16 runs of {args.rounds} rounds")

  timings, rows = {}, {}
  for label, parallel in (("sweep", None), ("sweep/4", 4), ("sweep/1", 1)):
    tic = time.perf_counter()
    result = sweep.sweep(config, GRID, max_parallel=parallel)
    timings[label] = {"total_s": time.perf_counter() - tic, "compile_s": result.compile_s,
                      "train_s": result.wall_s}
    rows[label] = result.rows
  tic = time.perf_counter()
  compile_s, sequential = 0.0, []
  with tempfile.TemporaryDirectory() as tmp:
    for i, row in enumerate(rows["sweep"]):
      overrides = [f"{key}={row[key]}" for key in GRID]
      summary = runner.run(config_lib.load(None, BASE + overrides + [
          f"simulation.rounds={args.rounds}", f"simulation.eval_every={args.rounds}"]),
          Path(tmp) / str(i), progress=False)
      compile_s += summary["compile_time_s"]
      sequential.append({"test_accuracy": summary["test_accuracy"],
                         "epsilon": summary["privacy"]["epsilon"]})
  total = time.perf_counter() - tic
  timings["sequential"] = {"total_s": total, "compile_s": compile_s, "train_s": total - compile_s}
  rows["sequential"] = sequential

  for label in ("sweep/4", "sweep/1", "sequential"):
    for a, b in zip(rows["sweep"], rows[label]):
      if abs(a["test_accuracy"] - b["test_accuracy"]) > 0.02 or a["epsilon"] != b["epsilon"]:
        raise SystemExit(f"{label} disagrees with the sweep: {a} vs {b}")
  print(f"{'contender':14s} {'total s':>9s} {'compile s':>10s} {'train s':>9s} {'speed-up':>9s}")
  for label, t in timings.items():
    ratio = timings["sequential"]["total_s"] / t["total_s"]
    print(f"{label:14s} {t['total_s']:9.2f} {t['compile_s']:10.2f} {t['train_s']:9.2f} "
          f"{ratio:8.2f}x")
  programs = ("sweep", "sweep/4", "sweep/1")
  fastest = min(programs, key=lambda label: timings[label]["total_s"])
  ratio = timings["sequential"]["total_s"] / timings[fastest]["total_s"]
  full = timings["sequential"]["total_s"] / timings["sweep"]["total_s"]
  print(f"\none program ({fastest}) vs 16 sequential runs: {ratio:.2f}x (target >= 4x) -> "
        f"{'met' if ratio >= 4 else 'missed'}; all 16 vmapped: {full:.2f}x")
  best = max(rows["sweep"], key=lambda r: r["test_accuracy"])
  print(f"best run: sigma {best['privacy.noise_multiplier']}, lr {best['client.learning_rate']}: "
        f"accuracy {best['test_accuracy']:.3f} at epsilon {best['epsilon']:.2f}")
  if args.json:
    args.json.write_text(json.dumps({
        "jax": jax.__version__, "platform": jax.default_backend(),
        "device": device.device_kind, "rounds": args.rounds, "timings": timings,
        "fastest_program": fastest, "speedup_vs_sequential": ratio,
        "speedup_all_vmapped": full, "rows": rows["sweep"]}, indent=1))


if __name__ == "__main__":
  main()
