"""User-level DP-FedAvg: this toolkit against Apple's pfl 0.6 and a fedjax-style client loop.

One workload, run by every contender on this machine, one after the other:
scikit-learn's digits split i.i.d. over 100 clients, a ReLU MLP, 20 clients per
round drawn without replacement (the same cohorts for everyone), 200 rounds;
each client takes S local SGD steps on batches of B drawn by cycling through a
fresh permutation of its examples; every model delta is clipped to L2 norm C,
the cohort's sum gets N(0, sigma^2 C^2) noise once and is divided by the cohort
size; the server applies SGD at learning rate 1 (McMahan et al. 2018). All
start from the same initial parameters (exported from the toolkit's init).

Contenders:
  fedjax_priv scan       `runner.run` on the config: the population on the device,
                         all rounds in one jitted `lax.scan` (`rounds_on_device`).
  fedjax_priv per-round  the same pieces (`experiment.build`), one jitted call per
                         round (gather + batches + vmapped clients + DP mean).
  fedjax-style loop      hand-written stand-in for fedjax 0.0.17 (which needs jax
                         0.5.3): a jitted single-client update, a Python loop over
                         the cohort, clipping, sum and noise in numpy on the host.
  pfl 0.6 (PyTorch)      `peers/pfl_dp_fedavg.py` in its own virtual environment:
                         pfl's FederatedAveraging, SimulatedBackend, GaussianMechanism
                         in CentrallyAppliedPrivacyMechanism and its accountants.

Privacy. The cohorts have a fixed size. pfl accounts every round as a
Poisson-sampled Gaussian with q = K / N (add/remove one user); for the
epsilon-to-epsilon comparison the toolkit's config sets
`privacy.fixed_as_poisson`, the same approximation (its ledger then holds
`PoissonSampled(q, Gaussian(sigma))` per round). The rigorous epsilon for fixed
cohorts (sampling without replacement, replace-one, sensitivity 2C) is printed
beside it, by RDP and by the tight PLD accounting of fixed-size cohorts. The
fedjax-style loop has no accountant; it runs the same mechanism, so its row
repeats the toolkit's ledger.

Timing. JAX rows report compile time (ahead-of-time lower + compile, or what the
runner measures) apart from the training wall time; rounds/s is rounds / wall.
The scan's wall time is the median of `--scan-repeats` `runner.run` calls (all
listed in its row): one call lasts ~0.2 s on W1, and the first of a process
also pays XLA:CPU's one-time warm-up (~35-55 ms, mostly oneDNN generating
the GEMM kernels of the dots XNNPACK does not take). pfl's 200 rounds take
~6 s, one run.
Evaluation on the test set happens after the timed part for every contender.
Ratios are this toolkit's rounds/s over each peer's, measured in this one run.

Usage:
  .venv/bin/python experiments/benchmarks/vs_pfl.py                 # ~3-6 min on 2 cores
  .venv/bin/python experiments/benchmarks/vs_pfl.py --hidden 64 --markdown out.md

The first run creates experiments/benchmarks/.venv-pfl (git-ignored) with
`pip install "pfl[pytorch]==0.6.*" torch==2.13.0`.

References:
  McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
  Recurrent Language Models" (DP-FedAvg). Granqvist et al. 2024, "pfl-research:
  simulation framework for accelerating research in Private Federated Learning".
  Ro, Suresh & Wu 2021, "FedJAX: Federated learning simulation with JAX".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv import checkpoint, experiment, runner
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.config import Config, from_dict
from fedjax_priv.data.device import gather_cohort
from fedjax_priv.data.packing import pad_population
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.accounting import PrivacyLedger
from fedjax_priv.simulation.program import round_from_cohort

HERE = Path(__file__).resolve().parent
PFL_VENV = HERE / ".venv-pfl"
PFL_REQUIREMENTS = ("pfl[pytorch]==0.6.*", "torch==2.13.0")
CACHE = HERE / ".cache"


def make_config(args: argparse.Namespace, seed: int) -> Config:
  """The workload as a toolkit config; `seed` fixes split, partition, init, cohorts and noise."""
  return from_dict({
      "data": {"num_clients": args.clients, "partition": "iid", "seed": seed},
      "model": {"name": "mlp", "hidden": list(args.hidden)},
      "client": {"optimizer": "sgd", "learning_rate": args.client_lr,
                 "local_steps": args.local_steps, "batch_size": args.batch_size},
      "server": {"optimizer": "sgd", "learning_rate": 1.0},
      "privacy": {"unit": "user", "clip_norm": args.clip_norm,
                  "noise_multiplier": args.noise_multiplier, "delta": args.delta,
                  "accountant": "rdp", "fixed_as_poisson": True},
      "simulation": {"backend": "vmap", "rounds": args.rounds, "cohort_size": args.cohort,
                     "sampling": "fixed", "seed": seed, "eval_every": args.rounds,
                     "data_on_device": True},
  })


def initial_params(exp: experiment.Experiment):
  """The runner's initial parameters: it splits key(seed) into (init, rounds)."""
  init_key, rounds_key = jax.random.split(jax.random.key(exp.config.simulation.seed))
  return exp.model.init(init_key), rounds_key


