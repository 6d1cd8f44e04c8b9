"""Tests for fedjax_priv.secure.distributed_dp: samplers, accounting, aggregators.

The accounting tests re-derive every bound from the papers' formulas with
plain Python loops, independently of the vectorised implementation.
"""

import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.aggregation import dp_mean
from fedjax_priv.secure import distributed_dp as ddp
from fedjax_priv.simulation.round import build_round

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def exact_dg_moments(sigma):
  """Mean 0 and the exact variance of N_Z(0, sigma^2) from its pmf."""
  y = np.arange(-int(40 * sigma) - 40, int(40 * sigma) + 41, dtype=np.float64)
  p = np.exp(-y * y / (2 * sigma * sigma))
  p /= p.sum()
  return p, y, float(np.sum(p * y * y))


def draws(sampler, num_keys=4, seed=0):
  """float64 draws of `sampler(key)` for `num_keys` keys, stacked [num_keys, ...]."""
  keys = jax.random.split(jax.random.key(seed), num_keys)
  return np.asarray(jit(jax.vmap(sampler))(keys), np.float64)


# --- Samplers ---------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.5, 1.7, 40.0])
def test_discrete_gaussian_mean_variance_and_pmf(sigma):
  x = draws(lambda k: ddp.discrete_gaussian(k, sigma, (15_000,))).ravel()
  n = x.size
  p, y, var = exact_dg_moments(sigma)
  # At sigma = 0.5 the variance is well below sigma^2: the test uses the pmf's.
  if sigma == 0.5:
    assert var < 0.9 * sigma**2
  fourth = float(np.sum(p * y**4))
  assert abs(x.mean()) < 5 * math.sqrt(var / n)
  assert abs(x.var() - var) < 5 * math.sqrt((fourth - var**2) / n)
  # Point probabilities of the central values match the pmf.
  for value in (0, 1, -1, 2):
    prob = float(p[y == value][0])
    assert abs(np.mean(x == value) - prob) < 5 * math.sqrt(prob * (1 - prob) / n) + 1e-9


def test_discrete_gaussian_acceptance_bound():
  """The documented per-round acceptance probability >= 0.44 holds on a grid of sigma."""
  for sigma in np.concatenate([np.linspace(0.05, 5, 100), [7.5, 20.0, 300.0]]):
    t = math.floor(sigma) + 1
    y = np.arange(-int(60 * t) - 60, int(60 * t) + 61, dtype=np.float64)
    laplace = np.exp(-np.abs(y) / t)
    laplace /= laplace.sum()
    accept = np.exp(-(np.abs(y) - sigma**2 / t) ** 2 / (2 * sigma**2))
    assert np.sum(laplace * accept) >= 0.44, sigma


@pytest.mark.parametrize("variance", [3.0, 60.0, 1e7])
def test_skellam_mean_and_variance(variance):
  """Poisson(mu / 2) by inversion (mu = 3), by our PTRS near its lower limit (60) and far up (1e7,
  where jax.random.poisson's float32 variance is ~6% off and this test would fail)."""
  x = draws(lambda k: ddp.skellam(k, variance, (15_000,)), seed=1).ravel()
  n = x.size
  # Skellam's fourth central moment is 3 mu^2 + mu.
  assert abs(x.mean()) < 5 * math.sqrt(variance / n)
  assert abs(x.var() - variance) < 5 * math.sqrt((2 * variance**2 + variance) / n)


def test_noise_independent_across_keys_and_coordinates():
  def sampler(key):
    dg_key, sk_key = jax.random.split(key)
    return jnp.stack([ddp.discrete_gaussian(dg_key, 3.0, (10_000,)),
                      ddp.skellam(sk_key, 9.0, (10_000,))])

  x = draws(sampler, num_keys=4, seed=4)  # [client, sampler, coordinate]
  bound = 5 / math.sqrt(x.shape[-1])
  for s in range(2):
    for i in range(1, 4):  # Client 0 against the others.
      assert abs(np.corrcoef(x[0, s], x[i, s])[0, 1]) < bound
    assert abs(np.corrcoef(x[0, s, :-1], x[0, s, 1:])[0, 1]) < bound  # Neighbouring coordinates.
  assert abs(np.corrcoef(x[0, 0], x[0, 1])[0, 1]) < bound  # The two samplers' keys.
  np.testing.assert_array_equal(x, draws(sampler, num_keys=4, seed=4))  # Deterministic.


