"""A population of up to 10^6 clients trained with DP-FedAvg in bounded host memory.

For each population size N (default 10^4, 10^5, 10^6) this script:

1. writes N generated clients (`GeneratedPopulation`, FedProx Synthetic-IID,
   d = 20, 10 classes, 5..32 examples per client) to a SQLite store with
   `StoreWriter`, plus a test store of the 1,000 next clients (positions N to
   N + 999: new users of the same distribution): the write time, file size
   and peak memory;
2. trains R rounds of user-level DP-FedAvg (cohorts of K = 1,000, fixed size)
   through `fedjax_priv.runner.run` with `data.stream = true`, i.e. each
   cohort read from the store with one query and packed on the host;
3. trains the same rounds from the generated population itself (no disk:
   client i drawn from (seed, i) when sampled);
4. as the baseline, trains from the store loaded whole (`data.stream =
   false`, the population packed on the host per round), whose memory grows
   with N.

Each phase runs in its own process, so its peak resident set (`ru_maxrss`)
is its own; the process also samples its RSS every 10 ms, records the RSS
after imports (the baseline that does not depend on N), and traces the
Python heap with tracemalloc (numpy's buffers included; XLA's are not, the
RSS covers them). Results go to experiments/results/million_clients.md.

Usage:
  JAX_PLATFORMS=cpu .venv/bin/python experiments/million_clients.py           # full, < 20 min
  JAX_PLATFORMS=cpu .venv/bin/python experiments/million_clients.py --small   # < 60 s, prints
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import results_page  # experiments/results_page.py, beside this script

ROOT = results_page.ROOT
SEED = 0
TEST_CLIENTS = 1000
POPULATION = dict(iid=True, dimension=20, num_classes=10, min_examples=5, max_examples=32)
MIB = 1 << 20


def _rss() -> int:
  """Resident set size of this process in bytes."""
  with open("/proc/self/statm") as statm:
    return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Memory:
  """Peak RSS (sampled every 10 ms), peak Python heap (tracemalloc) and ru_maxrss of a phase."""

  def __enter__(self):
    self.baseline = _rss()
    self.peak = self.baseline
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    tracemalloc.start()
    return self

  def _sample(self):
    while not self._stop.wait(0.01):
      self.peak = max(self.peak, _rss())

  def __exit__(self, *exc):
    _, self.heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss())

  def report(self) -> dict:
    return {"rss_after_imports_mib": self.baseline / MIB, "rss_peak_mib": self.peak / MIB,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "python_heap_peak_mib": self.heap_peak / MIB}


def _population(n: int, seed: int = SEED):
  from fedjax_priv.data.population import GeneratedPopulation
  return GeneratedPopulation(n, seed=seed, **POPULATION)


def _write(store: Path, n: int) -> dict:
  """Phase 1: the N training clients and the test clients, one client in memory at a time."""
  from fedjax_priv.data.prepare import heldout_store_path
  from fedjax_priv.data.store import StoreWriter
  meta = dict(name="generated_synthetic_iid", source="fedjax_priv GeneratedPopulation",
              license="generated data, no restrictions", x_dtype="float32",
              x_shape=(POPULATION["dimension"],), overwrite=True,
              extra={**POPULATION, "seed": SEED})
  with _Memory() as memory:
    start = time.perf_counter()
    population = _population(n + TEST_CLIENTS)
    for path, split, positions in ((store, "train", range(n)),
                                   (heldout_store_path(store), "test",
                                    range(n, n + TEST_CLIENTS))):
      with StoreWriter(path, split=split, **meta) as writer:
        for block in range(positions.start, positions.stop, 1024):
          chunk = range(block, min(block + 1024, positions.stop))
          for i, (x, y) in zip(chunk, population.clients(chunk)):
            writer.add(f"g{i:07d}", x, y)
    seconds = time.perf_counter() - start
  return {"write_s": seconds, "store_bytes": store.stat().st_size,
          "examples": int(_population(n).client_sizes.sum()), **memory.report()}


def _config(args, n: int, store: Path | None, stream: bool):
  from fedjax_priv import config as config_lib
  # With a store, build() takes N from the store; data.num_clients only passes the check
  # cohort_size <= num_clients that config loading runs first.
  data = [f"data.num_clients={n}"] + ([] if store is None else [
      "data.dataset=store", f"data.store={store}", f"data.stream={str(stream).lower()}"])
  return config_lib.load(None, data + [
      "model.name=logistic_regression", "client.local_steps=5", "client.batch_size=8",
      "client.learning_rate=0.1", "server.learning_rate=1.0", "privacy.unit=user",
      "privacy.clip_norm=1.0", f"privacy.noise_multiplier={args.noise_multiplier}",
      f"privacy.delta={args.delta}", f"simulation.cohort_size={args.cohort}",
      "simulation.sampling=fixed", f"simulation.rounds={args.rounds}",
      f"simulation.eval_every={args.rounds}", "simulation.data_on_device=false",
      "simulation.backend=chunked", "simulation.client_chunk_size=250",
      f"simulation.seed={SEED}"])


def _train_store(args, n: int, store: Path, stream: bool) -> dict:
  """Phases 2 and 4: `fedjax-priv run` on the store, streamed or loaded whole."""
  from fedjax_priv import runner
  config = _config(args, n, store, stream)
  out = store.parent / f"run_{n}_{'stream' if stream else 'memory'}"
  with _Memory() as memory:
    start = time.perf_counter()
    summary = runner.run(config, out, progress=False, overwrite=True)  # Re-runnable.
    total = time.perf_counter() - start
  return {"total_s": total, "compile_s": summary["compile_time_s"],
          "round_s": summary["wall_time_s"] / summary["rounds"],
          "setup_s": total - summary["wall_time_s"] - summary["compile_time_s"],
          "epsilon": summary["privacy"]["epsilon"], "accuracy": summary["test_accuracy"],
          "num_clients": summary["num_clients"], **memory.report()}


def _train_generated(args, n: int, store: Path) -> dict:
  """Phase 3: the same DP-FedAvg rounds from the population generated on request (no disk)."""
  import jax
  import numpy as np
  from fedjax_priv.algorithms.server import server_init
  from fedjax_priv.data.packing import pack_cohort
  from fedjax_priv.experiment import (hyperparameters, make_training, participation_of,
                                      privacy_levels)
  from fedjax_priv.models import logistic_regression
  from fedjax_priv.models.model import evaluate
  from fedjax_priv.privacy.accounting import PrivacyLedger
  from fedjax_priv.simulation.program import Batching, round_from_cohort
  config = _config(args, n, None, False)
  with _Memory() as memory:
    start = time.perf_counter()
    population = _population(n)
    participation = participation_of(config, n)
    sampler = participation.sampler(config.simulation.seed)
    batching = Batching(config.client.local_steps, config.client.batch_size)
    levels = privacy_levels(config, population, participation, batching)
    model = logistic_regression(population.feature_shape, POPULATION["num_classes"])
    training = make_training(config, model, participation, hyperparameters(config, levels))
    step = jax.jit(round_from_cohort(training.round_fn, batching), donate_argnums=0)
    init_key, rounds_key = jax.random.split(jax.random.key(SEED))
    state = server_init(model.init(init_key), training.server_optimizer, training.aggregator)
    ledger = PrivacyLedger()
    setup = time.perf_counter() - start
    round_times = []
    for r in range(args.rounds):
      began = time.perf_counter()
      cohort = sampler.sample(r)
      data = jax.device_put(pack_cohort(population, cohort.indices, cohort.mask,
                                        POPULATION["max_examples"]))
      state, _ = step(state, data, jax.random.fold_in(rounds_key, r))
      jax.block_until_ready(state)
      ledger.record(levels[0].round_event, levels[0].overflow_probability_per_round)
      round_times.append(time.perf_counter() - began)
    test = _population(n + TEST_CLIENTS).clients(range(n, n + TEST_CLIENTS))
    x, y = (np.concatenate(parts) for parts in zip(*test))
    _, correct, count = evaluate(model, state.params, x, y, np.ones(len(y), np.float32))
  epsilon, _ = ledger.epsilon(config.privacy.delta, config.privacy.accountant)
  # Round 0 compiles; the others are the steady state.
  return {"setup_s": setup, "first_round_s": round_times[0],
          "round_s": float(np.mean(round_times[1:])) if len(round_times) > 1 else None,
          "epsilon": epsilon, "accuracy": float(correct / count), **memory.report()}


def _phase(args) -> None:
  """Runs one phase in this process and prints its JSON result."""
  n, store = args.n, Path(args.store)
  if args.phase == "write":
    result = _write(store, n)
  elif args.phase == "generated":
    result = _train_generated(args, n, store)
  else:
    result = _train_store(args, n, store, stream=args.phase == "stream")
  print(json.dumps(result))


def _child(args, phase: str, n: int, store: Path) -> dict:
  command = [sys.executable, __file__, "--phase", phase, "--n", str(n), "--store", str(store),
             "--rounds", str(args.rounds), "--cohort", str(args.cohort),
             "--noise-multiplier", str(args.noise_multiplier), "--delta", str(args.delta)]
  # One persistent compilation cache for all phases: the round program's shapes depend on
  # the cohort, not on N, so only the first phase of a kind pays the compile.
  env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
         "JAX_COMPILATION_CACHE_DIR": str(store.parent / "xla_cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"phase {phase} at N={n} failed:\n{done.stderr[-4000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  print(f"N={n:>9,} {phase:>9}: " + ", ".join(
      f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()),
        flush=True)
  return result


def _page(args, results: dict, wall: float) -> str:
  sizes = sorted(results)
  largest = sizes[-1]
  lines = [
      "# 10^6 clients streamed in bounded host memory",
      "",
      f"DP-FedAvg (user level, fixed cohorts of K = {args.cohort:,}, R = {args.rounds} rounds, "
      f"noise multiplier {args.noise_multiplier}, clip 1.0, delta = {args.delta:g}, RDP) on "
      "populations of generated clients (`fedjax_priv.data.population.GeneratedPopulation`: "
      "FedProx Synthetic-IID, d = 20, 10 classes, 5..32 examples per client, client i drawn "
      "from (seed, i) alone). Model: logistic regression (210 parameters); 5 local SGD steps "
      "of batch 8 at lr 0.1, server SGD at lr 1.0; chunked backend (chunks of 250). "
      f"Test set: the {TEST_CLIENTS:,} clients after the population (positions N to "
      f"N + {TEST_CLIENTS - 1}), new users of the same distribution.",
      "",
      "Data paths: **stream**: `fedjax-priv run` with `data.dataset = \"store\"`, "
      "`data.stream = true` (each cohort one SQLite query, packed on the host); "
      "**generated**: the same round function fed by `pack_cohort(GeneratedPopulation, ...)` "
      "(no disk at all); **in memory**: the store loaded whole (`to_federated()`), the "
      "cohort packed from memory on the host (the baseline).",
      "",
      "Memory: each phase runs in its own process. *RSS after imports* is the process "
      "(Python, numpy, JAX, XLA) before the phase; *peak RSS* the largest resident set "
      "sampled every 10 ms during the phase (ru_maxrss agrees to a few MiB); *heap* the "
      "peak of Python allocations traced by tracemalloc, numpy buffers included. The only "
      "O(N) state of the streamed and generated paths is the int64 client-size array "
      "(8 B per client, 7.6 MiB at 10^6) and the sampler's transient per-round draw. "
      "Before the measured phases, one streamed and one generated run at the smallest N "
      "fill JAX's persistent compilation cache (not reported), so that no measured peak "
      "holds XLA's compile-time memory.",
      "",
      "## Store",
      "",
      "| N | examples | store size | write time | write rate | peak RSS - RSS after imports |",
      "| ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for n in sizes:
    w = results[n]["write"]
    lines.append(
        f"| {n:,} | {w['examples']:,} | {w['store_bytes'] / MIB:,.1f} MiB | "
        f"{w['write_s']:.1f} s | {(n + TEST_CLIENTS) / w['write_s']:,.0f} clients/s | "
        f"{w['rss_peak_mib'] - w['rss_after_imports_mib']:.1f} MiB |")
  lines += [
      "",
      "## Training: memory against N",
      "",
      "| N | path | peak RSS | peak RSS - after imports | heap peak | setup | compile "
      "| s / round | epsilon | test accuracy |",
      "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for n in sizes:
    for path in ("stream", "generated", "memory"):
      r = results[n].get(path)
      if r is None:
        continue
      compile_s = r.get("compile_s", r.get("first_round_s"))
      lines.append(
          f"| {n:,} | {'in memory' if path == 'memory' else path} | {r['rss_peak_mib']:.0f} MiB "
          f"| {r['rss_peak_mib'] - r['rss_after_imports_mib']:.0f} MiB "
          f"| {r['python_heap_peak_mib']:.1f} MiB | {r['setup_s']:.1f} s | {compile_s:.1f} s "
          f"| {r['round_s']:.3f} | {r['epsilon']:.3g} | {r['accuracy']:.3f} |")
  def growth(path, key="rss_peak_mib"):
    return results[largest][path][key] - results[sizes[0]][path][key]
  baseline = ("" if "memory" not in results[largest] else
              f" Loaded whole, the same population's peak grew by {growth('memory'):.0f} MiB "
              f"RSS and {growth('memory', 'python_heap_peak_mib'):.0f} MiB heap.")
  lines += [
      "",
      "Setup: building the experiment (for the store: reading the client sizes, one pass over "
      "the label blobs for the number of classes, loading the test store) and the evaluation "
      "program; for *generated* the size array and the round program. Compile: the first "
      "round's XLA compile (for *generated*: the whole first round, compile included); the "
      "phases share JAX's persistent compilation cache, so after the first phase of a kind "
      "this is mostly a cache load. "
      "s / round: steady-state wall time per round, host packing included.",
      "",
      f"From N = {sizes[0]:,} to N = {largest:,} the peak Python heap grew by "
      f"{growth('stream', 'python_heap_peak_mib'):.1f} MiB streamed and "
      f"{growth('generated', 'python_heap_peak_mib'):.1f} MiB generated, against "
      f"{8 * (largest - sizes[0]) / MIB:.1f} MiB for the size array; the peak RSS by "
      f"{growth('stream'):.0f} and {growth('generated'):.0f} MiB (RSS peaks also move by a "
      f"few tens of MiB from run to run with XLA's and the allocator's own use).{baseline}",
      "",
      *results_page.command_and_hardware(),
      f"Wall time of the whole script: {wall / 60:.1f} min.",
      "",
  ]
  return "\n".join(lines)


def _ints(text: str) -> list[int]:
  return [int(float(v)) for v in text.split(",")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", type=_ints, default=[10**4, 10**5, 10**6],
                      help="population sizes N, comma-separated")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--cohort", type=int, default=1000)
  parser.add_argument("--noise-multiplier", type=float, default=1.0)
  parser.add_argument("--delta", type=float, default=1e-7)
  parser.add_argument("--no-baseline", action="store_true",
                      help="skip the in-memory baseline (its memory grows with N)")
  parser.add_argument("--small", action="store_true",
                      help="N = 1,000 and 10,000, cohort 100, 3 rounds, no baseline; prints "
                           "the page")
  parser.add_argument("--work", default=str(ROOT / "runs" / "million_clients"),
                      help="folder for the stores and runs (deleted at the end)")
  parser.add_argument("--out", default=None,
                      help="results page (default: experiments/results/million_clients.md; "
                           "with --small, printed)")
  parser.add_argument("--phase", choices=("write", "stream", "generated", "memory"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--store", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phase:
    _phase(args)
    return
  if args.small:
    args.sizes, args.cohort, args.rounds, args.no_baseline = [1000, 10000], 100, 3, True
  start = time.perf_counter()
  work = Path(args.work)
  results = {}
  try:
    for n in args.sizes:
      store = work / f"population_{n}.sqlite"
      store.parent.mkdir(parents=True, exist_ok=True)
      results[n] = {"write": _child(args, "write", n, store)}
      if n == args.sizes[0] and not args.small:
        # Unreported runs that fill the compilation cache, so that no measured phase
        # carries XLA's compile-time memory and the peaks compare across N.
        for phase in ("stream", "generated"):
          _child(args, phase, n, store)
      for phase in ("stream", "generated") + (() if args.no_baseline else ("memory",)):
        results[n][phase] = _child(args, phase, n, store)
      # Frees the disk before the next, larger population; the compilation cache stays.
      from fedjax_priv.data.prepare import heldout_store_path
      store.unlink()
      heldout_store_path(store).unlink()
      for run in work.glob(f"run_{n}_*"):
        shutil.rmtree(run)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  wall = time.perf_counter() - start
  page = _page(args, results, wall)
  out = args.out or (None if args.small else
                     ROOT / "experiments" / "results" / "million_clients.md")
  if out is None:
    print(page)
  else:
    Path(out).write_text(page)
    # The measurements behind the page, to redraw it without rerunning.
    Path(out).with_suffix(".json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if not k.startswith("phase")},
         "wall_s": wall, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
