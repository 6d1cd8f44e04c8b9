"""JAX's Threefry random numbers, bit for bit, with the hash unrolled on CPU.

JAX lowers the Threefry-2x32 hash on CPU as a rolled `fori_loop` over its five
4-round blocks (to keep compile times short): every block is a handful of
kernels that write both 32-bit words of every element to memory. Here the 20
rounds are written out, so XLA fuses the hash with whatever consumes it into
one elementwise loop. For a scalar typed threefry key (`jax.random.key`) and
JAX's default partitionable Threefry, each function below equals its
`jax.random` counterpart bit for bit on every platform, so seeds, tests and
published runs do not change; only the CPU lowering differs. Other platforms
and other PRNG implementations call `jax.random` itself
(`tests/test_fast_random.py` checks equality on every path).

  standard_normal  Gaussian noise of every mechanism (`privacy.noise`): 2.6x
                   faster per sample on the 2-core development CPU (3.6 vs 9.6
                   ns per normal; `experiments/benchmarks/vs_opacus.py
                   --breakdown`). The same floating-point Gaussian as JAX's
                   (inverse transform of a 23-bit uniform), so the caveat of
                   Mironov (CCS 2012) applies to it unchanged.
  uniform          the uniforms that draw each client's local batches
                   (`data.device`).
  fold_in_range, split
                   the round's keys: its split into client, server and batch
                   keys, each slot's key, each local step's, each noise
                   leaf's. In a W1 round of
                   `experiments/benchmarks/runner_vs_floor.py` these rolled
                   hashes were about 60 % of the ~600 kernels XLA:CPU ran
                   per round; a few percent of its time.

Reference: Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as
1, 2, 3", SC 2011 (Threefry-2x32 with 20 rounds and its rotation constants).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_SCHEDULE_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key1: jax.Array, key2: jax.Array, x0: jax.Array,
                 x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 block function with 20 rounds, unrolled (uint32 in and out)."""
  schedule = (key1, key2, key1 ^ key2 ^ _KEY_SCHEDULE_PARITY)
  x0, x1 = x0 + schedule[0], x1 + schedule[1]
  for block in range(5):
    for rotation in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = x0 ^ _rotate_left(x1, rotation)
    x0 = x0 + schedule[(block + 1) % 3]
    x1 = x1 + schedule[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _unrolled_bits(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  # jax's partitionable threefry bits: counter (hi, lo) = the element's flat
  # index, output = the xor of the two words.
  counter = lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  word0, word1 = threefry2x32(key_data[0], key_data[1], jnp.zeros_like(counter), counter)
  return word0 ^ word1


def _one_to_two(bits: jax.Array) -> jax.Array:
  # jax's float from 32 random bits: 23 of them as the mantissa of [1, 2).
  return lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)


def _unrolled_uniform(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  # jax's uniform on [0, 1): (one_to_two - 1) * (1 - 0) + 0, then max(0, .);
  # the subtraction is exact and non-negative, so the rest changes no bit.
  return _one_to_two(_unrolled_bits(key_data, shape)) - np.float32(1.0)


def _unrolled_normal(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  # jax's uniform on [nextafter(-1, 0), 1), then sqrt(2) * erfinv, step for step.
  one_to_two = _one_to_two(_unrolled_bits(key_data, shape))
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  uniform = lax.max(low, (one_to_two - np.float32(1.0)) * (np.float32(1.0) - low) + low)
  return np.float32(np.sqrt(2.0)) * lax.erf_inv(uniform)


def _unrolled_counter_keys(key_data: jax.Array, count: int) -> jax.Array:
  # Key i is the hash of the counter (hi, lo) = (0, i): jax's fold_in(key, i)
  # (its seed of a 32-bit i is (0, i)) and row i of its partitionable split.
  counter = lax.iota(jnp.uint32, count)
  word0, word1 = threefry2x32(key_data[0], key_data[1], jnp.zeros_like(counter), counter)
  return jnp.stack([word0, word1], axis=-1)


def _on_fast_path(key: jax.Array, shape: tuple[int, ...]) -> bool:
  size = math.prod(shape)
  return (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0
          and str(jax.random.key_impl(key)) == "threefry2x32"
          and getattr(jax.config, "jax_threefry_partitionable", True) and 0 < size < 2**32)


def _unrolled_on_cpu(key: jax.Array, unrolled, jax_random):
  """`unrolled(key_data)` on CPU, `jax_random(key)` elsewhere, for a fast-path key."""
  wrap = lambda data: jax.random.wrap_key_data(data, impl="threefry2x32")
  return lax.platform_dependent(jax.random.key_data(key), cpu=unrolled,
                                default=lambda data: jax_random(wrap(data)))


def standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """N(0, 1) float32 samples of `shape`, equal to `jax.random.normal(key, shape, jnp.float32)`.

  Args:
    key: a PRNG key; a scalar typed threefry key (`jax.random.key`) takes the
      unrolled CPU path, any other key `jax.random.normal`.
    shape: output shape.
  """
  shape = tuple(int(d) for d in shape)
  normal = lambda k: jax.random.normal(k, shape, jnp.float32)
  if not _on_fast_path(key, shape):
    return normal(key)
  return _unrolled_on_cpu(key, lambda data: _unrolled_normal(data, shape), normal)


def uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """U[0, 1) float32 samples of `shape`, equal to `jax.random.uniform(key, shape, jnp.float32)`.

  Args:
    key: a PRNG key; a scalar typed threefry key takes the unrolled CPU path,
      any other key `jax.random.uniform`.
    shape: output shape.
  """
  shape = tuple(int(d) for d in shape)
  draw = lambda k: jax.random.uniform(k, shape, jnp.float32)
  if not _on_fast_path(key, shape):
    return draw(key)
  return _unrolled_on_cpu(key, lambda data: _unrolled_uniform(data, shape), draw)


def _counter_keys(key: jax.Array, count: int, jax_random) -> jax.Array:
  if not _on_fast_path(key, (count,)):
    return jax_random(key)
  data = _unrolled_on_cpu(key, lambda data: _unrolled_counter_keys(data, count),
                          lambda k: jax.random.key_data(jax_random(k)))
  return jax.random.wrap_key_data(data, impl="threefry2x32")


def fold_in_range(key: jax.Array, count: int) -> jax.Array:
  """[count] keys, key i equal to `jax.random.fold_in(key, i)`.

  Args:
    key: a PRNG key; a scalar typed threefry key takes the unrolled CPU path,
      any other key a vmapped `jax.random.fold_in`.
    count: number of keys, a static int >= 0.
  """
  count = int(count)
  return _counter_keys(key, count, lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(
      jnp.arange(count, dtype=jnp.uint32)))


def split(key: jax.Array, num: int) -> jax.Array:
  """[num] keys equal to `jax.random.split(key, num)`.

  Args:
    key: a PRNG key; a scalar typed threefry key takes the unrolled CPU path,
      any other key `jax.random.split`.
    num: number of keys, a static int >= 0.
  """
  num = int(num)
  return _counter_keys(key, num, lambda k: jax.random.split(k, num))
