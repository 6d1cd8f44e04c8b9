"""Tests of fedjax_priv.privacy.matrix_factorization: workloads, strategies, sensitivity, streams."""

import functools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from dp_accounting.rdp import rdp_privacy_accountant

from fedjax_priv.privacy import matrix_factorization as mf
from fedjax_priv.privacy.aggregation import RoundContext
from fedjax_priv.privacy.dp_ftrl import dp_ftrl_aggregator
from fedjax_priv.privacy.noise import gaussian_like

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def random_blt(rng, buffers):
  """A BLT with w >= 0 and sum w < 1: non-negative, non-increasing coefficients."""
  scale = rng.dirichlet(np.ones(buffers + 1))[:buffers]
  return mf.BufferedToeplitz(np.sort(rng.uniform(0.05, 0.98, buffers))[::-1], scale)


def some_strategies(n, rng):
  """One strategy of each kind, with n-sized ones where needed."""
  return [
      mf.BandedToeplitz(rng.normal(size=4) + np.array([3.0, 0, 0, 0])),
      mf.banded_square_root(n),
      mf.banded_inverse_square_root(3, momentum=0.5),
      random_blt(rng, 3),
      mf.DenseStrategy(np.tril(rng.normal(size=(n, n))) + 3 * np.eye(n)),
      mf.binary_tree_strategy(n),
  ]


# ----------------------------------------------------------------------------
# Workloads.


def test_workload_is_the_map_from_gradients_to_sgd_momentum_iterates():
  n, beta = 12, 0.7
  rng = np.random.default_rng(0)
  rates = rng.uniform(0.1, 1.0, n)
  grads = rng.normal(size=(n, 3))
  momentum, params, iterates = np.zeros(3), np.zeros(3), []
  for t in range(n):
    momentum = beta * momentum + grads[t]
    params = params - rates[t] * momentum
    iterates.append(params)
  workload = mf.Workload(n, momentum=beta, learning_rates=rates)
  np.testing.assert_allclose(-workload.matrix() @ grads, np.array(iterates), rtol=1e-12)
  assert not workload.is_toeplitz
  np.testing.assert_array_equal(mf.Workload(5).matrix(), np.tril(np.ones((5, 5))))
  toeplitz = mf.Workload(n, momentum=beta)
  np.testing.assert_allclose(toeplitz.matrix()[:, 0], toeplitz.toeplitz_coefs(), rtol=1e-12)


def test_cooldown_learning_rates():
  rates = mf.cooldown_learning_rates(10, 4, final_fraction=0.2)
  np.testing.assert_allclose(rates, [1, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2])
  np.testing.assert_array_equal(mf.cooldown_learning_rates(3, 0), np.ones(3))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_square_root_coefficients_factor_the_workload(momentum):
  n = 40
  root = mf.strategy_matrix(mf.BandedToeplitz(mf.square_root_coefs(n, momentum)), n)
  np.testing.assert_allclose(root @ root, mf.Workload(n, momentum).matrix(), rtol=1e-10)
  # With n bands, BISR's C^-1 is the whole inverse square root: C is the root.
  bisr = mf.strategy_matrix(mf.banded_inverse_square_root(n, momentum), n)
  np.testing.assert_allclose(bisr, root, rtol=1e-10, atol=1e-14)


def test_blt_coefficients_and_inverse():
  blt = mf.BufferedToeplitz(np.array([0.9, 0.3]), np.array([0.4, -0.2]))
  j = np.arange(1, 30)
  expected = np.concatenate([[1.0], 0.4 * 0.9 ** (j - 1) - 0.2 * 0.3 ** (j - 1)])
  np.testing.assert_allclose(mf.toeplitz_coefs(blt, 30), expected, rtol=1e-12, atol=1e-15)
  c = mf.strategy_matrix(blt, 30)
  inverse = mf.strategy_matrix(mf.BandedToeplitz(mf.inverse_toeplitz_coefs(blt, 30)), 30)
  np.testing.assert_allclose(c @ inverse, np.eye(30), atol=1e-12)


# ----------------------------------------------------------------------------
# Expected error.


@pytest.mark.parametrize("workload", [
    mf.Workload(24), mf.Workload(24, momentum=0.9),
    mf.Workload(24, momentum=0.5, learning_rates=mf.cooldown_learning_rates(24, 8, 0.1))],
                         ids=["prefix", "momentum", "cooldown"])
