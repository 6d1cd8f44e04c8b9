"""Accuracy vs bits and vs epsilon: central Gaussian, distributed discrete Gaussian, Skellam.

What it does
  Trains DP-FedAvg on scikit-learn's digits split over 100 clients (Dirichlet
  label skew, alpha 0.5), logistic regression, every client in every round
  (a fixed cohort of n = 100: the DDG/Skellam accountants assume n noise
  shares each round), with three user-level aggregators in the same slot:

    central   `privacy.dp_mean`: clip, sum in float, N(0, z^2 C^2) once;
    ddg       `secure.distributed_dp.distributed_discrete_gaussian_mean`
              (Kairouz, Liu & Steinke 2021): every client adds a discrete
              Gaussian share to its rotated, rounded update; sum mod 2^b;
    skellam   `secure.distributed_dp.skellam_mean` (Agarwal, Kairouz & Liu
              2021): the same pipeline with Skellam shares.

  Sweep 1: accuracy and epsilon vs the bits b per coordinate at one noise
  multiplier z. Sweep 2: accuracy vs epsilon at fixed bits, each mechanism's z
  calibrated to the target by bisection on its own accountant
  (`accounting.calibrate_noise_multiplier` for central, `ddg_epsilon` /
  `skellam_epsilon` for the others). Sweep 3 looks for the cause of an
  accuracy gap at equal epsilon: many seeds, accuracy paired by seed, DDG and
  Skellam at two ring headrooms (k_stddevs), and the noise each mechanism
  really adds to one round's update, measured against z C / n. Each point is
  trained for several seeds; seed s fixes the initial model, the per-round
  keys and the cohorts, and is the same for every mechanism. Writes a markdown page and two PNG plots.

Accounting (the same for the three mechanisms)
  Unit: one user; relation: zero-out (the user's update replaced by nothing,
  the cohort and so the n noise shares unchanged). For the Gaussian this has
  the RDP of add/remove with sensitivity C. Every round is charged as if the
  user took part (q = 1): exact with full participation (the default), and
  with --cohort-size < 100 an upper bound that claims no amplification by
  sampling, since the library's DDG/Skellam accountants amplify only Poisson
  sampling, which would make the number of noise shares random. Central is
  `user_level_event(z, R, "full", K, K)`, i.e. R Gaussian(z) rounds, on the
  RDP accountant like the other two.

Usage
  JAX_PLATFORMS=cpu python experiments/distributed_dp.py [--rounds 50] [--seeds 3]
      [--bits 8,10,12,14,16,18,20] [--noise-multiplier 5] [--epsilons 1,2,4,8]
      [--eps-bits 16] [--gap-epsilons 2,4] [--gap-seeds 20] [--gap-k 6]
      [--out experiments/results/distributed_dp.md]
  Smaller and faster: --rounds 20 --seeds 1 --bits 8,16 --epsilons 4 --gap-epsilons 4
      --gap-seeds 2.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv import config as config_lib
from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.packing import pad_population
from fedjax_priv.data.sampling import FixedSizeSampler
from fedjax_priv.experiment import Experiment, build
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.aggregation import Aggregator, ClientContext, RoundContext, dp_mean
from fedjax_priv.runner import make_evaluator
from fedjax_priv.secure import distributed_dp as ddp
from fedjax_priv.secure import quantization
from fedjax_priv.simulation.program import rounds_on_device
from fedjax_priv.simulation.round import build_round

import results_page  # experiments/results_page.py, beside this script

ROOT = results_page.ROOT
MECHANISMS = ("central", "ddg", "skellam")
LABELS = {"central": "central Gaussian", "ddg": "distributed discrete Gaussian",
          "skellam": "distributed Skellam"}
# Per-round metrics of the distributed aggregators summarised per run.
_OVERFLOW_METRICS = ("modular_overflow", "overflow_fraction", "range_used", "rounding_failed")
DEFAULT_K = ddp.DistributedDPConfig.k_stddevs  # The library's ring headroom in noise stds.


class Setup(NamedTuple):
  """What every run shares: the experiment's pieces and the accounting constants."""
  exp: Experiment
  evaluator: Callable
  dim: int
  clip_norm: float
  cohort_size: int
  rounds: int
  delta: float


