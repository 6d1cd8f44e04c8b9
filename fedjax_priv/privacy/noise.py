"""Gaussian and Laplace noise shaped like a pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.fast_random import standard_normal


def _noise_like(sampler, key: jax.Array, tree: tree_util.PyTree,
                scale: float | jax.Array) -> tree_util.PyTree:
  # Each leaf draws from its own sub-key, so the noise of different leaves is
  # independent and does not depend on the order leaves are visited in.
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noise = [scale * sampler(k, leaf.shape, jnp.float32).astype(leaf.dtype)
           for k, leaf in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, noise)


def gaussian_like(key: jax.Array, tree: tree_util.PyTree,
                  stddev: float | jax.Array) -> tree_util.PyTree:
  """Independent N(0, stddev^2) noise for every coordinate of `tree`.

  Args:
    key: PRNG key.
    tree: pytree giving the shapes and dtypes.
    stddev: standard deviation, in the units of the leaves.
  """
  return _noise_like(lambda k, shape, dtype: standard_normal(k, shape), key, tree, stddev)


def laplace_like(key: jax.Array, tree: tree_util.PyTree,
                 scale: float | jax.Array) -> tree_util.PyTree:
  """Independent Laplace(0, scale) noise (std sqrt(2) * scale) for every coordinate of `tree`."""
  return _noise_like(jax.random.laplace, key, tree, scale)
