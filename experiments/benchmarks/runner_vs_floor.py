"""The runner against a hand-written JAX floor that does the same work, in one process.

Each workload is run by the toolkit's runner path and by a floor written by
hand in plain JAX, timed interleaved (one call of each per repeat, order
alternating), compilation excluded:

  w1      user-level DP-FedAvg (McMahan et al. 2018) on scikit-learn's digits
          split i.i.d. over 100 clients; fixed-size cohorts of 20 accounted as
          Poisson (`privacy.fixed_as_poisson`, as `vs_pfl.py` and pfl do);
          MLP 64-128-10 (ReLU); S = 3 local SGD steps (lr 0.1) on shuffled
          batches of B = 6; each delta clipped to L2 norm C = 1; N(0, sigma^2 C^2),
          sigma = 1, added once to the cohort's sum, divided by the public cohort
          size 20; server SGD at lr 1; 200 rounds; epsilon 23.42 at delta 1e-5 (RDP).
  cnn     example-level DP-SGD inside clients (`privacy.unit = "example"`) on
          the same digits (8x8x1): the zoo's `cnn` (conv32-conv64-pool-dense128,
          53k params; patches + matmul convolutions on CPU), 100 clients, fixed
          cohorts of 10, S = 2 local DP-SGD steps (lr 0.5) on Poisson batches
          (expected size b = 12, rate b / n_i, truncated to the capacity the
          runner picks, 16), per-example clip 1, sigma 1, noise on every step's
          clipped sum divided by b; the server takes the clients' mean weighted
          by example count; 30 rounds (epsilon 55: a speed workload, not a
          privacy recommendation).
  emnist  the EMNIST-CNN round of `round_throughput.py --workload cnn` (for
          accelerators; `gpu_suite.sh` runs it): synthetic 28x28 images, 62
          classes, `cnn` (1.2M params), 2K clients, fixed cohorts of K for each
          K of --cohorts, S = 10 steps of B = 20, user-level DP-FedAvg as w1,
          the `chunked` backend (chunks of 64), float32 or bfloat16. Both
          sides run the same chunking. --emnist-image 12 and small --cohorts,
          --emnist-steps, --emnist-batch make a CPU rehearsal.

"Same work". Each floor, like the runner, keeps the padded population on the
device and runs every round inside one jitted `lax.scan` over rounds: it
samples the cohort (on the device: top-K of N uniforms; the runner draws the
same distribution on the host), gathers the cohort's examples, draws every
client's batches (a random permutation per client, cycled, as the runner's
"shuffle" batches; w1, emnist) or Poisson batches truncated to the same
capacity (cnn), trains locally with `lax.scan` over steps (plain steps written out
up to `UNROLLED_LOCAL_STEPS` of them, as the runner does) and `vmap` over
clients, masks the loss with the batch mask, zeroes a client whose update is
not finite (its weight in the sum is 0), clips (w1, emnist: the whole delta;
cnn: every example's gradient, with materialised per-example gradients,
`vmap(grad)`, where the runner uses ghost norms for the dense layers, so
that floor is not strict), sums the cohort with a dot product, adds
Gaussian noise (the toolkit's `fast_random.standard_normal`, bit-identical
to `jax.random.normal` and the fastest sampler here) and applies the server
step. The w1 floor writes the MLP by hand; the cnn and emnist floors call
the zoo model's `apply`. What the floors leave out: the
metrics (loss sums, example counts, delta norms, clipped fractions, update
norm, the non-finite count, batch overflow counts, and their copy to the
host), and the host's bookkeeping between blocks (privacy ledger, metric
files, evaluation, checkpoints).

Rows:
  runner        the block the runner runs (`runner._Trainer`, the
                `rounds_on_device` program with the population on the
                device): the host samples the cohorts and derives the round
                keys, one device call trains all rounds, the per-round
                metrics are copied to the host. Timed from sampling to
                metrics on the host; compile excluded (checked: none in the
                timed calls).
  runner.run    (w1, with --end-to-end) `runner.run` on the config, as the
                CLI runs it: its summary's `wall_time_s` (training without
                compilation, the runner's own measure).
  baseline      (with --baseline DIR) the runner block of the package in
                the checkout DIR, e.g. a worktree of the commit a change
                starts from: before and after timed in one process.
  floor         the hand-written program above.

Columns: rounds/s (min, median, max over repeats), each contender's speed
over the floor's (floor time / its time) from the calls of each repeat, by
wall time and by process CPU time (less disturbed by other jobs on a shared
machine), test accuracy, compile seconds; contenders take turns going
first. Both sides start from the same initial parameters (the runner's init
key); their cohorts, batches and noise are different draws, so the script
reports both accuracies (they should be close) instead of comparing
parameters.

Usage (from the repository root; PYTHONPATH=. imports this checkout):
  PYTHONPATH=. python experiments/benchmarks/runner_vs_floor.py            # w1, cnn; ~3 min
  PYTHONPATH=. python experiments/benchmarks/runner_vs_floor.py --workloads w1 --repeats 15
  git worktree add ../base BASE_COMMIT   # before/after in one process:
  PYTHONPATH=. python experiments/benchmarks/runner_vs_floor.py --workloads w1 --repeats 30 \
      --baseline ../base
  PYTHONPATH=. python experiments/benchmarks/runner_vs_floor.py --workloads emnist \
      --dtype bfloat16 --cohorts 16,64,256,1024,4096 --json runs/bench/floor_bf16.json
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_priv import runner
from fedjax_priv.algorithms.client_update import UNROLLED_LOCAL_STEPS
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.config import Config, from_dict
from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.packing import pad_population
from fedjax_priv.experiment import Experiment, RunSettings, assemble, build
from fedjax_priv.models import cnn
from fedjax_priv.privacy.aggregation import dp_mean
from fedjax_priv.privacy.fast_random import standard_normal
from fedjax_priv.simulation.participation import FixedSize


# --------------------------------------------------------------------------
# Workloads as configs: what `fedjax-priv run` would be given.


def w1_spec(rounds: int) -> dict[str, Any]:
  return {
      "data": {"num_clients": 100, "partition": "iid", "seed": 0},
      "model": {"name": "mlp", "hidden": [128]},
      "client": {"optimizer": "sgd", "learning_rate": 0.1, "local_steps": 3, "batch_size": 6},
      "server": {"optimizer": "sgd", "learning_rate": 1.0},
      "privacy": {"unit": "user", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
                  "accountant": "rdp", "fixed_as_poisson": True},
      "simulation": {"backend": "vmap", "rounds": rounds, "cohort_size": 20, "sampling": "fixed",
                     "seed": 0, "eval_every": rounds, "data_on_device": True, "log_to": []},
  }


def cnn_spec(rounds: int, cohort: int, steps: int, batch: int) -> dict[str, Any]:
  return {
      "data": {"num_clients": 100, "partition": "iid", "seed": 0},
      "model": {"name": "cnn"},
      "client": {"optimizer": "sgd", "learning_rate": 0.5, "local_steps": steps,
                 "batch_size": batch},
      "server": {"optimizer": "sgd", "learning_rate": 1.0},
      "privacy": {"unit": "example", "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
                  "accountant": "rdp"},
      "simulation": {"backend": "vmap", "rounds": rounds, "cohort_size": cohort,
                     "sampling": "fixed", "seed": 0, "eval_every": rounds,
                     "data_on_device": True, "log_to": []},
  }


def w1_config(rounds: int) -> Config:
  return from_dict(w1_spec(rounds))


class Library(NamedTuple):
  """What a runner block needs from a `fedjax_priv` package: this checkout's or a baseline's."""
  runner: Any
  server_init: Callable
  build_config: Callable  # spec dict -> Experiment


THIS = Library(runner, server_init, lambda spec: build(from_dict(spec)))


def import_baseline(checkout: Path) -> Library:
  """The `fedjax_priv` package of another checkout (e.g. a worktree of the base commit).

  For before/after timings in one process, interleaved: the package is
  copied to a temporary directory as `fedjax_priv_baseline`, its absolute
  imports renamed to match, and imported next to this checkout's.
  """
  source = checkout / "fedjax_priv"
  if not (source / "runner.py").is_file():
    raise SystemExit(f"--baseline {checkout}: no fedjax_priv/runner.py there")
  target = Path(tempfile.mkdtemp(prefix="runner_vs_floor_")) / "fedjax_priv_baseline"
  atexit.register(shutil.rmtree, target.parent, ignore_errors=True)
  shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
  for path in target.rglob("*.py"):
    path.write_text(re.sub(r"\bfedjax_priv\b", "fedjax_priv_baseline", path.read_text()))
  sys.path.insert(0, str(target.parent))
  module = lambda name: importlib.import_module(f"fedjax_priv_baseline.{name}")
  config, experiment = module("config"), module("experiment")
  return Library(module("runner"), module("algorithms.server").server_init,
                 lambda spec: experiment.build(config.from_dict(spec)))


def initial_state(exp: Experiment, dtype=jnp.float32, lib: Library = THIS):
  """The runner's round-0 server state (params in `dtype`) and its rounds key.

  The runner splits key(seed) into (init, rounds) keys; bfloat16 params are
  the float32 init cast, as `round_throughput.py` does.
  """
  init_key, rounds_key = jax.random.split(jax.random.key(exp.settings.seed))
  params = jax.tree.map(lambda p: p.astype(dtype), exp.model.init(init_key))
  return lib.server_init(params, exp.server_optimizer, exp.aggregator), rounds_key


# --------------------------------------------------------------------------
# The runner side.


def make_runner_block(exp: Experiment, dtype=jnp.float32, lib: Library = THIS
                      ) -> tuple[Callable[[], Any], float]:
  """`go()` runs all rounds as the runner's block loop does and returns the final params.

  Compiles (and runs once) before returning, so `go` times training only;
  also returns the compile time the runner's stopwatch measured. `lib`: the
  package whose runner runs (`exp` must come from its `build`).
  """
  runner = lib.runner
  trainer = runner._Trainer(exp)  # The runner's own data path, not a copy of it.
  if dtype != jnp.float32:  # The population as the program will hold it.
    trainer.population = trainer.population._replace(x=trainer.population.x.astype(dtype))
  rounds = exp.settings.rounds

  def go():
    state, rounds_key = initial_state(exp, dtype, lib)
    jax.block_until_ready(state)
    start, cpu = time.perf_counter(), time.process_time()
    with runner._stopwatch() as times:
      cohorts = [exp.sampler.sample(r) for r in range(rounds)]
      keys = _round_keys(runner, rounds_key, rounds)
      state, metrics = trainer.run(state, keys, cohorts)
      metrics = jax.device_get(metrics)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return state.params, elapsed, cpu, times["compile"]

  compile_s = go()[3]  # Compile.
  return go, compile_s


def _round_keys(runner, rounds_key, rounds: int):
  """The round keys fold_in(rounds_key, r), derived as the runner derives them."""
  if hasattr(runner, "round_keys"):
    return runner.round_keys(rounds_key, 0, rounds)
  # Runners before `round_keys` existed: one eager fold_in per round.
  return jnp.stack([jax.random.fold_in(rounds_key, r) for r in range(rounds)])


def run_end_to_end(config: Config) -> tuple[float, float, float]:
  """`runner.run` as the CLI runs it: (wall_time_s, compile_time_s, test accuracy)."""
  with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fixed_as_poisson warns by design.
    summary = runner.run(config, Path(out) / "run", progress=False)
  return summary["wall_time_s"], summary["compile_time_s"], summary["test_accuracy"]


# --------------------------------------------------------------------------
# The floors.


def _device_population(exp: Experiment, dtype=jnp.float32):
  population = pad_population(exp.train)
  return (jnp.asarray(population.x, dtype), jnp.asarray(population.y),
          jnp.asarray(population.num_examples))


def _hyperparameters(exp: Experiment) -> dict[str, float]:
  """The numbers a floor needs, from the config `build` was given."""
  cfg = exp.config
  return {"client_lr": cfg.client.learning_rate, "clip_norm": cfg.privacy.clip_norm,
          "noise_multiplier": exp.privacy.noise_multiplier,
          "server_lr": cfg.server.learning_rate}


def _sample_cohort(key, num_clients: int, cohort: int):
  """K distinct clients, uniformly: the K largest of N uniforms."""
  return jax.lax.top_k(jax.random.uniform(key, (num_clients,)), cohort)[1]


def _noise(key, tree, stddev):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [stddev * standard_normal(k, leaf.shape)
                                      for k, leaf in zip(keys, leaves)])


def _xent(logits, y):
  return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]


def make_user_dp_floor(exp: Experiment, apply: Callable | None = None,
                       chunk: int | None = None, dtype=jnp.float32,
                       hp: dict[str, float] | None = None) -> Callable:
  """`run(params, key) -> params`: all rounds of user-level DP-FedAvg in one jitted scan.

  `apply(params, x [B, ...]) -> logits`: the model (default `exp.model.apply`).
  `chunk`: vmap at most this many clients at a time and scan over the chunks
  (as the runner's `chunked` backend); None: the whole cohort in one vmap.
  """
  hp = hp or _hyperparameters(exp)
  rounds, cohort = exp.settings.rounds, int(exp.participation.expected_cohort_size)
  steps, batch = exp.batching.num_steps, exp.batching.batch_size
  lr, clip, sigma, server_lr = (hp["client_lr"], hp["clip_norm"], hp["noise_multiplier"],
                                hp["server_lr"])
  x_all, y_all, n_all = _device_population(exp, dtype)
  num_clients, max_examples = x_all.shape[:2]
  apply = apply or exp.model.apply
  groups = 1 if chunk is None or chunk >= cohort else -(-cohort // chunk)
  if cohort % groups:
    raise ValueError(f"cohort {cohort} must split into {groups} equal chunks")

  def loss(params, x, y, mask):
    return jnp.sum(_xent(apply(params, x), y) * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  def client(params, x, y, n, key):  # One client: draw its batches, S SGD steps, its delta.
    valid = jnp.arange(max_examples) < n
    order = jnp.argsort(jnp.where(valid, jax.random.uniform(key, (max_examples,)), 2.0))
    idx = order[jnp.arange(steps * batch) % jnp.maximum(n, 1)].reshape(steps, batch)
    mask = jnp.broadcast_to(n > 0, idx.shape).astype(jnp.float32)

    def step(p, inputs):
      g = jax.grad(loss)(p, *inputs)
      return jax.tree.map(lambda w, gw: w - (lr * gw).astype(w.dtype), p, g), None

    local, _ = jax.lax.scan(step, params, (x[idx], y[idx], mask),
                            unroll=steps <= UNROLLED_LOCAL_STEPS)
    return jax.tree.map(jnp.subtract, local, params)

  def clipped_sum(params, ids, keys):  # One group of clients: their clipped, summed deltas.
    deltas = jax.vmap(client, in_axes=(None, 0, 0, 0, 0))(
        params, x_all[ids], y_all[ids], n_all[ids], keys)
    size = ids.shape[0]
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(l.reshape(size, -1).astype(jnp.float32)), 1)
                         for l in jax.tree.leaves(deltas)))
    finite = jnp.isfinite(norms)  # A NaN or inf anywhere makes the norm non-finite.
    # Clip factor, and weight 0 for a non-finite client (where, not a product: 0 * NaN).
    weights = jnp.where(finite, jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12)), 0.0)
    deltas = jax.tree.map(lambda d: jnp.where(finite.reshape((-1,) + (1,) * (d.ndim - 1)),
                                              d, 0.0), deltas)
    return jax.tree.map(lambda d: jnp.tensordot(weights.astype(d.dtype), d, 1), deltas)

  def one_round(params, round_key):
    cohort_key, batch_key, noise_key = jax.random.split(round_key, 3)
    ids = _sample_cohort(cohort_key, num_clients, cohort)
    keys = jax.random.split(batch_key, cohort)
    if groups == 1:
      total = clipped_sum(params, ids, keys)
    else:
      shaped = (ids.reshape(groups, -1), keys.reshape(groups, -1))
      total = jax.lax.scan(
          lambda acc, group: (jax.tree.map(jnp.add, acc, clipped_sum(params, *group)), None),
          jax.tree.map(jnp.zeros_like, params), shaped)[0]
    noisy = jax.tree.map(lambda t, n: t + n.astype(t.dtype), total,
                         _noise(noise_key, total, sigma * clip))
    return jax.tree.map(lambda p, u: p + (server_lr / cohort * u).astype(p.dtype), params,
                        noisy), None

  def run(params, key):
    return jax.lax.scan(lambda p, r: one_round(p, jax.random.fold_in(key, r)), params,
                        jnp.arange(rounds))[0]

  return jax.jit(run)


def make_w1_floor(exp: Experiment) -> Callable:
  """The user-level floor with the MLP written by hand (x [B, 8, 8, 1] -> logits [B, 10])."""
  layers = sorted(exp.model.init(jax.random.key(0)), key=lambda name: int(name.split("_")[-1]))

  def mlp(params, x):
    x = x.reshape(x.shape[0], -1)
    for i, name in enumerate(layers):
      x = x @ params[name]["kernel"] + params[name]["bias"]
      if i < len(layers) - 1:
        x = jax.nn.relu(x)
    return x

  return make_user_dp_floor(exp, mlp)


def make_cnn_floor(exp: Experiment) -> Callable:
  """`run(params, key) -> params`: all rounds of the CNN workload in one jitted scan."""
  cfg = exp.config
  rounds, cohort = cfg.simulation.rounds, cfg.simulation.cohort_size
  steps, lr = cfg.client.local_steps, cfg.client.learning_rate
  capacity, b = exp.batching.batch_size, exp.batching.expected_batch_size
  clip, sigma = cfg.privacy.clip_norm, exp.privacy.noise_multiplier
  server_lr = cfg.server.learning_rate
  x_all, y_all, n_all = _device_population(exp)
  num_clients, max_examples = x_all.shape[:2]
  apply = exp.model.apply

  def example_loss(params, x, y):  # One example.
    return _xent(apply(params, x[None]), y[None])[0]

  def dp_step(params, x, y, mask, key):
    grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, x, y)
    norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(capacity, -1)), 1)
                         for g in jax.tree.leaves(grads)))
    factors = mask * jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12))
    summed = jax.tree.map(lambda g: jnp.tensordot(factors, g, 1), grads)
    noisy = jax.tree.map(jnp.add, summed, _noise(key, summed, sigma * clip))
    return jax.tree.map(lambda p, g: p - lr * g / b, params, noisy)

  def client(params, x, y, n, key):
    q = jnp.minimum(1.0, b / jnp.maximum(n, 1))
    valid = jnp.arange(max_examples) < n
    batch_key, noise_key = jax.random.split(key)

    def draw(step_key):  # Poisson batch, truncated to the capacity (as the runner's).
      u = jax.random.uniform(step_key, (max_examples,))
      selected = valid & (u < q)
      _, idx = jax.lax.top_k(-jnp.where(selected, u, 2.0), capacity)
      return idx, selected[idx].astype(jnp.float32)

    idx, mask = jax.vmap(draw)(jax.random.split(batch_key, steps))

    def step(p, inputs):
      xs, ys, ms, k = inputs
      # Unsampled slots hold real examples (inert through the mask); zero them
      # anyway as the runner does, so a NaN in one could not reach the sum.
      xs = jnp.where(ms[:, None, None, None] > 0, xs, 0.0)
      return dp_step(p, xs, ys, ms, k), None

    local, _ = jax.lax.scan(step, params, (x[idx], y[idx], mask,
                                           jax.random.split(noise_key, steps)))
    return jax.tree.map(jnp.subtract, local, params)

  def one_round(params, round_key):
    cohort_key, client_key = jax.random.split(round_key)
    ids = _sample_cohort(cohort_key, num_clients, cohort)
    n = n_all[ids]
    deltas = jax.vmap(client, in_axes=(None, 0, 0, 0, 0))(
        params, x_all[ids], y_all[ids], n, jax.random.split(client_key, cohort))
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(l.reshape(cohort, -1)), 1)
                                for l in jax.tree.leaves(deltas)]), 0)
    weights = jnp.where(finite, n.astype(jnp.float32), 0.0)
    deltas = jax.tree.map(lambda d: jnp.where(finite.reshape((-1,) + (1,) * (d.ndim - 1)),
                                              d, 0.0), deltas)
    total = jax.tree.map(lambda d: jnp.tensordot(weights, d, 1), deltas)
    scale = server_lr / jnp.maximum(jnp.sum(weights), 1e-12)
    return jax.tree.map(lambda p, u: p + scale * u, params, total), None

  def run(params, key):
    return jax.lax.scan(lambda p, r: one_round(p, jax.random.fold_in(key, r)), params,
                        jnp.arange(rounds))[0]

  return jax.jit(run)


def make_floor_call(exp: Experiment, run: Callable, dtype=jnp.float32
                    ) -> tuple[Callable[[], Any], float]:
  """`go()` runs the jitted floor `run` from the runner's initial params; and its compile time."""
  state, rounds_key = initial_state(exp, dtype)
  start = time.perf_counter()
  compiled = run.lower(state.params, rounds_key).compile()
  compile_s = time.perf_counter() - start

  def go():
    params = initial_state(exp, dtype)[0].params
    jax.block_until_ready(params)
    start, cpu = time.perf_counter(), time.process_time()
    params = jax.block_until_ready(compiled(params, rounds_key))
    return params, time.perf_counter() - start, time.process_time() - cpu, 0.0

  go()
  return go, compile_s


# --------------------------------------------------------------------------
# Timing.


def time_workload(name: str, exp: Experiment, floor: Callable, repeats: int,
                  end_to_end: Config | None = None, dtype=jnp.float32,
                  baseline: tuple[Experiment, Library] | None = None) -> dict[str, Any]:
  """Times the runner's block and the jitted `floor` interleaved, `repeats` times each.

  `baseline`: (its experiment, its package) from `import_baseline`; its
  runner block is a third contender, in the same rotation.
  """
  rounds = exp.settings.rounds
  runner_go, runner_compile = make_runner_block(exp, dtype)
  floor_go, floor_compile = make_floor_call(exp, floor, dtype)
  contenders = {"runner": runner_go, "floor": floor_go}
  compile_s = {"runner": runner_compile, "floor": floor_compile}
  if baseline is not None:
    contenders["baseline"], compile_s["baseline"] = make_runner_block(baseline[0], dtype,
                                                                      baseline[1])
  evaluator = runner.make_evaluator(exp)
  times = {label: [] for label in contenders}
  cpu_times = {label: [] for label in contenders}
  accuracy = {label: [] for label in contenders}
  loads = []
  if end_to_end is not None:
    times["runner.run"], accuracy["runner.run"] = [], []
  for repeat in range(repeats):
    labels = list(contenders)
    shift = repeat % len(labels)  # Each contender runs first, second, ... in turn.
    for label in labels[shift:] + labels[:shift]:
      params, seconds, cpu, compiled = contenders[label]()
      if compiled > 0.05:
        raise RuntimeError(f"{name}/{label}: {compiled:.2f} s of compilation in a timed call")
      times[label].append(seconds)
      cpu_times[label].append(cpu)
      params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
      accuracy[label].append(float(evaluator(params)[0]))
    if end_to_end is not None:
      wall, _, acc = run_end_to_end(end_to_end)
      times["runner.run"].append(wall)
      accuracy["runner.run"].append(float(acc))
    loads.append(os.getloadavg()[0])
    line = ", ".join(f"{label} {rounds / times[label][-1]:.1f}" for label in contenders)
    print(f"  {name} repeat {repeat + 1}/{repeats}: rounds/s {line}; runner/floor "
          f"{times['floor'][-1] / times['runner'][-1]:.3f} (CPU time "
          f"{cpu_times['floor'][-1] / cpu_times['runner'][-1]:.3f}); load {loads[-1]:.1f}",
          flush=True)
  over_floor = lambda t, label: [f / x for f, x in zip(t["floor"], t[label])]
  ratios = {label: over_floor(times, label) for label in times if label != "floor"}
  cpu_ratios = {label: over_floor(cpu_times, label) for label in cpu_times if label != "floor"}
  print(f"  {name}: compile s, " + ", ".join(f"{label} {s:.2f}" for label, s in compile_s.items())
        + " (runners: their stopwatch; floor: lower + compile)", flush=True)
  result = {"workload": name, "rounds": rounds, "times_s": times, "cpu_times_s": cpu_times,
            "accuracy": accuracy, "ratios_over_floor": ratios, "cpu_ratios_over_floor": cpu_ratios,
            "compile_s": compile_s, "load_average_1min": loads}
  if baseline is not None:
    speedup = [b / r for b, r in zip(times["baseline"], times["runner"])]
    cpu_speedup = [b / r for b, r in zip(cpu_times["baseline"], cpu_times["runner"])]
    result["speedup_over_baseline"] = {"wall": speedup, "cpu": cpu_speedup}
    print(f"  {name}: runner speed / baseline speed, median (range): wall "
          f"{np.median(speedup):.3f} ({min(speedup):.3f}-{max(speedup):.3f}), CPU time "
          f"{np.median(cpu_speedup):.3f} ({min(cpu_speedup):.3f}-{max(cpu_speedup):.3f})",
          flush=True)
  return result


def table(results: list[dict[str, Any]]) -> str:
  lines = ["| workload | contender | rounds/s min | rounds/s median | rounds/s max | "
           "speed / floor's, wall (median of per-repeat ratios) | wall ratio min-max | "
           "speed / floor's, CPU time (median) | CPU ratio min-max | test acc (mean) | "
           "compile s | n |",
           "|---|---|---:|---:|---:|---:|---|---:|---|---:|---:|---:|"]
  for res in results:
    for label, values in res["times_s"].items():
      speeds = sorted(res["rounds"] / t for t in values)
      ratio, spread, cpu_ratio, cpu_spread = "1", "-", "1", "-"
      if label != "floor":
        ratios = res["ratios_over_floor"][label]
        ratio = f"{np.median(ratios):.3f}"
        ratio = f"**{ratio}**" if label == "runner" else ratio
        spread = f"{min(ratios):.3f}-{max(ratios):.3f}"
        cpu = res["cpu_ratios_over_floor"].get(label)
        if cpu:
          cpu_ratio, cpu_spread = f"{np.median(cpu):.3f}", f"{min(cpu):.3f}-{max(cpu):.3f}"
        else:
          cpu_ratio = "-"
      lines.append(f"| {res['workload']} | {label} | {speeds[0]:.1f} | {np.median(speeds):.1f} | "
                   f"{speeds[-1]:.1f} | {ratio} | {spread} | {cpu_ratio} | {cpu_spread} | "
                   f"{np.mean(res['accuracy'][label]):.4f} | "
                   f"{res['compile_s'].get(label, float('nan')):.2f} | {len(values)} |")
  return "\n".join(lines)


def emnist_experiment(cohort: int, rounds: int, steps: int, batch: int, image: int,
                      chunk: int) -> Experiment:
  """The EMNIST CNN round of `round_throughput.py --workload cnn` as a runnable experiment.

  2K synthetic clients of 32 uniform random `image`x`image` images with
  uniform labels over 62 classes; `cnn` (conv32-conv64-pool-dense128-dense62,
  1.2M params at 28x28); fixed cohorts of K; S local SGD steps (lr 0.1) on
  batches of B; user-level DP-FedAvg (clip 1, sigma 1, mean over K); server SGD
  at lr 1; the `chunked` backend with chunks of `chunk` clients.
  """
  num_clients, per_client = 2 * cohort, 32
  rng = np.random.default_rng(0)
  x = rng.random((num_clients * per_client, image, image, 1), dtype=np.float32)
  y = rng.integers(0, 62, num_clients * per_client).astype(np.int32)
  train = FederatedDataset.from_partition(
      x, y, np.split(np.arange(num_clients * per_client), num_clients))
  participation = FixedSize(num_clients, cohort)
  settings = RunSettings(rounds, seed=0, eval_every=rounds, backend="chunked",
                         client_chunk_size=chunk, log_to=())
  return assemble(cnn((image, image, 1), 62), train, (x[:256], y[:256]),
                  dp_mean(1.0, 1.0, participation.expected_cohort_size), participation,
                  settings, client_optimizer=optax.sgd(0.1), local_steps=steps,
                  batch_size=batch)


EMNIST_HP = {"client_lr": 0.1, "clip_norm": 1.0, "noise_multiplier": 1.0, "server_lr": 1.0}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workloads", default="w1,cnn", help="comma-separated: w1, cnn, emnist")
  parser.add_argument("--repeats", type=int, default=15, help="timed calls per contender")
  parser.add_argument("--cnn-repeats", type=int, default=3, help="for cnn (its calls are slow)")
  parser.add_argument("--rounds", type=int, default=200, help="W1 rounds")
  parser.add_argument("--cnn-rounds", type=int, default=30)
  parser.add_argument("--cnn-cohort", type=int, default=10)
  parser.add_argument("--cnn-steps", type=int, default=2)
  parser.add_argument("--cnn-batch", type=int, default=12, help="expected DP-SGD batch b")
  parser.add_argument("--cohorts", default="16,64,256,1024,4096",
                      help="emnist: cohort sizes K")
  parser.add_argument("--emnist-rounds", type=int, default=3)
  parser.add_argument("--emnist-steps", type=int, default=10)
  parser.add_argument("--emnist-batch", type=int, default=20)
  parser.add_argument("--emnist-image", type=int, default=28,
                      help="image side; e.g. 12 for a CPU rehearsal")
  parser.add_argument("--chunk", type=int, default=64, help="emnist: clients per chunk")
  parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                      help="emnist: params and inputs")
  parser.add_argument("--end-to-end", action="store_true",
                      help="W1: also time runner.run each repeat (compiles each time)")
  parser.add_argument("--baseline", type=Path,
                      help="a checkout of another commit (e.g. a git worktree of the base): "
                           "its runner block is timed too, in the same process and rotation")
  parser.add_argument("--json", type=Path, help="write every number here")
  args = parser.parse_args()
  baseline = None if args.baseline is None else import_baseline(args.baseline.resolve())

  print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"load {os.getloadavg()}", flush=True)
  if baseline is not None:
    print(f"baseline: {args.baseline} (imported as fedjax_priv_baseline)", flush=True)
  results = []
  for name in args.workloads.split(","):
    runs = []  # (label, experiment, floor, end-to-end config, dtype, config spec)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # fixed_as_poisson warns by design.
      if name == "w1":
        spec = w1_spec(args.rounds)
        config = from_dict(spec)
        exp = build(config)
        runs.append(("w1", exp, make_w1_floor(exp), config if args.end_to_end else None,
                     jnp.float32, spec))
      elif name == "cnn":
        spec = cnn_spec(args.cnn_rounds, args.cnn_cohort, args.cnn_steps, args.cnn_batch)
        exp = build(from_dict(spec))
        runs.append(("cnn", exp, make_cnn_floor(exp), None, jnp.float32, spec))
      elif name == "emnist":
        if baseline is not None:
          raise SystemExit("--baseline times the config workloads (w1, cnn), not emnist")
        dtype = DTYPES[args.dtype]
        for k in (int(v) for v in args.cohorts.split(",")):
          exp = emnist_experiment(k, args.emnist_rounds, args.emnist_steps, args.emnist_batch,
                                  args.emnist_image, args.chunk)
          runs.append((f"emnist K={k} {args.dtype}", exp,
                       make_user_dp_floor(exp, chunk=args.chunk, dtype=dtype, hp=EMNIST_HP),
                       None, dtype, None))
      else:
        raise SystemExit(f"unknown workload {name!r}")
    for label, exp, floor, end_to_end, dtype, spec in runs:
      epsilon = _epsilon(exp)
      print(f"{label}: {exp.train.num_clients} clients, cohort "
            f"{int(exp.participation.expected_cohort_size)}, {exp.settings.rounds} rounds, "
            f"S={exp.batching.num_steps} B={exp.batching.batch_size} ({exp.batching.mode}), "
            f"backend {exp.settings.backend}, params "
            f"{sum(l.size for l in jax.tree.leaves(exp.model.init(jax.random.key(0))))}, "
            f"{exp.privacy.unit}-level, epsilon {epsilon:.2f} at delta {exp.settings.delta}",
            flush=True)
      try:
        repeats = args.cnn_repeats if label == "cnn" else args.repeats
        with warnings.catch_warnings():
          warnings.simplefilter("ignore")
          base = None if baseline is None else (baseline.build_config(spec), baseline)
        res = time_workload(label, exp, floor, repeats, end_to_end, dtype, base)
      except Exception as error:  # An out-of-memory cohort must not end a GPU run.
        if "RESOURCE_EXHAUSTED" not in str(error) and "out of memory" not in str(error).lower():
          raise
        print(f"  {label}: out of memory ({str(error).splitlines()[0][:200]})", flush=True)
        continue
      res["epsilon"] = epsilon
      results.append(res)
  print()
  print(table(results))
  print(f"\nload after: {os.getloadavg()}")
  if args.json:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                     "device": str(jax.devices()[0].device_kind),
                                     "results": results}, indent=1))


def _epsilon(exp: Experiment) -> float:
  """The run's epsilon, from a ledger of its planned rounds (as the runner's)."""
  from fedjax_priv.privacy.accounting import PrivacyLedger
  ledger = PrivacyLedger()
  for r in range(exp.settings.rounds):
    ledger.record(exp.privacy.event_at(r), exp.privacy.overflow_probability_per_round)
  return ledger.epsilon(exp.settings.delta, exp.settings.accountant)[0]


if __name__ == "__main__":
  main()
