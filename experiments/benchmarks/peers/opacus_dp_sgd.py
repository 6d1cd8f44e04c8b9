"""Opacus side of `vs_opacus.py`: DP-SGD of an MLP 784-256-10, reported as JSON lines.

Runs in its own virtual environment (torch CPU + opacus 1.6), started by
`experiments/benchmarks/vs_opacus.py`, which writes the data and the initial
weights to an .npz file. Protocol: after loading, the script prints one JSON
line (versions, threads); then for each line "MODE SEED" read from standard
input it trains once and prints one JSON line (per-epoch wall and CPU times in
seconds, test accuracy, ε). One process serves every run, so the caller can
interleave its own runs with these without paying torch's import each time.

What one run does: the textbook Opacus loop. A `DataLoader` of batch size b
over the training set, made private by
`PrivacyEngine(accountant="rdp").make_private(..., poisson_sampling=True)`,
which swaps in Poisson sampling at rate 1 / len(loader) = b / n and a
`DPOptimizer` that clips each example's gradient to L2 norm C, adds
N(0, sigma^2 C^2) to the sum and divides by b (add/remove-one-example DP).
`grad_sample_mode="hooks"` (Opacus's default) materialises per-example
gradients with module hooks; `"ghost"` uses ghost clipping through the
`DPLossFastGradientClipping` criterion that `make_private` returns, whose
`backward()` runs both backward passes.

Usage (what `vs_opacus.py` runs)
  printf 'ghost 0\nhooks 0\n' | .venv-opacus/bin/python peers/opacus_dp_sgd.py \
      --data DATA.npz --epochs 5 --batch 250 --lr 2.0 --clip 1.0 --sigma 1.0 \
      --delta 1e-5 --threads 1

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
  Li, Tramer, Liang, Hashimoto, "Large Language Models Can Be Strong
    Differentially Private Learners", ICLR 2022 (ghost clipping).
  Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in
    PyTorch", arXiv:2109.12298, 2021.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import opacus
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

MODES = ("ghost", "hooks")


def mlp(init: dict[str, np.ndarray]) -> nn.Module:
  """MLP 784-256-10 (ReLU) holding the given weights (flax layout: kernel [in, out])."""
  model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
  with torch.no_grad():
    for layer, name in ((model[1], "Dense_0"), (model[3], "Dense_1")):
      layer.weight.copy_(torch.from_numpy(init[f"{name}/kernel"].T.copy()))
      layer.bias.copy_(torch.from_numpy(init[f"{name}/bias"]))
  return model


def train(data: dict[str, np.ndarray], mode: str, seed: int, args) -> dict:
  """One private training run from the given initial weights."""
  torch.manual_seed(seed)  # Opacus's Poisson sampler and noise draw from the global generator.
  model = mlp(data)
  optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
  loader = DataLoader(TensorDataset(torch.from_numpy(data["x_train"]),
                                    torch.from_numpy(data["y_train"]).long()),
                      batch_size=args.batch)
  engine = PrivacyEngine(accountant="rdp")
  private = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                criterion=nn.CrossEntropyLoss(), noise_multiplier=args.sigma,
                                max_grad_norm=args.clip, poisson_sampling=True,
                                grad_sample_mode=mode)
  if mode == "ghost":
    model, optimizer, criterion, loader = private
  else:
    (model, optimizer, loader), criterion = private, nn.CrossEntropyLoss()
  epoch_s, epoch_cpu_s, steps = [], [], 0
  for _ in range(args.epochs):
    start, start_cpu = time.perf_counter(), time.process_time()
    for x, y in loader:
      optimizer.zero_grad()
      criterion(model(x), y).backward()
      optimizer.step()
      steps += 1
    epoch_s.append(time.perf_counter() - start)
    epoch_cpu_s.append(time.process_time() - start_cpu)
  model.eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(data["x_test"]))
  accuracy = float((logits.argmax(-1).numpy() == data["y_test"]).mean())
  return {"mode": mode, "seed": seed, "epoch_s": epoch_s, "epoch_cpu_s": epoch_cpu_s,
          "steps": steps, "sample_rate": 1 / len(loader), "accuracy": accuracy,
          "epsilon": float(engine.accountant.get_epsilon(delta=args.delta))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", required=True, help=".npz written by vs_opacus.py")
  parser.add_argument("--epochs", type=int, required=True)
  parser.add_argument("--batch", type=int, required=True)
  parser.add_argument("--lr", type=float, required=True)
  parser.add_argument("--clip", type=float, required=True)
  parser.add_argument("--sigma", type=float, required=True)
  parser.add_argument("--delta", type=float, required=True)
  parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: default")
  args = parser.parse_args()
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  with np.load(args.data) as archive:
    data = dict(archive)
  print(json.dumps({"torch": torch.__version__, "opacus": opacus.__version__,
                    "threads": torch.get_num_threads()}), flush=True)
  for line in sys.stdin:
    mode, seed = line.split()
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    print(json.dumps(train(data, mode, int(seed), args)), flush=True)


if __name__ == "__main__":
  main()
