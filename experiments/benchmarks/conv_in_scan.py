"""CNN local training inside `lax.scan` on XLA:CPU: lax's convolution gradients vs `models.conv`.

For each model, S local steps run as `make_client_update` runs them (a
`lax.scan` over steps), from the same params and batches, with:

  lax conv, scan       flax's default convolution (JAX's own VJP);
  lax conv, unrolled   the same, `unroll=True` (no while loop: the reference
                       speed XLA:CPU reaches outside loops);
  models.conv, scan    the zoo's CPU convolution (explicit channels-last VJP).

and, for `tanh_cnn`, the DP-SGD client update (`ExampleDP`, ghost clipping)
of the zoo model against the same update with flax's default convolution. It
prints the median wall time of `--repeats` calls and the ratios; the final
params of each pair must agree (allclose), or the script stops.

Usage:
  JAX_PLATFORMS=cpu .venv/bin/python experiments/benchmarks/conv_in_scan.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.models.model import example_losses, from_linen
from fedjax_priv.models.zoo import _CNN, _TanhCNN, cnn, tanh_cnn


def median_time(fn, args, repeats: int) -> tuple[float, object]:
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def sgd_steps(model, unroll):
  def step(params, xy):
    grad = jax.grad(lambda p: jnp.mean(example_losses(model, p, *xy)))(params)
    return jax.tree.map(lambda w, g: w - 0.1 * g, params, grad), None
  return jax.jit(lambda params, x, y: jax.lax.scan(step, params, (x, y), unroll=unroll)[0])


def check_close(a, b, what: str) -> None:
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if not np.allclose(u, v, rtol=1e-4, atol=1e-5):
      raise SystemExit(f"{what}: params differ (max {float(jnp.max(jnp.abs(u - v))):.2e})")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs; "
        f"S = {args.steps} local steps; median of {args.repeats} calls; load average "
        f"{os.getloadavg()[0]:.1f}")
  models = {
      "tanh_cnn, batch 256": (tanh_cnn(), from_linen(_TanhCNN(10, "tanh"), (28, 28, 1), 10), 256),
      "cnn (Reddi) xla conv, batch 20": (
          cnn((28, 28, 1), 62, conv_impl="xla"),
          from_linen(_CNN((32, 64), 128, 62, "xla"), (28, 28, 1), 62), 20),
  }
  rng = np.random.default_rng(0)
  print(f"{'model':32s} {'lax conv, scan':>15s} {'lax, unrolled':>14s} {'models.conv, scan':>18s} "
        f"{'speed-up in scan':>17s}")
  for name, (ours, plain, batch) in models.items():
    x = jnp.asarray(rng.random((args.steps, batch, *ours.input_shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, ours.num_classes, (args.steps, batch)), jnp.int32)
    params = ours.init(jax.random.key(0))
    t_scan, p_scan = median_time(sgd_steps(plain, 1), (params, x, y), args.repeats)
    t_unrolled, _ = median_time(sgd_steps(plain, True), (params, x, y), args.repeats)
    t_ours, p_ours = median_time(sgd_steps(ours, 1), (params, x, y), args.repeats)
    check_close(p_ours, p_scan, name)
    print(f"{name:32s} {t_scan:14.3f}s {t_unrolled:13.3f}s {t_ours:17.3f}s "
          f"{t_scan / t_ours:16.1f}x")

  ours, plain, batch = models["tanh_cnn, batch 256"]
  x = jnp.asarray(rng.random((args.steps, batch, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, (args.steps, batch)), jnp.int32)
  mask = jnp.ones((args.steps, batch), jnp.float32)
  params = ours.init(jax.random.key(0))
  dp = ExampleDP(clip_norm=0.1, noise_multiplier=1.0, expected_batch_size=float(batch),
                 clipping="ghost")
  times = {}
  deltas = {}
  for label, model in (("lax conv", plain), ("models.conv", ours)):
    update = jax.jit(make_client_update(model, optax.sgd(4.0), dp))
    times[label], (deltas[label], _) = median_time(
        update, (params, x, y, mask, jax.random.key(1)), args.repeats)
  check_close(deltas["models.conv"], deltas["lax conv"], "DP-SGD client update")
  print(f"DP-SGD client update (tanh_cnn, ghost clipping, batch {batch}, S = {args.steps}): "
        f"lax conv {times['lax conv']:.3f}s, models.conv {times['models.conv']:.3f}s, "
        f"{times['lax conv'] / times['models.conv']:.1f}x")


if __name__ == "__main__":
  main()
