"""Small pytree helpers shared by the privacy, algorithm and simulation layers.

Every helper works leaf-wise on arbitrary pytrees of arrays and is safe under
`jax.jit` and `jax.vmap`.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def squared_l2_norm(tree: PyTree) -> jax.Array:
  """Sum of the squares of all leaves' elements, as one float32 scalar.

  One reduction per leaf, added in leaf order: XLA computes an identical
  expression once, so `l2_norm` (a clip norm) and a finiteness test written
  with this function share their passes over the tree.
  """
  squares = [jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)]
  return sum(squares, jnp.float32(0.0))


def l2_norm(tree: PyTree) -> jax.Array:
  """Global L2 norm of all leaves taken together, as one float32 scalar."""
  return jnp.sqrt(squared_l2_norm(tree))


def l1_norm(tree: PyTree) -> jax.Array:
  """Global L1 norm of all leaves taken together, as one float32 scalar."""
  sums = [jnp.sum(jnp.abs(leaf.astype(jnp.float32))) for leaf in jax.tree.leaves(tree)]
  return sum(sums, jnp.float32(0.0))


def all_finite(tree: PyTree) -> jax.Array:
  """Scalar bool: True when no leaf holds a NaN or an infinity.

  Written as isfinite(sum(leaf - leaf)): x - x is 0 for every finite x and
  NaN for NaN or +-inf (IEEE 754, which XLA keeps: its simplifier folds
  x - x only for integers), and a sum of zeros cannot overflow, so the sum
  is finite exactly when every element is. One float reduction per leaf
  that reads nothing but the leaf. `all(isfinite(leaf))` took an
  elementwise pass and a boolean reduction that XLA:CPU split into three
  kernels per leaf; `sum(leaf * 0)` became an XNNPACK dot against a zero
  tensor that XLA:CPU wrote out every round, and `min(isfinite(leaf))` an
  elementwise pass that wrote the flags out before reducing them
  (`experiments/benchmarks/runner_vs_floor.py`).
  """
  leaves = [leaf for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]  # Integers are finite.
  total = sum((jnp.sum(leaf - leaf).astype(jnp.float32) for leaf in leaves), jnp.float32(0.0))
  return jnp.isfinite(total)


def scale(tree: PyTree, factor: jax.Array | float) -> PyTree:
  """Multiplies every leaf by a scalar."""
  return jax.tree.map(lambda leaf: leaf * factor, tree)


def add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def zeros_like(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, tree)


def select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Leaf-wise `jnp.where` with a scalar predicate.

  Unlike `pred * a + (1 - pred) * b`, this never propagates a NaN from the
  branch that is not taken, which is what keeps a broken client out of a sum.
  """
  return jax.tree.map(lambda t, f: jnp.where(pred, t, f), on_true, on_false)


def weighted_sum(weights: jax.Array, stacked: PyTree) -> PyTree:
  """Sum over the leading axis weighted by `weights`, written as a dot product.

  Args:
    weights: [K] float32.
    stacked: pytree whose leaves have shape [K, ...].

  Returns:
    Pytree with leaves of shape [...]: sum_k weights[k] * leaf[k].

  A dot product lowers to one GEMV; the broadcast-multiply-then-reduce form was
  measured 35x slower on XLA:CPU for 20 clients x 10k parameters (DESIGN.md).
  """
  return jax.tree.map(
      lambda leaf: jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1), stacked)


def is_concrete_number(value: Any) -> bool:
  """True for a Python or NumPy number, False for arrays and tracers.

  Hyper-parameters may arrive traced (a sweep vmaps over them); range checks
  on them run on the host, before tracing, and are skipped here.
  """
  return isinstance(value, numbers.Real)


def num_parameters(tree: PyTree) -> int:
  return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))
