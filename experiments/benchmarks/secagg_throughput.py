"""Cost of secure aggregation in a round: plain vs SecAgg vs SecAgg+, side by side.

What is timed
  One federated round of K clients (S local SGD steps of B synthetic examples
  each) on a ~100k-parameter MLP (64-320-240-10, 100,250 params), chunked
  backend (chunks of --chunk clients), with three aggregators on the same
  batch and key:
    plain      `weighted_mean("uniform")`: float32 sum, no quantisation.
    secagg     `secure_sum(...)` over the complete graph (Bonawitz et al. 2017):
               each client generates K - 1 pair-mask streams of d_pad words.
    secagg+    `secure_sum(..., neighbours=2 ceil(log2 K))` (Bell et al. 2020).
  Both secure rows: clip 1, Hadamard rotation (d_pad = 131072), 32-bit ring,
  10% simulated dropouts after masking, masks from --prg.

  Compile time (jit(...).lower(...).compile()) is reported apart. The timed
  rounds follow one warm-up round; each row is the median of --repeats
  rounds; "vs plain" divides by the plain round of the same K in this run.

  SecAgg over the complete graph at K = 1000 would generate ~1.3e11 mask
  words (~K^2 d); it is not run unless --full, and its row is then an
  estimate: the SecAgg+ round at that K plus the extra streams at the mask
  throughput measured in the SecAgg+ row (printed as "est.").

Usage
  python experiments/benchmarks/secagg_throughput.py [--cohorts 100,1000] [--prg hash]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import mlp
from fedjax_priv.privacy.aggregation import weighted_mean
from fedjax_priv.secure import quantization as quant
from fedjax_priv.secure.aggregators import secure_sum
from fedjax_priv.secure.secagg import default_degree
from fedjax_priv.simulation.round import build_round

INPUT_SHAPE, NUM_CLASSES, HIDDEN = (8, 8, 1), 10, (320, 240)


def make_batch(num_clients, steps, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  shape = (num_clients, steps, batch_size)
  return ClientBatch(jnp.asarray(rng.normal(size=shape + INPUT_SHAPE), jnp.float32),
                     jnp.asarray(rng.integers(0, NUM_CLASSES, shape), jnp.int32),
                     jnp.ones(shape, jnp.float32), jnp.full(shape[:1], steps * batch_size),
                     jnp.ones(shape[:1], jnp.float32))


def time_round(model, aggregator, batch, chunk, repeats):
  """(compile s, median round s, metrics) of one jitted chunked round."""
  server_opt = optax.sgd(1.0)
  round_fn = build_round(make_client_update(model, optax.sgd(0.1)), aggregator, server_opt,
                         "chunked", client_chunk_size=chunk)
  state = server_init(model.init(jax.random.key(0)), server_opt, aggregator)
  key = jax.random.key(1)
  start = time.perf_counter()
  compiled = jax.jit(round_fn).lower(state, batch, key).compile()
  compile_s = time.perf_counter() - start
  state, metrics = jax.block_until_ready(compiled(state, batch, key))  # Warm-up.
  times = []
  for r in range(repeats):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, batch, jax.random.key(2 + r)))
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times), metrics


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cohorts", default="100,1000")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=20)
  parser.add_argument("--chunk", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--prg", default="hash", choices=("hash", "threefry"))
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--full", action="store_true",
                      help="also run SecAgg (complete graph) at K >= 1000")
  args = parser.parse_args()

  model = mlp(INPUT_SHAPE, NUM_CLASSES, HIDDEN)
  dim = quant.ravel(model.init(jax.random.key(0)))[0].shape[0]
  d_pad = quant.padded_dim(dim)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; model {dim} params "
        f"(d_pad {d_pad}); S={args.steps} B={args.batch_size} chunk={args.chunk} "
        f"prg={args.prg} dropout={args.dropout}")
  header = (f"{'K':>5} {'aggregator':<14} {'compile s':>9} {'round s':>9} {'vs plain':>9} "
            f"{'MB/client':>9} {'expansion':>9} {'survivors':>9}")
  print(header)
  print("-" * len(header))
  for num_clients in [int(c) for c in args.cohorts.split(",")]:
    batch = make_batch(num_clients, args.steps, args.batch_size)
    degree = default_degree(num_clients)
    secure = dict(bits=32, scale=2.0**20, denominator=float(num_clients), clip_norm=1.0,
                  dropout_rate=args.dropout, prg=args.prg, threshold=None)
    rows = [("plain", weighted_mean("uniform"))]
    if num_clients < 1000 or args.full:
      rows.append(("secagg", secure_sum(**secure)))
    rows.append((f"secagg+ k={degree}", secure_sum(**secure, neighbours=degree)))
    plain_s = None
    for name, aggregator in rows:
      compile_s, round_s, metrics = time_round(model, aggregator, batch, args.chunk,
                                               args.repeats)
      plain_s = round_s if plain_s is None else plain_s
      mb = float(metrics.get("secagg_bytes_per_client", 4.0 * dim)) / 1e6
      expansion = float(metrics.get("secagg_expansion", 1.0))
      survivors = metrics.get("secagg_survivors", metrics["clients"])
      print(f"{num_clients:>5} {name:<14} {compile_s:>9.1f} {round_s:>9.2f} "
            f"{round_s / plain_s:>9.2f} {mb:>9.3f} {expansion:>9.2f} {float(survivors):>9.0f}",
            flush=True)
      if name.startswith("secagg+") and not (num_clients < 1000 or args.full):
        # Mask streams per round: clients (k + 1 each) plus the server's regeneration.
        plus_streams = num_clients * (degree + 1) * (1 + args.dropout)
        full_streams = num_clients * num_clients * (1 + args.dropout)
        per_stream = (round_s - plain_s) / plus_streams
        estimate = round_s + (full_streams - plus_streams) * per_stream
        print(f"{num_clients:>5} {'secagg (est.)':<14} {'-':>9} {estimate:>9.0f} "
              f"{estimate / plain_s:>9.0f}   (not run: {full_streams:.1e} streams of {d_pad} "
              f"words at the secagg+ row's {per_stream * 1e3:.1f} ms/stream)")
  print("\nTarget: SecAgg+ at K = 1000 below 10x the plain round.")


if __name__ == "__main__":
  main()
