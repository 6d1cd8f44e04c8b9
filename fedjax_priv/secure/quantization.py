"""Quantisation of client updates to integers modulo 2^b, for secure summation.

Secure aggregation sums in a finite ring, so each client maps its float
update to integers first:

  x f32[d] --pad to 2^n, randomized Hadamard rotation--> --* scale, stochastic
  rounding--> int32[d] --mod 2^b--> uint32[d]

and the server inverts the chain on the *sum*: centred lift to
[-2^(b-1), 2^(b-1)), divide by the scale, rotate back. Every step is linear
except the rounding, which is unbiased, so the decoded sum is an unbiased
estimate of the float sum with the error bounded by `error_bound`.

The rotation spreads a vector's mass evenly over the coordinates, so the
largest coordinate of a clipped vector shrinks from C to about
C * sqrt(2 ln(2d) / d), and with it the number of bits needed to avoid
wrap-around (Suresh et al. 2017; Kairouz, Liu & Steinke 2021).

Wrap-around: the ring only represents sums in [-2^(b-1), 2^(b-1)). A
coordinate whose true integer sum leaves that range silently decodes to a
value 2^b away from the truth: the round decodes garbage and nothing in the
arithmetic notices. `overflow_ratio` gives the a-priori risk (the worst-case
sum over the half-range; <= 1 means no wrap can happen) and `range_used` the
realised one (largest decoded magnitude over the half-range; a value near 1
signals that a wrap probably happened).

References:
  Suresh, Yu, Kumar & McMahan 2017, "Distributed Mean Estimation with Limited
  Communication" (ICML): randomized Hadamard rotation, stochastic rounding.
  Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism
  for Federated Learning with Secure Aggregation" (ICML): the
  rotate-scale-round-wrap pipeline modulo 2^b.
  Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving
  Machine Learning" (CCS): summation in Z_{2^b}.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from fedjax_priv import tree as tree_util

MAX_BITS = 32


def ravel(tree: tree_util.PyTree) -> tuple[jax.Array, Callable]:
  """Flattens a pytree into one f32[d] vector; returns it and the inverse function.

  The inverse restores the original leaf shapes and dtypes.
  """
  flat, unravel = ravel_pytree(tree)
  return flat.astype(jnp.float32), unravel


def padded_dim(d: int) -> int:
  """The smallest power of two >= d (>= 1): the length the Hadamard transform needs."""
  if not (isinstance(d, int) and d >= 1):
    raise ValueError(f"dimension d must be an int >= 1, got {d!r}")
  return 1 << (d - 1).bit_length()


def pad(x: jax.Array, d_pad: int) -> jax.Array:
  """Zero-pads the last axis of `x` to length `d_pad`."""
  extra = d_pad - x.shape[-1]
  if extra < 0:
    raise ValueError(f"cannot pad length {x.shape[-1]} down to {d_pad}")
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _walsh_hadamard(x: jax.Array) -> jax.Array:
  """Orthonormal Walsh-Hadamard transform H / sqrt(d) of the last axis, O(d log d).

  One butterfly per level on a [..., blocks, 2, h] view; log2(d) levels
  (a static Python loop over levels, not over data).
  """
  d = x.shape[-1]
  if d & (d - 1):
    raise ValueError(f"the Hadamard transform needs a power-of-two length, got {d}; "
                     "pad with padded_dim/pad first")
  lead = x.shape[:-1]
  h = 1
  while h < d:
    pairs = x.reshape(*lead, d // (2 * h), 2, h)
    a, b = pairs[..., 0, :], pairs[..., 1, :]
    x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, d)
    h *= 2
  return x * jnp.float32(1.0 / math.sqrt(d))


def _signs(key: jax.Array, d: int) -> jax.Array:
  return jax.random.rademacher(key, (d,), dtype=jnp.float32)


def hadamard_rotate(x: jax.Array, key: jax.Array) -> jax.Array:
  """Randomized Hadamard rotation y = H D x / sqrt(d), D = diag of random signs.

  Args:
    x: f32[..., d_pad], d_pad a power of two (see `padded_dim`).
    key: PRNG key of the rotation; every client and the server must share it
      (e.g. derived from the round key) so the server can rotate the sum back.

  Returns:
    f32[..., d_pad] with the same L2 norm as x (the map is orthogonal).
  """
  return _walsh_hadamard(x * _signs(key, x.shape[-1]))


def hadamard_unrotate(y: jax.Array, key: jax.Array) -> jax.Array:
  """Inverse of `hadamard_rotate` with the same key: x = D H y / sqrt(d)."""
  return _walsh_hadamard(y) * _signs(key, y.shape[-1])


def stochastic_round(x: jax.Array, key: jax.Array) -> jax.Array:
  """Unbiased rounding to integers: floor(x) + Bernoulli(x - floor(x)).

  E[result] = x and |result - x| < 1 coordinate-wise.

  Args:
    x: f32[...]; |x| must stay below 2^31 (the int32 range).
    key: PRNG key, private to the client (its rounding must be independent
      of everyone else's for the error to average out).

  Returns:
    int32[...] of x's shape.
  """
  low = jnp.floor(x)
  up = jax.random.uniform(key, x.shape, jnp.float32) < (x - low)
  return (low + up.astype(jnp.float32)).astype(jnp.int32)


def quantize(x: jax.Array, scale: float | jax.Array, key: jax.Array) -> jax.Array:
  """int32 stochastic_round(x * scale): one integer step is 1 / scale in x's units."""
  return stochastic_round(x * scale, key)


def dequantize(v: jax.Array, scale: float | jax.Array) -> jax.Array:
  """f32 v / scale: the inverse of `quantize` up to its rounding."""
  return v.astype(jnp.float32) / scale


def _check_bits(bits: int) -> None:
  if not (isinstance(bits, int) and 1 <= bits <= MAX_BITS):
    raise ValueError(f"bits must be an int in [1, {MAX_BITS}], got {bits!r}")


def modulus_mask(bits: int) -> jnp.uint32:
  """2^bits - 1 as uint32: `u & mask` reduces a uint32 modulo 2^bits."""
  _check_bits(bits)
  return jnp.uint32((1 << bits) - 1)


def wrap(v: jax.Array, bits: int) -> jax.Array:
  """int32 -> uint32 v mod 2^bits (two's complement makes the cast v mod 2^32)."""
  return v.astype(jnp.uint32) & modulus_mask(bits)


def unwrap(u: jax.Array, bits: int) -> jax.Array:
  """uint32 mod 2^bits -> int32 centred lift in [-2^(bits-1), 2^(bits-1)).

  Shifting the b-bit value to the top of the word and arithmetic-shifting it
  back sign-extends bit b-1, which is exactly the centred lift.
  """
  _check_bits(bits)
  shift = MAX_BITS - bits
  top = (u & modulus_mask(bits)) << jnp.uint32(shift)
  return jax.lax.shift_right_arithmetic(top.astype(jnp.int32), jnp.int32(shift))


def modular_add(a: tree_util.PyTree, b: tree_util.PyTree, bits: int) -> tree_util.PyTree:
  """(a + b) mod 2^bits leaf-wise on uint32 pytrees; an Aggregator.combine via partial."""
  mask = modulus_mask(bits)
  return jax.tree.map(lambda x, y: (x + y) & mask, a, b)


def modular_sum(weights: jax.Array, values: tree_util.PyTree, bits: int) -> tree_util.PyTree:
  """Sum modulo 2^bits of the rows whose weight is > 0.

  Usable as `Aggregator.group_sum` through `functools.partial(modular_sum,
  bits=b)`: a weight only selects (0 = not received), it never scales,
  because scaling a masked value would break the mask cancellation.

  Args:
    weights: [c] float, > 0 for the rows that take part.
    values: pytree of uint32[c, ...] values modulo 2^bits.
    bits: the modulus exponent b in [1, 32].

  Returns:
    pytree of uint32[...] in [0, 2^bits). uint32 addition wraps modulo 2^32,
    a multiple of 2^bits, so reducing once at the end is exact.
  """
  mask = modulus_mask(bits)

  def leaf_sum(leaf):
    take = (weights > 0).reshape(-1, *([1] * (leaf.ndim - 1)))
    return jnp.sum(jnp.where(take, leaf, jnp.uint32(0)), axis=0, dtype=jnp.uint32) & mask

  return jax.tree.map(leaf_sum, values)


def error_bound(scale: float, dim: int, num_clients: int | float) -> dict[str, float]:
  """Bounds on the error of a decoded sum of `num_clients` quantised vectors.

  Stochastic rounding adds to each coordinate of each client an independent,
  zero-mean error e with |e| < 1 and Var(e) <= 1/4 (integer units). The
  rotation is orthogonal, so L2 errors are the same before and after it.

  Args:
    scale: quantisation scale (integer steps per unit of x).
    dim: number of quantised coordinates (d_pad when rotating).
    num_clients: clients in the sum.

  Returns:
    Scalars (Python floats, or jax arrays when num_clients is traced), in the
    units of x (divide by the denominator for a mean):
      per_coordinate: worst case |error| of one coordinate, n / scale.
      per_coordinate_std: its standard deviation bound, sqrt(n) / (2 scale).
      l2_rms: bound on sqrt(E ||error||^2), sqrt(n d) / (2 scale).
  """
  if not scale > 0:
    raise ValueError(f"scale must be > 0, got {scale}")
  n = num_clients
  return {"per_coordinate": n / scale,
          "per_coordinate_std": n ** 0.5 / (2.0 * scale),
          "l2_rms": (n * dim) ** 0.5 / (2.0 * scale)}


def overflow_ratio(clip_norm: float, scale: float, num_clients, bits: int):
  """Worst-case |integer sum of one coordinate| over the half-range 2^(bits-1).

  Each client's coordinate is at most C in magnitude (its L2 norm, rotation
  or not), so after scaling and rounding at most C * scale + 1; n of them sum
  to at most n (C * scale + 1). A ratio <= 1 guarantees no wrap-around; above
  1 a wrap is possible (with rotation it stays unlikely while the ratio is
  below ~sqrt(d / (2 ln(2 d))), the rotation's typical shrinkage).
  """
  _check_bits(bits)
  return num_clients * (clip_norm * scale + 1.0) / 2.0 ** (bits - 1)


def range_used(v: jax.Array, bits: int) -> jax.Array:
  """f32 scalar max |v| / 2^(bits-1) for a decoded int32 sum v (near 1: likely wrapped)."""
  return jnp.max(jnp.abs(v.astype(jnp.float32))) / jnp.float32(2.0 ** (bits - 1))