def test_samplers_reject_bad_scales():
  with pytest.raises(ValueError, match="sigma"):
    ddp.discrete_gaussian(jax.random.key(0), 0.0, (3,))
  with pytest.raises(ValueError, match="variance"):
    ddp.skellam(jax.random.key(0), -1.0, (3,))
  with pytest.raises(ValueError, match="lam"):
    ddp.poisson(jax.random.key(0), float("nan"), (3,))


# --- Conditional rounding -------------------------------------------------------------


def test_conditional_rounding_respects_the_bound():
  x = jax.random.normal(jax.random.key(0), (256,)) * 3.0
  norm = float(jnp.linalg.norm(x))
  keys = jax.random.split(jax.random.key(1), 64)
  # A bound slightly above ||x||: plain stochastic rounding usually exceeds it.
  bound = math.sqrt(norm**2 + 256 / 4 * 0.9)
  fn = jit(jax.vmap(lambda k: ddp.conditional_stochastic_round(x, k, norm * 1.0001, bound, 100)))
  rounded, tries, failed = fn(keys)
  norms = np.linalg.norm(np.asarray(rounded, np.float64), axis=1)
  assert np.all(norms <= bound)
  assert np.all(np.abs(np.asarray(rounded) - np.asarray(x)) < 1)
  assert int(tries.max()) > 1 and not bool(failed.any())
  # An unreachable bound: every try fails and the zero vector is sent.
  rounded, tries, failed = jit(
      lambda k: ddp.conditional_stochastic_round(x, k, norm * 1.0001, norm * 0.9, 7))(keys[0])
  assert bool(failed) and int(tries) == 7 and not np.any(np.asarray(rounded))


# --- Accounting -------------------------------------------------------------------------


def paper_l2_bound(c, gamma, d, beta):
  """Kairouz et al. Thm. 1, in model units, divided by gamma (integer units)."""
  plain = (c + gamma * math.sqrt(d)) ** 2
  conditioned = (c * c + gamma * gamma * d / 4
                 + math.sqrt(2 * math.log(1 / beta)) * gamma * (c + gamma * math.sqrt(d) / 2))
  return math.sqrt(min(plain, conditioned)) / gamma


# Small local scale (s ~ 0.62) so the tau term of the DDG bound is not negligible.
SMALL_SCALE = ddp.DistributedDPConfig(clip_norm=2.0, noise_multiplier=0.9, num_clients=5, dim=40,
                                      granularity=1.3, bits=20)


def test_sensitivities_follow_the_paper():
  for beta in (math.exp(-0.5), 1e-3):
    config = ddp.DistributedDPConfig(clip_norm=2.0, noise_multiplier=1.0, num_clients=5, dim=40,
                                     granularity=0.05, beta=beta)
    assert config.padded_dim == 64
    assert config.l2_sensitivity == pytest.approx(paper_l2_bound(2.0, 0.05, 64, beta), rel=1e-12)
    l2 = config.l2_sensitivity
    assert config.l1_sensitivity == pytest.approx(l2 * min(8.0, l2), rel=1e-12)
  no_conditioning = ddp.DistributedDPConfig(2.0, 1.0, 5, 40, granularity=0.05, beta=0.0)
  assert no_conditioning.l2_sensitivity == pytest.approx(40 + 8)


