"""DP-FTRL: noisy prefix sums of clipped updates by tree aggregation.

DP-FTRL (Kairouz et al. 2021) needs no sampling or shuffling for its privacy.
Round t adds the clipped sum of the cohort's updates g_t as leaf t of a binary
tree; every tree node (a dyadic block of rounds) carries its own
N(0, sigma^2 C^2 I) noise, drawn once. The noisy prefix sum S_t = g_1 + ... +
g_t + noise_t uses the nodes of the binary decomposition of t, popcount(t) <=
floor(log2 t) + 1 of them, so its noise has variance popcount(t) sigma^2 C^2
per coordinate while each update enters at most ceil(log2(T + 1)) nodes.

The server keeps theta_t = theta_0 + S_t / M (M the public expected cohort
size). As an aggregator, finalize returns the increment (S_t - S_{t-1}) / M =
(g_t + noise_t - noise_{t-1}) / M, so a server SGD step of learning rate eta
yields exactly theta_0 + eta S_t / M (the FTRL iterate with a quadratic
regulariser); server momentum on increments gives the paper's DP-FTRLM only
approximately.

Noise bookkeeping. The state holds the noise of the live node at each level
(leaves [L, ...], zero where no node is live). Moving from t - 1 to t, with
l* the lowest set bit of t, the nodes at levels < l* (the low set bits of
t - 1) retire and a single new node at level l* is drawn:

  noise_t - noise_{t-1} = new - sum_{l < l*} nodes[l],

one Gaussian draw and one masked sum over levels per round, with static
shapes and no Python loop over levels. Every `restart_every` rounds (an
epoch) the tree restarts empty: the noise of the finished tree stays in the
params and the next tree starts from there (the paper's restarts).

Neighbouring relation: replace one user's data by the special all-zero user
(REPLACE_SPECIAL), user level, requiring each client to take part in at most
one round per epoch; sensitivity C per node. Account `rounds` rounds with
`accounting.tree_aggregation_event(noise_multiplier, rounds, restart_every)`.

References:
  Kairouz, McMahan, Song, Thakkar, Thakurta & Xu 2021, "Practical and
  Private (Deep) Learning without Sampling or Shuffling", ICML (Alg. 1, App.
  D). Dwork, Naor, Pitassi & Rothblum 2010, "Differential Privacy under
  Continual Observation"; Chan, Shi & Song 2011, "Private and Continual
  Release of Statistics" (tree aggregation).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.aggregation import (ZERO_OUT, Aggregator, RoundPrivacy, check_relation,
                                             clipping_prepare)
from fedjax_priv.privacy.noise import gaussian_like


class TreeState(NamedTuple):
  """Where the current tree stands.

  Attributes:
    step: int32 scalar, leaves already added to the current tree, in
      [0, restart_every).
    nodes: pytree like the params with leaves [L, ...] float32: the noise of
      the live node at each of the L = num_levels(restart_every) levels, zero
      where none is live. Their sum is the noise of the current prefix sum.
  """
  step: jax.Array
  nodes: Any


def num_levels(restart_every: int) -> int:
  """Levels L a tree of `restart_every` leaves needs: bit length of restart_every."""
  return int(restart_every).bit_length()


def dp_ftrl_aggregator(clip_norm: float, noise_multiplier: float, expected_cohort_size: float,
                       restart_every: int) -> Aggregator:
  """DP-FTRL tree aggregation of clipped client updates (Kairouz et al. 2021).

  Args:
    clip_norm: C > 0, per-client L2 bound on the update (may be traced: a
      sweep vmaps over it; its range is then checked on the host).
    noise_multiplier: sigma >= 0, std of each tree node's noise over C (0:
      clipping only, which equals DP-FedAvg without noise); may be traced.
    expected_cohort_size: M > 0, public denominator of the released sums.
    restart_every: rounds per tree (an epoch), >= 1; each client may take
      part in at most one round per epoch for the accounting to hold.

  Returns:
    An Aggregator with state `TreeState`. Finalize returns the increment of
    the noisy prefix sum over M and reports `tree_nodes` (nodes summed in
    this round's prefix, popcount(t)) and `noise_stddev` (per-coordinate
    std of the prefix sum's noise over M, sigma C sqrt(popcount(t)) / M).

  Raises:
    ValueError: an argument out of range, named, before anything is traced.
  """
  # Traced values (a sweep vmaps over them) are checked by the sweep, on the host.
  concrete = (tree_util.is_concrete_number(clip_norm)
              and tree_util.is_concrete_number(noise_multiplier))
  if tree_util.is_concrete_number(clip_norm) and not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
  if tree_util.is_concrete_number(noise_multiplier) and not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
  if not expected_cohort_size > 0:
    raise ValueError(f"expected_cohort_size must be > 0, got {expected_cohort_size!r}")
  if (isinstance(restart_every, bool) or not isinstance(restart_every, numbers.Integral)
      or restart_every < 1):
    raise ValueError(f"restart_every must be an integer >= 1, got {restart_every!r}")
  levels = num_levels(restart_every)
  node_stddev = noise_multiplier * clip_norm

  def init(params):
    nodes = jax.tree.map(lambda p: jnp.zeros((levels, *jnp.shape(p)), jnp.float32), params)
    return TreeState(jnp.int32(0), nodes)

  def finalize(state, weighted_sum, total_weight, ctx):
    del total_weight  # The realised count would leak participation.
    t = state.step + 1
    level = jnp.arange(levels, dtype=jnp.int32)
    bits = (t >> level) & 1
    new_level = jnp.argmax(bits)  # Lowest set bit of t.
    retiring = (level < new_level).astype(jnp.float32)
    new_node = gaussian_like(ctx.key, weighted_sum, node_stddev)
    noise_step = jax.tree.map(
        lambda new, nodes: new - jnp.tensordot(retiring, nodes, axes=1), new_node, state.nodes)
    restart = t == restart_every

    def next_nodes(new, nodes):
      at = (level == new_level).reshape((levels,) + (1,) * new.ndim)
      below = (level < new_level).reshape(at.shape)
      nodes = jnp.where(at, new[None], jnp.where(below, 0.0, nodes))
      return jnp.where(restart, jnp.zeros_like(nodes), nodes)

    nodes = jax.tree.map(next_nodes, new_node, state.nodes)
    update = tree_util.scale(tree_util.add(weighted_sum, noise_step), 1.0 / expected_cohort_size)
    tree_nodes = jnp.sum(bits).astype(jnp.float32)
    stats = {"tree_nodes": tree_nodes,
             "noise_stddev": node_stddev * jnp.sqrt(tree_nodes) / expected_cohort_size}
    return update, TreeState(jnp.where(restart, 0, t).astype(jnp.int32), nodes), stats

  def event(relation):
    check_relation(relation, (ZERO_OUT,))
    # Traced values are accounted from the host's build of the same mechanism.
    return dp_accounting.SingleEpochTreeAggregationDpEvent(
        float(noise_multiplier) if concrete else math.nan, restart_every)

  values = (f"clip_norm={clip_norm}, noise_multiplier={noise_multiplier}" if concrete
            else "traced hyper-parameters")
  privacy = RoundPrivacy(
      event, (ZERO_OUT,), rounds_per_event=restart_every,
      description=f"dp_ftrl({values}, restart_every={restart_every})")
  return Aggregator(init, clipping_prepare(clip_norm), finalize, privacy=privacy)
