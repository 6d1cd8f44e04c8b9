"""Tests for fedjax_priv.privacy.local_dp: per-client clipping and noise in `prepare`."""

import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.privacy import accounting, local_dp
from fedjax_priv.privacy import transforms as T
from fedjax_priv.privacy.aggregation import ClientContext
from fedjax_priv.simulation.round import build_round

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

C, SIGMA, B, M = 0.5, 1.5, 0.8, 4.0
GAUSS = local_dp.gaussian_local_dp(C, SIGMA, M)
LAPLACE = local_dp.laplace_local_dp(C, B, M)
# One client's upload: 200k coordinates in two leaves (std error of the std ~0.16%).
ZERO = {"a": jnp.zeros((200, 500), jnp.float32), "b": jnp.zeros((100_000,), jnp.float32)}


def flat(tree):
  return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def client_keys(key, num_clients):
  """The aggregation keys build_round gives clients 0..K-1 for a round key."""
  client_key = jax.random.split(key, 3)[0]
  return [jax.random.split(jax.random.fold_in(client_key, k))[1] for k in range(num_clients)]


@functools.cache
def uploader(name):
  """jit(key -> one client's upload of a zero delta) through the aggregator's prepare."""
  chain = {"gauss": GAUSS, "laplace": LAPLACE}[name]
  aggregator = T.as_aggregator(chain)
  state = aggregator.init(ZERO)

  def upload(key):
    ctx = ClientContext(jnp.int32(0), key, jax.random.key(0), jnp.ones(4))
    prepared, weight, stats = aggregator.prepare(state, ZERO, jnp.int32(3), ctx)
    return prepared, weight, stats

  return jit(upload)


def test_local_events_and_per_client_guarantee():
  """One upload is GaussianDpEvent(sigma) / LaplaceDpEvent(b); T uploads self-compose."""
  assert GAUSS.local_dp_event == GAUSS.dp_event == dp_accounting.GaussianDpEvent(SIGMA)
  assert LAPLACE.local_dp_event == dp_accounting.LaplaceDpEvent(B)
  assert GAUSS.relation == T.NeighboringRelation.REPLACE_ONE
  assert local_dp.per_client_event(GAUSS, 7) == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(SIGMA), 7)
  assert local_dp.per_client_event(GAUSS, 0) == dp_accounting.NoOpDpEvent()
  # Laplace is pure DP: one upload is (1/b, 0), T uploads at most (T/b, 0).
  one = accounting.compute_epsilon(local_dp.per_client_event(LAPLACE, 1), 1e-9, "pld")
  np.testing.assert_allclose(one, 1 / B, rtol=1e-3)
  five = accounting.compute_epsilon(local_dp.per_client_event(LAPLACE, 5), 1e-9, "pld")
  assert one < five <= 5 / B * (1 + 1e-3)


def test_per_client_event_refuses_bad_input():
  central = T.chain(T.clip_l2(1.0), T.sum_units(), T.gaussian(1.0))
  with pytest.raises(ValueError, match="not locally private"):
    local_dp.per_client_event(central, 3)
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match="participations"):
      local_dp.per_client_event(GAUSS, bad)
  with pytest.raises(ValueError, match="clip_l1"):
    local_dp.laplace_local_dp(0.0, 1.0, 4.0)


@pytest.mark.parametrize("name, pairs", [("gauss", [(2.0, 0.0), (0.5, 1.0)]),
                                         ("laplace", [(0.3, 1.0), (4.0, 0.0)])])