def test_closed_form_error_equals_the_matrix_formula(workload):
  n = workload.n
  for strategy in some_strategies(n, np.random.default_rng(1)):
    b = workload.matrix() @ np.linalg.inv(mf.strategy_matrix(strategy, n))
    rows = np.sum(b**2, axis=1)
    got = mf.expected_error(strategy, workload)
    np.testing.assert_allclose(got.rmse, np.sqrt(rows.mean()), rtol=1e-6)
    np.testing.assert_allclose(got.max_error, np.sqrt(rows.max()), rtol=1e-6)


def test_tree_error_matrix_counts_the_nodes_of_each_prefix():
  n = 21
  b = mf.noise_to_error_matrix(mf.binary_tree_strategy(n), mf.Workload(n))
  np.testing.assert_allclose(b, np.round(b), atol=1e-12)
  assert set(np.unique(np.round(b))) <= {0.0, 1.0}
  np.testing.assert_array_equal(np.round(b).sum(1), [bin(t).count("1") for t in range(1, n + 1)])


# ----------------------------------------------------------------------------
# Sensitivity.


def brute_force(strategy, n, k, b):
  return mf.brute_force_sensitivity(mf.strategy_matrix(strategy, n), k, b)


PARTICIPATIONS = [(1, 1), (2, 3), (3, 2), (4, 3), (3, 5)]


@pytest.mark.parametrize("k,b", PARTICIPATIONS)
def test_exact_sensitivity_equals_brute_force(k, b):
  n = 11
  rng = np.random.default_rng(10 * k + b)
  decreasing = np.sort(rng.uniform(0.0, 1.0, n))[::-1]
  signed = rng.normal(size=(n, n))
  cases = [
      # At most b bands, any signs.
      mf.BandedToeplitz(rng.normal(size=b)),
      mf.DenseStrategy(np.tril(signed) - np.tril(signed, -b) + 3 * np.eye(n)),
      # Non-negative, non-increasing Toeplitz coefficients.
      mf.BandedToeplitz(decreasing),
      mf.BandedToeplitz(decreasing[:b + 2]),
      random_blt(rng, 2),
      mf.banded_inverse_square_root(4),
      mf.banded_square_root(7, momentum=0.8),
  ]
  for strategy in cases:
    exact = mf.sensitivity(strategy, n, k, b)
    assert exact == pytest.approx(brute_force(strategy, n, k, b), rel=1e-6), strategy
    assert mf.sensitivity_upper_bound(strategy, n, k, b) >= exact * (1 - 1e-12)


@pytest.mark.parametrize("k,b", PARTICIPATIONS)
def test_upper_bound_covers_general_strategies(k, b):
  n = 11
  rng = np.random.default_rng(100 + 10 * k + b)
  for _ in range(3):
    for strategy in (mf.BandedToeplitz(rng.normal(size=n)),
                     mf.BufferedToeplitz(rng.uniform(0, 0.9, 2), rng.normal(size=2)),
                     mf.DenseStrategy(np.tril(rng.normal(size=(n, n))) + 2 * np.eye(n))):
      lower = brute_force(strategy, n, k, b)
      assert mf.sensitivity_upper_bound(strategy, n, k, b) >= lower * (1 - 1e-9)
      # A Toeplitz C can also be bounded as a dense matrix (Alg. 4).
      if not isinstance(strategy, mf.DenseStrategy):
        dense = mf.DenseStrategy(mf.strategy_matrix(strategy, n))
        assert mf.sensitivity_upper_bound(dense, n, k, b) >= lower * (1 - 1e-9)


def test_neighbours_move_the_release_by_at_most_the_bound():
  # Multi-dimensional contributions, not only collinear ones: the worst case
  # of a signed C can exceed the brute force's collinear lower bound, never
  # the upper bound.
  n, k, b, dim = 10, 3, 2, 4
  rng = np.random.default_rng(5)
  for strategy in (mf.BandedToeplitz(rng.normal(size=n)),
                   mf.DenseStrategy(np.tril(rng.normal(size=(n, n))) + np.eye(n)),
                   random_blt(rng, 2)):
    c = mf.strategy_matrix(strategy, n)
    bound = mf.sensitivity_upper_bound(strategy, n, k, b)
    worst = 0.0
    for _ in range(2000):
      start = rng.integers(0, b)
      pattern = np.arange(start, n, b)[:k]
      g = rng.normal(size=(len(pattern), dim))
      g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1.0)
      worst = max(worst, np.linalg.norm(c[:, pattern] @ g))
    assert worst <= bound * (1 + 1e-12)
    if isinstance(strategy, mf.BufferedToeplitz):
      assert worst <= mf.sensitivity(strategy, n, k, b) * (1 + 1e-12)


