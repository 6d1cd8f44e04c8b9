"""L2 clipping of a pytree taken as one vector."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util


def clip_factor(norm: jax.Array, clip_norm: float | jax.Array) -> jax.Array:
  """min(1, C / norm): the factor that brings a vector of L2 norm `norm` within C.

  The max() keeps the division finite for an all-zero vector, which is left as is.
  """
  return jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-12)).astype(jnp.float32)


def clip_by_l2_norm(tree: tree_util.PyTree, clip_norm: float | jax.Array
                    ) -> tuple[tree_util.PyTree, jax.Array]:
  """Scales `tree` so its global L2 norm is at most `clip_norm`.

  After clipping, adding or removing one such tree changes a sum by at most
  `clip_norm` in L2, which is the sensitivity every Gaussian mechanism of this
  package is calibrated to.

  Args:
    tree: pytree of arrays (one client's delta, or one example's gradient).
    clip_norm: C > 0, in the units of the tree's leaves.

  Returns:
    (clipped tree, norm of the input before clipping as a float32 scalar).
  """
  norm = tree_util.l2_norm(tree)
  return tree_util.scale(tree, clip_factor(norm, clip_norm)), norm
