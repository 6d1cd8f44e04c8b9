"""Standard normal samples, bit-identical to `jax.random.normal`, faster on CPU.

Every Gaussian mechanism of the toolkit draws its noise with `standard_normal`
(through `noise.gaussian_like`); the RLWE encryption keeps `jax.random.normal`
for its errors, a small share of its time, since the unrolled hash lengthens
compiles. For a scalar typed threefry key, `standard_normal(key, shape)` equals
`jax.random.normal(key, shape, jnp.float32)` bit for bit on every platform, so
seeds, tests and published runs do not change; only the CPU lowering differs.
JAX lowers the Threefry-2x32 hash on CPU as a rolled `fori_loop` over its five
4-round blocks (to keep compile times short), which writes both 32-bit words
of every element to memory after every block. Here
the 20 rounds are written out, so XLA fuses the hash, the uniform transform and
the inverse error function into one elementwise loop: 2.6x faster per sample
on the 2-core development CPU (3.6 vs 9.6 ns per normal;
`tests/privacy/test_fast_random.py` checks equality,
`experiments/benchmarks/vs_opacus.py --breakdown` times it).
Other platforms and other PRNG implementations keep `jax.random.normal`.

The noise is the same floating-point Gaussian as JAX's (inverse transform of a
23-bit uniform), so the floating-point caveat of Mironov (CCS 2012) applies to
it unchanged.

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


def _unrolled_normal(key_data: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  # jax's uniform on [nextafter(-1, 0), 1), then sqrt(2) * erfinv, step for step.
  bits = _unrolled_bits(key_data, shape)
  one_to_two = lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000),
                                        jnp.float32)
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  uniform = lax.max(low, (one_to_two - np.float32(1.0)) * (np.float32(1.0) - low) + low)
  return np.float32(np.sqrt(2.0)) * lax.erf_inv(uniform)


def _on_fast_path(key: jax.Array, shape: tuple[int, ...]) -> bool:
  size = math.prod(shape)
  return (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 0
          and str(jax.random.key_impl(key)) == "threefry2x32"
          and getattr(jax.config, "jax_threefry_partitionable", True) and 0 < size < 2**32)


def standard_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """N(0, 1) float32 samples of `shape`, equal to `jax.random.normal(key, shape, jnp.float32)`.

  Args:
    key: a PRNG key; a scalar typed threefry key (`jax.random.key`) takes the
      unrolled CPU path, any other key `jax.random.normal`.
    shape: output shape.
  """
  shape = tuple(int(d) for d in shape)
  if not _on_fast_path(key, shape):
    return jax.random.normal(key, shape, jnp.float32)
  return lax.platform_dependent(
      jax.random.key_data(key), cpu=lambda data: _unrolled_normal(data, shape),
      default=lambda data: jax.random.normal(
          jax.random.wrap_key_data(data, impl="threefry2x32"), shape, jnp.float32))