def test_sensitivity_refuses_where_no_theorem_applies():
  n = 8
  with pytest.raises(ValueError, match="sensitivity_upper_bound"):
    mf.sensitivity(mf.BandedToeplitz(np.array([1.0, -0.5, 0.3])), n, 2, 2)
  with pytest.raises(ValueError, match="bands"):
    mf.sensitivity(mf.DenseStrategy(np.tril(np.ones((n, n)))), n, 2, 3)
  # One participation is always exact: the largest column norm.
  c = np.tril(np.random.default_rng(0).normal(size=(n, n))) + np.eye(n)
  assert mf.sensitivity(mf.DenseStrategy(c), n) == pytest.approx(np.linalg.norm(c, axis=0).max())


def test_participations_possible():
  assert mf.participations_possible(10, 5, 3) == 4  # Rounds 0, 3, 6, 9.
  assert mf.participations_possible(10, 2, 3) == 2
  assert mf.participations_possible(1, 7, 1) == 1
  with pytest.raises(ValueError, match="min_separation"):
    mf.participations_possible(10, 1, 0)


@pytest.mark.parametrize("n", [1, 7, 8, 100])
def test_tree_strategy_sensitivity_and_accounting_match_dp_accounting(n):
  tree = mf.binary_tree_strategy(n)
  levels = n.bit_length()  # = ceil(log2(n + 1))
  assert mf.sensitivity(tree, n) == pytest.approx(math.sqrt(levels), rel=1e-12)
  # The tree's node noise sigma is the MF mechanism's sigma * sens: its
  # Gaussian event must account like dp_accounting's own tree event.
  sigma, delta = 2.0, 1e-6
  epsilons = []
  for event in (dp_accounting.GaussianDpEvent(sigma / mf.sensitivity(tree, n)),
                dp_accounting.SingleEpochTreeAggregationDpEvent(sigma, n)):
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    epsilons.append(accountant.compose(event).get_epsilon(delta))
  assert epsilons[0] == pytest.approx(epsilons[1], rel=1e-6)


# ----------------------------------------------------------------------------
# Streams.


def stream_rows(strategy, template, keys):
  """Rows of the stream for keys [n], stacked: a pytree with leaves [n, ...]."""
  def step(state, key):
    noise, state = mf.stream_next(strategy, state, key)
    return state, noise
  return jax.lax.scan(step, mf.stream_init(strategy, template), keys)[1]


def test_streamed_rows_equal_the_dense_noise():
  n = 20
  template = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(5)}
  keys = jax.random.split(jax.random.key(0), n)
  draws = jax.vmap(lambda key: gaussian_like(key, template, 1.0))(keys)
  run = jit(stream_rows)
  for strategy in some_strategies(n, np.random.default_rng(2)):
    rows = run(strategy, template, keys)
    inverse = np.linalg.inv(mf.strategy_matrix(strategy, n))
    for name in template:
      z = np.asarray(draws[name], np.float64).reshape(n, -1)
      got = np.asarray(rows[name]).reshape(n, -1)
      np.testing.assert_allclose(got, inverse @ z, rtol=1e-4, atol=1e-4 * np.abs(inverse).max(),
                                 err_msg=type(strategy).__name__)


def test_stream_state_is_bands_times_dim_and_coefficients_do_not_recompile():
  dim, bands = 1000, 8
  step = jit(mf.stream_next)
  state = mf.stream_init(mf.banded_square_root(bands), jnp.zeros(dim))
  assert state.buffers.shape == (bands - 1, dim)
  for coefs in (mf.square_root_coefs(bands), np.linspace(2.0, 1.0, bands)):
    _, state = step(mf.BandedToeplitz(coefs), state, jax.random.key(0))
  assert step._cache_size() == 1
  blt = mf.stream_init(random_blt(np.random.default_rng(0), 4), jnp.zeros(dim))
  assert blt.buffers.shape == (4, dim)


def test_tree_stream_equals_dp_ftrl_noise():
  n, dim, sigma = 13, 6, 1.7
  aggregator = dp_ftrl_aggregator(1.0, sigma, 1.0, restart_every=n)
  keys = jax.random.split(jax.random.key(3), n)
  mask = jnp.ones(1)

  def ftrl_step(state, key):
    update, state, _ = aggregator.finalize(state, jnp.zeros(dim), jnp.float32(0.0),
                                           RoundContext(key, key, mask, mask))
    return state, update

  ftrl = jit(lambda: jax.lax.scan(ftrl_step, aggregator.init(jnp.zeros(dim)), keys)[1])()
  rows = jit(stream_rows)(mf.binary_tree_strategy(n), jnp.zeros(dim), keys)
  np.testing.assert_allclose(sigma * rows, ftrl, rtol=1e-5, atol=1e-5)


