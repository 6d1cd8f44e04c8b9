"""`secure_sum`: an Aggregator that sums quantised, pairwise-masked client updates.

  prepare (per client, vmapped):  clip -> ravel -> pad + rotate -> quantise
      -> wrap mod 2^b -> add the self mask (secagg.self_mask_client)
  group_sum / combine:            sum mod 2^b of the survivors' vectors
  finalize (once):                add the survivors' pair masks, each pair's
      stream expanded once (secagg.add_pair_masks) -> unmask with
      Shamir-recovered secrets -> centred lift -> dequantise -> rotate back
      -> unravel -> / denominator

The pair masks are added at the server side of the simulation because a
client's masked message is its self-masked input plus one stream per
neighbour: summed over the survivors that is the self-masked sum plus every
edge's stream once with coefficient +1, -1 or 0 (`add_pair_masks`), the same
integers as summing `secagg.mask_client` messages (tested) at half the mask
expansion, since a per-client prepare would expand each pair's stream at
both of its endpoints.

The decoded sum equals the sum of the survivors' quantised vectors exactly
(integer-exact modulo 2^b); with no wrap-around the update is
unrotate(sum_i q_i / scale) / denominator.

Dropouts: a client "drops" after masking when its weight is 0: padded slots
are not in the protocol at all, but clients the builder zeroes (non-finite
updates) and clients the simulated `dropout_rate` removes (a Bernoulli draw
per slot from the round key) count as dropouts, and their pair masks are
recovered from Shamir shares. When some needed secret has fewer than t
surviving share holders the round fails: finalize reports
`secagg_failed = 1`, returns a zero update, and (by default) raises a
runtime error naming the cause when the jitted round runs (via
`jax.debug.callback`); `check_threshold` does the same check on the host
before a round.

Neighbouring relation: none of its own. Masking and quantisation add no
privacy: the server learns the survivors' quantised sum. With `clip_norm`
each client's contribution (before rounding) has L2 norm <= C, so
add/remove-one-user changes the float sum by <= C; rounding can add up to
sqrt(d) / scale more per client (see quantization.error_bound). Add noise
before masking (distributed DP) for a DP guarantee.

References:
  Bonawitz et al. 2017 (CCS), "Practical Secure Aggregation for
  Privacy-Preserving Machine Learning". Bell et al. 2020 (CCS), "Secure
  Single-Server Aggregation with (Poly)Logarithmic Overhead".
  Kairouz, Liu & Steinke 2021 (ICML), "The Distributed Discrete Gaussian
  Mechanism for Federated Learning with Secure Aggregation".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.aggregation import Aggregator
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.secure import quantization as quant
from fedjax_priv.secure import secagg

_ROTATION, _DROPOUT = 11, 12  # Round-key tags (secagg uses 1-4).


class SecureSumFailed(RuntimeError):
  """Too few surviving share holders to unmask the round's sum."""


def _raise_if_failed(failed, survivors, dropouts, threshold):
  if failed:
    raise SecureSumFailed(
        f"secure aggregation failed: {int(survivors)} clients survived and {int(dropouts)} "
        f"dropped; some client's secret has fewer than threshold t={threshold} surviving "
        "share holders, so the masks cannot be removed")


_host_graph = jax.jit(secagg.masking_graph, static_argnums=2)


def check_threshold(cohort_mask, included, threshold: int, neighbours: int | None = None,
                    round_key=None) -> None:
  """Host-side check that the round can be unmasked; raises SecureSumFailed if not.

  Args:
    cohort_mask, included: [K] arrays as in RoundContext.
    threshold: t.
    neighbours: the SecAgg+ degree (needs round_key for the graph), or None
      for the complete graph, where t survivors suffice.
  """
  real = np.asarray(cohort_mask) > 0
  alive = real & (np.asarray(included) > 0)
  if neighbours is None:
    ok = alive.sum() >= threshold
  else:
    graph = _host_graph(jnp.asarray(cohort_mask, jnp.float32), round_key, neighbours)
    nbrs, valid = np.asarray(graph.neighbours), np.asarray(graph.valid)
    holders = alive[:, None] + np.sum(valid & alive[nbrs], axis=1, keepdims=True)
    ok = bool(np.all((holders[:, 0] >= threshold) | ~real))
  _raise_if_failed(not ok, alive.sum(), (real & ~alive).sum(), threshold)


