"""Gaussian noise shaped like a pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util


def gaussian_like(key: jax.Array, tree: tree_util.PyTree,
                  stddev: float | jax.Array) -> tree_util.PyTree:
  """Independent N(0, stddev^2) noise for every coordinate of `tree`.

  Each leaf draws from its own sub-key, so the noise of different leaves is
  independent and does not depend on the order leaves are visited in.

  Args:
    key: PRNG key.
    tree: pytree giving the shapes and dtypes.
    stddev: standard deviation, in the units of the leaves.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [stddev * jax.random.normal(k, leaf.shape, jnp.float32).astype(leaf.dtype)
           for k, leaf in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, noise)