def test_streamed_noise_has_covariance_sigma2_cinv_cinv_t():
  # Coordinates are iid copies of one n-dimensional noise vector: 40k samples
  # of (C^-1 z) sigma, whose covariance must be sigma^2 C^-1 C^-T.
  n, dim, sigma = 8, 40_000, 1.3
  keys = jax.random.split(jax.random.key(11), n)
  for strategy in (mf.banded_square_root(3), mf.banded_inverse_square_root(4),
                   random_blt(np.random.default_rng(3), 2)):
    rows = sigma * np.asarray(jit(stream_rows)(strategy, jnp.zeros(dim), keys), np.float64)
    inverse = np.linalg.inv(mf.strategy_matrix(strategy, n))
    expected = sigma**2 * inverse @ inverse.T
    empirical = rows @ rows.T / dim
    # Std of a sample covariance: sqrt((S_ii S_jj + S_ij^2) / dim); allow 5 of them.
    stderr = np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected**2) / dim)
    assert np.all(np.abs(empirical - expected) <= 5 * stderr), type(strategy).__name__
    assert np.all(np.abs(rows.mean(axis=1)) <= 5 * np.sqrt(np.diag(expected) / dim))


def test_monte_carlo_prefix_error_matches_the_closed_form():
  n, dim = 16, 20_000
  workload = mf.Workload(n, momentum=0.6)
  strategy = mf.optimize_blt(workload, 2)
  rows = np.asarray(jit(stream_rows)(strategy, jnp.zeros(dim),
                                     jax.random.split(jax.random.key(4), n)), np.float64)
  per_step = np.mean((workload.matrix() @ rows) ** 2, axis=1)
  closed = mf.expected_error(strategy, workload)
  # 320k squared Gaussians: relative std of the mean square ~ 0.25%.
  assert np.sqrt(per_step.mean()) == pytest.approx(closed.rmse, rel=0.02)
  assert np.sqrt(per_step.max()) == pytest.approx(closed.max_error, rel=0.03)


# ----------------------------------------------------------------------------
# Optimisation.


def loss(strategy, workload, k, b):
  return mf.sensitivity(strategy, workload.n, k, b) * mf.expected_error(strategy, workload).rmse


@pytest.mark.parametrize("k,b", [(1, 1), (4, 16), (6, 5)])
def test_banded_optimum_matches_scipy_and_beats_bsr(k, b):
  workload, bands = mf.Workload(64, momentum=0.3), 8
  strategy = mf.optimize_banded_toeplitz(workload, bands, k, b)
  assert strategy.coefs[0] == 1.0
  ours = loss(strategy, workload, k, b)
  assert ours <= loss(mf.banded_square_root(bands, 0.3), workload, k, b)
  if bands > b and k > 1:  # The monotone cone, where the sensitivity is exact.
    assert np.all(np.diff(strategy.coefs) <= 0) and np.all(strategy.coefs >= 0)
  else:
    reference = scipy.optimize.minimize(
        lambda u: loss(mf.BandedToeplitz(np.concatenate([[1.0], u])), workload, k, b),
        mf.square_root_coefs(bands, 0.3)[1:], method="L-BFGS-B")
    assert ours == pytest.approx(reference.fun, rel=1e-6)


@pytest.mark.parametrize("k,b", [(1, 1), (4, 32)])
def test_blt_optimum_matches_scipy_and_has_exact_sensitivity(k, b):
  workload = mf.Workload(128)
  blt = mf.optimize_blt(workload, 2, k, b)
  coefs = mf.toeplitz_coefs(blt, workload.n)
  assert np.all(coefs >= 0) and np.all(np.diff(coefs) <= 0)
  ours = loss(blt, workload, k, b)

  def reference_loss(x):  # The same cone: sigmoid decays, softmax scales with a slack.
    scales = np.exp(np.concatenate([x[2:], [0.0]]))
    return loss(mf.BufferedToeplitz(1 / (1 + np.exp(-x[:2])), (scales / scales.sum())[:2]),
                workload, k, b)

  reference = scipy.optimize.minimize(reference_loss, np.array([2.0, 0.0, -1.0, -1.0]),
                                      method="Nelder-Mead",
                                      options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000})
  assert ours <= reference.fun * (1 + 1e-6)
  if k == 1:  # The square root is optimal for max error, not for RMSE.
    assert ours < loss(mf.BandedToeplitz(mf.square_root_coefs(workload.n)), workload, k, b)


