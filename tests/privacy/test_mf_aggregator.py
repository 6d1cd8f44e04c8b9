"""Tests of fedjax_priv.privacy.mf_aggregator (matrix-factorization noise) with Cyclic participation.

Sensitivity (noise off: the clipped mean; a zeroed-out user moves the release
C x by at most clip * sens, attained by the earliest pattern), noise
statistics (covariance (sigma C sens / M)^2 C^-1 C^-T across rounds),
accounting through the open API against dp_accounting, checkpoint/resume and
the refusals.
"""

import functools
import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv import Cyclic, Poisson, RunSettings, ShuffledEpochs, assemble, run_experiment
from fedjax_priv import checkpoint as ckpt
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data import federated_digits
from fedjax_priv.models import logistic_regression
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy import matrix_factorization as mf
from fedjax_priv.privacy.aggregation import ClientContext, RoundContext, dp_mean
from fedjax_priv.privacy.dp_ftrl import dp_ftrl_aggregator
from fedjax_priv.privacy.mf_aggregator import mf_mean, mf_sensitivity

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

COHORT, CLIP = 4, 0.5
BLT = mf.BufferedToeplitz(np.array([0.9, 0.5]), np.array([0.3, 0.1]))


def run_rounds(aggregator, deltas, key):
  """Scans prepare -> sum -> finalize over deltas [R, K, D]; returns updates [R, D] and stats."""
  num_clients, dim = deltas.shape[1:]
  mask = jnp.ones((num_clients,), jnp.float32)

  def one_round(state, inputs):
    round_deltas, round_key = inputs
    ctx = ClientContext(jnp.int32(0), round_key, round_key, mask)
    prepared, weights, _ = jax.vmap(
        lambda d: aggregator.prepare(state, d, jnp.int32(1), ctx))(round_deltas)
    total = aggregator.group_sum(weights, prepared)
    update, new_state, stats = aggregator.finalize(
        state, total, jnp.sum(weights), RoundContext(round_key, round_key, mask, mask))
    return new_state, (update, stats)

  keys = jax.random.split(key, deltas.shape[0])
  _, outputs = jax.lax.scan(one_round, aggregator.init(jnp.zeros(dim)), (deltas, keys))
  return outputs


def _clipped(deltas):
  deltas = np.asarray(deltas, np.float64)
  norms = np.linalg.norm(deltas, axis=-1, keepdims=True)
  return deltas * np.minimum(1.0, CLIP / norms)


# ----------------------------------------------------------------------------
# Sensitivity.


@pytest.mark.parametrize("strategy", [mf.banded_square_root(3), BLT, mf.binary_tree_strategy(6)],
                         ids=["bandmf", "blt", "tree"])
