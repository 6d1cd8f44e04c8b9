"""Throughput of one private federated round under the `loop`, `vmap` and `chunked` backends.

What is timed
  One round of DP-FedAvg with user-level differential privacy: each of the K
  clients of a cohort runs S = 10 local SGD steps (learning rate 0.1) on
  batches of B = 20 examples; each client's delta is clipped to L2 norm 1, the clipped deltas
  are summed, Gaussian noise (noise multiplier 1) is added once and the sum
  is divided by the public expected cohort size K (`privacy.dp_mean`); the
  server applies SGD with learning rate 1. So the private path is what runs.

  Workloads:
    mlp  MLP 64-200-200-10 (`models.mlp((8, 8, 1), 10, (200, 200))`) on real
         scikit-learn digits, packed into clients of 32 examples each. The CPU
         target.
    cnn  The EMNIST CNN of Reddi et al. 2021 (`models.cnn((28, 28, 1), 62)`:
         conv32-conv64-pool-dense128-dense62) on synthetic 28x28 images with
         random labels (no download), clients of 32 examples each.

  For every workload and cohort size K, in one process, on the same
  `ClientBatch` [K, S, B, ...] and the same PRNG key:
    loop        `build_round(..., "loop")`: a Python loop over clients with one
                jitted local-training call per client; the reference.
    vmap        `jax.jit(build_round(..., "vmap"))`: all K clients in one vmap.
    chunked/C   `jax.jit(build_round(..., "chunked", client_chunk_size=C))` for
                every C < K (a single chunk of C = K is the vmap round; a C above K
                pads the cohort with empty slots, i.e. does C/K times the work).
    scan/X      `jax.jit(rounds_on_device(...))` with X the smallest chunked/C
                above (vmap where none): R rounds in one `lax.scan` call, each
                gathering a cohort from a device-resident population and drawing
                its local batches on the device; reported per round (so, unlike
                the rows above, it includes the cohort gather and the batch
                sampling).

How
  * Before any timing, every backend runs one round from the same state; the
    new params must agree with the loop backend's (vmap's where K is above
    --loop-max-clients): allclose with atol 1e-4 in float32 on a CPU (2e-3
    on a GPU, where XLA's float32 matmuls use TF32), 2**-6 (two bfloat16 ulps
    at 1.0) in bfloat16; otherwise the script stops.
  * Compile time is reported apart from run time. Jitted backends are compiled
    ahead of time (`jit(...).lower(...).compile()`, trace + lower + compile
    wall time); for `loop` it is the time JAX reports (jax.monitoring) spent
    tracing and compiling during its first round. The persistent compilation
    cache is not enabled, so these are cold compiles.
  * Steady state is the median of up to --repeats timed rounds after that
    first round. Backends are interleaved within each repeat, so background
    load hits all of them alike; each timed round continues from the state its
    previous round returned and ends in `jax.block_until_ready` on the new
    params. An XLA compile during the timed rounds stops the script (round 2
    must not recompile). The scan, compiled ahead of time, gets no separate
    warm-up call.
    A cohort stops repeating when one more repeat would take it past
    --time-budget seconds (every backend gets at least one timed round).
  * examples/s = K * S * B / round time; "vs loop" = loop round time / round
    time, both measured in this run. "xla temp" is the scratch memory XLA
    allocated for the compiled round; "peak" is the process high-water mark so
    far (device `peak_bytes_in_use` where the device reports it, else the
    host's max RSS).

Usage
  python experiments/benchmarks/round_throughput.py [--workload mlp|cnn|all]
      [--cohorts 16,64] [--chunk-sizes 64,16] [--repeats 10] [--time-budget 20]
      [--scan-rounds 10] [--loop-max-clients N] [--vmap-max-clients N]
      [--dtype float32|bfloat16] [--breakdown] [--json OUT]

`--breakdown` adds, per workload and K, the time of the parts of a round
(local training looped vs vmapped, the loop backend's per-client slicing and
accumulation, the aggregation), to explain where a backend's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import ServerState, server_init
from fedjax_priv.data.device import ClientBatch, gather_cohort
from fedjax_priv.data.digits import load_digits
from fedjax_priv.data.packing import CohortData
from fedjax_priv.models import Model, cnn, mlp
from fedjax_priv.privacy.aggregation import Aggregator, ClientContext, RoundContext, dp_mean
from fedjax_priv.simulation.program import Batching, cohort_to_batch, rounds_on_device
from fedjax_priv.simulation.round import build_round

LOCAL_STEPS = 10
BATCH_SIZE = 20
EXAMPLES_PER_CLIENT = 32
CLIENT_LEARNING_RATE = 0.1
SERVER_LEARNING_RATE = 1.0
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
# Population = this many times the largest cohort, so rounds_on_device samples.
POPULATION_FACTOR = 2
# float32 on a GPU: XLA lets matmuls and convolutions use TF32 (10-bit
# mantissa), so backends that batch differently differ by ~1e-4; seen 1.9e-4
# on an H100 between vmap and loop after one round.
TOLERANCE = {("float32", "cpu"): 1e-4, ("float32", "accelerator"): 2e-3,
             ("bfloat16", "cpu"): 2.0**-6, ("bfloat16", "accelerator"): 2.0**-6}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Defaults per platform: (cohorts per workload, chunk sizes, largest loop cohort).
CPU_DEFAULTS = ({"mlp": "16,64", "cnn": "16"}, "64,16", 64)
ACCELERATOR_DEFAULTS = ({"mlp": "16,64,256,1024,4096", "cnn": "16,64,256,1024,4096"}, "64", 1024)
CPU_TARGET = 1.5  # DESIGN.md: vmap/chunked >= 1.5x the loop backend for the MLP on CPU.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileClock:
  """Accumulates the seconds JAX reports spending on tracing and compiling."""

  def __init__(self):
    self.seconds = 0.0
    self.backend_compiles = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_: Any) -> None:
    if event in _COMPILE_EVENTS:
      self.seconds += duration
    if event == _BACKEND_COMPILE_EVENT:
      self.backend_compiles += 1

  @contextlib.contextmanager
  def measure(self) -> Iterator[dict[str, float]]:
    """Yields a dict filled, on exit, with compile seconds and XLA compiles in the block."""
    result = {"seconds": 0.0, "compiles": 0}
    seconds, compiles = self.seconds, self.backend_compiles
    try:
      yield result
    finally:
      result["seconds"] = self.seconds - seconds
      result["compiles"] = self.backend_compiles - compiles


class Workload(NamedTuple):
  """A model and a device-resident population of equal-size clients."""
  name: str
  model: Model
  population: CohortData


class Variant(NamedTuple):
  """One way to run a round: a backend, and its chunk size for "chunked"."""
  backend: str
  chunk: int | None = None

  @property
  def label(self) -> str:
    return f"chunked/{self.chunk}" if self.backend == "chunked" else self.backend


class Stepper:
  """Runs rounds of one variant, each from the state the previous one returned."""

  def __init__(self, fn: Callable, state: ServerState, *inputs: Any):
    self.fn, self.state, self.inputs = fn, state, inputs

  def __call__(self) -> None:
    self.state, _ = self.fn(self.state, *self.inputs)
    jax.block_until_ready(self.state.params)


def digits_population(num_clients: int, dtype: str, seed: int) -> CohortData:
  """Packs real digits training examples into clients of EXAMPLES_PER_CLIENT each.

  Each client draws its examples without replacement from the 1437 training
  digits; different clients may share examples.
  """
  split = load_digits(seed=seed)
  rng = np.random.default_rng(seed)
  rows = np.stack([rng.choice(len(split.y_train), EXAMPLES_PER_CLIENT, replace=False)
                   for _ in range(num_clients)])
  return _population(split.x_train[rows], split.y_train[rows], dtype)


def synthetic_population(num_clients: int, num_classes: int, dtype: str,
                         seed: int) -> CohortData:
  """Uniform random 28x28 images with uniform random labels."""
  rng = np.random.default_rng(seed)
  x = rng.random((num_clients, EXAMPLES_PER_CLIENT, 28, 28, 1), dtype=np.float32)
  y = rng.integers(0, num_classes, (num_clients, EXAMPLES_PER_CLIENT), dtype=np.int32)
  return _population(x, y, dtype)


def _population(x: np.ndarray, y: np.ndarray, dtype: str) -> CohortData:
  num_clients = x.shape[0]
  return jax.device_put(CohortData(
      x=jnp.asarray(x, DTYPES[dtype]),
      y=y.astype(np.int32),
      num_examples=np.full(num_clients, EXAMPLES_PER_CLIENT, np.int32),
      client_mask=np.ones(num_clients, np.float32)))


def make_workload(name: str, num_clients: int, dtype: str, conv_impl: str,
                  seed: int) -> Workload:
  """Builds the "mlp" or "cnn" workload with a population of `num_clients`."""
  if name == "mlp":
    return Workload(name, mlp((8, 8, 1), 10, (200, 200)),
                    digits_population(num_clients, dtype, seed))
  return Workload(name, cnn((28, 28, 1), 62, conv_impl=conv_impl),
                  synthetic_population(num_clients, 62, dtype, seed))


def initial_state(workload: Workload, dtype: str, seed: int) -> ServerState:
  """Server state with freshly initialised params cast to `dtype`."""
  params = workload.model.init(jax.random.key(seed))
  params = jax.tree.map(lambda p: p.astype(DTYPES[dtype]), params)
  return server_init(params, optax.sgd(SERVER_LEARNING_RATE))


def cohort_batch(population: CohortData, indices: np.ndarray, key: jax.Array) -> ClientBatch:
  """Gathers the cohort `indices` and draws its [K, S, B] local batches on the device."""
  make = cohort_to_batch(Batching(LOCAL_STEPS, BATCH_SIZE))

  @jax.jit
  def build(population, indices, key):
    cohort = gather_cohort(population, indices, jnp.ones(indices.shape, jnp.float32))
    return make(cohort, key)[0]

  return jax.block_until_ready(build(population, jnp.asarray(indices), key))


def make_round(model: Model, aggregator: Aggregator, variant: Variant) -> Callable:
  """The library's round function for `variant` (not yet jitted)."""
  client_update = make_client_update(model, optax.sgd(CLIENT_LEARNING_RATE))
  # Only "chunked" reads client_chunk_size; the others get the library default.
  return build_round(client_update, aggregator, optax.sgd(SERVER_LEARNING_RATE),
                     variant.backend, variant.chunk or 64)


