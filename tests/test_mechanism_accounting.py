"""Every mechanism brings its own accounting: the runner's epsilon is the mechanism's.

For each aggregator the library offers (and DP-SGD inside clients), a short
run through the open API (`assemble` + `run_experiment`) must report the
epsilon of a DpEvent built here, independently, from the mechanism's own
parameters and the participation's sampling; and building the mechanism with
another sigma, changing nothing else, must change that epsilon.
"""

import json
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

from fedjax_priv import Full, FixedSize, Poisson, RunSettings, ShuffledEpochs, assemble
from fedjax_priv import run_experiment
from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.data import federated_digits
from fedjax_priv.experiment import total_event
from fedjax_priv.models import logistic_regression
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy import transforms as T
from fedjax_priv.privacy.adaptive_clipping import adaptive_clip_mean
from fedjax_priv.privacy.aggregation import dp_mean, weighted_mean
from fedjax_priv.privacy.dp_ftrl import dp_ftrl_aggregator
from fedjax_priv.privacy.local_dp import gaussian_local_dp
from fedjax_priv.secure import distributed_dp as ddp
from fedjax_priv.secure.aggregators import secure_sum
from fedjax_priv.secure.he import he_mean, standard_params
from fedjax_priv.simulation.round import build_round

N, M, ROUNDS, DELTA, CLIP = 12, 4, 6, 1e-5, 0.5
TRAIN, X_TEST, Y_TEST = federated_digits(num_clients=N, partition="iid", seed=0)
MODEL = logistic_regression(TRAIN.feature_shape, 10)
DIM = int(sum(np.size(leaf) for leaf in jax.tree.leaves(MODEL.init(jax.random.key(0)))))


def _run(aggregator, participation, tmp_path, example_dp=None, rounds=ROUNDS):
  exp = assemble(MODEL, TRAIN, (X_TEST, Y_TEST), aggregator, participation,
                 RunSettings(rounds=rounds, eval_every=rounds, delta=DELTA),
                 client_optimizer=None if example_dp else optax.sgd(0.1),
                 example_dp=example_dp, local_steps=2, batch_size=8)
  return run_experiment(exp, tmp_path, progress=False)["privacy"]


def _epsilon(event, rounds):
  return accounting.compute_epsilon(dp_accounting.SelfComposedDpEvent(event, rounds), DELTA)


def _poisson_gaussian(sigma):
  return dp_accounting.PoissonSampledDpEvent(M / N, dp_accounting.GaussianDpEvent(sigma))


def _he(sigma):
  template = jax.tree.map(jnp.zeros_like, MODEL.init(jax.random.key(0)))
  return he_mean(template, standard_params(2048, t=2**24), clip_norm=CLIP, scale=2.0**10,
                 expected_cohort_size=float(M), max_clients=M, key=jax.random.key(1),
                 num_key_holders=2, statistical_bits=4, noise_multiplier=sigma)


def _ddp_config(sigma, num_clients=N):
  return ddp.DistributedDPConfig(CLIP, sigma, num_clients, DIM, bits=20)


