"""The PyTorch per-client loop: the baseline a researcher would write without this toolkit.

What is timed
  The same DP-FedAvg round as `round_throughput.py --workload cnn`: K clients,
  each running S = 10 local SGD steps (learning rate 0.1) on batches of B = 20
  synthetic 28x28 images with 62 random labels through the EMNIST CNN of Reddi
  et al. 2021 (conv32-conv64-maxpool-dense128-dense62, VALID padding, no
  dropout); each client's delta is clipped to L2 norm 1, the clipped deltas are
  summed, N(0, 1) noise (multiplier 1 x clip 1) is added once and the sum is
  divided by K; the server applies the mean delta (SGD, learning rate 1).
  Clients run one after the other in a Python loop, as in fedjax, Flower or a
  hand-written PyTorch simulation; each client's steps use
  `torch.func.functional_call` on its own parameter tensors, so no module is
  copied per client.

How
  Data lives on the device before timing ([K, S, B, 1, 28, 28]). One warm-up
  round, then the median of --repeats timed rounds, each ending in
  `torch.cuda.synchronize()` on a GPU. examples/s = K * S * B / round time.

Usage
  python experiments/benchmarks/torch_client_loop.py [--cohorts 64] [--repeats 5]
      [--dtype float32|bfloat16] [--device cuda|cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

LOCAL_STEPS = 10
BATCH_SIZE = 20
CLIENT_LEARNING_RATE = 0.1
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
NUM_CLASSES = 62


def emnist_cnn() -> nn.Module:
  """Reddi et al. 2021's EMNIST CNN, shaped like `fedjax_priv.models.cnn((28, 28, 1), 62)`."""
  return nn.Sequential(
      nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(12 * 12 * 64, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))


def make_round(model: nn.Module):
  """`round(global_params, x [K,S,B,1,28,28], y [K,S,B], generator) -> new params`."""
  loss_fn = nn.CrossEntropyLoss()

  def local_training(global_params, x, y):
    params = {name: p.detach().clone().requires_grad_(True) for name, p in global_params.items()}
    for step in range(LOCAL_STEPS):
      logits = torch.func.functional_call(model, params, (x[step],))
      grads = torch.autograd.grad(loss_fn(logits.float(), y[step]), list(params.values()))
      with torch.no_grad():
        params = {name: (p - CLIENT_LEARNING_RATE * g).requires_grad_(True)
                  for (name, p), g in zip(params.items(), grads)}
    return {name: (p.detach() - global_params[name]) for name, p in params.items()}

  def one_round(global_params, x, y, generator):
    total = {name: torch.zeros_like(p) for name, p in global_params.items()}
    for k in range(x.shape[0]):
      delta = local_training(global_params, x[k], y[k])
      norm = torch.sqrt(sum(torch.sum(d.float() ** 2) for d in delta.values()))
      factor = torch.clamp(CLIP_NORM / (norm + 1e-12), max=1.0)
      for name, d in delta.items():
        total[name] += d * factor.to(d.dtype)
    cohort = x.shape[0]
    return {name: p + (total[name] + NOISE_MULTIPLIER * CLIP_NORM * torch.randn(
        p.shape, generator=generator, device=p.device, dtype=p.dtype)) / cohort
            for name, p in global_params.items()}

  return one_round


def synchronize(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def measure(k: int, args: argparse.Namespace, device: torch.device) -> dict:
  dtype = getattr(torch, args.dtype)
  torch.manual_seed(args.seed)
  model = emnist_cnn().to(device=device, dtype=dtype)
  params = {name: p.detach() for name, p in model.named_parameters()}
  x = torch.rand(k, LOCAL_STEPS, BATCH_SIZE, 1, 28, 28, device=device, dtype=dtype)
  y = torch.randint(0, NUM_CLASSES, (k, LOCAL_STEPS, BATCH_SIZE), device=device)
  generator = torch.Generator(device=device).manual_seed(args.seed)
  one_round = make_round(model)
  params = one_round(params, x, y, generator)  # Warm-up: cuDNN autotuning, allocator.
  synchronize(device)
  times = []
  for _ in range(args.repeats):
    tic = time.perf_counter()
    params = one_round(params, x, y, generator)
    synchronize(device)
    times.append(time.perf_counter() - tic)
  round_s = statistics.median(times)
  return {"framework": "torch", "backend": "per-client loop", "cohort": k, "dtype": args.dtype,
          "device": str(device), "round_s": round_s, "repeats": args.repeats,
          "examples_per_s": k * LOCAL_STEPS * BATCH_SIZE / round_s}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cohorts", default="64", help="comma-separated cohort sizes K")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", type=Path, help="write the results to this file")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  device = torch.device(args.device)
  name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  print(f"torch {torch.__version__} on {name}; dtype {args.dtype}; "
        f"S={LOCAL_STEPS} local steps of B={BATCH_SIZE}")
  results = []
  for k in sorted({int(c) for c in args.cohorts.split(",")}):
    result = measure(k, args, device)
    results.append(result)
    print(f"K={k:5d}  round {result['round_s'] * 1e3:10.1f} ms  "
          f"{result['examples_per_s']:12.0f} examples/s  (median of {args.repeats})", flush=True)
  if args.json:
    args.json.write_text(json.dumps({"torch": torch.__version__, "device": name,
                                     "results": results}, indent=1))


if __name__ == "__main__":
  main()