def test_learning_rate_workload_optimisation_improves_on_its_start():
  workload = mf.Workload(48, momentum=0.5, learning_rates=mf.cooldown_learning_rates(48, 16))
  strategy = mf.optimize_banded_toeplitz(workload, 6, error="max")
  start = mf.banded_square_root(6, 0.5)
  def max_loss(s):
    return mf.sensitivity(s, 48) * mf.expected_error(s, workload).max_error
  assert max_loss(strategy) < max_loss(start)


# ----------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("strategy,match", [
    (mf.BandedToeplitz(np.array([0.0, 1.0])), r"coefs\[0\]"),
    (mf.BandedToeplitz(np.ones((2, 2))), "1-D"),
    (mf.InverseBandedToeplitz(np.array([np.nan])), "finite"),
    (mf.BufferedToeplitz(np.array([0.5, 1.0]), np.array([0.1, 0.1])), "buffer_decay"),
    (mf.BufferedToeplitz(np.array([0.5]), np.array([0.1, 0.1])), "same shape"),
    (mf.DenseStrategy(np.ones((3, 3))), "lower triangular"),
    (mf.DenseStrategy(np.tril(np.ones((3, 3))) - np.eye(3)), "diagonal"),
])
def test_bad_strategies_are_named(strategy, match):
  with pytest.raises(ValueError, match=match):
    mf.check_strategy(strategy)
  with pytest.raises(ValueError, match=match):
    mf.stream_init(strategy, jnp.zeros(2))


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="DenseStrategy.matrix is 3 x 3, but n = 4"):
    mf.sensitivity(mf.binary_tree_strategy(3), 4)
  with pytest.raises(ValueError, match="momentum"):
    mf.Workload(4, momentum=1.0)
  with pytest.raises(ValueError, match="learning_rates"):
    mf.Workload(4, learning_rates=np.ones(3))
  with pytest.raises(ValueError, match="bands"):
    mf.optimize_banded_toeplitz(mf.Workload(4), 5)
  with pytest.raises(ValueError, match="error"):
    mf.optimize_blt(mf.Workload(4), 1, error="mse")


# ----------------------------------------------------------------------------
# Against jax_privacy, when it is importable (never a dependency). To run it:
#   pip download jax-privacy==2.0.0 --no-deps -d /tmp/jp && unzip -q -d /tmp/jp_pkgs /tmp/jp/*.whl
#   PYTHONPATH=$PWD:/tmp/jp_pkgs python -m pytest \
#       tests/privacy/test_matrix_factorization.py -k jax_privacy


def test_matches_jax_privacy():
  jp = pytest.importorskip("jax_privacy.matrix_factorization")
  n, k, b = 64, 4, 16
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    for strategy in (mf.optimize_banded_toeplitz(mf.Workload(n), 24, k, b),
                     mf.BandedToeplitz(mf.square_root_coefs(n))):
      coefs = jnp.asarray(strategy.coefs)
      theirs = float(jp.toeplitz.minsep_sensitivity_squared(coefs, b, k, n=n))
      assert mf.sensitivity(strategy, n, k, b) ** 2 == pytest.approx(theirs, rel=1e-6)
      per_query = np.asarray(jp.toeplitz.per_query_error(strategy_coef=coefs, n=n))
      error = mf.expected_error(strategy, mf.Workload(n))
      assert error.rmse ** 2 == pytest.approx(per_query.mean(), rel=1e-6)
      assert error.max_error ** 2 == pytest.approx(per_query.max(), rel=1e-6)
    signed = rng.normal(size=(n, n))
    banded = np.tril(signed) - np.tril(signed, -b) + 3 * np.eye(n)
    assert mf.sensitivity(mf.DenseStrategy(banded), n, k, b) == pytest.approx(
        float(jp.sensitivity.get_sensitivity_banded(jnp.asarray(banded), b, k)), rel=1e-6)
    dense = np.tril(rng.normal(size=(n, n))) + np.eye(n)
    assert mf.sensitivity_upper_bound(mf.DenseStrategy(dense), n, k, b) == pytest.approx(
        float(jp.sensitivity.get_min_sep_sensitivity_upper_bound(jnp.asarray(dense), b, k)),
        rel=1e-6)
    blt = random_blt(rng, 3)
    theirs = jp.buffered_toeplitz.BufferedToeplitz.build(blt.buffer_decay, blt.output_scale)
    np.testing.assert_allclose(mf.toeplitz_coefs(blt, n), theirs.toeplitz_coefs(n), rtol=1e-10)
