"""A convolution whose backward pass stays fast inside `lax.scan` on XLA:CPU.

`conv_general_dilated` is a drop-in for `lax.conv_general_dilated` (pass it to
`flax.linen.Conv(conv_general_dilated=...)`): the same forward convolution,
with a custom VJP that writes both gradients as plain channels-last
convolutions with explicit transposes:

  d lhs = conv(g dilated by the strides, the spatially flipped kernel with its
          in/out axes swapped), padded so that it lands on the input grid;
  d rhs = conv(the input with batch and channel axes swapped, g as the kernel),
          with the strides as kernel dilation and the kernel dilation as
          strides; output [C_in, kh, kw, C_out], transposed to the kernel's.

Why: JAX's own transposes emit the kernel gradient with batch as the
contracted feature axis (dimension labels like `f01b_i01o->01bf`). In the
entry computation XLA:CPU rewrites that into a form its Eigen convolution
runs, but inside a while loop (every `lax.scan`: local steps, rounds) it does
not, and the convolution falls back to a slow loop emitter. Measured on the
2-core development CPU: 4 local SGD steps of `tanh_cnn` at batch 256 took
0.63-0.83 s in a scan against 0.19 s unrolled; of the Reddi et al. CNN at
batch 20, 3.7 s against 0.12 s with this convolution
(`experiments/benchmarks/conv_in_scan.py`). The gradients are the same
numbers (tested against `jax.vjp` of `lax.conv_general_dilated`).

Covered: channels-last inputs with channels-last-output kernels (flax's
layout: lhs N...C, rhs ...IO, out N...C), any spatial rank, strides, explicit
or named padding, kernel dilation, float dtypes. Anything else (input
dilation, feature or batch groups, other layouts) differentiates through
`lax.conv_general_dilated`'s own rules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _channels_last(ndim: int) -> lax.ConvDimensionNumbers:
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, ndim - 1, *spatial),
                                  rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
                                  out_spec=(0, ndim - 1, *spatial))


def _explicit_backward_applies(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count,
                               batch_group_count) -> bool:
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return (numbers == _channels_last(lhs.ndim) and feature_group_count == 1
          and batch_group_count == 1 and all(d == 1 for d in (lhs_dilation or ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=tuple(range(2, 11)))
def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, same arguments and result; see the module docstring."""
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision, preferred_element_type)


def _forward(lhs, rhs, *static):
  return conv_general_dilated(lhs, rhs, *static), (lhs, rhs)


def _backward(window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count, batch_group_count, precision, preferred_element_type,
              residuals, g):
  lhs, rhs = residuals
  if not _explicit_backward_applies(lhs, rhs, lhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count):
    _, vjp = jax.vjp(lambda a, b: lax.conv_general_dilated(
        a, b, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type), lhs, rhs)
    return vjp(g)
  spatial = lhs.ndim - 2
  strides = tuple(window_strides)
  dilation = tuple(rhs_dilation or (1,) * spatial)
  kernel = rhs.shape[:spatial]
  window = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
  in_sizes, out_sizes = lhs.shape[1:-1], g.shape[1:-1]
  pads = (lax.padtype_to_pads(in_sizes, window, strides, padding) if isinstance(padding, str)
          else tuple(tuple(p) for p in padding))
  layout = _channels_last(lhs.ndim)

  # d rhs: rows of the padded input a stride-s window never reaches ("slack")
  # are cut by the high padding, so the output is exactly the kernel's size.
  rhs_pads = []
  for size, (low, high), k, d, s, out in zip(in_sizes, pads, kernel, dilation, strides,
                                             out_sizes):
    slack = (size + low + high - (k - 1) * d - 1) - (out - 1) * s
    rhs_pads.append((low, high - slack))
  image = jnp.moveaxis(lhs, (0, lhs.ndim - 1), (lhs.ndim - 1, 0))  # [C_in, ..., N]
  per_output = jnp.moveaxis(g, 0, g.ndim - 2)                     # [..., N, C_out]
  d_rhs = lax.conv_general_dilated(image, per_output, dilation, rhs_pads, None, strides, layout,
                                   precision=precision,
                                   preferred_element_type=preferred_element_type)
  d_rhs = jnp.moveaxis(d_rhs, 0, d_rhs.ndim - 2)                  # [..., C_in, C_out]

  # d lhs: the transposed convolution, as JAX's own lhs transpose pads it.
  flipped = jnp.swapaxes(jnp.flip(rhs, axis=tuple(range(spatial))), -1, -2)
  lhs_pads = []
  for size, (low, _), w, s, out in zip(in_sizes, pads, window, strides, out_sizes):
    before = w - low - 1
    lhs_pads.append((before, size + w - 1 - ((out - 1) * s + 1) - before))
  d_lhs = lax.conv_general_dilated(g, flipped, (1,) * spatial, lhs_pads, strides, dilation,
                                   layout, precision=precision,
                                   preferred_element_type=preferred_element_type)
  return d_lhs.astype(lhs.dtype), d_rhs.astype(rhs.dtype)


conv_general_dilated.defvjp(_forward, _backward)