def test_ddg_rdp_matches_the_paper_formula():
  config = SMALL_SCALE
  n, d = 5, 64
  s = 0.9 * 2.0 / (1.3 * math.sqrt(n))
  assert config.local_stddev == pytest.approx(s)
  tau = 10 * sum(math.exp(-2 * math.pi**2 * s * s * k / (k + 1)) for k in range(1, n))
  assert tau > 0.1  # The tau term matters at this scale.
  l2 = paper_l2_bound(2.0, 1.3, d, math.exp(-0.5))
  l1 = l2 * min(math.sqrt(d), l2)
  a2, a1 = l2 / (math.sqrt(n) * s), l1 / (math.sqrt(n) * s)
  orders = [2, 3, 7, 32, 256]
  expected = [min(alpha * a2**2 / 2 + tau * d,
                  alpha / 2 * (a2**2 + 2 * a1 * tau + tau**2 * d),
                  alpha / 2 * (a2 + tau * math.sqrt(d)) ** 2) for alpha in orders]
  np.testing.assert_allclose(ddp.ddg_rdp(config, orders), expected, rtol=1e-12)
  assert ddp.ddg_tau(s, n) == pytest.approx(tau, rel=1e-12)


def test_skellam_rdp_matches_the_paper_formula():
  config = SMALL_SCALE
  mu = (0.9 * 2.0 / 1.3) ** 2  # Variance of the summed Skellam noise, integer units.
  l2 = paper_l2_bound(2.0, 1.3, 64, math.exp(-0.5))
  l1 = l2 * min(8.0, l2)
  orders = [2, 3, 7, 32, 256]
  expected = [alpha * l2**2 / (2 * mu)
              + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
              for alpha in orders]
  np.testing.assert_allclose(ddp.skellam_rdp(config, orders), expected, rtol=1e-12)


def test_subsampled_rdp_matches_zhu_wang():
  def base(alpha):
    return 0.3 * np.asarray(alpha, np.float64) + 0.01

  q = 0.05
  orders = [2, 3, 5, 12]
  got = accounting.poisson_subsampled_rdp(base, q, orders)
  for alpha, value in zip(orders, got):
    total = (1 - q) ** (alpha - 1) * (alpha * q - q + 1)
    total += math.comb(alpha, 2) * q**2 * (1 - q) ** (alpha - 2) * math.exp(base(2))
    total += 3 * sum(math.comb(alpha, l) * (1 - q) ** (alpha - l) * q**l
                     * math.exp((l - 1) * base(l)) for l in range(3, alpha + 1))
    assert value == pytest.approx(min(math.log(total) / (alpha - 1), base(alpha)), rel=1e-10)
  np.testing.assert_array_equal(accounting.poisson_subsampled_rdp(base, 1.0, orders), base(orders))


def test_epsilon_is_the_rdp_conversion():
  """epsilon = min over orders of rdp + log(1 - 1/a) - log(delta a) / (a - 1) (CKS Prop. 12)."""
  rounds, delta = 30, 1e-6
  for eps_fn, rdp_fn in ((ddp.ddg_epsilon, ddp.ddg_rdp), (ddp.skellam_epsilon, ddp.skellam_rdp)):
    rdp = rounds * rdp_fn(SMALL_SCALE, accounting.INTEGER_RDP_ORDERS)
    expected = min(r + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
                   for a, r in zip(accounting.INTEGER_RDP_ORDERS, rdp))
    assert eps_fn(SMALL_SCALE, rounds, delta) == pytest.approx(expected, rel=1e-10)
  assert ddp.ddg_epsilon(SMALL_SCALE, 0, delta) == 0.0
  no_noise = ddp.DistributedDPConfig(2.0, 0.0, 5, 40)
  assert ddp.skellam_epsilon(no_noise, 1, delta) == math.inf


def test_epsilon_approaches_the_gaussian_as_bits_grow():
  """More bits -> finer gamma -> less rounding inflation -> the continuous Gaussian's epsilon."""
  orders = accounting.INTEGER_RDP_ORDERS
  gaussian = accounting.compute_epsilon(dp_accounting.GaussianDpEvent(1.2), 1e-5, orders=orders)
  for eps_fn in (ddp.ddg_epsilon, ddp.skellam_epsilon):
    eps = [eps_fn(ddp.DistributedDPConfig(1.0, 1.2, 50, 1000, bits=b), 1, 1e-5)
           for b in (8, 12, 16, 24)]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    assert eps[0] > 1.05 * gaussian
    assert eps[-1] == pytest.approx(gaussian, rel=1e-4)


