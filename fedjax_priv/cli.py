"""The `fedjax-priv` command.

  fedjax-priv run CONFIG.toml [--set section.key=value ...] [--out DIR] [--resume]
  fedjax-priv sweep CONFIG.toml --grid section.key=v1,v2,... [--grid ...] [--set ...] [--out DIR]
  fedjax-priv calibrate CONFIG.toml [--set ...]
  fedjax-priv data prepare NAME [--source PATH] [--out PATH] [options]

Exit status 2 and a message naming the key for a bad config, before anything
is compiled; for `data prepare`, exit status 2 and a message saying what source
is missing or which option is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from fedjax_priv import config as config_lib


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="fedjax-priv", description=__doc__.split("\n\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="train and evaluate one experiment")
  run.add_argument("config", help="TOML config file")
  run.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key, e.g. simulation.rounds=50")
  run.add_argument("--out", default=None, help="output directory (default runs/<config name>)")
  run.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.npz")
  run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  sweep = commands.add_parser("sweep", help="train a grid of configurations as one program")
  sweep.add_argument("config", help="TOML config file (the base of every run)")
  sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                     help="values of one config key; repeat for a product grid")
  sweep.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="KEY=VALUE", help="override a config key of the base")
  sweep.add_argument("--out", default=None, help="output directory (default runs/<name>-sweep)")
  sweep.add_argument("--max-parallel", type=int, default=None,
                     help="the most runs vmapped at once; groups of them are scanned in the "
                     "same program (default: all)")
  calibrate = commands.add_parser(
      "calibrate", help="print the noise multipliers that meet the config's target epsilon")
  calibrate.add_argument("config", help="TOML config file")
  calibrate.add_argument("--set", dest="overrides", action="append", default=[],
                         metavar="KEY=VALUE", help="override a config key")
  _add_data_parser(commands)
  return parser


def _add_data_parser(commands) -> None:
  data = commands.add_parser("data", help="prepare federated datasets")
  actions = data.add_subparsers(dest="data_command", required=True)
  prep = actions.add_parser(
      "prepare", help="write a dataset as SQLite stores (train at --out, test beside it)")
  prep.add_argument("name", choices=("fashion_mnist", "leaf", "mnist5k", "shakespeare",
                                     "synthetic"))
  prep.add_argument("--source", default=None, help="raw data: file or folder (see docs)")
  prep.add_argument("--out", default=None, help="training store (default data/NAME.sqlite)")
  # Defaults are None so that each dataset's own defaults apply, and an
  # option a dataset does not take is reported instead of ignored.
  prep.add_argument("--num-clients", type=int, default=None)
  prep.add_argument("--partition", choices=("iid", "dirichlet"), default=None)
  prep.add_argument("--dirichlet-alpha", type=float, default=None)
  prep.add_argument("--seed", type=int, default=None)
  prep.add_argument("--test-fraction", type=float, default=None)
  prep.add_argument("--alpha", type=float, default=None, help="synthetic: model heterogeneity")
  prep.add_argument("--beta", type=float, default=None, help="synthetic: input heterogeneity")
  prep.add_argument("--iid", action="store_const", const=True, default=None,
                    help="synthetic: Synthetic-IID")
  prep.add_argument("--leaf-dataset", default=None,
                    help="leaf: femnist | sent140 | shakespeare | synthetic")
  prep.add_argument("--overwrite", action="store_const", const=True, default=None)


def _data_prepare(args) -> int:
  from fedjax_priv.data import prepare as prepare_lib
  from fedjax_priv.data.store import FederatedStore
  names = ("num_clients", "partition", "dirichlet_alpha", "seed", "test_fraction", "alpha",
           "beta", "iid", "leaf_dataset", "overwrite")
  options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
  try:
    paths = prepare_lib.prepare_dataset(args.name, args.source, args.out, **options)
  except (FileNotFoundError, ValueError) as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 2
  for path in paths:
    with FederatedStore(path) as store:
      print(f"wrote {path}: {store.info.split}, {store.num_clients} clients, "
            f"{int(store.client_sizes().sum())} examples")
  return 0


def _enable_compilation_cache() -> None:
  """Persistent XLA cache: compiling dominates short runs on a CPU (DESIGN.md)."""
  import jax
  cache = os.environ.get("FEDJAX_PRIV_CACHE", str(Path.home() / ".cache" / "fedjax_priv" / "xla"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _sweep(args, config: config_lib.Config) -> int:
  from fedjax_priv import sweep as sweep_lib  # Imports JAX; kept off the config-error path.
  out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-sweep"
  try:
    grid = sweep_lib.parse_grid(args.grid)
    traced = [key for key in grid if key in sweep_lib.TRACED]
    outer = [key for key in grid if key not in sweep_lib.TRACED]
    print(f"traced (one program, vmapped): {', '.join(traced) or '-'}")
    print(f"outer loop (one compile each): {', '.join(outer) or '-'}")
    result = sweep_lib.sweep(config, grid, args.max_parallel)
  except (config_lib.ConfigError, ValueError) as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 2
  paths = sweep_lib.write_results(result, out)
  keys = list(grid)
  print("  ".join(keys + ["noise_mult", "epsilon", "test_acc"]))
  for row in result.rows:
    print("  ".join([str(row[k]) for k in keys] + [f"{row['noise_multiplier']:.4g}",
                                                   f"{row['epsilon']:.3f}",
                                                   f"{row['test_accuracy']:.4f}"]))
  print(f"{len(result.rows)} runs: compile {result.compile_s:.1f} s, train {result.wall_s:.1f} s; "
        f"wrote {', '.join(str(p) for p in paths.values())}")
  return 0


def _calibrate(config: config_lib.Config) -> int:
  from fedjax_priv.experiment import calibrate  # Imports JAX; kept off the config-error path.
  try:
    calibrated = calibrate(config)
  except ValueError as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 2
  privacy = calibrated.privacy
  print(f"--set privacy.noise_multiplier={privacy.noise_multiplier:.6g}")
  if privacy.unit == "both":
    print(f"--set privacy.example_noise_multiplier={privacy.example_noise_multiplier:.6g}")
  return 0


def _interrupted_line(stopped, args, out: Path) -> str:
  """The one line printed when a run is stopped by a signal: what was kept and how to go on."""
  import signal
  name = signal.Signals(stopped.signum).name
  if stopped.checkpoint is None:
    return f"fedjax-priv: {name} before the first checkpoint; nothing to resume"
  command = ["fedjax-priv", "run", args.config, "--out", str(out), "--resume"]
  for override in args.overrides:
    command += ["--set", override]
  if args.no_progress:
    command.append("--no-progress")
  return (f"fedjax-priv: {name}: checkpoint at round {stopped.rounds_done} in "
          f"{stopped.checkpoint}; resume with: {shlex.join(command)}")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _dispatch(args)
  except KeyboardInterrupt:
    # Ctrl-C outside a run's training loop (loading, compiling, a sweep):
    # nothing was saved, so no traceback and no resume hint.
    print(f"fedjax-priv: interrupted during {args.command}", file=sys.stderr)
    return 130


def _dispatch(args) -> int:
  if args.command == "data":
    return _data_prepare(args)
  try:
    config = config_lib.load(args.config, args.overrides)
  except config_lib.ConfigError as error:
    print(f"fedjax-priv: config error: {error}", file=sys.stderr)
    return 2
  _enable_compilation_cache()
  if args.command == "sweep":
    return _sweep(args, config)
  if args.command == "calibrate":
    return _calibrate(config)
  out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
  from fedjax_priv import runner  # Imports JAX; kept off the config-error path.
  from fedjax_priv.interrupts import Interrupted
  try:
    summary = runner.run(config, out, resume=args.resume,
                         progress=False if args.no_progress else None)
  except ValueError as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 2
  except Interrupted as stopped:
    print(_interrupted_line(stopped, args, out), file=sys.stderr, flush=True)
    return stopped.exit_status
  privacy = summary["privacy"]
  print(json.dumps({k: summary[k] for k in ("test_accuracy", "test_loss", "rounds",
                                            "wall_time_s", "compile_time_s")}, indent=2))
  for level in privacy["levels"].values():
    epsilon = level["epsilon"]  # "inf" (a string in JSON) when sigma = 0.
    epsilon = f"{epsilon:.3f}" if isinstance(epsilon, float) else epsilon
    print(f"privacy: ({epsilon}, {level['delta_total']:.3g})-DP per {level['unit']} "
          f"({level['neighbouring_relation']}), {privacy['accountant']} accountant, "
          f"noise multiplier {level['noise_multiplier']:.4g}")
  if privacy["stopped_by_budget"]:
    print(f"stopped after {summary['rounds']} of {summary['rounds_planned']} rounds: the next "
          f"round would exceed privacy.epsilon_budget = {privacy['epsilon_budget']}")
  print(f"wrote {out}/summary.json and {out}/metrics.jsonl")
  return 0


if __name__ == "__main__":
  sys.exit(main())