def compile_ahead(fn: Callable, *args: Any) -> tuple[Callable, float, float | None]:
  """jit-compiles `fn` for `args`; returns (executable, seconds, XLA temp MiB or None)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp = memory.temp_size_in_bytes / 2**20 if memory is not None else None
  return compiled, seconds, temp


def peak_memory_mib() -> tuple[float, str]:
  """Process high-water mark: device peak where reported, else the host's max RSS."""
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device"
  # ru_maxrss is in KiB on Linux and in bytes on macOS.
  scale = 2**20 if sys.platform == "darwin" else 2**10
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, "host"


def is_out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "out of memory" in str(error).lower()


def check_agreement(reference: Any, params: Any, label: str, reference_label: str,
                    tolerance: float) -> None:
  """Raises AssertionError unless every leaf of `params` is allclose to `reference`."""
  for ref, new in zip(jax.tree.leaves(reference), jax.tree.leaves(params)):
    ref = np.asarray(ref, np.float32)
    new = np.asarray(new, np.float32)
    if not np.allclose(new, ref, atol=tolerance):
      raise AssertionError(
          f"{label} disagrees with {reference_label} after one round: max |diff| = "
          f"{np.max(np.abs(new - ref)):.3g} > atol {tolerance:g}")


def interleaved_medians(steppers: dict[str, Callable[[], None]], repeats: int,
                        budget_s: float) -> dict[str, tuple[float, int]]:
  """Times one call of every stepper per repeat; returns {label: (median s, repeats)}."""
  times: dict[str, list[float]] = {label: [] for label in steppers}
  start = time.perf_counter()
  for _ in range(repeats):
    tic = time.perf_counter()
    for label, step in steppers.items():
      step()
      times[label].append(time.perf_counter() - tic)
      tic = time.perf_counter()
    # Stop when one more repeat, as long as the last one, would overrun the budget.
    elapsed = time.perf_counter() - start
    if elapsed + sum(ts[-1] for ts in times.values()) > budget_s:
      break
  return {label: (statistics.median(ts), len(ts)) for label, ts in times.items()}


