"""DP-SGD epochs/s with materialised per-example gradients (vmap) vs ghost norms.

What is timed
  One epoch of example-level DP-SGD (`ExampleDP`, SGD lr 0.1, C = 1, sigma = 1)
  of an MLP 784-256-10 on n = 5000 synthetic 784-dim examples: n / b = 20
  steps, each on a Poisson sample of expected size b = 250, padded to a fixed
  capacity with mask 0 (static shapes). The whole epoch is one jitted
  `client_update` call (a `lax.scan` over its steps). Both methods run on the
  same batches and key, in one process, interleaved repeat by repeat; their
  deltas must agree before timing. Compile time is reported apart.

Usage
  JAX_PLATFORMS=cpu .venv/bin/python experiments/benchmarks/dp_sgd_clipping.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.models.zoo import mlp


def poisson_epoch(rng, n, batch, num_steps, capacity):
  """[num_steps, capacity] example indices and mask of Poisson samples (rate batch / n)."""
  idx = np.zeros((num_steps, capacity), np.int32)
  mask = np.zeros((num_steps, capacity), np.float32)
  for s in range(num_steps):
    chosen = np.flatnonzero(rng.random(n) < batch / n)[:capacity]
    idx[s, :len(chosen)], mask[s, :len(chosen)] = chosen, 1.0
  return idx, mask


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--examples", type=int, default=5000)
  parser.add_argument("--batch", type=int, default=250)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  n, b = args.examples, args.batch
  num_steps = n // b
  capacity = int(b + 4 * np.sqrt(b))  # Over capacity drops examples with prob < 1e-4.
  data_x = rng.normal(size=(n, 784)).astype(np.float32)
  data_y = rng.integers(0, 10, n).astype(np.int32)
  idx, mask = poisson_epoch(rng, n, b, num_steps, capacity)
  x, y, mask = jnp.asarray(data_x[idx]), jnp.asarray(data_y[idx]), jnp.asarray(mask)

  model = mlp((784,), 10, (256,))
  params = model.init(jax.random.key(0))
  key = jax.random.key(1)
  runs = {}
  for method in ("vmap", "ghost"):
    dp = ExampleDP(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=float(b),
                   clipping=method)
    start = time.perf_counter()
    compiled = jax.jit(make_client_update(model, optax.sgd(0.1), dp)).lower(
        params, x, y, mask, key).compile()
    runs[method] = {"fn": compiled, "compile_s": time.perf_counter() - start, "times": []}
  deltas = {m: r["fn"](params, x, y, mask, key)[0] for m, r in runs.items()}
  for a, c in zip(jax.tree.leaves(deltas["vmap"]), jax.tree.leaves(deltas["ghost"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-5)
  for _ in range(args.repeats):
    for r in runs.values():
      start = time.perf_counter()
      jax.block_until_ready(r["fn"](params, x, y, mask, key))
      r["times"].append(time.perf_counter() - start)

  print(f"device: {jax.devices()[0].device_kind}; MLP 784-256-10, n={n}, expected batch {b} "
        f"(Poisson, capacity {capacity}), {num_steps} steps/epoch, {args.repeats} repeats")
  print(f"{'method':8s} {'s/epoch':>9s} {'epochs/s':>9s} {'compile s':>10s}")
  for method, r in runs.items():
    t = statistics.median(r["times"])
    print(f"{method:8s} {t:9.3f} {1 / t:9.2f} {r['compile_s']:10.2f}")
  ratio = statistics.median(runs["vmap"]["times"]) / statistics.median(runs["ghost"]["times"])
  print(f"ghost / vmap epochs/s: {ratio:.1f}x (issue reference on the 2-core CPU: 10 s vs "
        "0.10 s per epoch)")


if __name__ == "__main__":
  main()