class Point(NamedTuple):
  """One (mechanism, z, bits) trained for every seed."""
  mechanism: str
  bits: int | None
  noise_multiplier: float
  epsilon: float
  metrics: dict[str, np.ndarray]   # [seeds] per metric
  compile_s: float
  run_s: float


def make_setup(args) -> Setup:
  overrides = [
      "data.num_clients=100", "data.partition=\"dirichlet\"", "data.dirichlet_alpha=0.5",
      "model.name=\"logistic_regression\"",
      f"client.learning_rate={args.client_lr}", f"client.local_steps={args.local_steps}",
      "client.batch_size=16", f"server.learning_rate={args.server_lr}",
      "privacy.unit=\"user\"", f"privacy.clip_norm={args.clip_norm}",
      f"privacy.delta={args.delta}", "simulation.sampling=\"fixed\"",
      f"simulation.cohort_size={args.cohort_size}", f"simulation.rounds={args.rounds}",
      "simulation.backend=\"vmap\""]
  exp = build(config_lib.load(None, overrides))
  params = exp.model.init(jax.random.key(0))
  return Setup(exp, make_evaluator(exp), tree_util.num_parameters(params), args.clip_norm,
               args.cohort_size, args.rounds, args.delta)


# --------------------------------------------------------------------------
# Mechanisms: aggregator and epsilon from (z, bits).


def _ddp_config(setup: Setup, z: float, bits: int,
                k_stddevs: float = DEFAULT_K) -> ddp.DistributedDPConfig:
  return ddp.DistributedDPConfig(clip_norm=setup.clip_norm, noise_multiplier=z,
                                 num_clients=setup.cohort_size, dim=setup.dim, bits=bits,
                                 k_stddevs=k_stddevs)


def aggregator(setup: Setup, mechanism: str, z: float, bits: int | None,
               k_stddevs: float = DEFAULT_K) -> Aggregator:
  if mechanism == "central":
    return dp_mean(setup.clip_norm, z, setup.cohort_size)
  config = _ddp_config(setup, z, bits, k_stddevs)
  if mechanism == "ddg":
    return ddp.distributed_discrete_gaussian_mean(config)
  return ddp.skellam_mean(config)


def _central_event(setup: Setup, z: float):
  # The cohort as a full-participation population of K: R Gaussian(z) rounds,
  # no amplification by sampling (module docstring).
  return accounting.user_level_event(z, setup.rounds, "full", setup.cohort_size,
                                     setup.cohort_size)


def epsilon(setup: Setup, mechanism: str, z: float, bits: int | None,
            k_stddevs: float = DEFAULT_K) -> float:
  """The mechanism's epsilon after setup.rounds rounds at setup.delta; inf where unproven."""
  if z == 0:
    return math.inf
  if mechanism == "central":
    return accounting.compute_epsilon(_central_event(setup, z), setup.delta, "rdp")
  account = ddp.ddg_epsilon if mechanism == "ddg" else ddp.skellam_epsilon
  try:
    return account(_ddp_config(setup, z, bits, k_stddevs), setup.rounds, setup.delta)
  except ValueError:  # DDG refuses local scales below 1/2 integer step: no proven bound.
    return math.inf


def calibrate(setup: Setup, mechanism: str, target: float, bits: int | None,
              k_stddevs: float = DEFAULT_K, tolerance: float = 1e-3) -> float:
  """Smallest z (to relative `tolerance`) whose epsilon meets `target`.

  Only a z whose computed epsilon met the target is returned. The distributed
  mechanisms' epsilon is not a DpEvent, so they get the same doubling-then-
  bisection search as `accounting.calibrate_noise_multiplier` on their own
  accountant.

  Raises:
    ValueError: no z up to 1e4 meets the target (at low bits the rounding
      inflation of the sensitivity grows with z and epsilon has a floor).
  """
  if mechanism == "central":
    return accounting.calibrate_noise_multiplier(lambda z: _central_event(setup, z), target,
                                                 setup.delta, "rdp", tolerance)

  def meets(z):
    return epsilon(setup, mechanism, z, bits, k_stddevs) <= target

  lo, hi = 0.0, 1.0
  while not meets(hi):
    if hi >= 1e4:
      raise ValueError(f"{mechanism} at bits={bits} cannot reach epsilon={target} with "
                       "noise_multiplier <= 1e4")
    lo, hi = hi, 2 * hi
  while hi - lo > tolerance * hi:
    mid = 0.5 * (lo + hi)
    lo, hi = (lo, mid) if meets(mid) else (mid, hi)
  return hi