def row(workload: str, k: int, label: str, round_s: float, repeats: int,
        loop_s: float | None, **extra: Any) -> dict[str, Any]:
  """One result: per-round time and throughput, and the ratio to the loop backend."""
  peak, peak_kind = peak_memory_mib()
  return {
      "workload": workload, "cohort": k, "backend": label,
      "round_s": round_s, "rounds_per_s": 1.0 / round_s,
      "examples_per_s": k * LOCAL_STEPS * BATCH_SIZE / round_s,
      "vs_loop": loop_s / round_s if loop_s else None, "repeats": repeats,
      "peak_mib": peak, "peak_kind": peak_kind, **extra,
  }


def measure_cohort(workload: Workload, k: int, variants: list[Variant], args: argparse.Namespace,
                   clock: CompileClock) -> list[dict[str, Any]]:
  """Checks, then times side by side, every variant and rounds_on_device for cohort size `k`."""
  rng = np.random.default_rng(args.seed)
  population_size = workload.population.client_mask.shape[0]
  # Cohort of round r (for the scan); the single-round rows use round 0's.
  indices = np.stack([rng.choice(population_size, k, replace=False)
                      for _ in range(max(args.scan_rounds, 1))]).astype(np.int32)
  batch = cohort_batch(workload.population, indices[0], jax.random.key(args.seed + 1))
  key = jax.random.key(args.seed + 2)
  state = initial_state(workload, args.dtype, args.seed)
  aggregator = dp_mean(CLIP_NORM, NOISE_MULTIPLIER, float(k))

  steppers: dict[str, Stepper] = {}
  info: dict[str, dict[str, Any]] = {}
  failed: list[dict[str, Any]] = []
  reference = None
  for variant in variants:
    fn = make_round(workload.model, aggregator, variant)
    try:
      with clock.measure() as compiled:
        if variant.backend != "loop":
          fn, compile_s, temp = compile_ahead(fn, state, batch, key)
        tic = time.perf_counter()
        new_state, _ = fn(state, batch, key)
        jax.block_until_ready(new_state.params)
        first_round_s = time.perf_counter() - tic
    except jax.errors.JaxRuntimeError as error:
      if not is_out_of_memory(error):
        raise
      failed.append({"workload": workload.name, "cohort": k, "backend": variant.label,
                     "error": "out of memory"})
      continue
    if variant.backend == "loop":
      compile_s, temp = compiled["seconds"], None
    info[variant.label] = {"compile_s": compile_s, "xla_temp_mib": temp,
                           "first_round_s": first_round_s, "rounds_per_call": 1}
    if reference is None:
      reference = (variant.label, new_state.params)
    else:
      platform = "cpu" if jax.default_backend() == "cpu" else "accelerator"
      check_agreement(reference[1], new_state.params, variant.label, reference[0],
                      TOLERANCE[args.dtype, platform])
    steppers[variant.label] = Stepper(fn, new_state, batch, key)

  scanned = [v for v in variants if v.backend != "loop" and v.label in steppers]
  if scanned and args.scan_rounds >= 2:
    # The smallest chunk below K, else vmap: the chunked/vmap choice a user would make.
    variant = scanned[-1]
    label = f"scan/{variant.label}"
    try:
      steppers[label], info[label] = prepare_scan(
          workload, k, variant, info[variant.label]["first_round_s"], indices, state,
          aggregator, args)
    except jax.errors.JaxRuntimeError as error:
      if not is_out_of_memory(error):
        raise
      failed.append({"workload": workload.name, "cohort": k, "backend": label,
                     "error": "out of memory"})

  with clock.measure() as timed:
    medians = interleaved_medians(steppers, args.repeats, args.time_budget)
  if timed["compiles"]:
    raise AssertionError(f"{timed['compiles']} XLA compiles during timed rounds: "
                         "a round recompiled after its first call")
  loop_s = medians["loop"][0] if "loop" in medians else None
  rows = []
  for label, (call_s, repeats) in medians.items():
    rows.append(row(workload.name, k, label, call_s / info[label]["rounds_per_call"], repeats,
                    loop_s, **info[label]))
  return rows + failed