# name -> (sigma -> (aggregator, participation), (sigma, rounds) -> reference epsilon)
CENTRAL = {
    "dp_mean": (lambda s: (dp_mean(CLIP, s, M), Poisson(N, M)),
                lambda s, r: _epsilon(_poisson_gaussian(s), r)),
    "chain": (lambda s: (T.as_aggregator(T.chain(T.clip_l2(CLIP), T.sum_units(), T.gaussian(s),
                                                 T.mean(M))), Poisson(N, M)),
              lambda s, r: _epsilon(_poisson_gaussian(s), r)),
    "adaptive_clip_mean": (lambda s: (adaptive_clip_mean(s, M, count_stddev=4.0), Poisson(N, M)),
                           lambda s, r: _epsilon(_poisson_gaussian(s), r)),
    # Fixed-size cohorts: replace-one, so the Gaussian's multiplier halves (sensitivity 2C).
    "he_mean": (lambda s: (_he(s), FixedSize(N, M)),
                lambda s, r: _epsilon(dp_accounting.SampledWithoutReplacementDpEvent(
                    N, M, dp_accounting.GaussianDpEvent(s / 2)), r)),
    # Local noise N(0, (2 sigma C)^2) per client, seen by the server: replace-one, no amplification.
    "local_dp": (lambda s: (T.as_aggregator(gaussian_local_dp(CLIP, s, M)), FixedSize(N, M)),
                 lambda s, r: _epsilon(dp_accounting.GaussianDpEvent(s), r)),
    # One tree of N // M = 3 leaves per epoch, each user once per epoch (Kairouz et al. 2021).
    "dp_ftrl": (lambda s: (dp_ftrl_aggregator(CLIP, s, M, restart_every=N // M),
                           ShuffledEpochs(N, M)),
                lambda s, r: _epsilon(dp_accounting.SingleEpochTreeAggregationDpEvent(s, N // M),
                                      r // (N // M))),
    # Every client every round: the Kairouz et al. / Agarwal et al. RDP curves, N shares.
    "ddg": (lambda s: (ddp.distributed_discrete_gaussian_mean(_ddp_config(s)), Full(N)),
            lambda s, r: ddp.ddg_epsilon(_ddp_config(s), r, DELTA)),
    "skellam": (lambda s: (ddp.skellam_mean(_ddp_config(s)), Full(N)),
                lambda s, r: ddp.skellam_epsilon(_ddp_config(s), r, DELTA)),
}


def _planned_epsilon(make, sigma):
  exp = assemble(MODEL, TRAIN, (X_TEST, Y_TEST), *make(sigma), RunSettings(rounds=ROUNDS))
  return accounting.compute_epsilon(total_event(exp.privacy, ROUNDS), DELTA)


# The runner reports the ledger of the plan `assemble` reads from the mechanism
# (the runs below show they agree). HE's round takes ~30 s to compile and is run
# elsewhere (tests/secure/he against the plaintext round, and docs/
# homomorphic_encryption.md through run_experiment), so here its plan is checked.
PLAN_ONLY = ("he_mean",)


@pytest.mark.parametrize("name", sorted(CENTRAL))
def test_runner_reports_the_mechanisms_own_epsilon(name, tmp_path):
  make, reference = CENTRAL[name]
  if name in PLAN_ONLY:
    epsilon = _planned_epsilon(make, 1.5)
  else:
    privacy = _run(*make(1.5), tmp_path)
    assert privacy["unit"] == "user"
    epsilon = privacy["epsilon"]
  assert epsilon == pytest.approx(reference(1.5, ROUNDS), rel=1e-9)
  # Compiling a second run per mechanism would only repeat the agreement above.
  more_noise = _planned_epsilon(make, 3.0)
  assert more_noise == pytest.approx(reference(3.0, ROUNDS), rel=1e-9)
  assert more_noise < epsilon  # More noise in the mechanism alone: less epsilon.


def test_dp_sgd_inside_clients_reports_its_per_step_event(tmp_path):
  reported = []
  for i, sigma in enumerate((1.0, 2.0)):
    example_dp = ExampleDP(1.0, sigma, 4.0)
    privacy = _run(weighted_mean("uniform"), Full(N), tmp_path / str(i), example_dp)
    smallest = int(TRAIN.client_sizes.min())
    step = dp_accounting.PoissonSampledDpEvent(4.0 / smallest, dp_accounting.GaussianDpEvent(sigma))
    assert privacy["unit"] == "example"
    # Two local steps per round, every round charged to the smallest client.
    assert privacy["epsilon"] == pytest.approx(_epsilon(step, 2 * ROUNDS), rel=1e-9)
    reported.append(privacy["epsilon"])
  assert reported[1] < reported[0]


def test_truncated_poisson_cohorts_under_pld_report_the_truncated_event_and_delta(tmp_path):
  """A capacity of 6 for cohorts of 4 expected out of 12 truncates often. Under PLD the run
  reports dp_accounting's truncated event, its epsilon, and delta_total = delta; under RDP the
  Poisson event with the overflow charged to delta, as before."""
  capacity = 6
  exp = assemble(MODEL, TRAIN, (X_TEST, Y_TEST), dp_mean(CLIP, 1.5, M), Poisson(N, M, capacity),
                 RunSettings(rounds=ROUNDS, eval_every=2, delta=DELTA, accountant="pld"),
                 client_optimizer=optax.sgd(0.1), local_steps=2, batch_size=8)
  summary = run_experiment(exp, tmp_path / "pld", progress=False)
  privacy = summary["privacy"]
  event = dp_accounting.TruncatedSubsampledGaussianDpEvent(
      dataset_size=N + 1, sampling_probability=M / N, truncated_batch_size=capacity,
      noise_multiplier=1.5)
  assert privacy["accountant"] == "pld"
  assert privacy["dp_event"] == repr(dp_accounting.ComposedDpEvent(
      [dp_accounting.SelfComposedDpEvent(event, ROUNDS)]))
  assert privacy["delta_total"] == DELTA
  reference = pld_privacy_accountant.PLDAccountant(
      value_discretization_interval=accounting.DEFAULT_PLD_DISCRETIZATION)
  reference.compose(event, ROUNDS)
  assert privacy["epsilon"] == pytest.approx(reference.get_epsilon(DELTA), rel=1e-6)
  metrics = (tmp_path / "pld" / "metrics.jsonl").read_text().splitlines()
  lines = [json.loads(line) for line in metrics]
  assert [line["delta_total"] for line in lines] == [DELTA] * (ROUNDS // 2)
  # The RDP path is unchanged: the ideal Poisson event, the overflow charged to delta.
  rdp = assemble(MODEL, TRAIN, (X_TEST, Y_TEST), dp_mean(CLIP, 1.5, M), Poisson(N, M, capacity),
                 RunSettings(rounds=ROUNDS, delta=DELTA, accountant="rdp",
                             allow_delta_overflow=True))
  assert rdp.privacy.round_event == _poisson_gaussian(1.5)
  assert rdp.privacy.overflow_probability_per_round == pytest.approx(
      stats.binom.sf(capacity, N + 1, M / N))


@pytest.mark.parametrize("aggregator", [weighted_mean(), secure_sum(20, 2.0**10, M, CLIP)],
                         ids=["weighted_mean", "secure_sum"])
def test_mechanisms_without_noise_claim_nothing(aggregator, tmp_path):
  privacy = _run(aggregator, FixedSize(N, M), tmp_path)
  assert privacy["unit"] == "none" and float(privacy["epsilon"]) == math.inf


def test_tree_aggregation_refuses_participation_that_breaks_its_epoch():
  with pytest.raises(ValueError, match="ShuffledEpochs"):
    assemble(MODEL, TRAIN, (X_TEST, Y_TEST), dp_ftrl_aggregator(CLIP, 1.0, M, restart_every=3),
             Poisson(N, M), RunSettings(rounds=3))


# --- Distributed DP with Poisson cohorts: accounted at the fewest shares --------------------

def test_distributed_dp_with_poisson_cohorts_is_accounted_at_the_fewest_shares():
  """N = 1,000, m = 20: a round has < 20 shares with probability 0.47.

  The old accounting assumed all 20 shares every round (eps 2.68 over these
  rounds); the mechanism now states its event at its guaranteed minimum of
  shares (and fails rounds below it), so its epsilon is at least that of
  rounds with exactly that many shares of the same local noise.
  """
  population, m, rounds, q = 1000, 20, 1000, 0.02
  fewest = ddp.min_shares_for(population, q)
  assert fewest < m
  for kind, account in (("discrete_gaussian", ddp.ddg_epsilon),
                        ("skellam", ddp.skellam_epsilon)):
    all_shares = ddp.DistributedDPConfig(1.0, 1.0, m, 10_000, bits=20)
    guarded = ddp.DistributedDPConfig(1.0, 1.0, m, 10_000, bits=20, min_shares=fewest)
    epsilon = account(guarded, rounds, DELTA, q)
    assert epsilon > 1.2 * account(all_shares, rounds, DELTA, q)
    # The same local noise summed over exactly `fewest` shares, from the paper formulas.
    s, d = guarded.local_stddev, guarded.padded_dim
    l2, l1 = guarded.l2_sensitivity, guarded.l1_sensitivity
    orders = np.asarray(accounting.INTEGER_RDP_ORDERS, np.float64)
    if kind == "skellam":
      mu = fewest * s**2
      rdp = orders * l2**2 / (2 * mu) + np.minimum(
          ((2 * orders - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
    else:
      tau = 10 * sum(math.exp(-2 * math.pi**2 * s * s * k / (k + 1)) for k in range(1, m))
      a2, a1 = l2 / (math.sqrt(fewest) * s), l1 / (math.sqrt(fewest) * s)
      rdp = np.minimum.reduce([orders * a2**2 / 2 + tau * d,
                               orders * (a2**2 + 2 * a1 * tau + tau**2 * d) / 2,
                               orders * (a2 + tau * math.sqrt(d))**2 / 2])
    curve = accounting.poisson_subsampled_rdp(
        lambda a, rdp=rdp: np.interp(a, orders, rdp), q, orders)
    reference = min(rounds * r + math.log1p(-1 / a) - math.log(DELTA * a) / (a - 1)
                    for a, r in zip(orders, curve))
    assert epsilon >= reference * (1 - 1e-9), kind


def test_a_round_below_the_fewest_shares_releases_nothing():
  config = ddp.DistributedDPConfig(CLIP, 1.0, M, DIM, bits=20, min_shares=M - 1)
  aggregator = ddp.distributed_discrete_gaussian_mean(config)
  round_fn = jax.jit(build_round(make_client_update(MODEL, optax.sgd(1.0)), aggregator,
                                 optax.sgd(1.0), "vmap"))
  params = MODEL.init(jax.random.key(0))
  state = server_init(params, optax.sgd(1.0), aggregator)
  rng = np.random.default_rng(0)
  for real, short in ((M - 1, False), (M - 2, True)):
    batch = ClientBatch(
        jnp.asarray(rng.normal(size=(M, 2, 4, *TRAIN.feature_shape)), jnp.float32),
        jnp.asarray(rng.integers(0, 10, (M, 2, 4)), jnp.int32), jnp.ones((M, 2, 4), jnp.float32),
        jnp.full((M,), 8, jnp.int32), jnp.asarray(np.arange(M) < real, jnp.float32))
    new_state, metrics = round_fn(state, batch, jax.random.key(1))
    assert float(metrics["shares_short"]) == float(short)
    moved = any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(new_state.params),
                                                      jax.tree.leaves(params)))
    assert moved != short