# --------------------------------------------------------------------------
# Training: one jitted program per (mechanism, z, bits), vmapped over seeds.


def cohorts(setup: Setup, seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """[G, R, K] indices and masks: seed s's cohorts, shared by every mechanism."""
  indices, masks = [], []
  for seed in seeds:
    sampler = FixedSizeSampler(setup.exp.train.num_clients, setup.cohort_size, seed)
    rounds = [sampler.sample(r) for r in range(setup.rounds)]
    indices.append(np.stack([c.indices for c in rounds]))
    masks.append(np.stack([c.mask for c in rounds]))
  return np.asarray(indices, np.int32), np.asarray(masks, np.float32)


def train(setup: Setup, agg: Aggregator, seeds, population, indices, masks):
  """Trains one run per seed with `agg`; seeds int32[G], indices/masks [G, R, K].

  Returns:
    ({name: float32[G]}: test accuracy after the last round, and each round
    metric of the aggregator averaged over rounds (range_used: the maximum),
    compile seconds, run seconds).
  """
  exp = setup.exp
  round_fn = build_round(exp.client_update, agg, exp.server_optimizer, "vmap")
  run_rounds = rounds_on_device(round_fn, exp.batching)

  def one_run(seed, indices, masks):
    # The key schedule of `simulation.sweep`, so a seed means the same run there.
    init_key, rounds_key = jax.random.split(jax.random.key(seed))
    state = server_init(exp.model.init(init_key), exp.server_optimizer, agg)
    keys = jax.vmap(lambda r: jax.random.fold_in(rounds_key, r))(jnp.arange(setup.rounds))
    state, metrics = run_rounds(state, population, indices, masks, keys)
    accuracy, _ = setup.evaluator(state.params)
    summary = {"accuracy": accuracy, "clipped_fraction": jnp.mean(metrics["clipped_fraction"])}
    for name in _OVERFLOW_METRICS:
      if name in metrics:
        reduce = jnp.max if name == "range_used" else jnp.mean
        summary[name] = reduce(metrics[name])
    return summary

  program = jax.jit(jax.vmap(one_run))
  start = time.perf_counter()
  compiled = program.lower(seeds, indices, masks).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(seeds, indices, masks))
  return {k: np.asarray(v) for k, v in out.items()}, compile_s, time.perf_counter() - start


def run_point(setup: Setup, data, mechanism: str, z: float, bits: int | None,
              k_stddevs: float = DEFAULT_K) -> Point | None:
  """Trains one point for every seed; None (and a message) where the library refuses the config."""
  try:
    agg = aggregator(setup, mechanism, z, bits, k_stddevs)
  except ValueError as err:  # e.g. a DDG share below 1/2 integer step at low bits.
    print(f"  {mechanism:8s} bits={bits} z={z:.4g} refused: {err}", flush=True)
    return None
  metrics, compile_s, run_s = train(setup, agg, *data)
  point = Point(mechanism, bits, z, epsilon(setup, mechanism, z, bits, k_stddevs), metrics,
                compile_s, run_s)
  acc = metrics["accuracy"]
  print(f"  {mechanism:8s} bits={bits} z={z:.4g} eps={point.epsilon:.4g} "
        f"acc={acc.mean():.4f}+-{acc.std():.4f} overflow_rounds="
        f"{metrics.get('modular_overflow', np.zeros(1)).mean():.3f} "
        f"({compile_s:.1f}s compile, {run_s:.1f}s run)", flush=True)
  return point


# --------------------------------------------------------------------------
# Sweep 3: where an accuracy gap at equal epsilon comes from.


class GapRow(NamedTuple):
  """One mechanism at one target epsilon, trained on the sweep's many seeds."""
  target: float
  k_stddevs: float | None
  point: Point
  noise_ratio: float   # std of (update - exact mean) per coordinate / (z C / n)
  noise_bias: float    # mean of (update - exact mean) / (z C / n)