def prepare_scan(workload: Workload, k: int, variant: Variant, round_s: float,
                 indices: np.ndarray, state: ServerState, aggregator: Aggregator,
                 args: argparse.Namespace) -> tuple[Stepper, dict[str, Any]]:
  """Compiles rounds_on_device with `variant`'s round, R rounds per call.

  R is --scan-rounds, lowered (to no fewer than 2) so that --repeats calls fit
  in --time-budget at the variant's single-round time `round_s`. The call is
  compiled ahead of time and gets no separate warm-up call.
  """
  fits = int(args.time_budget / (args.repeats * round_s))
  rounds = max(2, min(args.scan_rounds, fits))
  run = rounds_on_device(make_round(workload.model, aggregator, variant),
                         Batching(LOCAL_STEPS, BATCH_SIZE))
  inputs = (workload.population, jnp.asarray(indices[:rounds]),
            jnp.ones((rounds, k), jnp.float32),
            jax.random.split(jax.random.key(args.seed + 3), rounds))
  compiled, compile_s, temp = compile_ahead(run, state, *inputs)
  return Stepper(compiled, state, *inputs), {"compile_s": compile_s, "xla_temp_mib": temp,
                                             "rounds_per_call": rounds}


def breakdown(workload: Workload, k: int, args: argparse.Namespace) -> dict[str, Any]:
  """Milliseconds per round of the parts of a round, for cohorts of size `k`.

  Parts: local training (`client_update`) as K jitted calls on pre-sliced data
  and as one vmapped call; the loop backend's per-client work besides training
  (slicing the client's inputs out of the batch, accumulating its weighted
  delta); the aggregation of the vmapped round (finite check, clipping,
  weighted sum as a dot product, noise and division).
  """
  population_size = workload.population.client_mask.shape[0]
  indices = np.random.default_rng(args.seed).choice(population_size, k, replace=False)
  batch = cohort_batch(workload.population, indices.astype(np.int32),
                       jax.random.key(args.seed + 1))
  params = initial_state(workload, args.dtype, args.seed).params
  keys = jax.random.split(jax.random.key(args.seed + 2), k)
  aggregator = dp_mean(CLIP_NORM, NOISE_MULTIPLIER, float(k))
  client_update = make_client_update(workload.model, optax.sgd(CLIENT_LEARNING_RATE))

  one_client = jax.jit(client_update)
  clients = [jax.tree.map(lambda a, i=i: a[i], (batch.x, batch.y, batch.example_mask, keys))
             for i in range(k)]
  vmapped = jax.jit(jax.vmap(client_update, in_axes=(None, 0, 0, 0, 0)))
  deltas = vmapped(params, batch.x, batch.y, batch.example_mask, keys)[0]
  weight = jnp.float32(1.0)
  accumulate = jax.jit(lambda total, delta, weight: tree_util.add(
      total, tree_util.scale(delta, weight)))
  client_deltas = [jax.tree.map(lambda a, i=i: a[i], deltas) for i in range(k)]

  @jax.jit
  def aggregate(deltas, num_examples, key):
    cohort_mask = jnp.ones(k, jnp.float32)
    client_keys = jax.random.split(key, k)

    def prepare(delta, n, slot, client_key):
      finite = tree_util.all_finite(delta)
      delta = tree_util.select(finite, delta, tree_util.zeros_like(delta))
      ctx = ClientContext(slot, client_key, key, cohort_mask)
      return aggregator.prepare((), delta, n, ctx)[:2]
    prepared, weights = jax.vmap(prepare)(deltas, num_examples, jnp.arange(k), client_keys)
    ctx = RoundContext(key, key, cohort_mask, cohort_mask)
    return aggregator.finalize((), aggregator.group_sum(weights, prepared), jnp.sum(weights),
                               ctx)[0]

  def accumulate_all():
    total = tree_util.zeros_like(client_deltas[0])
    for delta in client_deltas:
      total = accumulate(total, delta, weight)
    return total

  parts = {
      "client_update, K jitted calls": lambda: [one_client(params, *c) for c in clients],
      "client_update, vmapped": lambda: vmapped(params, batch.x, batch.y,
                                                batch.example_mask, keys),
      "loop: slice inputs x K": lambda: [
          (batch.x[i], batch.y[i], batch.example_mask[i], batch.num_examples[i],
           batch.client_mask[i], keys[i]) for i in range(k)],
      "loop: accumulate x K": accumulate_all,
      "aggregate, vmapped": lambda: aggregate(deltas, batch.num_examples, keys[0]),
  }
  blocking = {name: (lambda part=part: jax.block_until_ready(part()))
              for name, part in parts.items()}
  for run in blocking.values():
    run()
  medians = interleaved_medians(blocking, args.repeats, args.time_budget)
  return {"workload": workload.name, "cohort": k,
          "ms_per_round": {name: 1e3 * median for name, (median, _) in medians.items()}}