def test_poisson_sampling_amplifies():
  config = ddp.DistributedDPConfig(1.0, 1.0, 100, 1000, bits=20)
  full = ddp.ddg_epsilon(config, 50, 1e-5)
  sampled = ddp.ddg_epsilon(config, 50, 1e-5, sampling_probability=0.01)
  tight_gaussian = accounting.compute_epsilon(
      accounting.user_level_event(1.0, 50, "poisson", 10_000, 100), 1e-5)
  assert sampled < 0.2 * full
  # Zhu & Wang's general bound is valid but not tighter than the exact
  # subsampled-Gaussian analysis.
  assert sampled >= tight_gaussian


def test_bad_configuration_names_the_field():
  with pytest.raises(ValueError, match="clip_norm"):
    ddp.DistributedDPConfig(0.0, 1.0, 10, 100)
  with pytest.raises(ValueError, match="bits"):
    ddp.DistributedDPConfig(1.0, 1.0, 10, 100, bits=33)
  with pytest.raises(ValueError, match="bits=3 is too small"):
    ddp.DistributedDPConfig(1.0, 1.0, 10, 100, bits=3)
  with pytest.raises(ValueError, match="beta"):
    ddp.DistributedDPConfig(1.0, 1.0, 10, 100, beta=1.0)
  with pytest.raises(ValueError, match="num_clients"):
    ddp.DistributedDPConfig(1.0, 1.0, 0, 100)
  tiny_noise = ddp.DistributedDPConfig(1.0, 0.01, 100, 100, granularity=0.01)
  with pytest.raises(ValueError, match=">= 1/2"):
    ddp.ddg_rdp(tiny_noise, [2])
  with pytest.raises(ValueError, match=">= 1/2"):
    ddp.distributed_discrete_gaussian_mean(tiny_noise)
  with pytest.raises(ValueError, match="sampling_probability"):
    ddp.ddg_epsilon(SMALL_SCALE, 1, 1e-5, sampling_probability=0.0)


# --- Aggregators in a round --------------------------------------------------------------

INPUT_SHAPE, NUM_CLASSES, K, S, B = (4, 4, 1), 3, 6, 2, 4
LOGREG = logistic_regression(INPUT_SHAPE, NUM_CLASSES)
DIM = 4 * 4 * 3 + 3
CLIP = 0.5


def make_batch(seed, num_real=K):
  rng = np.random.default_rng(seed)
  return ClientBatch(
      jnp.asarray(rng.normal(size=(K, S, B, *INPUT_SHAPE)), jnp.float32),
      jnp.asarray(rng.integers(0, NUM_CLASSES, (K, S, B)), jnp.int32),
      jnp.ones((K, S, B), jnp.float32), jnp.full((K,), S * B, jnp.int32),
      jnp.asarray(np.arange(K) < num_real, jnp.float32))


@functools.cache
def get_round(kind, backend, bits=16, noise=1.0, granularity=None):
  # Rounds with one empty slot still sum enough shares.
  config = ddp.DistributedDPConfig(CLIP, noise, K, DIM, bits=bits, granularity=granularity,
                                   min_shares=K - 1)
  if kind == "dp_mean":
    aggregator = dp_mean(CLIP, 0.0, float(K))
  elif kind == "ddg":
    aggregator = ddp.distributed_discrete_gaussian_mean(config)
  else:
    aggregator = ddp.skellam_mean(config)
  fn = build_round(make_client_update(LOGREG, optax.sgd(1.0)), aggregator, optax.sgd(1.0),
                   backend)
  fn = fn if backend == "loop" else jit(fn)
  # Zero params: the new params are exactly minus the aggregated update.
  state = server_init(jax.tree.map(jnp.zeros_like, LOGREG.init(jax.random.key(0))),
                      optax.sgd(1.0), aggregator)
  return fn, state, config


def flat_params(state):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)])


