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

  Masks: each client adds its self mask in the vmapped client step; each
  pair's mask stream (d_pad words) is expanded once for the survivors' sum
  (`secagg.add_pair_masks`: K (K - 1) / 2 streams on the complete graph,
  K k / 2 for SecAgg+), and the server regenerates the dropped clients'
  streams from their Shamir-recovered keys. "streams" counts them.

  Compile time (jit(...).lower(...).compile()) is reported apart. The timed
  rounds follow one warm-up round; each row is the median of --repeats
  rounds; "vs plain" divides by the plain round of the same K in this run.
  The complete graph at K = 1000 expands ~5e5 streams of 131,072 words per
  round (minutes on this CPU); --max-complete skips it above a cohort size.

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
  parser.add_argument("--max-complete", type=int, default=1000,
                      help="run SecAgg (complete graph) only for cohorts up to this size")
  args = parser.parse_args()

  model = mlp(INPUT_SHAPE, NUM_CLASSES, HIDDEN)
  dim = quant.ravel(model.init(jax.random.key(0)))[0].shape[0]
  d_pad = quant.padded_dim(dim)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; model {dim} params "
        f"(d_pad {d_pad}); S={args.steps} B={args.batch_size} chunk={args.chunk} "
        f"prg={args.prg} dropout={args.dropout}")
  header = (f"{'K':>5} {'aggregator':<14} {'compile s':>9} {'round s':>9} {'vs plain':>9} "
            f"{'streams':>9} {'MB/client':>9} {'expansion':>9} {'survivors':>9}")
  print(header)
  print("-" * len(header))
  for num_clients in [int(c) for c in args.cohorts.split(",")]:
    batch = make_batch(num_clients, args.steps, args.batch_size)
    degree = default_degree(num_clients)
    secure = dict(bits=32, scale=2.0**20, denominator=float(num_clients), clip_norm=1.0,
                  dropout_rate=args.dropout, prg=args.prg, threshold=None)
    rows = [("plain", weighted_mean("uniform"), 0)]
    if num_clients <= args.max_complete:
      rows.append(("secagg", secure_sum(**secure), num_clients - 1))
    rows.append((f"secagg+ k={degree}", secure_sum(**secure, neighbours=degree), degree))
    plain_s = None
    for name, aggregator, width in rows:
      compile_s, round_s, metrics = time_round(model, aggregator, batch, args.chunk,
                                               args.repeats)
      plain_s = round_s if plain_s is None else plain_s
      mb = float(metrics.get("secagg_bytes_per_client", 4.0 * dim)) / 1e6
      expansion = float(metrics.get("secagg_expansion", 1.0))
      survivors = float(metrics.get("secagg_survivors", metrics["clients"]))
      # Pair streams once per edge, the dropped clients' regenerated by the server.
      dropped = num_clients - survivors
      streams = num_clients * width / 2 + dropped * width if width else 0
      print(f"{num_clients:>5} {name:<14} {compile_s:>9.1f} {round_s:>9.2f} "
            f"{round_s / plain_s:>9.2f} {streams:>9.3g} {mb:>9.3f} {expansion:>9.2f} "
            f"{survivors:>9.0f}", flush=True)
  print("\nTarget: SecAgg+ at K = 1000 below 10x the plain round.")


if __name__ == "__main__":
  main()
