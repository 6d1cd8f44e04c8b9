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

Refused when built (and again when the round is traced, with the cohort's
K slots): a cohort of fewer than 2 slots; with `clip_norm`, a bit width that
cannot hold the largest possible sum. Each coordinate of a clipped (and
rotated: the rotation is orthonormal) update is at most C in magnitude, so
it quantises to at most ceil(C * scale) < C * scale + 1, and K clients sum
to less than K (C * scale + 1); the centred lift recovers any sum in
[-2^(b-1), 2^(b-1)), so K (C * scale + 1) <= 2^(b-1) rules out wrap-around
(up to float32 rounding of the clipped norm). Without `clip_norm` nothing
bounds an update: wrap-around is possible and `quant_range_used` is the
only sign of it. A `threshold` below floor(h / 2) + 1 of the h share holders
per client is refused (a minority of holders could then reconstruct a
client's secrets, the majority condition of Bonawitz et al. 2017, Sec. 4 and
Bell et al. 2020), and one above h, since no secret could ever be recovered.
The default threshold is a majority of each client's share holders in the
round, as the server fixes it once the round's R clients have advertised
their keys: floor(R / 2) + 1 for SecAgg, floor(h / 2) + 1 of the
h = min(k + 1, R) holders for SecAgg+. The shares are drawn for the largest
threshold the K slots allow and the polynomials' coefficients above the
round's degree are zero (`shamir.share(..., active=)`), so a Poisson cohort
smaller than the slots' majority is still unmasked.

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
import math

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
        f"dropped; some client's secret has fewer than threshold t={int(threshold)} "
        "surviving share holders, so the masks cannot be removed")


def _raise_if_above(real, max_cohort):
  if real > max_cohort:
    raise ValueError(f"a round has {int(real)} real clients, more than secure_sum's max_cohort "
                     f"= {max_cohort}, for which its bit width and threshold were checked")


_host_graph = jax.jit(secagg.masking_graph, static_argnums=2)


def check_threshold(cohort_mask, included, threshold: int | None,
                    neighbours: int | None = None, round_key=None) -> None:
  """Host-side check that the round can be unmasked; raises SecureSumFailed if not.

  Args:
    cohort_mask, included: [K] arrays as in RoundContext.
    threshold: t; None for the default, a majority of each client's share
      holders in the round (floor(R / 2) + 1 of the R real clients for the
      complete graph).
    neighbours: the SecAgg+ degree (needs round_key for the graph), or None
      for the complete graph, where t survivors suffice.
  """
  real = np.asarray(cohort_mask) > 0
  alive = real & (np.asarray(included) > 0)
  if neighbours is None:
    t = int(secagg.round_threshold(cohort_mask)) if threshold is None else threshold
    ok = alive.sum() >= t
  else:
    graph = _host_graph(jnp.asarray(cohort_mask, jnp.float32), round_key, neighbours)
    nbrs, valid = np.asarray(graph.neighbours), np.asarray(graph.valid)
    holders = alive + np.sum(valid & alive[nbrs], axis=1)
    t = np.asarray(secagg.round_threshold(cohort_mask, graph)) if threshold is None else threshold
    ok = bool(np.all((holders >= t) | ~real))
    t = int(np.max(np.where(real, t, 0)))
  _raise_if_failed(not ok, alive.sum(), (real & ~alive).sum(), t)


def check_cohort(bits: int, scale: float, clip_norm: float | None, num_slots: int,
                 neighbours: int | None, threshold: int | None) -> None:
  """Raises ValueError if a cohort of `num_slots` slots cannot run `secure_sum` safely.

  Refuses fewer than 2 slots (a sum of one client is that client's update,
  and the protocol's pairs and shares need two), a bit width whose modulus
  cannot hold the largest sum K (clip_norm * scale + 1) of K = `num_slots`
  clipped, quantised updates, and a threshold outside
  [floor(h / 2) + 1, h] for the h = K (complete graph) or k + 1 (SecAgg+)
  share holders of a client.
  """
  if num_slots < 2:
    raise ValueError(f"secure_sum needs a cohort of at least 2 slots, got {num_slots}: one "
                     "client's masked sum is its own update")
  if clip_norm is not None:
    ratio = quant.overflow_ratio(clip_norm, scale, num_slots, bits)
    if ratio > 1:
      needed = math.ceil(math.log2(num_slots * (clip_norm * scale + 1))) + 1
      raise ValueError(
          f"bits = {bits} cannot hold the sum of {num_slots} clients at clip_norm = {clip_norm} "
          f"and scale = {scale}: it may reach {num_slots * (clip_norm * scale + 1):.4g} against "
          f"2^{bits - 1} = {2 ** (bits - 1)}, and would wrap around; use bits >= {needed}, a "
          "smaller scale or a smaller cohort")
  holders = num_slots if neighbours is None else neighbours + 1
  if threshold is not None and not holders // 2 + 1 <= threshold <= holders:
    raise ValueError(f"threshold = {threshold} must be in [{holders // 2 + 1}, {holders}] for "
                     f"the {holders} share holders of each client (floor(h / 2) + 1 at least, "
                     "so no minority of holders can reconstruct a client's secrets)")


