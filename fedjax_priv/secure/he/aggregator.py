"""`he_mean`: a mean of client deltas that the server only ever sees encrypted (BFV).

Per client (prepare, vmapped): clip the delta to L2 norm C, ravel it,
quantise it (stochastic rounding of x * scale to int32), pack n coordinates per
plaintext polynomial and encrypt the ceil(d / n) polynomials under the shared
public key. Across clients (group_sum / combine): add ciphertexts mod q; a
zero-weight slot (padding, non-finite delta) adds nothing. Once per round
(finalize): the M key holders' partial decryptions with smudging noise are
combined, the integer sum is decoded and dequantised, optional central
Gaussian noise is added, and the result is divided by the public expected
cohort size.

The decrypted sum equals the sum of the quantised clipped deltas exactly: the
constructor refuses settings where the summed noise could exceed the
decryption bound or the integer sum could leave (-t/2, t/2].

Neighbouring relation (of the released update, with noise_multiplier > 0):
add/remove one user's whole dataset, user level, as in `privacy.dp_mean`. The
quantised contribution of one user has L2 norm at most C + sqrt(d) / scale
(clipping, then stochastic rounding moves each coordinate by less than one
step), and the noise is calibrated to that sensitivity. Encryption itself adds
no differential privacy: it keeps individual deltas from the server. In this
simulation the central noise is added after decryption, so it protects the
released update, not the sum against the key holders.

What is simulated: the key holders' secret shares live in the aggregator
state so that finalize can run their partial decryptions; a deployment keeps
each share on its holder. Keys come from JAX's PRNG, not a cryptographic one.
See docs/homomorphic_encryption.md.

References:
  Fan & Vercauteren. 2012. Somewhat Practical Fully Homomorphic Encryption.
  IACR ePrint 2012/144.
  Asharov, Jain, Lopez-Alt, Tromer, Vaikuntanathan & Wichs. 2012. Multiparty
  Computation with Low Communication, Computation and Interaction via Threshold
  FHE. EUROCRYPT 2012.
  McMahan, Ramage, Talwar & Zhang. 2018. Learning Differentially Private
  Recurrent Language Models. ICLR 2018 (the DP-FedAvg mean).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.privacy.aggregation import Aggregator, gaussian_sum_privacy
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.privacy.noise import gaussian_like
from fedjax_priv.secure import distributed_dp as ddp
from fedjax_priv.secure import quantization
from fedjax_priv.secure.he import params as he_params
from fedjax_priv.secure.he import rlwe
from fedjax_priv.secure.he.ntt import RnsRing


class HeState(NamedTuple):
  """Aggregator state: the public key and (simulation only) the key holders' shares.

  Attributes:
    public_key: (b, a) in the NTT domain, uint32 [L, n] each.
    secret_shares: uint32 [M, L, n], share j of the secret key in the NTT domain.
  """
  public_key: rlwe.PublicKey
  secret_shares: jax.Array


def _encrypted_mean(template: Any, params: he_params.RlweParams, message_dim: int, encode,
                    decode, *, max_clients: int, key: jax.Array, num_key_holders: int,
                    statistical_bits: int, privacy=None,
                    sums_nonfinite_as_zero: bool = False) -> Aggregator:
  """The encrypted pipeline around an integer encoding of the client deltas.

  Args:
    template: pytree with the shapes of a client delta.
    params: the BFV parameter set.
    message_dim: m, the length of one client's integer message.
    encode: `(delta, key, round_key) -> (int32[m], stats)`, per client.
    decode: `(int32[m] centred sum, RoundContext) -> (update pytree, stats)`.
    max_clients, key, num_key_holders, statistical_bits: as in `he_mean`.
    privacy, sums_nonfinite_as_zero: the Aggregator's fields.

  Returns:
    An Aggregator whose finalize also reports ciphertext_bytes (per client)
    and expansion (ciphertext bytes / float32 update bytes).
  """
  he_params.check_noise_budget(params, max_clients, num_key_holders, statistical_bits)
  shapes = jax.tree.map(lambda leaf: jnp.shape(leaf), template)
  dim = tree_util.num_parameters(template)
  ring = RnsRing(params)
  num_ciphertexts = -(-message_dim // params.n)
  smudging = he_params.smudging_bound(params, max_clients, num_key_holders, statistical_bits)
  ct_bytes = he_params.ciphertext_bytes(params, message_dim)

  # One program: run eagerly, keygen's NTTs dispatched ~700 single-op
  # programs, each compiled on first use (28 s on a 2-core CPU).
  keygen = jax.jit(lambda key: rlwe.keygen(ring, key, num_key_holders))

  def init(model_params):
    got = jax.tree.map(lambda leaf: jnp.shape(leaf), model_params)
    if got != shapes:
      raise ValueError(f"params shapes {got} differ from the template's the aggregator was "
                       "built for")
    return HeState(*keygen(key))

  def prepare(state, delta, num_examples, ctx):
    del num_examples  # Weighting by example count would break the sensitivity bound.
    encode_key, encrypt_key = jax.random.split(ctx.key)
    message, stats = encode(delta, encode_key, ctx.round_key)
    message = jnp.pad(message, (0, num_ciphertexts * params.n - message_dim))
    ct = rlwe.encrypt(ring, state.public_key, message.reshape(num_ciphertexts, params.n),
                      encrypt_key)
    return ct, jnp.float32(1.0), stats

  def group_sum(weights, stacked):
    return rlwe.masked_sum(ring, weights, stacked)

  def combine(a, b):
    return rlwe.add(ring, a, b)

  def finalize(state, total, total_weight, ctx):
    del total_weight  # Dividing by the realised count would leak participation.
    num_slots = ctx.cohort_mask.shape[0]
    if num_slots > max_clients:
      raise ValueError(f"the round has {num_slots} client slots but the aggregator's noise "
                       f"budget was checked for max_clients = {max_clients}")
    decrypt_key, decode_key = jax.random.split(ctx.key)
    summed = rlwe.decrypt(ring, total, state.secret_shares, decrypt_key, smudging)
    update, stats = decode(summed.reshape(-1)[:message_dim], ctx._replace(key=decode_key))
    stats.update(ciphertext_bytes=jnp.float32(ct_bytes),
                 expansion=jnp.float32(ct_bytes / (4 * dim)))
    return update, state, stats

  return Aggregator(init, prepare, finalize, group_sum, combine, privacy=privacy,
                    sums_nonfinite_as_zero=sums_nonfinite_as_zero)


def _unravel(template: Any):
  return quantization.ravel(jax.tree.map(
      lambda leaf: jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf)), template))[1]


def he_mean(template: Any, params: he_params.RlweParams, *, clip_norm: float, scale: float,
            expected_cohort_size: float, max_clients: int, key: jax.Array,
            num_key_holders: int = 3, statistical_bits: int = 40,
            noise_multiplier: float = 0.0) -> Aggregator:
  """Homomorphically encrypted (optionally DP) mean of clipped, quantised client deltas.

  Args:
    template: a pytree with the shapes of a client delta (e.g. the model
      params or `jax.eval_shape` of them); fixes d and the ciphertext count.
    params: the BFV parameter set (`he.params.standard_params()`).
    clip_norm: C > 0, the L2 clip of each delta, in parameter units.
    scale: quantisation steps per parameter unit (one step is 1 / scale).
    expected_cohort_size: public denominator of the mean.
    max_clients: K, the most client slots a round may sum; the noise budget and
      the plaintext range are checked for it.
    key: PRNG key of the (simulated) distributed key generation.
    num_key_holders: M, the parties holding n-of-n additive shares of the key.
    statistical_bits: smudging margin of the partial decryptions
      (`he.params.smudging_bound`).
    noise_multiplier: sigma >= 0; Gaussian noise of std sigma * (C + sqrt(d) /
      scale) is added to the decrypted sum.

  Returns:
    An Aggregator with state `HeState`; finalize reports `noise_stddev` (per
    coordinate of the update), `ciphertext_bytes` (per client) and
    `expansion` (ciphertext bytes / float32 update bytes).
  """
  for name, value in (("clip_norm", clip_norm), ("scale", scale),
                      ("expected_cohort_size", expected_cohort_size)):
    if not value > 0:
      raise ValueError(f"{name} must be > 0, got {value}")
  if not noise_multiplier >= 0:
    raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
  dim = tree_util.num_parameters(template)
  if dim == 0:
    raise ValueError("template has no parameters")
  # Largest |quantised coordinate| of one client; the margin covers a clipped
  # norm that float rounding leaves a hair above C.
  max_step = math.ceil(clip_norm * scale * (1 + 1e-6))
  if max_clients * max_step > (params.t - 1) // 2:
    raise ValueError(
        f"plaintext overflow: max_clients = {max_clients} clients of up to ceil(clip_norm * "
        f"scale) = {max_step} steps per coordinate can sum beyond t / 2 with t = {params.t}: "
        "lower scale or max_clients, or raise t")
  unravel = _unravel(template)
  noise_stddev = noise_multiplier * (clip_norm + math.sqrt(dim) / scale)

  def encode(delta, key, round_key):
    del round_key
    clipped, norm = clip_by_l2_norm(delta, clip_norm)
    message = quantization.quantize(quantization.ravel(clipped)[0], scale, key)
    return message, {"delta_norm": norm,
                     "clipped_fraction": (norm > clip_norm).astype(jnp.float32)}

  def decode(summed, ctx):
    update = unravel(quantization.dequantize(summed, scale))
    if noise_multiplier > 0:
      update = tree_util.add(update, gaussian_like(ctx.key, update, noise_stddev))
    update = tree_util.scale(update, 1.0 / expected_cohort_size)
    return update, {"noise_stddev": jnp.float32(noise_stddev / expected_cohort_size)}

  # Noise of std sigma (C + sqrt(d) / scale) on a sum that one user moves by at
  # most C plus its rounding error sqrt(d) / scale: the Gaussian mechanism.
  privacy = None if noise_multiplier == 0 else gaussian_sum_privacy(
      noise_multiplier, f"he_mean(clip_norm={clip_norm}, scale={scale}, "
      f"noise_multiplier={noise_multiplier})")
  return _encrypted_mean(template, params, dim, encode, decode, max_clients=max_clients, key=key,
                         num_key_holders=num_key_holders, statistical_bits=statistical_bits,
                         privacy=privacy)


def he_distributed_mean(template: Any, params: he_params.RlweParams,
                        config: ddp.DistributedDPConfig, noise: str = "skellam", *,
                        max_clients: int, key: jax.Array, num_key_holders: int = 3,
                        statistical_bits: int = 40) -> Aggregator:
  """Encrypted mean with distributed DP: each client adds integer noise before encrypting.

  The client side of `secure.distributed_dp` (clip to C, shared Hadamard
  rotation, scale by 1 / gamma, conditional rounding, a discrete Gaussian or
  Skellam noise share: `distributed_dp.encode_client`) produces the integer
  message, which is encrypted instead of masked; the server adds
  ciphertexts, the key holders decrypt the noisy integer sum (centred mod t),
  and `distributed_dp.decode_sum` rotates it back; the mean divides by the
  public n = config.num_clients. No party ever sees a noiseless sum, not
  even the key holders, which central noise added after decryption cannot
  offer. The released value is the one `distributed_discrete_gaussian_mean` /
  `skellam_mean` release (same integers, decoded mod t instead of mod
  2^bits), so `ddg_epsilon` / `skellam_epsilon` of `config` account for it.
  Relation: zero-out one user, user level (`distributed_dp` docstring).

  Args:
    template: pytree with the shapes of a client delta (config.dim parameters).
    params: the BFV parameter set; its plaintext modulus t must hold the ring
      that config.bits sized gamma for: 2^bits <= t.
    config: the distributed-DP hyper-parameters (clip, z, n, bits, ...).
    noise: "discrete_gaussian" (DDG, Kairouz, Liu & Steinke 2021) or
      "skellam" (Agarwal, Kairouz & Liu 2021).
    max_clients, key, num_key_holders, statistical_bits: as in `he_mean`.

  Returns:
    An Aggregator; per client the stats of `distributed_dp.encode_client`,
    per round noise_stddev (model units, of the update), range_used (max
    |decrypted sum| / (t / 2): near 1 means the sum probably wrapped),
    ciphertext_bytes and expansion.
  """
  dim = tree_util.num_parameters(template)
  if dim != config.dim:
    raise ValueError(f"DistributedDPConfig.dim={config.dim} but the template has {dim} "
                     "parameters")
  if 2**config.bits > params.t:
    raise ValueError(f"config.bits={config.bits} sizes gamma for a ring of 2^{config.bits}, "
                     f"larger than the plaintext modulus t={params.t}: lower bits to "
                     f"<= {params.t.bit_length() - 1}")
  sampler = ddp.integer_noise(config, noise)
  unravel = _unravel(template)
  n = config.num_clients
  noise_stddev = config.noise_multiplier * config.clip_norm / n

  def encode(delta, key, round_key):
    return ddp.encode_client(config, sampler, delta, key, round_key)

  def decode(summed, ctx):
    update = tree_util.scale(unravel(ddp.decode_sum(config, summed, ctx.round_key)), 1.0 / n)
    update, guard_stats = ddp.shares_guard(config, update, ctx)
    range_used = jnp.max(jnp.abs(summed)).astype(jnp.float32) / (params.t / 2)
    return update, {"noise_stddev": jnp.float32(noise_stddev), "range_used": range_used,
                    **guard_stats}

  return _encrypted_mean(template, params, config.padded_dim, encode, decode,
                         max_clients=max_clients, key=key, num_key_holders=num_key_holders,
                         statistical_bits=statistical_bits,
                         privacy=ddp.round_privacy(config, noise), sums_nonfinite_as_zero=True)
