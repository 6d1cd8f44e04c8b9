"""What correlated (matrix-factorization) noise costs inside a whole federated round, at d ~ 10^6.

Claim checked: generating BandMF / BLT noise is a small part of a user-level
DP-FedAvg round with a one-million-parameter model, and the mechanism's
memory grows as bands * d (BandMF keeps the last bands - 1 noise rows,
Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization",
Alg. 9; BLT one row per buffer, McMahan, Xu & Zhang 2024).

The round (the same for every contender): an MLP 64 -> H -> H -> 10
(H = 1000: d = 1,076,010 float32 parameters), synthetic data of the
digits' shape (64 features, 10 classes, labels from a fixed random linear
teacher: this is a timing benchmark, accuracy is not read), N = b * K
clients of S * B examples each, `Cyclic(N, K)` participation (b = N // K
rounds between a user's participations), S local SGD steps of batch B, each
delta clipped to C = 1 (user level), the cohort's sum noised once and
divided by K, server SGD at lr 1, the `vmap` backend. Built by
`fp.assemble` and run by the runner's own block (`runner._Trainer`: the
population on the device, `lax.scan` over --block rounds per device call,
the server state donated), timed from sampling the cohorts to the metrics
on the host, compilation excluded: the rounds `fp.run_experiment` runs,
without its host bookkeeping between blocks (ledger, metric files,
evaluation, checkpoints), which is the same for every contender.

Contenders, interleaved in one process (one block of each per repeat, the
order rotating), each carrying its own state from block to block:

  independent  `dp_mean(C, sigma, K)`: N(0, sigma^2 C^2) per coordinate, drawn
               fresh every round (the default user-level aggregator).
  BandMF p     `mf_mean(banded_square_root(p), ...)`: p bands (p <= b, so the
               sensitivity is exact); state: the last p - 1 noise rows.
  BLT m        `mf_mean(BufferedToeplitz(...), ...)`: m buffers, the decays
               and scales of `mf_strategies.py`.

The coefficients are not optimised (BSR, a fixed BLT): a round's cost
depends on p and m, not on the values.

The round calls finalize directly, so a state that finalize updates in
place (BandMF's ring of past rows) is not copied (the "state copies" column
checks it).

Also in the same process, after each repeat's blocks: the noise stream
alone at the model's d (`mf.stream_next` jitted with its state donated, and
one independent `gaussian_like` draw), the calls `mf_strategies.py` times.

Reported, per round (block time / --block): wall ms and process CPU ms
(all threads; less disturbed than wall time by other jobs on a shared
machine), min and median over repeats; the MF overhead
(round_mf - round_independent) / round_mf of each repeat's pair of blocks
(run seconds apart, so under about the same load), median and range over
the repeats, by wall and by CPU time; the median of the stream
alone; the aggregator state's bytes (the leaves of
`ServerState.aggregator_state`); the compiled block's XLA temporary bytes
and its copies of the state. Then, for p in --memory-bands, each BandMF p
round compiled: its state bytes and its memory beyond the independent
round's (state + temp - independent temp), over p * d. The 1-minute load
average is printed before, at every repeat and after: other jobs share
the machine.

Usage (from the repository root):
  PYTHONPATH=. python experiments/benchmarks/mf_round_cost.py [--hidden 1000] [--cohort 16]
      [--local-steps 4] [--batch-size 16] [--bands 64] [--buffers 4] [--block 4]
      [--repeats 15] [--memory-bands 8,16,32,64]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
import warnings
from typing import NamedTuple

import jax
import numpy as np
import optax

import fedjax_priv as fp
from fedjax_priv import runner
from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.models import mlp
from fedjax_priv.privacy import dp_mean, mf_mean
from fedjax_priv.privacy import matrix_factorization as mf
from fedjax_priv.privacy.noise import gaussian_like

CLIP, SIGMA, FEATURES, CLASSES = 1.0, 1.0, 64, 10


def synthetic_clients(num_clients: int, per_client: int, seed: int = 0):
  """Digits-shaped data: x ~ N(0, 1) [64], y = argmax of a fixed random linear teacher."""
  rng = np.random.default_rng(seed)
  teacher = rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)
  x = rng.standard_normal((num_clients * per_client + 256, FEATURES)).astype(np.float32)
  y = np.argmax(x @ teacher, axis=1).astype(np.int32)
  parts = np.split(np.arange(num_clients * per_client), num_clients)
  return (FederatedDataset.from_partition(x[:-256], y[:-256], parts), (x[-256:], y[-256:]))


def blt(buffers: int) -> mf.BufferedToeplitz:
  """The BLT of `mf_strategies.py`: decays 0.99..0.5, scales summing to 0.5 (exact sensitivity)."""
  return mf.BufferedToeplitz(np.linspace(0.99, 0.5, buffers), np.full(buffers, 0.5 / buffers))


def state_bytes(tree) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


class Contender:
  """One experiment, driven block by block through the runner's `_Trainer`."""

  def __init__(self, exp: fp.Experiment, block: int):
    self.exp, self.block = exp, block
    self.trainer = runner._Trainer(exp)  # The runner's own data path, not a copy of it.
    init_key, self.rounds_key = jax.random.split(jax.random.key(exp.settings.seed))
    self.state = fp.server_init(exp.model.init(init_key), exp.server_optimizer, exp.aggregator)
    self.next_round = 0

  def _cohorts(self, first: int) -> list:
    return [self.exp.sampler.sample(r) for r in range(first, first + self.block)]

  def go(self) -> tuple[float, float]:
    """The next `block` rounds: (wall s, process CPU s) from sampling to the metrics on the host."""
    jax.block_until_ready(self.state)
    first = self.next_round
    wall, cpu = time.perf_counter(), time.process_time()
    keys = runner.round_keys(self.rounds_key, first, first + self.block)
    self.state, metrics = self.trainer.run(self.state, keys, self._cohorts(first))
    jax.device_get(metrics)
    self.next_round += self.block
    return time.perf_counter() - wall, time.process_time() - cpu

  def analysis(self) -> tuple[int, float]:
    """(XLA temp bytes of the compiled block, copies of the aggregator state in its program).

    Counted in the optimised HLO: `copy` instructions shaped like a state
    array ([slots, ...]), over the number of such arrays. The round body
    appears once in the compiled scan, so this is per round, counted
    statically: a copy in each branch of a conditional counts twice
    although one branch runs.
    """
    cohorts = self._cohorts(0)
    compiled = self.trainer.many_rounds.lower(
        self.state, self.trainer.population, np.stack([c.indices for c in cohorts]),
        np.stack([c.mask for c in cohorts]),
        runner.round_keys(self.rounds_key, 0, self.block)).compile()
    rows = [leaf for leaf in jax.tree.leaves(self.state.aggregator_state) if leaf.ndim > 1]
    shapes = "|".join(re.escape(f"f32[{','.join(map(str, leaf.shape))}]") for leaf in rows)
    copy = re.compile(f"(?:{shapes})" + r"\{[0-9,]*\} copy\(")
    copies = sum(1 for line in compiled.as_text().splitlines() if rows and copy.search(line))
    return int(compiled.memory_analysis().temp_size_in_bytes), copies / max(len(rows), 1)