def noise_statistics(setup: Setup, agg: Aggregator, z: float, draws: int = 200,
                     seed: int = 0) -> tuple[float, float]:
  """(std, mean) of one round's update error per coordinate, in units of z C / n.

  The n deltas are fixed random directions of norm 0.8 C (clipping inactive)
  and the error is the aggregator's update minus their exact mean, over
  `draws` round keys: the noise each mechanism really adds, rounding and
  wrap-around included, against the Gaussian's z C / n per coordinate.
  """
  n = setup.cohort_size
  flat_params, unravel = quantization.ravel(setup.exp.model.init(jax.random.key(0)))
  directions = np.random.default_rng(seed).normal(size=(n, flat_params.shape[0]))
  deltas = jnp.asarray(0.8 * setup.clip_norm * directions
                       / np.linalg.norm(directions, axis=1, keepdims=True), jnp.float32)
  exact = jnp.mean(deltas, axis=0)
  state = agg.init(unravel(flat_params))
  cohort_mask = jnp.ones(n, jnp.float32)

  def one_round(key):
    client_key, server_key, round_key = jax.random.split(key, 3)
    prepared, weights, _ = jax.vmap(lambda slot, delta: agg.prepare(
        state, unravel(delta), 1.0, ClientContext(slot, jax.random.fold_in(client_key, slot),
                                                  round_key, cohort_mask)))(jnp.arange(n), deltas)
    total = agg.group_sum(weights, prepared)
    included = (weights > 0).astype(jnp.float32)
    update, _, _ = agg.finalize(state, total, jnp.sum(weights),
                                RoundContext(server_key, round_key, cohort_mask, included))
    return quantization.ravel(update)[0] - exact

  errors = np.asarray(jax.jit(jax.vmap(one_round))(
      jax.random.split(jax.random.key(seed), draws)), np.float64)
  unit = z * setup.clip_norm / n
  return float(errors.std() / unit), float(errors.mean() / unit)


def gap_sweep(args, setup: Setup) -> list[GapRow]:
  """Central, DDG and Skellam at each of args.gap_epsilons, on args.gap_seeds seeds.

  DDG and Skellam run with the library's ring headroom (k_stddevs = 4) and
  with args.gap_k: a larger k makes gamma coarser and wrap-around rarer.
  """
  seeds = list(range(args.gap_seeds))
  data = (jnp.asarray(seeds, jnp.int32), jax.device_put(pad_population(setup.exp.train)),
          *cohorts(setup, seeds))
  variants = [("central", None), ("ddg", DEFAULT_K), ("ddg", args.gap_k),
              ("skellam", DEFAULT_K), ("skellam", args.gap_k)]
  rows = []
  for target in args.gap_epsilons:
    for mechanism, k in variants:
      bits = None if mechanism == "central" else args.eps_bits
      kwargs = {} if k is None else {"k_stddevs": k}
      z = calibrate(setup, mechanism, target, bits, **kwargs)
      point = run_point(setup, data, mechanism, z, bits, **kwargs)
      ratio, bias = noise_statistics(setup, aggregator(setup, mechanism, z, bits, **kwargs), z)
      print(f"    k={k} noise std / (z C / n) = {ratio:.3f}, mean = {bias:+.3f}", flush=True)
      rows.append(GapRow(target, k, point, ratio, bias))
  return rows


# --------------------------------------------------------------------------
# Report.


def _acc(point: Point | None) -> str:
  if point is None:
    return "refused"
  acc = point.metrics["accuracy"]
  return f"{acc.mean():.3f} ± {acc.std():.3f}"


def _eps(value: float) -> str:
  return "∞" if math.isinf(value) else f"{value:.3g}"


def _overflow(point: Point | None) -> str:
  if point is None:
    return "–"
  m = point.metrics
  if "modular_overflow" not in m:
    return "–"
  return (f"{m['modular_overflow'].mean():.3f} / {m['overflow_fraction'].mean():.1e} / "
          f"{m['range_used'].max():.2f}")