def test_local_sensitivity(name, pairs):
  """Noise off, the upload of any two inputs differs by <= the declared 2C (attained)."""
  chain = {"gauss": local_dp.gaussian_local_dp(C, 0.0, M),
           "laplace": local_dp.laplace_local_dp(C, 0.0, M)}[name]
  noise_stage = chain.sum_index - 1
  tracked = chain.tracked[noise_stage]
  bound = tracked.l2_sensitivity if name == "gauss" else tracked.l1_sensitivity
  assert bound == pytest.approx(2 * C)
  norm = (lambda v: np.linalg.norm(v)) if name == "gauss" else (lambda v: np.abs(v).sum())
  rng = np.random.default_rng(0)
  upload = jit(lambda x: chain.update_unit(x, chain.init(None), jax.random.key(0)))
  largest = 0.0
  for scale_a, scale_b in pairs * 5:
    x = {"w": jnp.asarray(rng.normal(size=(5, 3)) * scale_a, jnp.float32)}
    y = {"w": jnp.asarray(rng.normal(size=(5, 3)) * scale_b, jnp.float32)}
    for other in (y, jax.tree.map(lambda a: -a, x)):  # -x attains the bound for a large x.
      distance = norm(flat(upload(x)) - flat(upload(other)))
      assert distance <= bound * (1 + 1e-5)
      largest = max(largest, distance / bound)
  np.testing.assert_allclose(largest, 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", ["gauss", "laplace"])
def test_upload_noise_statistics(name):
  """Each upload carries N(0, (2 sigma C)^2) or Laplace(0, 2 b C) per coordinate."""
  prepared, weight, stats = uploader(name)(client_keys(jax.random.key(1), 1)[0])
  noise = flat(prepared)
  expected_std = 2 * SIGMA * C if name == "gauss" else math.sqrt(2) * 2 * B * C
  assert float(weight) == 1.0
  np.testing.assert_allclose(float(stats["local_noise_stddev"]), expected_std, rtol=1e-6)
  np.testing.assert_allclose(noise.std(), expected_std, rtol=0.02)
  assert abs(noise.mean()) < 4 * expected_std / np.sqrt(noise.size)
  kurtosis = np.mean((noise / noise.std()) ** 4) - 3
  assert abs(kurtosis - (0.0 if name == "gauss" else 3.0)) < 0.4


def test_upload_noise_independent_across_clients_and_rounds():
  """Different clients of a round, and one client in two rounds, draw uncorrelated noise."""
  upload = uploader("gauss")
  round_1 = [upload(k)[0]["b"] for k in client_keys(jax.random.key(2), 3)]
  round_2 = upload(client_keys(jax.random.key(3), 1)[0])[0]["b"]
  bound = 4 / np.sqrt(round_2.size)
  pairs = [(round_1[0], round_1[1]), (round_1[1], round_1[2]), (round_1[0], round_2)]
  for u, v in pairs:
    assert abs(np.corrcoef(np.asarray(u), np.asarray(v))[0, 1]) < bound


def test_padded_units_add_no_noise():
  """apply_to_units with 3 real units of 5: the mean's noise std is sqrt(3) 2 sigma C / m."""
  zeros = jax.tree.map(lambda leaf: jnp.zeros((5, *leaf.shape)), ZERO)
  mask = jnp.asarray([1.0, 0.0, 1.0, 0.0, 1.0])
  out = jit(lambda key: T.apply_to_units(GAUSS, GAUSS.init(None), zeros, key, mask)[0])(
      jax.random.key(4))
  np.testing.assert_allclose(flat(out).std(), math.sqrt(3) * 2 * SIGMA * C / M, rtol=0.02)


# --- In a round -------------------------------------------------------------------------

INPUT_SHAPE, NUM_CLASSES, S, BATCH = (4, 4, 1), 3, 2, 4
LOGREG = logistic_regression(INPUT_SHAPE, NUM_CLASSES)


def test_local_dp_round_excludes_nonfinite_and_padded_clients():
  """In build_round a NaN client equals an absent one (noise on), and the noise is there."""
  aggregator = T.as_aggregator(GAUSS)
  round_fn = jit(build_round(make_client_update(LOGREG, optax.sgd(1.0)), aggregator,
                             optax.sgd(1.0), "vmap"))
  params = tree_util.zeros_like(LOGREG.init(jax.random.key(0)))
  state = server_init(params, optax.sgd(1.0), aggregator)
  rng = np.random.default_rng(5)
  x = rng.normal(size=(6, S, BATCH, *INPUT_SHAPE)).astype(np.float32)
  x_nan = x.copy()
  x_nan[2, 0, 0, 0, 0, 0] = np.nan
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, (6, S, BATCH)), jnp.int32)
  ones = jnp.ones((6, S, BATCH), jnp.float32)
  n = jnp.full((6,), 8, jnp.int32)
  mask = jnp.asarray([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
  key = jax.random.key(6)
  broken, metrics = round_fn(state, ClientBatch(jnp.asarray(x_nan), y, ones, n, mask), key)
  absent, _ = round_fn(state, ClientBatch(jnp.asarray(x), y, ones, n, mask.at[2].set(0.0)), key)
  np.testing.assert_allclose(flat(broken.params), flat(absent.params), rtol=1e-6, atol=1e-7)
  assert float(metrics["nonfinite_clients"]) == 1 and float(metrics["clients"]) == 4
  np.testing.assert_allclose(float(metrics["local_noise_stddev"]), 2 * SIGMA * C, rtol=1e-6)
  other, _ = round_fn(state, ClientBatch(jnp.asarray(x), y, ones, n, mask.at[2].set(0.0)),
                      jax.random.key(7))
  # Four clients' noise: std sqrt(4) 2 sigma C / m = 0.75 per coordinate.
  assert np.linalg.norm(flat(other.params) - flat(absent.params)) > 1.0