def export_workload(exp: experiment.Experiment, params, cohorts: np.ndarray, path: Path) -> None:
  """Writes everything a peer needs to run the identical experiment, as plain arrays."""
  cfg = exp.config
  layers = sorted(params, key=lambda name: int(name.split("_")[-1]))  # Dense_0, Dense_1, ...
  arrays = {f"{kind}_{i}": np.asarray(params[name][kind])
            for i, name in enumerate(layers) for kind in ("kernel", "bias")}
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path,
           x=exp.train.x.reshape(len(exp.train.y), -1).astype(np.float32), y=exp.train.y,
           offsets=exp.train.offsets,
           x_test=exp.x_test.reshape(len(exp.y_test), -1).astype(np.float32), y_test=exp.y_test,
           cohorts=cohorts, num_clients=exp.train.num_clients, num_layers=len(layers),
           local_steps=cfg.client.local_steps, batch_size=cfg.client.batch_size,
           client_learning_rate=cfg.client.learning_rate,
           server_learning_rate=cfg.server.learning_rate,
           clip_norm=cfg.privacy.clip_norm, noise_multiplier=exp.privacy.noise_multiplier,
           delta=cfg.privacy.delta, **arrays)


def ledger_epsilons(exp: experiment.Experiment) -> dict[str, float]:
  """Epsilon of the run's ledger (RDP and PLD) and the rigorous fixed-cohort epsilon (RDP, PLD)."""
  cfg, rounds = exp.config, exp.config.simulation.rounds
  ledger = PrivacyLedger()
  for _ in range(rounds):
    ledger.record(exp.privacy.round_event, exp.privacy.overflow_probability_per_round)
  rigorous = accounting.user_level_event(exp.privacy.noise_multiplier, rounds, "fixed",
                                         exp.train.num_clients, cfg.simulation.cohort_size)
  return {"epsilon_rdp": ledger.epsilon(cfg.privacy.delta, "rdp")[0],
          "epsilon_pld": ledger.epsilon(cfg.privacy.delta, "pld")[0],
          "epsilon_fixed_rdp": accounting.compute_epsilon(rigorous, cfg.privacy.delta, "rdp"),
          "epsilon_fixed_pld": accounting.compute_epsilon(rigorous, cfg.privacy.delta, "pld")}