def test_noise_off_is_the_clipped_mean(strategy):
  deltas = jax.random.normal(jax.random.key(0), (6, COHORT, 5))
  aggregator = mf_mean(strategy, CLIP, 0.0, COHORT, rounds=6, max_participations=2,
                       min_separation=3)
  updates, stats = jit(run_rounds, static_argnums=0)(aggregator, deltas, jax.random.key(1))
  np.testing.assert_allclose(updates, _clipped(deltas).sum(1) / COHORT, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(stats["noise_stddev"], 0.0)


def _release_changes(strategy, n, patterns, dim=3):
  """||C (X - X')||_F / clip per pattern: a user in it with large collinear deltas, zeroed in X'."""
  key = jax.random.key(2)
  others = jax.random.normal(key, (n, COHORT - 1, dim))
  users = np.zeros((len(patterns), n, 1, dim), np.float32)
  for i, pattern in enumerate(patterns):
    users[i, pattern, 0, 0] = 10.0  # Clipped to CLIP.
  aggregator = mf_mean(strategy, CLIP, 0.0, COHORT, n, 1, 1)  # Noise off: (k, b) plays no part.
  run = jit(jax.vmap(lambda user: run_rounds(aggregator, jnp.concatenate([others, user], 1),
                                             key)[0]))
  with_user, without = run(users), run(np.zeros_like(users))
  # Each round's update is (sum + noise) / M: the released C x moves by C (X - X') M.
  moved = np.einsum("ts,psd->ptd", mf.strategy_matrix(strategy, n),
                    np.asarray(with_user - without, np.float64) * COHORT)
  return np.linalg.norm(moved.reshape(len(patterns), -1), axis=1) / CLIP


@pytest.mark.parametrize("strategy", [mf.banded_square_root(4), BLT], ids=["bsr", "blt"])
def test_zeroing_a_user_moves_the_release_by_at_most_the_sensitivity(strategy):
  n, b, k = 10, 3, 3
  sens = mf_sensitivity(strategy, n, k, b)
  assert sens.exact  # Non-negative, non-increasing Toeplitz coefficients.
  rng = np.random.default_rng(0)
  patterns = [[0, b, 2 * b]]  # The earliest pattern first.
  for _ in range(4):
    start = int(rng.integers(0, n - (k - 1) * b))
    pattern = [start] + list(start + np.cumsum(rng.integers(b, b + 2, size=k - 1)))
    patterns.append([p for p in pattern if p < n])
  changes = _release_changes(strategy, n, patterns)
  assert np.all(changes <= sens.value * (1 + 1e-5))
  # The earliest pattern with collinear contributions attains it (Kalinin & Lampert 2024).
  assert changes[0] == pytest.approx(sens.value, rel=1e-5)


def test_sensitivity_falls_back_to_the_stated_upper_bound():
  # Signed Toeplitz coefficients with more bands than b: no theorem gives the exact value.
  strategy = mf.BandedToeplitz(np.array([1.0, -0.4, 0.3, 0.2]))
  sens = mf_sensitivity(strategy, 12, 3, 2)
  assert not sens.exact
  assert sens.value == pytest.approx(mf.sensitivity_upper_bound(strategy, 12, 3, 2), rel=1e-12)
  assert sens.value >= mf.brute_force_sensitivity(mf.strategy_matrix(strategy, 12), 3, 2)
  assert "upper bound" in mf_mean(strategy, CLIP, 1.0, COHORT, 12, 3, 2).privacy.description


# ----------------------------------------------------------------------------
# Noise statistics.

SIGMA, N_ROUNDS, DIM, KEYS = 1.3, 6, 64, 1000


@pytest.mark.parametrize("strategy", [mf.banded_square_root(3), BLT,
                                      mf.binary_tree_strategy(N_ROUNDS)],
                         ids=["bandmf", "blt", "tree"])
def test_noise_covariance_across_rounds(strategy):
  k, b = 2, 3
  aggregator = mf_mean(strategy, CLIP, SIGMA, COHORT, N_ROUNDS, k, b)
  deltas = jnp.zeros((N_ROUNDS, COHORT, DIM))
  updates, stats = jit(jax.vmap(lambda key: run_rounds(aggregator, deltas, key)))(
      jax.random.split(jax.random.key(3), KEYS))
  samples = np.asarray(updates, np.float64).transpose(0, 2, 1).reshape(-1, N_ROUNDS)
  inverse = np.linalg.inv(mf.strategy_matrix(strategy, N_ROUNDS))
  scale = SIGMA * CLIP * mf_sensitivity(strategy, N_ROUNDS, k, b).value / COHORT
  expected = scale ** 2 * inverse @ inverse.T
  empirical = samples.T @ samples / len(samples)  # The noise has mean zero.
  # Standard error of a Gaussian second moment: sqrt((S_ii S_jj + S_ij^2) / samples).
  diagonal = np.diag(expected)
  stderr = np.sqrt((np.outer(diagonal, diagonal) + expected ** 2) / len(samples))
  np.testing.assert_array_less(np.abs(empirical - expected), 5 * stderr + 1e-12)
  np.testing.assert_allclose(stats["noise_stddev"][0], np.sqrt(diagonal), rtol=1e-5)


# ----------------------------------------------------------------------------
# Accounting, checkpoint/resume and refusals through the open API.

N, M, DELTA = 24, 3, 1e-5            # Cyclic(24, 3): b = 8 rounds between participations.
ROUNDS, K = 16, 2                    # k = ceil(16 / 8) = 2.
TRAIN, X_TEST, Y_TEST = federated_digits(num_clients=N, partition="iid", seed=0)
MODEL = logistic_regression(TRAIN.feature_shape, 10)
SETTINGS = RunSettings(rounds=ROUNDS, eval_every=4, checkpoint_every=4, delta=DELTA)


def _bandmf(sigma, rounds=ROUNDS):
  return mf_mean(mf.banded_square_root(8), CLIP, sigma, M, rounds, K, N // M)


def _experiment(aggregator, participation=Cyclic(N, M), settings=SETTINGS):
  return assemble(MODEL, TRAIN, (X_TEST, Y_TEST), aggregator, participation, settings,
                  client_optimizer=optax.sgd(0.1), local_steps=2, batch_size=8)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp("mf_uninterrupted")
  return out, run_experiment(_experiment(_bandmf(1.1)), out, progress=False)


def test_reported_epsilon_is_one_gaussian_mechanism(uninterrupted, tmp_path):
  _, summary = uninterrupted
  reference = accounting.compute_epsilon(dp_accounting.GaussianDpEvent(1.1), DELTA)
  assert summary["privacy"]["epsilon"] == pytest.approx(reference, rel=1e-9)
  assert summary["rounds"] == ROUNDS
  # The mechanism's own sigma, changed alone, changes the epsilon.
  other = run_experiment(_experiment(_bandmf(2.0)), tmp_path, progress=False)
  assert other["privacy"]["epsilon"] == pytest.approx(
      accounting.compute_epsilon(dp_accounting.GaussianDpEvent(2.0), DELTA), rel=1e-9)
  assert other["privacy"]["epsilon"] < summary["privacy"]["epsilon"]


def test_binary_tree_strategy_equals_tree_aggregation_event(tmp_path):
  rounds, sigma = N // M, 0.9  # One participation: k = 1.
  aggregator = mf_mean(mf.binary_tree_strategy(rounds), CLIP, sigma, M, rounds, 1, N // M)
  summary = run_experiment(_experiment(aggregator, settings=RunSettings(
      rounds=rounds, eval_every=rounds, delta=DELTA)), tmp_path, progress=False)
  # The tree's node noise is sigma * sens * C with sens = sqrt(bit_length(rounds)).
  node_multiplier = sigma * math.sqrt(rounds.bit_length())
  tree = dp_accounting.SingleEpochTreeAggregationDpEvent(node_multiplier, rounds)
  rdp = dp_accounting.rdp.RdpAccountant(accounting.DEFAULT_RDP_ORDERS,
                                        dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
  rdp.compose(tree)
  assert summary["privacy"]["epsilon"] == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)


def _params(out):
  template = server_init(MODEL.init(jax.random.key(0)), optax.sgd(1.0), _bandmf(1.1))
  state, extra = ckpt.load_checkpoint(out / "checkpoint.npz", template)
  return state, extra


def test_resume_equals_uninterrupted(uninterrupted, tmp_path, monkeypatch,
                                     fail_trainer_at_block):
  out_a, summary_a = uninterrupted
  with monkeypatch.context() as patch:
    fail_trainer_at_block(patch, 3)  # Blocks end at rounds 4, 8, 12, 16.
    with pytest.raises(KeyboardInterrupt):
      run_experiment(_experiment(_bandmf(1.1)), tmp_path, progress=False)
  state, extra = _params(tmp_path)
  assert extra["round"] == 8 and int(state.aggregator_state.step) == 8  # The stream was saved.
  summary = run_experiment(_experiment(_bandmf(1.1)), tmp_path, resume=True, progress=False)
  state_a, extra_a = _params(out_a)
  state, extra = _params(tmp_path)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(state_a)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
  assert extra["ledgers"] == extra_a["ledgers"]
  assert summary["privacy"]["epsilon"] == summary_a["privacy"]["epsilon"]
  assert summary["test_accuracy"] == pytest.approx(summary_a["test_accuracy"], abs=1e-6)
  metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["round"] for m in metrics] == [4, 8, 12, 16]


@pytest.mark.parametrize("participation", [Poisson(N, M), ShuffledEpochs(N, M)],
                         ids=["poisson", "shuffled_epochs"])
def test_other_participations_refuse_mf(participation):
  with pytest.raises(ValueError, match="use Cyclic"):
    _experiment(_bandmf(1.0), participation)


def test_cyclic_with_too_small_separation_is_refused():
  # Cyclic(24, 6) puts a user in every 4th round: k = 4 > 2 and b = 4 < 8.
  with pytest.raises(ValueError, match=r"k=2 .* b=8 apart.* gives k=4 participations b=4 apart"):
    _experiment(_bandmf(1.0), Cyclic(N, 6))


def test_run_longer_than_the_mechanism_is_refused_before_compiling():
  with pytest.raises(ValueError, match="calibrated for a run of 8 rounds; round 16"):
    _experiment(mf_mean(mf.banded_square_root(8), CLIP, 1.0, M, 8, 1, N // M))


def test_cyclic_refuses_a_restarting_tree_and_charges_one_round_mechanisms_once_per_cycle():
  with pytest.raises(ValueError, match="use ShuffledEpochs"):
    Cyclic(N, M).round_event(dp_ftrl_aggregator(CLIP, 1.0, M, 8).privacy, 0)
  b = N // M
  one_round = dp_mean(CLIP, 1.0, M).privacy
  events = [Cyclic(N, M).round_event(one_round, r) for r in range(3 * b)]
  assert [r for r, e in enumerate(events) if e == dp_accounting.GaussianDpEvent(1.0)] == [
      0, b, 2 * b]
  assert all(isinstance(e, dp_accounting.NoOpDpEvent) for r, e in enumerate(events) if r % b)
  # Three charges of sigma compose to one Gaussian of sigma / sqrt(3) (RDP is additive): the
  # epsilon of independent noise as the identity strategy, sens sqrt(k), over k = 3 cycles.
  assert mf_sensitivity(mf.BandedToeplitz(np.ones(1)), 3 * b, 3, b).value == pytest.approx(
      math.sqrt(3))
  assert accounting.compute_epsilon(dp_accounting.ComposedDpEvent(events), DELTA) == (
      pytest.approx(accounting.compute_epsilon(
          dp_accounting.GaussianDpEvent(1.0 / math.sqrt(3)), DELTA), rel=1e-9))


@pytest.mark.parametrize("bad, match", [
    (dict(clip_norm=0.0), "clip_norm"), (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(expected_cohort_size=0), "expected_cohort_size"), (dict(rounds=0), "rounds"),
    (dict(max_participations=0), "max_participations"), (dict(min_separation=0), "min_separation"),
    (dict(strategy=mf.binary_tree_strategy(4)), "n")])
def test_bad_arguments_are_named(bad, match):
  args = dict(strategy=mf.banded_square_root(3), clip_norm=CLIP, noise_multiplier=1.0,
              expected_cohort_size=M, rounds=8, max_participations=1, min_separation=1)
  with pytest.raises(ValueError, match=match):
    mf_mean(**(args | bad))