def secure_sum(bits: int, scale: float, denominator: float, clip_norm: float | None = None,
               rotate: bool = True, neighbours: int | None = None,
               threshold: int | None = None, dropout_rate: float = 0.0, prg: str = "hash",
               raise_on_failure: bool = True, mask_chunk: int = 16) -> Aggregator:
  """Secure summation of quantised client updates, divided by a public denominator.

  Args:
    bits: b in [2, 32]; the sum lives in Z_{2^b}.
    scale: quantisation steps per unit of the update (see quantization).
    denominator: public divisor of the decoded sum (e.g. the expected cohort
      size); never the realised count.
    clip_norm: optional C > 0: clip each delta to L2 norm C first; also
      enables the `quant_overflow_ratio` statistic.
    rotate: randomized Hadamard rotation before quantising (shared key).
    neighbours: None for SecAgg (complete graph), or the even SecAgg+ degree
      k (see secagg.default_degree).
    threshold: t, shares needed to recover a secret; default
      floor(h / 2) + 1 of the h holders per client (K slots for SecAgg,
      k + 1 for SecAgg+), fixed when the round is traced.
    dropout_rate: probability in [0, 1) that a client drops after masking.
    prg: mask PRG, "hash" or "threefry" (secagg.prg).
    raise_on_failure: raise SecureSumFailed at run time when unmasking is
      impossible (else only report `secagg_failed`).
    mask_chunk: pairs (or clients) per vmapped chunk when pair masks are
      expanded in finalize and when the server regenerates masks.

  Returns:
    An Aggregator. prepare's stats: delta_norm, secagg_dropped (the fraction
    of clients the simulation dropped). finalize's stats: secagg_survivors,
    secagg_dropouts, secagg_failed, secagg_bytes_per_client,
    secagg_expansion, quant_error_l2 (RMS bound on the update's rounding
    error), quant_range_used, and with clip_norm quant_overflow_ratio.
  """
  if not (isinstance(bits, int) and 2 <= bits <= 32):
    raise ValueError(f"bits must be an int in [2, 32], got {bits!r}")
  for name, value in (("scale", scale), ("denominator", denominator)):
    if not value > 0:
      raise ValueError(f"{name} must be > 0, got {value}")
  if clip_norm is not None and not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}")
  if neighbours is not None and not (isinstance(neighbours, int) and neighbours >= 2
                                     and neighbours % 2 == 0):
    raise ValueError(f"neighbours must be None or an even int >= 2, got {neighbours!r}")
  if prg not in secagg.PRGS:
    raise ValueError(f"prg must be one of {secagg.PRGS}, got {prg!r}")
  if threshold is not None and not (isinstance(threshold, int) and threshold >= 1):
    raise ValueError(f"threshold must be None or an int >= 1, got {threshold!r}")

  def init(params):
    # Size-0 leaves that keep the params' shapes in their trailing axes: finalize
    # can unravel the sum without the state holding a copy of the model.
    return jax.tree.map(lambda p: jnp.zeros((0, *jnp.shape(p)), jnp.result_type(p)), params)

  def template(state):
    return jax.tree.map(lambda t: jnp.zeros(t.shape[1:], t.dtype), state)

  def encode(delta, key, round_key):
    flat, _ = quant.ravel(delta)
    d_pad = quant.padded_dim(flat.shape[0]) if rotate else flat.shape[0]
    x = quant.pad(flat, d_pad)
    if rotate:
      x = quant.hadamard_rotate(x, jax.random.fold_in(round_key, _ROTATION))
    return quant.wrap(quant.quantize(x, scale, key), bits)

  def graph_and_threshold(ctx):
    num_slots = ctx.cohort_mask.shape[0]
    if neighbours is not None and neighbours >= num_slots:
      raise ValueError(f"neighbours={neighbours} needs more than {num_slots} cohort slots; "
                       "use neighbours=None (complete graph) for small cohorts")
    graph = secagg.masking_graph(ctx.cohort_mask, ctx.round_key, neighbours)
    return graph, secagg.default_threshold(graph) if threshold is None else threshold

  def prepare(state, delta, num_examples, ctx):
    del num_examples  # Weights only select; weighting would break the masks.
    num_slots = ctx.cohort_mask.shape[0]
    norm = tree_util.l2_norm(delta)
    if clip_norm is not None:
      delta, _ = clip_by_l2_norm(delta, clip_norm)
    # Secrets depend only on unbatched inputs: vmap computes them once.
    secrets = secagg.client_secrets(ctx.round_key, num_slots)
    masked = secagg.self_mask_client(encode(delta, ctx.key, ctx.round_key), ctx.slot, secrets,
                                     ctx.round_key, bits, prg)
    dropped = jax.random.uniform(jax.random.fold_in(jax.random.fold_in(
        ctx.round_key, _DROPOUT), ctx.slot)) < dropout_rate
    weight = jnp.where(dropped, 0.0, 1.0).astype(jnp.float32)
    return masked, weight, {"delta_norm": norm, "secagg_dropped": dropped.astype(jnp.float32)}

  def finalize(state, total, total_weight, ctx):
    del total_weight
    num_slots = ctx.cohort_mask.shape[0]
    graph, t = graph_and_threshold(ctx)
    secrets = secagg.client_secrets(ctx.round_key, num_slots)
    alive = (ctx.cohort_mask > 0) & (ctx.included > 0)
    received = secagg.add_pair_masks(total, alive, graph, secrets, ctx.round_key, bits, prg,
                                     mask_chunk)
    plain, ok, stats = secagg.unmask(received, graph, secrets, ctx.round_key, ctx.cohort_mask,
                                     ctx.included, bits, t, neighbours is None, prg, mask_chunk)
    if raise_on_failure:
      jax.debug.callback(functools.partial(_raise_if_failed, threshold=t), ~ok,
                         stats["secagg_survivors"], stats["secagg_dropouts"])
    ints = quant.unwrap(plain, bits)
    x = quant.dequantize(ints, scale)
    if rotate:
      x = quant.hadamard_unrotate(x, jax.random.fold_in(ctx.round_key, _ROTATION))
    flat, unravel = quant.ravel(template(state))
    dim = flat.shape[0]
    update = unravel(jnp.where(ok, x[:dim], 0.0) / denominator)
    n = stats["secagg_survivors"]
    real = jnp.sum(ctx.cohort_mask > 0)
    num_neighbours = jnp.sum(graph.valid) / jnp.maximum(real, 1)
    stats.update(secagg.communication_cost(x.shape[0], bits, num_neighbours, dim))
    stats.update(
        secagg_failed=(~ok).astype(jnp.float32),
        quant_error_l2=quant.error_bound(scale, x.shape[0], n)["l2_rms"] / denominator,
        quant_range_used=quant.range_used(ints, bits))
    if clip_norm is not None:
      stats["quant_overflow_ratio"] = quant.overflow_ratio(clip_norm, scale, n, bits)
    return update, state, {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}

  return Aggregator(init, prepare, finalize,
                    functools.partial(quant.modular_sum, bits=bits),
                    functools.partial(quant.modular_add, bits=bits))