def secure_sum(bits: int, scale: float, denominator: float, clip_norm: float | None = None,
               rotate: bool = True, neighbours: int | None = None,
               threshold: int | None = None, dropout_rate: float = 0.0, prg: str = "hash",
               raise_on_failure: bool = True, mask_chunk: int = 16,
               max_cohort: int | None = None) -> Aggregator:
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
    threshold: t, shares needed to recover a secret, in [floor(h / 2) + 1, h]
      for the h holders per client (K slots for SecAgg, k + 1 for
      SecAgg+), fixed when the round is traced. Default: a majority of each
      client's share holders in the round, floor(R / 2) + 1 of the R real
      clients for SecAgg and floor(h / 2) + 1 of the h = min(k + 1, R)
      holders for SecAgg+ (with Poisson cohorts R varies below the K slots,
      and a majority of the slots would fail every round with fewer
      survivors than that).
    dropout_rate: probability in [0, 1) that a client drops after masking.
    prg: mask PRG, "hash" or "threefry" (secagg.prg).
    raise_on_failure: raise SecureSumFailed at run time when unmasking is
      impossible (else only report `secagg_failed`).
    mask_chunk: pairs (or clients) per vmapped chunk when pair masks are
      expanded in finalize and when the server regenerates masks.
    max_cohort: the most cohort slots K a round will have; given, the
      cohort checks (`check_cohort`: K >= 2, no wrap-around at
      `clip_norm`, the threshold's range) run now, else when the round is
      traced with its K.

  Raises:
    ValueError: invalid arguments, named; the cohort checks above.

  Returns:
    An Aggregator. prepare's stats: delta_norm, secagg_dropped (the fraction
    of clients the simulation dropped). finalize's stats: secagg_survivors,
    secagg_dropouts, secagg_threshold (the t used; the largest over
    clients for SecAgg+), secagg_failed,
    secagg_bytes_per_client,
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
  if max_cohort is not None:
    if isinstance(max_cohort, bool) or not isinstance(max_cohort, int):
      raise ValueError(f"max_cohort must be None or an int, got {max_cohort!r}")
    check_cohort(bits, scale, clip_norm, max_cohort, neighbours, threshold)
  elif neighbours is not None and threshold is not None:
    check_cohort(bits, scale, None, neighbours + 1, neighbours, threshold)

  def check_traced_cohort(num_slots):
    """The cohort checks once the round's K slots are known (static, at trace time).

    Without max_cohort they run on the K slots, which bound the real cohort
    from above (padding adds slots): sound, but stricter than the real
    cohort needs. With max_cohort they ran when built; a round with more
    real clients than max_cohort is refused when it runs.
    """
    if max_cohort is None:
      check_cohort(bits, scale, clip_norm, num_slots, neighbours, threshold)
    elif num_slots < 2:
      check_cohort(bits, scale, clip_norm, num_slots, neighbours, threshold)

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
    check_traced_cohort(num_slots)
    if neighbours is not None and neighbours >= num_slots:
      raise ValueError(f"neighbours={neighbours} needs more than {num_slots} cohort slots; "
                       "use neighbours=None (complete graph) for small cohorts")
    # threshold None: set per round, a majority of each client's holders.
    return secagg.masking_graph(ctx.cohort_mask, ctx.round_key, neighbours), threshold

  def prepare(state, delta, num_examples, ctx):
    del num_examples  # Weights only select; weighting would break the masks.
    num_slots = ctx.cohort_mask.shape[0]
    check_traced_cohort(num_slots)
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
      jax.debug.callback(_raise_if_failed, ~ok, stats["secagg_survivors"],
                         stats["secagg_dropouts"], stats["secagg_threshold"])
    if max_cohort is not None:
      jax.debug.callback(functools.partial(_raise_if_above, max_cohort=max_cohort),
                         jnp.sum(ctx.cohort_mask > 0))
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