def run_scan(config: Config, out: Path, repeats: int) -> dict[str, Any]:
  """The runner end to end: one block of all rounds (eval_every = rounds) in one lax.scan.

  `runner.run` is called `repeats` times (each builds, compiles and trains
  afresh, with the same result); its training wall time is their median,
  since one 200-round block lasts ~0.2 s, where a single hiccup of the
  machine moves it by half.
  """
  summaries = []
  for _ in range(repeats):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # fixed_as_poisson warns by design; the report says it.
      summaries.append(runner.run(config, out, progress=False, overwrite=True))
  if len({summary["test_accuracy"] for summary in summaries}) != 1:
    raise RuntimeError("repeated runner.run calls of one config disagree")
  walls = [summary["wall_time_s"] for summary in summaries]
  first = summaries[0]
  return {"wall_time_s": float(np.median(walls)), "wall_times_s": walls,
          "compile_time_s": first["compile_time_s"], "test_accuracy": first["test_accuracy"],
          "epsilon_rdp": first["privacy"]["epsilon"]}


def run_per_round(exp: experiment.Experiment, cohorts: np.ndarray) -> dict[str, Any]:
  """One jitted call per round: gather the cohort on device, draw batches, train, DP mean."""
  params, rounds_key = initial_params(exp)
  state = server_init(params, exp.server_optimizer, exp.aggregator)
  population = jax.device_put(pad_population(exp.train))
  one_round = round_from_cohort(exp.round_fn, exp.batching)

  def step(state, population, indices, mask, key):
    return one_round(state, gather_cohort(population, indices, mask), key)

  masks = np.ones(cohorts.shape, np.float32)
  keys = [jax.random.fold_in(rounds_key, r) for r in range(len(cohorts))]  # as the runner
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, population, cohorts[0], masks[0],
                                                   keys[0]).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for r in range(len(cohorts)):
    state, _ = compiled(state, population, cohorts[r], masks[r], keys[r])
  jax.block_until_ready(state)
  wall = time.perf_counter() - start
  accuracy, _ = runner.make_evaluator(exp)(state.params)
  return {"wall_time_s": wall, "compile_time_s": compile_s, "test_accuracy": float(accuracy),
          "params": state.params}


def run_fedjax_style(exp: experiment.Experiment, cohorts: np.ndarray, seed: int) -> dict[str, Any]:
  """fedjax-style: jitted single-client update, Python loop over clients, numpy DP mean on host."""
  cfg = exp.config
  steps, batch = cfg.client.local_steps, cfg.client.batch_size
  clip, sigma = cfg.privacy.clip_norm, exp.privacy.noise_multiplier
  params, _ = initial_params(exp)
  params = jax.tree.map(np.asarray, params)
  x, y, offsets = exp.train.x, exp.train.y, exp.train.offsets
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  ones = np.ones((steps, batch), np.float32)

  def client_batches(client: int):
    n = int(offsets[client + 1] - offsets[client])
    order = offsets[client] + rng.permutation(n)[np.arange(steps * batch) % n]
    return (x[order].reshape(steps, batch, *x.shape[1:]).astype(np.float32),
            y[order].reshape(steps, batch))

  xb, yb = client_batches(0)
  start = time.perf_counter()
  client_update = jax.jit(exp.client_update).lower(params, xb, yb, ones, key).compile()
  compile_s = time.perf_counter() - start

  start = time.perf_counter()
  for r, cohort in enumerate(cohorts):
    total = jax.tree.map(np.zeros_like, params)
    for slot, client in enumerate(cohort):
      xb, yb = client_batches(int(client))
      client_key = jax.random.fold_in(key, r * len(cohort) + slot)
      delta, _ = client_update(params, xb, yb, ones, client_key)
      delta = jax.device_get(delta)
      norm = math.sqrt(sum(float(np.sum(np.square(leaf))) for leaf in jax.tree.leaves(delta)))
      factor = min(1.0, clip / max(norm, 1e-12))
      total = jax.tree.map(lambda t, d: t + factor * d, total, delta)
    params = jax.tree.map(
        lambda p, t: p + (t + rng.normal(0.0, sigma * clip, t.shape).astype(t.dtype)) / len(cohort),
        params, total)
  wall = time.perf_counter() - start
  accuracy, _ = runner.make_evaluator(exp)(params)
  return {"wall_time_s": wall, "compile_time_s": compile_s, "test_accuracy": float(accuracy)}