@pytest.mark.parametrize("kind", ["ddg"])
def test_vmap_and_loop_backends_agree(kind):
  batch, key = make_batch(0, num_real=K - 1), jax.random.key(3)
  vmap_state, vmap_metrics = get_round(kind, "vmap")[0](get_round(kind, "vmap")[1], batch, key)
  loop_fn, state, _ = get_round(kind, "loop")
  loop_state, loop_metrics = loop_fn(state, batch, key)
  np.testing.assert_allclose(flat_params(vmap_state), flat_params(loop_state), atol=1e-6)
  for name in ("noise_shares", "modular_overflow", "rounded_norm_ratio", "rounding_tries"):
    assert float(vmap_metrics[name]) == pytest.approx(float(loop_metrics[name]), abs=1e-6), name
  assert float(vmap_metrics["noise_shares"]) == K - 1
  assert 0 < float(vmap_metrics["rounded_norm_ratio"]) <= 1
  assert float(vmap_metrics["modular_overflow"]) == 0.0
  # The noise is on: another key moves the result.
  other, _ = get_round(kind, "vmap")[0](state, batch, jax.random.key(4))
  assert np.abs(flat_params(other) - flat_params(vmap_state)).max() > 1e-3


@pytest.mark.parametrize("kind", ["skellam"])
def test_without_noise_the_mean_is_the_clipped_mean_up_to_rounding(kind):
  batch, key = make_batch(1), jax.random.key(5)
  ref_fn, ref_state, _ = get_round("dp_mean", "vmap")
  ref, _ = ref_fn(ref_state, batch, key)
  fn, state, config = get_round(kind, "vmap", bits=20, noise=0.0)
  got, metrics = fn(state, batch, key)
  error = np.linalg.norm(flat_params(got) - flat_params(ref))
  # Each client's rounding error is < sqrt(d') integer steps in L2; the mean's
  # is below that (times gamma), and well above float noise.
  assert error < config.gamma * math.sqrt(config.padded_dim)
  assert float(metrics["modular_overflow"]) == 0.0
  assert float(metrics["clipped_fraction"]) > 0  # Clipping is exercised.


def test_noise_of_the_update_has_the_target_std():
  """Over keys, the update's noise has per-coordinate std z C / n (DDG)."""
  batch = make_batch(2)
  fn, state, _ = get_round("ddg", "vmap")
  noiseless_fn, _, _ = get_round("ddg", "vmap", noise=0.0)
  keys = jax.random.split(jax.random.key(6), 12)
  noisy = np.stack([flat_params(fn(state, batch, k)[0]) for k in keys])
  clean = np.stack([flat_params(noiseless_fn(state, batch, k)[0]) for k in keys])
  noise = (noisy - clean).ravel()
  target = 1.0 * CLIP / K
  assert abs(noise.std() / target - 1) < 5 * math.sqrt(1 / (2 * noise.size))
  _, metrics = fn(state, batch, keys[0])
  assert float(metrics["noise_stddev"]) == pytest.approx(target, rel=1e-3)


def test_too_few_bits_wrap_and_are_reported():
  batch = make_batch(3)
  fn, state, _ = get_round("skellam", "vmap", bits=6, granularity=1e-3)
  _, metrics = fn(state, batch, jax.random.key(7))
  assert float(metrics["modular_overflow"]) == 1.0
  assert float(metrics["overflow_fraction"]) > 0.1
  assert float(metrics["range_used"]) > 1.0


def test_padded_slots_change_nothing():
  fn, state, _ = get_round("ddg", "vmap")
  batch = make_batch(4, num_real=K - 2)
  garbage = batch._replace(x=batch.x.at[K - 2:].set(1e4))
  a, metrics_a = fn(state, batch, jax.random.key(8))
  b, metrics_b = fn(state, garbage, jax.random.key(8))
  np.testing.assert_array_equal(flat_params(a), flat_params(b))
  assert float(metrics_a["noise_shares"]) == float(metrics_b["noise_shares"]) == K - 2


def test_init_checks_the_model_size():
  config = ddp.DistributedDPConfig(CLIP, 1.0, K, DIM + 1)
  with pytest.raises(ValueError, match=f"dim={DIM + 1}"):
    ddp.skellam_mean(config).init(LOGREG.init(jax.random.key(0)))
