"""Tests for fedjax_priv.secure.he.aggregator: he_mean in build_round and its refusals."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.privacy.aggregation import dp_mean
from fedjax_priv.secure.he import he_distributed_mean, he_mean, standard_params
from fedjax_priv.simulation.round import build_round

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

INPUT_SHAPE, NUM_CLASSES = (4, 4, 1), 3
MODEL = logistic_regression(INPUT_SHAPE, NUM_CLASSES)
K, S, B = 6, 2, 4
CLIP, SCALE = 0.5, 2.0**12
PARAMS = standard_params(2048, t=2**20)


@functools.cache
def setup():
  params = jax.tree.map(jnp.zeros_like, jit(MODEL.init)(jax.random.key(0)))
  client_update = make_client_update(MODEL, optax.sgd(1.0))
  agg = he_mean(params, PARAMS, clip_norm=CLIP, scale=SCALE, expected_cohort_size=float(K),
                max_clients=K, key=jax.random.key(1), num_key_holders=2, statistical_bits=4)
  return params, client_update, agg


def make_batch(seed):
  rng = np.random.default_rng(seed)
  client_mask = np.ones(K, np.float32)
  client_mask[-1] = 0.0  # A padded slot: it must add nothing.
  return ClientBatch(
      jnp.asarray(rng.normal(size=(K, S, B, *INPUT_SHAPE)), jnp.float32),
      jnp.asarray(rng.integers(0, NUM_CLASSES, (K, S, B)), jnp.int32),
      jnp.ones((K, S, B), jnp.float32), jnp.full((K,), S * B, jnp.int32),
      jnp.asarray(client_mask))


def test_he_round_matches_plaintext_round():
  """The encrypted vmap round equals the plaintext clipped mean up to quantisation.

  (Other backends are not compiled here: each compiles the encrypting client
  again, a minute or more on this CPU. The chunked backend differs from vmap
  only by `combine`, which `test_he_mean_exact_integer_sum_for_a_large_cohort`
  checks on two halves; the round tests hold every backend to the loop.)
  """
  params, client_update, agg = setup()
  opt = optax.sgd(1.0)
  batch, key = make_batch(0), jax.random.key(2)
  results = {"vmap": jit(build_round(client_update, agg, opt, "vmap"))(
      server_init(params, opt, agg), batch, key)}
  plain = jit(build_round(client_update, dp_mean(CLIP, 0.0, float(K)), opt, "vmap"))(
      server_init(params, opt), batch, key)
  # Server SGD with lr 1 from zero params: the new params are the update itself.
  for got, want in zip(jax.tree.leaves(results["vmap"][0].params),
                       jax.tree.leaves(plain[0].params)):
    # Stochastic rounding moves each client's coordinate by < 1 / SCALE.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=(K - 1) / K / SCALE)
    assert np.abs(np.asarray(want)).max() > 10 / SCALE  # The update is not trivially zero.
  metrics = results["vmap"][1]
  assert float(metrics["clients"]) == K - 1
  assert float(metrics["expansion"]) == pytest.approx(
      2 * 2 * 2048 * 4 / (4 * 51))  # One ciphertext: 2 polys x 2 primes x n words, d = 51.


def test_he_mean_exact_integer_sum_for_a_large_cohort():
  """prepare -> group_sum -> finalize gives dequantise(sum of quantised deltas) exactly."""
  from fedjax_priv.privacy.aggregation import ClientContext, RoundContext
  from fedjax_priv.secure import quantization
  num_clients, dim = 512, 40
  template = jnp.zeros((dim,))
  agg = he_mean(template, standard_params(2048, t=2**20), clip_norm=1.0, scale=2.0**8,
                expected_cohort_size=100.0, max_clients=num_clients, key=jax.random.key(3),
                num_key_holders=1, statistical_bits=0)
  rng = np.random.default_rng(4)
  deltas = jnp.asarray(rng.normal(size=(num_clients, dim)) * 0.1, jnp.float32)
  weights = jnp.asarray(rng.random(num_clients) < 0.9, jnp.float32)

  @jax.jit
  def run(deltas, weights, key):
    state = agg.init(template)
    keys = jax.random.split(key, num_clients)
    mask = jnp.ones(num_clients)
    prepared, _, _ = jax.vmap(lambda d, k, s: agg.prepare(
        state, d, 1, ClientContext(s, k, key, mask)))(deltas, keys, jnp.arange(num_clients))
    halves = [jax.tree.map(lambda x: x[i::2], prepared) for i in (0, 1)]
    total = agg.combine(agg.group_sum(weights[0::2], halves[0]),
                        agg.group_sum(weights[1::2], halves[1]))
    update, _, _ = agg.finalize(state, total, jnp.sum(weights),
                                RoundContext(key, key, mask, weights))
    quantised = jax.vmap(lambda d, k: quantization.quantize(
        d, 2.0**8, jax.random.split(k)[0]))(deltas, keys)
    want = quantization.dequantize(jnp.tensordot(weights.astype(jnp.int32), quantised, 1),
                                   2.0**8) * (1.0 / 100.0)
    return update, want

  got, want = run(deltas, weights, jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_refuses_overflowing_settings_before_compiling():
  template = jnp.zeros((10,))
  with pytest.raises(ValueError, match="plaintext overflow: max_clients = 100"):
    he_mean(template, standard_params(2048, t=2**12), clip_norm=1.0, scale=100.0,
            expected_cohort_size=10.0, max_clients=100, key=jax.random.key(0),
            num_key_holders=1, statistical_bits=0)
  with pytest.raises(ValueError, match="noise overflow: K = 4096"):
    he_mean(template, standard_params(2048, t=2**20), clip_norm=1.0, scale=1.0,
            expected_cohort_size=10.0, max_clients=4096, key=jax.random.key(0))
  with pytest.raises(ValueError, match="clip_norm must be > 0"):
    he_mean(template, PARAMS, clip_norm=0.0, scale=1.0, expected_cohort_size=1.0,
            max_clients=2, key=jax.random.key(0))


# --- Distributed DP noise before encryption ----------------------------------------------

DDP_CLIENTS, DDP_DIM = 16, 40


def _ddp_config(noise_multiplier, bits=20):
  from fedjax_priv.secure.distributed_dp import DistributedDPConfig
  return DistributedDPConfig(clip_norm=1.0, noise_multiplier=noise_multiplier,
                             num_clients=DDP_CLIENTS, dim=DDP_DIM, bits=bits)


@functools.cache
def _ddp_round(noise_multiplier, kind):
  """Jitted (deltas, round key) -> (he_distributed_mean's update, the plaintext pipeline's)."""
  from fedjax_priv.privacy.aggregation import ClientContext, RoundContext
  from fedjax_priv.secure import distributed_dp as ddp
  template = jnp.zeros((DDP_DIM,))
  config = _ddp_config(noise_multiplier)
  agg = he_distributed_mean(template, PARAMS, config, kind, max_clients=DDP_CLIENTS,
                            key=jax.random.key(3), num_key_holders=2, statistical_bits=4)
  sampler = ddp.integer_noise(config, kind)

  def run(deltas, key):
    state = agg.init(template)
    keys = jax.random.split(key, DDP_CLIENTS)
    mask = jnp.ones(DDP_CLIENTS)
    prepared, weights, _ = jax.vmap(lambda d, k, s: agg.prepare(
        state, d, 1, ClientContext(s, k, key, mask)))(deltas, keys, jnp.arange(DDP_CLIENTS))
    update, _, stats = agg.finalize(state, agg.group_sum(weights, prepared), jnp.sum(weights),
                                    RoundContext(key, key, mask, weights))
    # The same integer messages summed in the clear (prepare encodes with split(k)[0]).
    messages = jax.vmap(lambda d, k: ddp.encode_client(
        config, sampler, d, jax.random.split(k)[0], key)[0])(deltas, keys)
    want = ddp.decode_sum(config, jnp.sum(messages, axis=0), key) / DDP_CLIENTS
    return update, want, stats

  return jit(run)


@pytest.mark.parametrize("kind", ["skellam", "discrete_gaussian"])
def test_distributed_noise_before_encryption_decrypts_to_the_plaintext_noisy_sum(kind):
  deltas = jnp.asarray(np.random.default_rng(6).normal(size=(DDP_CLIENTS, DDP_DIM)) * 0.2,
                       jnp.float32)
  got, want, stats = _ddp_round(2.0, kind)(deltas, jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert float(stats["range_used"]) < 1.0
  # The noise is there: the update is not the clipped mean up to rounding.
  assert np.abs(np.asarray(got) - np.asarray(jnp.mean(deltas, 0))).max() > 0.05


def test_distributed_noise_before_encryption_has_the_calibrated_std():
  """Zero deltas: the decrypted update is pure noise of std z C / n per coordinate."""
  z = 2.0
  run = _ddp_round(z, "skellam")
  zeros = jnp.zeros((DDP_CLIENTS, DDP_DIM))
  samples = np.concatenate([np.asarray(run(zeros, jax.random.key(100 + i))[0])
                            for i in range(40)])
  expected = z * 1.0 / DDP_CLIENTS
  # 1600 draws: the sample std is within ~6% of the truth at 3 standard errors.
  assert abs(samples.std() / expected - 1) < 0.06
  assert abs(samples.mean()) < 3 * expected / math.sqrt(samples.size)


def test_distributed_noise_refuses_a_ring_larger_than_t():
  with pytest.raises(ValueError, match="config.bits=24 .* larger than the plaintext modulus"):
    he_distributed_mean(jnp.zeros((DDP_DIM,)), PARAMS, _ddp_config(1.0, bits=24),
                        max_clients=DDP_CLIENTS, key=jax.random.key(0))
  with pytest.raises(ValueError, match="dim=40 but the template has 10"):
    he_distributed_mean(jnp.zeros((10,)), PARAMS, _ddp_config(1.0), max_clients=DDP_CLIENTS,
                        key=jax.random.key(0))