class Setup(NamedTuple):
  """What every contender shares: the model, the clients, the participation and the planned run."""
  model: fp.Model
  train: FederatedDataset
  test: tuple[np.ndarray, np.ndarray]
  participation: fp.Cyclic
  rounds: int


def make_contender(args, setup: Setup, aggregator) -> Contender:
  settings = fp.RunSettings(rounds=setup.rounds, eval_every=setup.rounds, backend="vmap",
                            log_to=())
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    exp = fp.assemble(setup.model, setup.train, setup.test, aggregator, setup.participation,
                      settings, client_optimizer=optax.sgd(0.05), local_steps=args.local_steps,
                      batch_size=args.batch_size)
  return Contender(exp, args.block)


def correlated_mean(strategy: mf.Strategy, setup: Setup):
  """`mf_mean` with `strategy` for the planned run under the setup's Cyclic participation."""
  participation = setup.participation
  return mf_mean(strategy, CLIP, SIGMA, participation.expected_cohort_size, setup.rounds,
                 participation.max_participations(setup.rounds), participation.min_separation)


def build_contenders(args, setup: Setup) -> dict[str, Contender]:
  aggregators = {
      "independent": dp_mean(CLIP, SIGMA, setup.participation.expected_cohort_size),
      f"BandMF {args.bands}": correlated_mean(mf.banded_square_root(args.bands), setup),
      f"BLT {args.buffers}": correlated_mean(blt(args.buffers), setup),
  }
  return {name: make_contender(args, setup, aggregator) for name, aggregator in aggregators.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=1000, help="MLP hidden width H (two layers)")
  parser.add_argument("--cohort", type=int, default=16, help="K clients per round")
  parser.add_argument("--local-steps", type=int, default=4, help="S")
  parser.add_argument("--batch-size", type=int, default=16, help="B")
  parser.add_argument("--bands", type=int, default=64)
  parser.add_argument("--buffers", type=int, default=4)
  parser.add_argument("--block", type=int, default=4, help="rounds per device call")
  parser.add_argument("--repeats", type=int, default=15, help="timed blocks per contender")
  parser.add_argument("--memory-bands", default="8,16,32,64")
  args = parser.parse_args()
  memory_bands = [int(p) for p in args.memory_bands.split(",") if p]
  start = time.perf_counter()
  loads = [os.getloadavg()[0]]
  print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
        f"{jax.default_backend()}; load average (1 min) before: {loads[0]:.2f}", flush=True)

  separation = max([args.bands, *memory_bands])  # b >= every p: exact BandMF sensitivity.
  participation = fp.Cyclic(separation * args.cohort, args.cohort)
  rounds = (args.repeats + 1) * args.block  # The planned run: a warm-up block + timed blocks.
  train, test = synthetic_clients(participation.num_clients, args.local_steps * args.batch_size)
  model = mlp((FEATURES,), CLASSES, (args.hidden, args.hidden))
  params = model.init(jax.random.key(0))
  dim = sum(leaf.size for leaf in jax.tree.leaves(params))
  print(f"round: MLP {FEATURES}-{args.hidden}-{args.hidden}-{CLASSES}, d = {dim:,}; "
        f"Cyclic(N={participation.num_clients}, K={args.cohort}), b = "
        f"{participation.min_separation}, {rounds} rounds planned; S = {args.local_steps}, "
        f"B = {args.batch_size}; {args.block} rounds per device call; {args.repeats} repeats",
        flush=True)
  setup = Setup(model, train, test, participation, rounds)
  contenders = build_contenders(args, setup)

  template = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  strategies = {f"BandMF {args.bands}": mf.banded_square_root(args.bands),
                f"BLT {args.buffers}": blt(args.buffers)}
  streams = {name: mf.stream_init(s, template) for name, s in strategies.items()}
  stream_step = jax.jit(mf.stream_next, donate_argnums=1)
  independent_draw = jax.jit(lambda key: gaussian_like(key, template, 1.0))

  def stream_call(name: str, key) -> float:
    begin = time.perf_counter()
    if name == "independent":
      jax.block_until_ready(independent_draw(key))
    else:
      noise, streams[name] = stream_step(strategies[name], streams[name], key)
      jax.block_until_ready(noise)
    return time.perf_counter() - begin

  compile_start = time.perf_counter()
  for contender in contenders.values():
    contender.go()  # Compiles and runs the warm-up block.
  for name in ["independent", *strategies]:
    stream_call(name, jax.random.key(0))
  print(f"compile + warm-up block: {time.perf_counter() - compile_start:.1f} s", flush=True)

  names = list(contenders)
  wall = {name: [] for name in names}
  cpu = {name: [] for name in names}
  stream_ms = {name: [] for name in ["independent", *strategies]}
  for repeat in range(args.repeats):
    shift = repeat % len(names)
    for name in names[shift:] + names[:shift]:
      seconds, cpu_seconds = contenders[name].go()
      wall[name].append(1e3 * seconds / args.block)
      cpu[name].append(1e3 * cpu_seconds / args.block)
    key = jax.random.fold_in(jax.random.key(1), repeat)
    for name in stream_ms:
      stream_ms[name].append(1e3 * stream_call(name, key))
    loads.append(os.getloadavg()[0])
    print(f"repeat {repeat + 1}/{args.repeats} (load {loads[-1]:.2f}): " + ", ".join(
        f"{name} {wall[name][-1]:.0f} ms" for name in names), flush=True)

  print("\nper round; overhead = (round_mf - round_independent) / round_mf of the same repeat "
        "(the two blocks ran seconds apart), median and range over the repeats, by wall and by "
        "process CPU time")
  print("| contender | wall ms min | wall ms median | CPU ms median | overhead, wall | "
        "overhead range, wall | overhead, CPU | stream alone ms (median) | state bytes | "
        "XLA temp bytes | state copies in HLO |")
  print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|")
  temps = {}
  for name in names:
    base = "independent"
    overhead = spread = cpu_overhead = "-"
    if name != base:
      pairs = [100 * (m - i) / m for m, i in zip(wall[name], wall[base])]
      overhead = f"{statistics.median(pairs):.1f} %"
      spread = f"{min(pairs):.1f} to {max(pairs):.1f} %"
      cpu_pairs = [100 * (m - i) / m for m, i in zip(cpu[name], cpu[base])]
      cpu_overhead = f"{statistics.median(cpu_pairs):.1f} %"
    stream = f"{statistics.median(stream_ms[name]):.1f}" if name in stream_ms else "-"
    temp, copies = temps[name] = contenders[name].analysis()
    print(f"| {name} | {min(wall[name]):.0f} | {statistics.median(wall[name]):.0f} | "
          f"{statistics.median(cpu[name]):.0f} | {overhead} | {spread} | {cpu_overhead} | "
          f"{stream} | {state_bytes(contenders[name].state.aggregator_state):,} | {temp:,} | "
          f"{copies:g} |", flush=True)

  if memory_bands:
    print(f"\nBandMF p bands at d = {dim:,}: the state (p - 1 rows of d float32) and the compiled "
          "block's XLA temp bytes; extra = state + temp - the independent round's temp")
    print("| bands p | state bytes | state / (p d) | XLA temp bytes | extra bytes | "
          "extra / (p d) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in memory_bands:
      run = make_contender(args, setup, correlated_mean(mf.banded_square_root(p), setup))
      nbytes = state_bytes(run.state.aggregator_state)
      temp = run.analysis()[0]
      extra = nbytes + temp - temps["independent"][0]
      print(f"| {p} | {nbytes:,} | {nbytes / (p * dim):.3f} | {temp:,} | {extra:,} | "
            f"{extra / (p * dim):.3f} |", flush=True)
      del run  # Its state: up to 271 MB at p = 64.
  loads.append(os.getloadavg()[0])
  print(f"\nwall time {time.perf_counter() - start:.0f} s; load average (1 min): before "
        f"{loads[0]:.2f}, after {loads[-1]:.2f}, min {min(loads):.2f}, max {max(loads):.2f}")


if __name__ == "__main__":
  main()
