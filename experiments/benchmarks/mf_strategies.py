"""Matrix-factorization strategies: optimisation time, noise-stream cost and state memory.

Three measurements, in one process (see experiments/benchmarks/README.md):

1. Optimisation: `optimize_banded_toeplitz` (--bands) and `optimize_blt`
   (--buffers) on the prefix-sum workload of --n rounds, for one
   participation and for --participations k rounds at least --min-separation
   b apart. Wall time includes tracing and compiling (both are paid once
   per call). Each result is scored by sens(C) * RMSE (the RMSE of the
   calibrated mechanism per unit of sigma * clip), next to BSR (the
   optimiser's start) and the full square root (Fichtenberger et al. 2023).
2. Stream cost per round at --dim coordinates: `stream_next` of BandMF
   (--bands), BISR (--bands) and BLT (--buffers) against drawing the same
   number of independent Gaussians (`gaussian_like`), each jitted with its
   state donated, timed interleaved (one call of each per repeat) and
   reported as medians and as ratios to the independent draw.
3. State memory: bytes of each stream's state (float32), against
   slots * dim * 4.

Usage:
  python experiments/benchmarks/mf_strategies.py [--n 2000] [--bands 64] [--buffers 4]
      [--participations 16] [--min-separation 125] [--dim 1000000] [--repeats 20]
      [--skip-optimisation] [--skip-stream]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv.privacy import matrix_factorization as mf
from fedjax_priv.privacy.noise import gaussian_like


def score(strategy, workload, k, b):
  """sens(C) * RMSE, with the exact sensitivity (every strategy here has one)."""
  return mf.sensitivity(strategy, workload.n, k, b) * mf.expected_error(strategy, workload).rmse


def optimisation(args):
  workload = mf.Workload(args.n)
  print(f"== optimisation, prefix sums, n = {args.n} (wall time includes compile) ==")
  print(f"{'participation':>22} {'strategy':>14} {'seconds':>8} {'sens*RMSE':>10} "
        f"{'vs BSR':>7} {'vs sqrt':>8}")
  for k, b in ((1, 1), (args.participations, args.min_separation)):
    label = f"k={mf.participations_possible(args.n, k, b)}, b={b}"
    bsr = score(mf.banded_square_root(args.bands), workload, k, b)
    full = mf.BandedToeplitz(mf.square_root_coefs(args.n))
    try:
      sqrt = score(full, workload, k, b)
    except ValueError:
      sqrt = float("nan")
    runs = (
        (f"BandMF {args.bands}", lambda: mf.optimize_banded_toeplitz(workload, args.bands, k, b)),
        (f"BLT {args.buffers}", lambda: mf.optimize_blt(workload, args.buffers, k, b)),
    )
    for name, run in runs:
      start = time.perf_counter()
      strategy = run()
      seconds = time.perf_counter() - start
      value = score(strategy, workload, k, b)
      print(f"{label:>22} {name:>14} {seconds:8.2f} {value:10.4f} {value / bsr:7.3f} "
            f"{value / sqrt:8.3f}")
  print("(vs BSR / vs sqrt: the optimum's sens*RMSE over BSR's with the same bands and over "
        "the full square root's; < 1 is better)")


def stream(args):
  dim = args.dim
  template = jnp.zeros(dim, jnp.float32)
  strategies = {
      f"BandMF {args.bands}": mf.banded_square_root(args.bands),
      f"BISR {args.bands}": mf.banded_inverse_square_root(args.bands),
      f"BLT {args.buffers}": mf.BufferedToeplitz(np.linspace(0.99, 0.5, args.buffers),
                                                 np.full(args.buffers, 0.5 / args.buffers)),
  }
  steps = {name: jax.jit(mf.stream_next, donate_argnums=1) for name in strategies}
  states = {name: mf.stream_init(s, template) for name, s in strategies.items()}
  independent = jax.jit(lambda key: gaussian_like(key, template, 1.0))

  print(f"\n== noise stream per round, d = {dim:,} float32 ==")
  print(f"{'stream':>14} {'state bytes':>14} {'slots*d*4':>14} {'MiB':>8}")
  for name, state in states.items():
    nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    expected = mf.stream_slots(strategies[name]) * dim * 4
    print(f"{name:>14} {nbytes:14,d} {expected:14,d} {nbytes / 2**20:8.1f}")
  print(f"{'(one noise row':>14} {dim * 4:14,d} {'':>14} {dim * 4 / 2**20:8.1f})")

  key = jax.random.key(0)
  times = {name: [] for name in ["independent", *strategies]}
  # Warm up (compile) every call before timing; steps keep their own state.
  jax.block_until_ready(independent(key))
  for name in strategies:
    noise, states[name] = steps[name](strategies[name], states[name], key)
    jax.block_until_ready(noise)
  for repeat in range(args.repeats):
    key = jax.random.fold_in(jax.random.key(1), repeat)
    start = time.perf_counter()
    jax.block_until_ready(independent(key))
    times["independent"].append(time.perf_counter() - start)
    for name in strategies:
      start = time.perf_counter()
      noise, states[name] = steps[name](strategies[name], states[name], key)
      jax.block_until_ready(noise)
      times[name].append(time.perf_counter() - start)
  base = statistics.median(times["independent"])
  print(f"\n{'call':>14} {'median ms':>10} {'vs independent':>15}   ({args.repeats} interleaved "
        "repeats)")
  for name, values in times.items():
    median = statistics.median(values)
    print(f"{name:>14} {1e3 * median:10.2f} {median / base:15.2f}x")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--n", type=int, default=2000)
  parser.add_argument("--bands", type=int, default=64)
  parser.add_argument("--buffers", type=int, default=4)
  parser.add_argument("--participations", type=int, default=16)
  parser.add_argument("--min-separation", type=int, default=125)
  parser.add_argument("--dim", type=int, default=1_000_000)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--skip-optimisation", action="store_true")
  parser.add_argument("--skip-stream", action="store_true")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"{jax.local_device_count()} device(s)")
  if not args.skip_optimisation:
    optimisation(args)
  if not args.skip_stream:
    stream(args)


if __name__ == "__main__":
  main()