def _plot(path: Path, series: dict[str, list[tuple[float, Point]]], xlabel: str, title: str,
          logx: bool = False, reference: Point | None = None) -> None:
  """Accuracy (mean ± std over seeds) per mechanism over x; `reference` drawn as a band."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for mechanism, pts in series.items():
    if pts:
      xs = [x for x, _ in pts]
      ax.errorbar(xs, [p.metrics["accuracy"].mean() for _, p in pts],
                  yerr=[p.metrics["accuracy"].std() for _, p in pts], marker="o", capsize=3,
                  label=LABELS[mechanism])
  if reference is not None:
    mean, std = reference.metrics["accuracy"].mean(), reference.metrics["accuracy"].std()
    ax.axhline(mean, color="k", linestyle="--", label=f"{LABELS[reference.mechanism]} (float)")
    ax.axhspan(mean - std, mean + std, color="k", alpha=0.1)
  if logx:
    ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("test accuracy (mean ± std over seeds)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _kept_reading(out: Path) -> str:
  """The hand-written "Reading" section of an earlier page, so a rerun does not erase it."""
  if not out.exists() or "\n## Reading\n\n" not in out.read_text():
    return "(to be written after looking at the numbers)"
  return out.read_text().split("\n## Reading\n\n", 1)[1].split("\n\n## Reproduce", 1)[0]


def write_report(args, setup: Setup, bits_points: dict[str, list[Point | None]],
                 central_fixed: Point, eps_points: dict[str, list[tuple[float, Point]]],
                 gap_rows: list[GapRow], skipped: list[str], wall_s: float, out: Path) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  stem = out.with_suffix("")
  bits_png, eps_png = Path(f"{stem}_bits.png"), Path(f"{stem}_epsilon.png")
  seeds, z, distributed = args.seeds, args.noise_multiplier, ("ddg", "skellam")
  _plot(bits_png, {m: [(b, p) for b, p in zip(args.bits, bits_points[m]) if p]
                   for m in distributed}, "bits per coordinate b",
        f"accuracy vs bits at z = {z:g} ({setup.rounds} rounds, {seeds} seeds)",
        reference=central_fixed)
  _plot(eps_png, eps_points, f"epsilon (delta = {setup.delta:g})",
        f"accuracy vs epsilon (DDG/Skellam at b = {args.eps_bits}; {seeds} seeds)", logx=True)

  exp, n = setup.exp, setup.cohort_size
  population = exp.train.num_clients
  cohort = (f"every client in every round (n = {n} noise shares)" if n == population else
            f"a fixed cohort of n = {n} of them drawn without replacement each round")
  padded = ddp.DistributedDPConfig(1.0, 1.0, n, setup.dim).padded_dim
  lines = [
      "# Distributed DP: accuracy vs bits and vs epsilon",
      "",
      "DP-FedAvg with three user-level aggregators in the same slot of the round: the central "
      "Gaussian mean (`privacy.dp_mean`), the distributed discrete Gaussian (DDG; Kairouz, Liu & "
      "Steinke 2021) and distributed Skellam (Agarwal, Kairouz & Liu 2021) of "
      "`fedjax_priv.secure.distributed_dp`, whose clients add integer noise shares to rotated, "
      "conditionally rounded updates that are summed modulo 2^b as under secure aggregation.",
      "",
      f"Setup: scikit-learn digits over {population} clients (Dirichlet label skew, alpha 0.5), "
      f"{cohort}; logistic regression (d = {setup.dim} parameters, d' = {padded} after padding "
      f"for the rotation); {setup.rounds} rounds of {args.local_steps} local SGD steps (batch "
      f"16, lr {args.client_lr}); server SGD at lr {args.server_lr}; clip norm C = "
      f"{setup.clip_norm}; the clipped sum divided by the public n. DDG/Skellam use the library "
      "defaults: granularity gamma such that 4 standard deviations of a coordinate of the noisy "
      "sum fill the ring, conditional rounding with beta = e^-1/2. Seeds "
      f"0..{seeds - 1}: seed s fixes the initial model, the round keys and the cohorts, "
      "identical for the three mechanisms. Accuracy: pooled held-out test set after the last "
      "round, mean ± std over seeds.",
      "",
      "Privacy: unit one user, zero-out relation (the user's update replaced by nothing, the "
      "cohort and its n noise shares unchanged; for the Gaussian the same RDP as add/remove "
      f"with sensitivity C); delta = {setup.delta:g}; RDP accountants, every round charged as if "
      "the user took part (q = 1, no amplification by sampling claimed). Central: "
      "`user_level_event(z, R, \"full\", n, n)`; DDG: `ddg_epsilon`; Skellam: `skellam_epsilon` "
      "(both with the rounding-inflated sensitivities Delta_2, Delta_1).",
      "",
      f"## Sweep 1: accuracy vs bits at z = {z:g}",
      "",
      f"Central Gaussian at the same z (no bits): epsilon {_eps(central_fixed.epsilon)}, "
      f"accuracy {_acc(central_fixed)}.",
      "",
      "Delta_2 gamma / C: the rounding inflation of the L2 sensitivity. Overflow: fraction of "
      "rounds in which some coordinate of the exact integer sum left the ring / mean fraction "
      "of coordinates that wrapped / largest |sum| as a fraction of 2^(b-1) "
      "(`modular_overflow` / `overflow_fraction` / `range_used`). \"refused\": the library "
      "rejects the configuration (a DDG share below 1/2 integer step).",
      "",
      "| bits | gamma / C | Delta_2 gamma / C | eps DDG | eps Skellam | acc DDG | acc Skellam | "
      "overflow DDG | overflow Skellam |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for bits, ddg_pt, sk_pt in zip(args.bits, bits_points["ddg"], bits_points["skellam"]):
    config = _ddp_config(setup, z, bits)
    lines.append(
        f"| {bits} | {config.gamma / setup.clip_norm:.3g} | "
        f"{config.l2_sensitivity * config.gamma / setup.clip_norm:.3f} | "
        f"{_eps(epsilon(setup, 'ddg', z, bits))} | {_eps(epsilon(setup, 'skellam', z, bits))} | "
        f"{_acc(ddg_pt)} | {_acc(sk_pt)} | {_overflow(ddg_pt)} | {_overflow(sk_pt)} |")
  lines += [
      "",
      f"![accuracy vs bits]({bits_png.name})",
      "",
      f"## Sweep 2: accuracy vs epsilon (DDG and Skellam at b = {args.eps_bits})",
      "",
      "Each mechanism's z is the smallest (to 0.1%) whose own accountant meets the target.",
      "",
      "| target eps | z central | z DDG | z Skellam | acc central | acc DDG | acc Skellam | "
      "overflow DDG | overflow Skellam |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  by_target = {m: dict(eps_points[m]) for m in MECHANISMS}
  for target in args.epsilons:
    cells = [by_target[m].get(target) for m in MECHANISMS]
    lines.append(" | ".join(
        [f"| {target:g}"] + [f"{p.noise_multiplier:.4g}" if p else "–" for p in cells]
        + [_acc(p) if p else "–" for p in cells] + [_overflow(p) for p in cells[1:]]) + " |")
  if skipped:
    lines += ["", "Not run: " + "; ".join(skipped) + "."]
  lines += ["", f"![accuracy vs epsilon]({eps_png.name})", ""]
  lines += _gap_section(args, gap_rows)
  every = [central_fixed, *(p for pts in bits_points.values() for p in pts if p),
           *(p for pts in eps_points.values() for _, p in pts), *(r.point for r in gap_rows)]
  lines += [
      "## Reading",
      "",
      _kept_reading(out),
      "",
      "## Reproduce",
      "",
      *results_page.command_and_hardware(),
      f"Wall time: {wall_s:.0f} s in all; {sum(p.compile_s for p in every):.0f} s of it XLA "
      f"compilation ({len(every)} programs, one per mechanism, z and bits, each vmapped over the "
      f"seeds) and {sum(p.run_s for p in every):.0f} s training.",
      ""]
  out.write_text("\n".join(lines))
  print(f"wrote {out}, {bits_png.name}, {eps_png.name}")


def _gap_section(args, rows: list[GapRow]) -> list[str]:
  """Sweep 3's table: noise actually added, wrap-around, and the accuracy gap paired by seed."""
  lines = [
      f"## Sweep 3: the gap at equal epsilon, on {args.gap_seeds} seeds (b = {args.eps_bits})",
      "",
      "Each mechanism calibrated to the target on its own accountant, as in sweep 2; DDG and "
      f"Skellam with the default ring headroom k = {DEFAULT_K:g} noise standard deviations and "
      f"with k = {args.gap_k:g} (coarser gamma, rarer wrap-around). Noise std and mean: one "
      "round's update minus the exact mean of 100 fixed deltas of norm 0.8 C, over 200 round "
      "keys, per coordinate, in units of the Gaussian's z C / n (`noise_statistics`). "
      "Wrapped rounds: fraction of training rounds in which some coordinate of the integer sum "
      "left the ring. Gap: accuracy minus central's on the same seed (same initial model, round "
      "keys and cohorts), mean ± standard error over seeds.",
      "",
      "| target eps | mechanism | k | z | eps | noise std | noise mean | wrapped rounds | "
      "accuracy | gap vs central |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  central = {r.target: r.point.metrics["accuracy"] for r in rows if r.k_stddevs is None}
  for r in rows:
    p = r.point
    gap = p.metrics["accuracy"] - central[r.target]
    wrapped = p.metrics.get("modular_overflow")
    lines.append(
        f"| {r.target:g} | {p.mechanism} | {'–' if r.k_stddevs is None else f'{r.k_stddevs:g}'} "
        f"| {p.noise_multiplier:.4g} | {_eps(p.epsilon)} | {r.noise_ratio:.3f} | "
        f"{r.noise_bias:+.3f} | {'–' if wrapped is None else f'{wrapped.mean():.3f}'} | "
        f"{_acc(p)} | " + ("–" if r.k_stddevs is None else
                           f"{gap.mean():+.3f} ± {gap.std(ddof=1) / math.sqrt(len(gap)):.3f}")
        + " |")
  return lines + [""]


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
  return [float(v) for v in text.split(",")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=50)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--cohort-size", type=int, default=100,
                      help="clients per round, of 100 (q = 1 accounting, module docstring)")
  parser.add_argument("--clip-norm", type=float, default=0.5)
  parser.add_argument("--client-lr", type=float, default=0.5)
  parser.add_argument("--local-steps", type=int, default=5)
  parser.add_argument("--server-lr", type=float, default=1.0)
  parser.add_argument("--delta", type=float, default=1e-5)
  parser.add_argument("--bits", type=_ints, default=[8, 10, 12, 14, 16, 18, 20])
  parser.add_argument("--noise-multiplier", type=float, default=5.0,
                      help="z of sweep 1 (summed noise std z C per coordinate)")
  parser.add_argument("--epsilons", type=_floats, default=[1.0, 2.0, 4.0, 8.0])
  parser.add_argument("--eps-bits", type=int, default=16, help="b of DDG/Skellam in sweeps 2, 3")
  parser.add_argument("--gap-epsilons", type=_floats, default=[2.0, 4.0],
                      help="targets of sweep 3 (the gap at equal epsilon)")
  parser.add_argument("--gap-seeds", type=int, default=20)
  parser.add_argument("--gap-k", type=float, default=6.0,
                      help="the larger ring headroom (k_stddevs) sweep 3 compares with 4")
  parser.add_argument("--out", default=str(ROOT / "experiments" / "results" /
                                           "distributed_dp.md"))
  args = parser.parse_args()
  if args.seeds < 1 or args.rounds < 1 or args.gap_seeds < 2:
    raise ValueError(f"--seeds and --rounds must be >= 1 and --gap-seeds >= 2, got "
                     f"{args.seeds}, {args.rounds}, {args.gap_seeds}")

  start = time.perf_counter()
  setup = make_setup(args)
  seeds = list(range(args.seeds))
  data = (jnp.asarray(seeds, jnp.int32), jax.device_put(pad_population(setup.exp.train)),
          *cohorts(setup, seeds))

  print(f"sweep 1: bits at z = {args.noise_multiplier}", flush=True)
  central_fixed = run_point(setup, data, "central", args.noise_multiplier, None)
  bits_points = {m: [run_point(setup, data, m, args.noise_multiplier, b) for b in args.bits]
                 for m in ("ddg", "skellam")}

  print(f"sweep 2: epsilon at bits = {args.eps_bits}", flush=True)
  eps_points: dict[str, list[tuple[float, Point]]] = {m: [] for m in MECHANISMS}
  skipped = []
  for target in args.epsilons:
    for mechanism in MECHANISMS:
      bits = None if mechanism == "central" else args.eps_bits
      try:
        z = calibrate(setup, mechanism, target, bits)
      except ValueError as err:
        skipped.append(str(err))
        continue
      point = run_point(setup, data, mechanism, z, bits)
      if point is not None:
        eps_points[mechanism].append((target, point))

  print(f"sweep 3: the gap at equal epsilon on {args.gap_seeds} seeds", flush=True)
  gap_rows = gap_sweep(args, setup)
  write_report(args, setup, bits_points, central_fixed, eps_points, gap_rows, skipped,
               time.perf_counter() - start, Path(args.out))


if __name__ == "__main__":
  main()
