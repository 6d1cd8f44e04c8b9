"""Tests for fedjax_priv.secure.he.aggregator: he_mean in build_round and its refusals."""

import functools

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
from fedjax_priv.secure.he import he_mean, standard_params
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


def test_he_round_matches_plaintext_round_under_vmap_and_chunked():
  """The encrypted round equals the plaintext clipped mean up to quantisation; vmap == chunked.

  (The loop backend compiles the encrypting client four times over, minutes on
  this CPU; it shares its per-client code with these two, which the round
  tests hold to it.)
  """
  params, client_update, agg = setup()
  opt = optax.sgd(1.0)
  batch, key = make_batch(0), jax.random.key(2)
  results = {}
  for backend in ("vmap", "chunked"):
    round_fn = jit(build_round(client_update, agg, opt, backend, client_chunk_size=2))
    results[backend] = round_fn(server_init(params, opt, agg), batch, key)
  plain = jit(build_round(client_update, dp_mean(CLIP, 0.0, float(K)), opt, "vmap"))(
      server_init(params, opt), batch, key)
  # Server SGD with lr 1 from zero params: the new params are the update itself.
  he_update = jax.tree.leaves(results["vmap"][0].params)
  for got, chunked, want in zip(he_update, jax.tree.leaves(results["chunked"][0].params),
                             jax.tree.leaves(plain[0].params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(chunked))
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