def format_row(r: dict[str, Any]) -> str:
  """One line of the results table."""
  if "error" in r:
    return f"{r['workload']:<8} {r['cohort']:>6}  {r['backend']:<18} {r['error']}"
  ratio = f"{r['vs_loop']:.2f}x" if r["vs_loop"] else "-"
  temp = f"{r['xla_temp_mib']:.1f}" if r["xla_temp_mib"] is not None else "-"
  return (f"{r['workload']:<8} {r['cohort']:>6}  {r['backend']:<18} {r['examples_per_s']:>11,.0f} "
          f"{r['rounds_per_s']:>9.2f} {1e3 * r['round_s']:>10.2f} {r['compile_s']:>8.2f} "
          f"{ratio:>8} {temp:>9} {r['peak_mib']:>9.0f}  {r['repeats']}")


TABLE_HEADER = (f"{'workload':<8} {'K':>6}  {'backend':<18} {'examples/s':>11} {'rounds/s':>9} "
                f"{'round ms':>10} {'compile s':>8} {'vs loop':>8} {'xla temp':>9} {'peak MiB':>9}"
                "  n")


def print_targets(rows: list[dict[str, Any]]) -> None:
  """Prints how the fastest jitted single-round backend compares with the targets."""
  if jax.default_backend() != "cpu":
    print("reference (DESIGN.md, H200, f32 CNN): ~195k examples/s with chunks of 64, "
          "flat from 64 to 4096 clients; raw vmap ~34k at 256 clients")
    return
  mlp_cohorts = sorted({r["cohort"] for r in rows if r["workload"] == "mlp"})
  if mlp_cohorts:
    print(f"target (CPU, mlp): vmap or chunked >= {CPU_TARGET}x the loop backend")
  for k in mlp_cohorts:
    ratios = {r["backend"]: r["vs_loop"] for r in rows
              if r["workload"] == "mlp" and r["cohort"] == k and r.get("vs_loop")
              and not r["backend"].startswith(("loop", "scan")) and "error" not in r}
    if not ratios:
      print(f"  K={k}: no loop measurement (K > --loop-max-clients)")
      continue
    best = max(ratios, key=ratios.get)
    listed = ", ".join(f"{label} {ratio:.3f}x" for label, ratio in ratios.items())
    verdict = "met" if ratios[best] >= CPU_TARGET else "missed"
    print(f"  K={k}: {listed} -> {verdict} (best {best})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """Command-line flags; defaults depend on the platform JAX runs on."""
  on_cpu = jax.default_backend() == "cpu"
  cohorts, chunks, loop_max = CPU_DEFAULTS if on_cpu else ACCELERATOR_DEFAULTS
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workload", choices=("mlp", "cnn", "all"), default="all",
                      help="which workload(s) to run (default %(default)s)")
  defaults = "; ".join(f"{name} {ks}" for name, ks in cohorts.items())
  parser.add_argument("--cohorts", help="comma-separated cohort sizes K for every workload "
                      f"(default on this platform: {defaults})")
  parser.add_argument("--chunk-sizes", default=chunks,
                      help="comma-separated client_chunk_size values for the chunked backend; "
                      "run where smaller than K (default %(default)s)")
  parser.add_argument("--repeats", type=int, default=10,
                      help="timed rounds per backend after the first (default %(default)s)")
  parser.add_argument("--time-budget", type=float, default=20.0,
                      help="seconds after which a cohort stops repeating (default %(default)s)")
  parser.add_argument("--scan-rounds", type=int, default=10,
                      help="rounds per rounds_on_device call, lowered to fit the time budget "
                      "(at least 2; 0 skips the scan measurement; default %(default)s)")
  parser.add_argument("--loop-max-clients", type=int, default=loop_max,
                      help="largest cohort the loop backend runs (default %(default)s)")
  parser.add_argument("--vmap-max-clients", type=int, default=1 << 30,
                      help="largest cohort the raw vmap backend runs (default: all)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="dtype of params and inputs (default %(default)s)")
  parser.add_argument("--conv-impl", choices=("auto", "xla", "patches"), default="auto",
                      help="CNN convolution implementation (default %(default)s: patches on "
                      "CPU, xla elsewhere)")
  parser.add_argument("--breakdown", action="store_true",
                      help="also time the parts of a round (local training, slicing, "
                      "accumulation, aggregation)")
  parser.add_argument("--seed", type=int, default=0, help="seed of data, params and keys")
  parser.add_argument("--json", type=Path, help="write every number to this file")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.scan_rounds == 1 or args.scan_rounds < 0:
    parser.error(f"--scan-rounds must be 0 or >= 2, got {args.scan_rounds}")
  try:
    args.chunk_sizes = sorted({int(c) for c in args.chunk_sizes.split(",")}, reverse=True)
    args.cohort_lists = {
        name: sorted({int(k) for k in (args.cohorts or cohorts[name]).split(",")})
        for name in (("mlp", "cnn") if args.workload == "all" else (args.workload,))}
  except ValueError as error:
    parser.error(f"--cohorts and --chunk-sizes take comma-separated integers: {error}")
  if min(args.chunk_sizes) < 1 or min(min(ks) for ks in args.cohort_lists.values()) < 1:
    parser.error("--cohorts and --chunk-sizes must be >= 1")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  clock = CompileClock()
  device = jax.devices()[0]
  print(f"jax {jax.__version__} on {jax.default_backend()} ({device.device_kind}, "
        f"{jax.device_count()} device(s)); python {platform.python_version()}; dtype {args.dtype}; "
        f"S={LOCAL_STEPS} local steps of B={BATCH_SIZE}; dp_mean clip {CLIP_NORM}, "
        f"noise multiplier {NOISE_MULTIPLIER}")
  print("n = timed rounds (calls for scan rows); peak = process high-water mark so far\n")
  print(TABLE_HEADER, flush=True)
  rows, breakdowns = [], []
  for name, cohorts in args.cohort_lists.items():
    workload = make_workload(name, POPULATION_FACTOR * max(cohorts), args.dtype,
                             args.conv_impl, args.seed)
    for k in cohorts:
      variants = ([Variant("loop")] if k <= args.loop_max_clients else [])
      variants += [Variant("vmap")] if k <= args.vmap_max_clients else []
      # A chunk as large as the cohort is the vmap round; a larger one only pads.
      variants += [Variant("chunked", c) for c in args.chunk_sizes if c < k]
      for r in measure_cohort(workload, k, variants, args, clock):
        rows.append(r)
        print(format_row(r), flush=True)
      if args.breakdown:
        breakdowns.append(breakdown(workload, k, args))
    del workload

  print()
  print_targets(rows)
  if breakdowns:
    print("\nbreakdown (ms per round, median):")
    for b in breakdowns:
      parts = "; ".join(f"{part} {ms:.2f}" for part, ms in b["ms_per_round"].items())
      print(f"  {b['workload']} K={b['cohort']}: {parts}")
  if args.json:
    report = {
        "jax": jax.__version__, "platform": jax.default_backend(),
        "device": device.device_kind, "python": platform.python_version(),
        "args": {key: (str(value) if isinstance(value, Path) else value)
                 for key, value in vars(args).items()},
        "local_steps": LOCAL_STEPS, "batch_size": BATCH_SIZE,
        "results": rows, "breakdown": breakdowns,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
  main()