def matmul_floor(args: argparse.Namespace, repeats: int = 3) -> float:
  """Rounds/s of the round's matrix products alone: an upper bound for any JAX round here.

  The same per-client products as one round of the workload (K clients, S
  steps, batches of B, the MLP's widths): forward, backward to the inputs of
  every layer but the first, and the weight gradients, as batched einsums over
  the cohort, with an SGD update in between and nothing else (no biases,
  activations, loss, sampling, clipping or noise). Median of `repeats` timed
  calls of all rounds in one `lax.fori_loop`.
  """
  widths = [64, *args.hidden, 10]
  keys = jax.random.split(jax.random.key(0), len(widths))
  weights = [jax.random.normal(k, (args.cohort, a, b)) * 0.01
             for k, a, b in zip(keys, widths[:-1], widths[1:])]
  x = jax.random.normal(keys[-1], (args.local_steps, args.cohort, args.batch_size, widths[0]))

  def step(weights, xb):
    inputs, h = [], xb
    for w in weights:
      inputs.append(h)
      h = jnp.einsum("kbi,kio->kbo", h, w)
    grads, g = [], h
    for i in reversed(range(len(weights))):
      grads.insert(0, jnp.einsum("kbi,kbo->kio", inputs[i], g))
      if i > 0:
        g = jnp.einsum("kbo,kio->kbi", g, weights[i])
    return [w - 1e-3 * gw for w, gw in zip(weights, grads)], None

  run = jax.jit(lambda w, x: jax.lax.fori_loop(
      0, args.rounds, lambda r, w: jax.lax.scan(step, w, x)[0], w)).lower(weights, x).compile()
  jax.block_until_ready(run(weights, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run(weights, x))
    times.append(time.perf_counter() - start)
  return args.rounds / float(np.median(times))


def pfl_python(create: bool) -> Path:
  """The pfl venv's interpreter, creating the venv (pinned CPU torch) on first use."""
  python = PFL_VENV / "bin" / "python"
  if python.exists() or not create:
    return python
  print(f"creating {PFL_VENV} (one time): pip install {' '.join(PFL_REQUIREMENTS)}", flush=True)
  subprocess.run([sys.executable, "-m", "venv", str(PFL_VENV)], check=True)
  subprocess.run([str(python), "-m", "pip", "install", "-q", *PFL_REQUIREMENTS], check=True)
  return python


def pin_to_cores(count: int) -> None:
  """Restricts this process (and the peers it starts, which inherit it) to its first `count` CPUs.

  Must run before the first JAX computation: XLA:CPU sizes its thread pools
  from the CPUs the process may use when its client starts.
  """
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= count <= len(allowed):
    raise ValueError(f"--cores must be in [1, {len(allowed)}], got {count}")
  os.sched_setaffinity(0, allowed[:count])


def run_pfl(python: Path, workload: Path, seed: int) -> dict[str, Any]:
  result = subprocess.run([str(python), str(HERE / "peers" / "pfl_dp_fedavg.py"), str(workload),
                           "--seed", str(seed)], capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(f"pfl run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]], reference: dict[str, Any]) -> str:
  head = ("| contender | compile s | train wall s | rounds/s | test acc | eps RDP | eps PLD | "
          "fedjax_priv scan rounds/s ÷ this |\n|---|---|---|---|---|---|---|---|\n")
  lines = []
  for row in rows:
    compile_s = row.get("compile_time_s")
    lines.append(
        f"| {row['name']} | {'-' if compile_s is None else f'{compile_s:.2f}'} | "
        f"{row['wall_time_s']:.2f} | {row['rounds_per_s']:.1f} | {row['test_accuracy']:.4f} | "
        f"{row['epsilon_rdp']:.4f} | {row.get('epsilon_pld', float('nan')):.4f} | "
        f"{reference['rounds_per_s'] / row['rounds_per_s']:.1f}x |")
  return head + "\n".join(lines)


def prepare(args: argparse.Namespace, seed: int):
  """Config, experiment, cohorts [R, K] and the exported workload file for one seed."""
  config = make_config(args, seed)
  exp = experiment.build(config)
  cohorts = np.stack([exp.sampler.sample(r).indices for r in range(args.rounds)])
  workload = CACHE / f"vs_pfl_workload_{seed}.npz"
  export_workload(exp, initial_params(exp)[0], cohorts, workload)
  return config, exp, cohorts, workload


def spread(values: list[float]) -> str:
  return f"{np.mean(values):.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.4f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=200)
  parser.add_argument("--clients", type=int, default=100)
  parser.add_argument("--cohort", type=int, default=20)
  parser.add_argument("--hidden", type=lambda s: tuple(int(w) for w in s.split(",")),
                      default=(200, 200), help="MLP widths, e.g. 200,200 or 64")
  parser.add_argument("--local-steps", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--client-lr", type=float, default=0.1)
  parser.add_argument("--clip-norm", type=float, default=0.5)
  parser.add_argument("--noise-multiplier", type=float, default=1.0)
  parser.add_argument("--delta", type=float, default=1e-5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--extra-seeds", type=int, default=2,
                      help="further seeds (init, cohorts, noise) run by the scan and pfl only, "
                           "for the spread of accuracy and speed")
  parser.add_argument("--scan-repeats", type=int, default=5,
                      help="runner.run calls per seed; the scan's wall time is their median")
  parser.add_argument("--cores", type=int, default=0,
                      help="pin this process, and so every contender, to its first N CPUs "
                           "(0: all), before JAX starts its thread pools")
  parser.add_argument("--skip-pfl", action="store_true", help="run only the JAX contenders")
  parser.add_argument("--markdown", type=Path, help="also write the results table here")
  args = parser.parse_args()
  if args.cores:
    pin_to_cores(args.cores)

  config, exp, cohorts, workload = prepare(args, args.seed)
  eps = ledger_epsilons(exp)
  print(f"workload: digits iid, {args.clients} clients, cohort {args.cohort} (fixed), "
        f"{args.rounds} rounds, mlp{args.hidden}, S={args.local_steps} B={args.batch_size} "
        f"lr={args.client_lr}, C={args.clip_norm}, sigma={exp.privacy.noise_multiplier}, "
        f"delta={args.delta}", flush=True)

  rows = []

  def add(name: str, result: dict[str, Any]) -> dict[str, Any]:
    result = {**result, "name": name, "rounds_per_s": args.rounds / result["wall_time_s"]}
    print(f"  {name}: {json.dumps({k: v for k, v in result.items() if k != 'params'})}",
          flush=True)
    return result

  scan = add("fedjax_priv scan (runner.run)",
             {**run_scan(config, CACHE / f"vs_pfl_run_{args.seed}", args.scan_repeats),
              "epsilon_pld": eps["epsilon_pld"]})
  per_round = add("fedjax_priv per-round jit", {**run_per_round(exp, cohorts), **eps})
  rows += [scan, per_round,
           add("fedjax-style loop (stand-in, JAX)",
               {**run_fedjax_style(exp, cohorts, args.seed), **eps})]
  pfl, notes = None, []
  python = None if args.skip_pfl else pfl_python(create=True)
  if python is not None:
    try:
      pfl = add("pfl 0.6 PyTorch", run_pfl(python, workload, args.seed))
      rows.append(pfl)
    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
      notes.append(f"pfl could not run: {error}")
      print(notes[-1])
  # Seed to seed, DP noise moves accuracy by about a point: compare spreads, not one draw.
  scans, pfls = [scan], [pfl] if pfl else []
  for seed in range(args.seed + 1, args.seed + 1 + args.extra_seeds):
    seed_config, _, _, seed_workload = prepare(args, seed)
    scans.append(add(f"fedjax_priv scan, seed {seed}",
                     run_scan(seed_config, CACHE / f"vs_pfl_run_{seed}", args.scan_repeats)))
    if pfl:
      pfls.append(add(f"pfl 0.6 PyTorch, seed {seed}", run_pfl(python, seed_workload, seed)))

  floor = matmul_floor(args)
  text = table(rows, scan)
  notes += [
      f"rigorous epsilon of the same run for fixed-size cohorts (sampling without replacement, "
      f"replace-one): RDP {eps['epsilon_fixed_rdp']:.3f}, PLD (tight) "
      f"{eps['epsilon_fixed_pld']:.3f}",
      f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
      f"({len(os.sched_getaffinity(0))} used by every contender), "
      f"jax {jax.__version__} on {jax.default_backend()}",
      f"scan: training wall time of each runner.run call, seed {args.seed}: "
      f"{', '.join(f'{wall:.3f}' for wall in scan['wall_times_s'])} s (the row takes the median)",
      f"the round's matrix products alone (no activations, loss, sampling, clipping or noise): "
      f"{floor:.1f} rounds/s, an upper bound for a JAX round of this model here; the scan "
      f"reaches {scan['rounds_per_s'] / floor:.0%} of it"]
  if pfl:
    ratios = [a["rounds_per_s"] / b["rounds_per_s"] for a, b in zip(scans, pfls)]
    notes += [
        f"speed, fedjax_priv scan / pfl: {scan['rounds_per_s'] / pfl['rounds_per_s']:.1f}x "
        f"(target >= 35x); over {len(ratios)} seeds {', '.join(f'{r:.1f}x' for r in ratios)}; "
        f"including compile: "
        f"{pfl['wall_time_s'] / (scan['wall_time_s'] + scan['compile_time_s']):.1f}x",
        f"speed, fedjax_priv per-round / pfl: "
        f"{per_round['rounds_per_s'] / pfl['rounds_per_s']:.1f}x",
        f"accuracy, fedjax_priv scan - pfl: "
        f"{100 * (scan['test_accuracy'] - pfl['test_accuracy']):+.2f} points (target within 1); "
        f"over {len(scans)} seeds (mean ± std): fedjax_priv "
        f"{spread([r['test_accuracy'] for r in scans])}, pfl "
        f"{spread([r['test_accuracy'] for r in pfls])}",
        f"epsilon (RDP), fedjax_priv / pfl: {scan['epsilon_rdp'] / pfl['epsilon_rdp']:.5f} "
        f"(target within 1 %); PLD: {scan['epsilon_pld'] / pfl['epsilon_pld']:.5f}",
        f"pfl: torch {pfl['torch']}, {pfl['torch_threads']} threads",
        f"matrix-product bound / pfl: {floor / pfl['rounds_per_s']:.1f}x (the most a JAX round "
        f"that runs these per-client products through XLA:CPU can gain on pfl here)"]
  scan_vs_round = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(per_round["params"]),
      jax.tree.leaves(runner_params(CACHE / f"vs_pfl_run_{args.seed}", exp))))
  notes.append(f"scan and per-round final params differ by at most {scan_vs_round:.2e} "
               "(same cohorts and keys)")
  report = text + "\n\n" + "\n".join(f"- {note}" for note in notes)
  print("\n" + report)
  if args.markdown:
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(report + "\n")


def runner_params(out: Path, exp: experiment.Experiment):
  """The final server params the runner checkpointed."""
  params, _ = initial_params(exp)
  template = server_init(params, exp.server_optimizer, exp.aggregator)
  state, _ = checkpoint.load_checkpoint(out / "checkpoint.npz", template)
  return state.params


if __name__ == "__main__":
  main()
