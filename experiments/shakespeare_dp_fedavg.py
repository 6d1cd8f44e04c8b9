"""User-level DP-FedAvg on Shakespeare next-character prediction (McMahan et al. 2018).

What it does
  Trains the character LSTM of `shakespeare_adaptive.py` (same data, sequences,
  local training and evaluation) with DP-FedAvg: each round every role joins
  the cohort independently with probability q = K / N (Poisson sampling,
  `PoissonSampler`), trains one local epoch of SGD (at most --max-steps steps
  of batch 4), and the server takes `dp_mean`: each delta clipped to L2 norm
  C, the clipped deltas summed, N(0, sigma^2 C^2) added once, the sum divided
  by the public expected cohort size qN; server SGD with momentum (FedAvgM)
  then applies it. Every
  noise multiplier sigma in --noise trains from the same initial model with
  the same cohorts and client orders (paired); sigma = 0 is clipping without
  noise, the non-private reference.

  Privacy: the unit is a user (one role, all its text), the relation
  add/remove one user. Each round's DpEvent is
  `user_level_event(sigma, 1, "poisson", N, qN)` recorded in a
  `PrivacyLedger` with the sampler's cohort-overflow probability, and
  (epsilon, delta) comes from the RDP accountant at delta = N^-1.1 (the
  choice in the paper's Table 1, below 1/N).

  Projection, labelled as such on the page: the epsilon the accountant gives
  for the same number of rounds, the same sigma and the same expected cohort
  K, if the population were N' = 10^6 users (q' = K / 10^6, delta' = N'^-1.1).
  It is what a deployment with that many users would pay for this run's
  noise on the mean; no model was trained on 10^6 users.

Usage
  JAX_PLATFORMS=cpu python experiments/shakespeare_dp_fedavg.py [--rounds 150] [--cohort 30]
      [--noise 0,0.3,1.0] [--clip 0.3] [--server-lr 0.316] [--server-momentum 0.9]

References:
  McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent
  Language Models", ICLR 2018 (DP-FedAvg, user-level privacy, Table 1's
  projection to larger populations).
  Mironov, Talwar & Zhang, "Renyi Differential Privacy of the Sampled Gaussian
  Mechanism", arXiv:1908.10530, 2019 (the accountant).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import jax
import numpy as np
import optax

from fedjax_priv.algorithms import make_client_update, server_init
from fedjax_priv.data.sampling import PoissonSampler
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.aggregation import dp_mean
from fedjax_priv.simulation.round import build_round

import results_page  # experiments/results_page.py, beside this script
import shakespeare_adaptive as shared

ROOT = results_page.ROOT
PROJECTED_POPULATION = 10**6
SLOT_MULTIPLE = 8  # cohorts are padded to a multiple of this many slots


def padded_cohorts(sampler: PoissonSampler, rounds: int, block: int):
  """Per block of rounds: indices [block, k] and masks [block, k]; also the realised cohort
  sizes [rounds] and the numbers of clients dropped by overflow [rounds].

  k is the largest realised cohort of the run rounded up to SLOT_MULTIPLE, not
  the sampler's capacity: the empty slots cut off carry weight 0 and change
  nothing but the cost, and one width means one compile.
  """
  cohorts = [sampler.sample(r) for r in range(rounds)]
  sizes = np.array([int(c.mask.sum()) for c in cohorts])
  width = min(sampler.capacity, max(SLOT_MULTIPLE, -(-sizes.max() // SLOT_MULTIPLE)
                                    * SLOT_MULTIPLE))
  indices = np.stack([c.indices[:width] for c in cohorts]).astype(np.int32)
  masks = np.stack([c.mask[:width] for c in cohorts]).astype(np.float32)
  return ([(indices[i:i + block], masks[i:i + block]) for i in range(0, rounds, block)], sizes,
          np.array([c.overflow for c in cohorts]))


def privacy(sigma: float, rounds: int, n: int, cohort: float, overflow_probability: float,
            delta: float) -> dict:
  """epsilon for the population that ran (ledger), and the labelled 10^6-user projection."""
  if sigma == 0:
    return {"epsilon": math.inf, "delta_total": delta, "projected": math.inf}
  ledger = accounting.PrivacyLedger()
  for _ in range(rounds):
    ledger.record(accounting.user_level_event(sigma, 1, "poisson", n, cohort),
                  overflow_probability)
  epsilon, delta_total = ledger.epsilon(delta)
  projected = accounting.compute_epsilon(
      accounting.user_level_event(sigma, rounds, "poisson", PROJECTED_POPULATION, cohort),
      PROJECTED_POPULATION ** -1.1)
  return {"epsilon": epsilon, "delta_total": delta_total, "projected": projected}


def server_optimizer(args) -> optax.GradientTransformation:
  """Server SGD, with momentum (FedAvgM) when --server-momentum > 0; post-processing of the
  noised mean, so it costs no privacy."""
  return optax.sgd(args.server_lr, momentum=args.server_momentum or None)


def run_sigma(sigma: float, s: shared.Setup, args, rounds_fn, blocks, compiled: dict) -> dict:
  server = server_optimizer(args)
  # The aggregator's state and structure do not depend on sigma (traced below).
  state = server_init(s.model.init(jax.random.key(args.seed)), server,
                      dp_mean(args.clip, 1.0, args.cohort))
  keys = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), 1), args.rounds)
  curve = [s.evaluator(state.params, s.eval_subset)]
  metrics_log = {"train_loss": [], "delta_norm": [], "clipped_fraction": []}
  tick, compile_time = time.perf_counter(), 0.0
  sigma_arg = np.float32(sigma)
  for b, (indices, masks) in enumerate(blocks):
    block_keys = keys[b * args.eval_every:(b + 1) * args.eval_every]
    shape = indices.shape
    if shape not in compiled:
      t = time.perf_counter()
      compiled[shape] = rounds_fn.lower(state, s.device_pop, indices, masks, block_keys,
                                        sigma_arg).compile()
      compile_time += time.perf_counter() - t
    state, metrics = compiled[shape](state, s.device_pop, indices, masks, block_keys, sigma_arg)
    for name in metrics_log:
      metrics_log[name].extend(np.asarray(metrics[name]).tolist())
    curve.append(s.evaluator(state.params, s.eval_subset))
    print(f"sigma {sigma:4.2f} round {(b + 1) * args.eval_every:4d}: train loss "
          f"{np.mean(metrics_log['train_loss'][-args.eval_every:]):.3f}, delta norm "
          f"{np.mean(metrics_log['delta_norm'][-args.eval_every:]):.2f}, clipped "
          f"{np.mean(metrics_log['clipped_fraction'][-args.eval_every:]):.2f}, held-out subset "
          f"accuracy {curve[-1][1]:.3f}  ({time.perf_counter() - tick:.0f} s)", flush=True)
  return {"curve": np.array(curve), "final": s.evaluator(state.params, s.eval_full),
          **{k: np.array(v) for k, v in metrics_log.items()},
          "seconds": time.perf_counter() - tick, "compile": compile_time}


def write_plot(results, args, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  evals = np.arange(0, args.rounds + 1, args.eval_every)
  for sigma, r in results.items():
    label = ("sigma = 0 (clip only, no privacy)" if sigma == 0 else
             f"sigma = {sigma:g}: eps = {r['epsilon']:.2f} (N = {args.population}), "
             f"projected {r['projected']:.2f} (N = 10^6)")
    ax.plot(evals, r["curve"][:, 1], marker=".", label=label)
  ax.set(xlabel="round", ylabel="held-out next-character accuracy",
         title=f"DP-FedAvg, expected cohort {args.cohort:g}, clip {args.clip:g}, "
               f"LSTM {args.layers}x{args.hidden}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_page(results, s: shared.Setup, args, sizes, overflow, sampler, total, path) -> None:
  n = args.population
  q = args.cohort / n
  lines = [
      "# User-level DP-FedAvg on Shakespeare next-character prediction",
      "",
      "DP-FedAvg in the style of McMahan et al. 2018 (\"Learning Differentially Private "
      "Recurrent Language Models\", ICLR): Poisson-sampled users, each user's model delta "
      "clipped to L2 norm C, Gaussian noise of std sigma C added once to the sum, divided by "
      "the public expected cohort size (`privacy.aggregation.dp_mean`), server SGD with "
      "momentum. The unit of "
      "privacy is a **user = one (play, role)**, all its text; the neighbouring relation is "
      "add/remove one user. epsilon comes from `PrivacyLedger` (RDP accountant, "
      "`user_level_event(sigma, 1, \"poisson\", N, qN)` per round, plus the cohort-overflow "
      "term).",
      "",
      f"Setup: N = {n} roles, q = {q:.4f} (expected cohort qN = {args.cohort:g}; realised "
      f"{sizes.min()}..{sizes.max()}, mean {sizes.mean():.1f}; cohort capacity "
      f"{sampler.capacity}, overflow probability {sampler.overflow_probability_per_round:.1e} per "
      f"round, {int(overflow.sum())} clients dropped), C = {args.clip:g}, server SGD lr "
      f"{args.server_lr:.3g} with momentum {args.server_momentum:g} (FedAvgM, Reddi et al. "
      f"2021's best for Shakespeare; post-processing, no privacy cost), client SGD lr "
      f"{args.client_lr:g}, one local epoch of batch "
      f"{args.batch_size} capped at {args.max_steps} steps, {args.rounds} rounds, delta = "
      f"N^-1.1 = {args.delta:.2e}. Model: embedding {args.embed}, {args.layers} LSTM layers of "
      f"{args.hidden} units, sequences of {args.seq_length}. Data: "
      f"{shared.data_summary(s, args)}.",
      "",
      "## Results",
      "",
      f"| sigma | noise std on the mean update (per coordinate) | epsilon, N = {n} (this run) | "
      "delta total | held-out accuracy | held-out loss | mean delta norm (last "
      f"{args.eval_every} rounds) | fraction clipped | **projection**: epsilon if N = 10^6, "
      "same K, sigma, rounds |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for sigma, r in results.items():
    eps = "inf (no noise)" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}"
    proj = "inf" if math.isinf(r["projected"]) else f"{r['projected']:.3f}"
    lines.append(
        f"| {sigma:g} | {sigma * args.clip / args.cohort:.4f} | {eps} | {r['delta_total']:.2e} | "
        f"{r['final'][1]:.3f} | {r['final'][0]:.3f} | "
        f"{r['delta_norm'][-args.eval_every:].mean():.2f} | "
        f"{r['clipped_fraction'][-args.eval_every:].mean():.2f} | {proj} |")
  base = results.get(0.0)
  lines += [
      "",
      "**The last column is a projection, not a measurement**: the accountant's epsilon for "
      f"the same {args.rounds} rounds, sigma and expected cohort K = {args.cohort:g} drawn from "
      f"N' = 10^6 users (q' = K / 10^6 = {args.cohort / PROJECTED_POPULATION:.1e}, delta' = "
      f"N'^-1.1 = {PROJECTED_POPULATION ** -1.1:.1e}). The noise on the mean, sigma C / K, "
      "and so the accuracy column, would be the same; only privacy amplification by sampling "
      "improves. This is the paper's argument that user-level DP gets cheap with enough users.",
      "",
  ]
  for sigma, r in results.items():
    if sigma > 0 and r["delta_total"] > 2 * args.delta:
      lines.append(
          f"**sigma = {sigma:g} gives no meaningful guarantee**: delta total is "
          f"{r['delta_total']:.2g} because the cohort-overflow term (1 + e^epsilon) x rounds x "
          "P[overflow] grows with e^epsilon; the untruncated mechanism's epsilon at delta "
          f"{args.delta:.1e} is {r['epsilon']:.2f}, itself far too large to protect anyone.")
      lines.append("")
  lines += [
      "## Against the paper",
      "",
      "McMahan et al. train a word-level LSTM on 763,430 Reddit users with expected cohorts of "
      "100 to 5,000 users and report that, with that many users, the noised models match the "
      "non-private ones in accuracy: privacy costs more computation (larger cohorts), not "
      "utility, and their Table 1 shows epsilon falling as the population grows at a fixed "
      "cohort size. We do not reproduce their numbers (different data set and model); the "
      "qualitative claims checked here:",
      "",
  ]
  if base is not None:
    # One seed: the no-noise curve's own last step is a yardstick for run-to-run variation.
    wiggle = abs(base["curve"][-1, 1] - base["curve"][-2, 1])
    for sigma, r in results.items():
      if sigma == 0:
        continue
      gap = base["final"][1] - r["final"][1]
      relation = f"{100 * abs(gap):.1f} points {'below' if gap >= 0 else 'above'} it"
      lines.append(
          f"- sigma = {sigma:g}: accuracy {r['final'][1]:.3f} against {base['final'][1]:.3f} "
          f"without noise ({relation}) at epsilon {r['epsilon']:.2f} for N = {n}, projected "
          f"{r['projected']:.3f} for N = 10^6.")
    lines.append(
        f"- One seed per noise level: the no-noise curve alone moved {100 * wiggle:.1f} points "
        "between its last two evaluations, and every run first sits on the plateau of "
        "predicting the most frequent character (accuracy 0.187) for a number of rounds that "
        "differs from run to run (a different noise draw is a different trajectory). At this "
        "length the gaps between noise levels mostly measure when each run left that plateau; "
        "they are not evidence that noise helps.")
  lines += [
      f"- With only {n} users, a cohort of {args.cohort:g} is q = {q:.3f} of the population, "
      "so sampling amplifies little, and the noise that buys a small epsilon (sigma C / "
      f"{args.cohort:g} per coordinate of the mean) is large next to the clipped updates of "
      "a model of this size. The same run drawn from 10^6 users would cost a fraction of the "
      "epsilon (last column); the paper's regime is that one.",
      "",
      f"![held-out accuracy per noise level]({path.with_suffix('.png').name})",
      "",
      "## Limits (reduced scale, stated plainly)",
      "",
      f"- LSTM of {args.hidden} units instead of the papers' 256 (CPU time), {args.rounds} "
      f"rounds, expected cohort {args.cohort:g}, at most {args.max_steps} local steps per "
      "client; one seed.",
      "- The data set is small (about 1,000 users), so the epsilons for the actual population "
      "are large at useful noise levels; that is the honest result for this population.",
      "- Clipping uses a fixed C (no adaptive clipping), chosen by hand from the delta norms "
      "of a short non-private run (10 rounds, 4 local steps: mean norms 0.4 to 0.85); that run "
      "is not accounted for (a usual but real leak).",
      "- A first configuration (expected cohort 40, 4 local steps, C = 0.5, server SGD lr 1 "
      "without momentum) was stopped after 50 rounds: it cost about 6 s a round on the loaded "
      "machine and even without noise was still at the 0.187 accuracy of predicting spaces.",
      "",
      "## Run",
      "",
      *results_page.command_and_hardware(),
      f"Wall time: {total:.0f} s in all; per noise level "
      + ", ".join(f"sigma {sg:g}: {r['seconds']:.0f} s ({r['compile']:.0f} s compiling)"
                  for sg, r in results.items()) + ".",
  ]
  path.write_text("\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  shared.add_model_flags(parser, rounds=150, max_steps=2)
  parser.add_argument("--cohort", type=float, default=30.0, help="expected cohort size qN")
  parser.add_argument("--noise", default="0,0.3,1.0", help="comma-separated noise multipliers")
  parser.add_argument("--clip", type=float, default=0.3, help="L2 clip norm C of a user's delta")
  parser.add_argument("--server-lr", type=float, default=10 ** -0.5)
  parser.add_argument("--server-momentum", type=float, default=0.9)
  parser.add_argument("--out", default=str(ROOT / "experiments" / "results" /
                                           "shakespeare_dp_fedavg.md"))
  args = parser.parse_args()
  shared.check_flags(args)
  noises = [float(v) for v in args.noise.split(",")]
  if any(not v >= 0 for v in noises):
    raise ValueError(f"--noise values must be >= 0, got {args.noise}")
  if not args.clip > 0:
    raise ValueError(f"--clip must be > 0, got {args.clip}")
  if not args.server_lr > 0:
    raise ValueError(f"--server-lr must be > 0, got {args.server_lr}")
  if not 0 <= args.server_momentum < 1:
    raise ValueError(f"--server-momentum must be in [0, 1), got {args.server_momentum}")
  start = time.perf_counter()
  s = shared.setup(args)
  args.population = len(s.client_ids)
  if not 0 < args.cohort <= args.population:
    raise ValueError(f"--cohort must be in (0, {args.population}], got {args.cohort}")
  args.delta = args.population ** -1.1
  print(shared.data_summary(s, args), flush=True)
  sampler = PoissonSampler(args.population, args.cohort / args.population, args.seed)
  blocks, sizes, overflow = padded_cohorts(sampler, args.rounds, args.eval_every)
  client_update = make_client_update(s.model, optax.sgd(args.client_lr))
  rounds_fn = shared.make_rounds(
      lambda sigma: build_round(client_update, dp_mean(args.clip, sigma, args.cohort),
                                server_optimizer(args), "vmap"), s.batcher)
  results, compiled = {}, {}
  for sigma in noises:
    results[sigma] = run_sigma(sigma, s, args, rounds_fn, blocks, compiled)
    results[sigma].update(privacy(sigma, args.rounds, args.population, args.cohort,
                                  sampler.overflow_probability_per_round, args.delta))
    r = results[sigma]
    print(f"sigma {sigma:g}: held-out accuracy {r['final'][1]:.3f}, epsilon {r['epsilon']:.3f} "
          f"(N = {args.population}), projected {r['projected']:.3f} (N = 10^6)", flush=True)
  total = time.perf_counter() - start
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  write_plot(results, args, out.with_suffix(".png"))
  write_page(results, s, args, sizes, overflow, sampler, total, out)
  print(f"wrote {out} and {out.with_suffix('.png')} in {total:.0f} s")


if __name__ == "__main__":
  main()
