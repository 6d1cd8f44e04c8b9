"""The open experiment API: objects in (`assemble`), and the config as one way to build them.

`assemble(model, train, test, aggregator, participation, settings, ...)`
returns an `Experiment` from objects: any model, any aggregator (a user's
chain, secure or homomorphic aggregation, distributed DP), any participation
scheme. Its privacy is read from the objects that run: each aggregator and
`ExampleDP` states the event of one round of itself and the participation
wraps it (`user_plan`, `example_plan`); `calibrate_mechanism` finds the
noise multiplier of any mechanism for a target epsilon. `build(config)` makes
the same objects from a TOML config and calls nothing else. The runner
(`runner.run_experiment`) executes an Experiment whichever way it was built.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple

import dp_accounting
import jax
import numpy as np
import optax

from fedjax_priv import config as config_lib
from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.algorithms.stragglers import with_stragglers
from fedjax_priv.checks import check_delta, check_int
from fedjax_priv.config import Config, min_separation
from fedjax_priv.data import FederatedDataset, federated_digits
from fedjax_priv.data.population import ClientSource
from fedjax_priv.data.sampling import poisson_capacity, poisson_overflow_probability
from fedjax_priv.models import Model, cnn, logistic_regression, mlp, tanh_cnn
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy import matrix_factorization as mf
from fedjax_priv.privacy.aggregation import Aggregator, dp_mean, weighted_mean
from fedjax_priv.privacy.dp_ftrl import dp_ftrl_aggregator
from fedjax_priv.privacy.mf_aggregator import mf_mean
from fedjax_priv.privacy.ledger import PrivacyLedger
from fedjax_priv.simulation import participation as participation_lib
from fedjax_priv.simulation.participation import Participation
from fedjax_priv.simulation.program import Batching
from fedjax_priv.simulation.round import BACKENDS, RoundFn, build_round

# Bound on P[a Poisson batch overflows its static capacity] in one DP-SGD step;
# the accountant charges (1 + e^eps) * steps * this to delta.
BATCH_OVERFLOW_PROBABILITY = 1e-12

EXAMPLE_RELATION = "add/remove one example of one client's dataset"

# Heavy-ball momentum of the optimizers a config names "momentum".
MOMENTUM = 0.9


class PrivacyPlan(NamedTuple):
  """What one round releases at one privacy level, and how it is accounted.

  Built from the objects that run (`user_plan`, `example_plan`), never from
  a second copy of their parameters.

  Attributes:
    unit: "user" or "example".
    clip_norm: the level's clip norm C where the mechanism has one, else None.
    noise_multiplier: sigma where the mechanism has one, else None.
    sampling: the participation's name ("full", "fixed", "poisson",
      "shuffled_epochs"; "poisson" at the example level).
    sampling_rate: q of the accounted sampling (worst client at example level).
    event_at: round index -> the DpEvent of that round, for the accountant
      the plan was built for (`user_plan`).
    overflow_probability_per_round: bound on P[truncation] charged to delta
      per round; 0 where `event_at` accounts the truncation itself
      (truncated Poisson cohorts under "pld").
    neighbouring: the neighbouring relation in words.
    description: the mechanism, in one line.
  """
  unit: str
  clip_norm: float | None
  noise_multiplier: float | None
  sampling: str
  sampling_rate: float
  event_at: Callable[[int], Any]
  overflow_probability_per_round: float
  neighbouring: str
  description: str = ""

  @property
  def round_event(self):
    """The event of the first round (every round's, for schemes without epochs)."""
    return self.event_at(0)

  def charge(self, ledger: Any, start: int, end: int) -> None:
    """Records rounds [start, end) of this plan (their events and overflow) in `ledger`."""
    for r in range(start, end):
      ledger.record(self.event_at(r), self.overflow_probability_per_round)


def user_plan(aggregator: Aggregator, participation: Participation, accountant: str = "rdp"
              ) -> PrivacyPlan | None:
  """The user level of a run: the aggregator's own `RoundPrivacy`, wrapped by the participation.

  Args:
    aggregator: the aggregator that runs; None privacy means no guarantee.
    participation: how clients take part.
    accountant: the accountant that will compute epsilon ("rdp" or "pld";
      `assemble` and `build` pass the run's `RunSettings.accountant`). It
      picks how truncated Poisson cohorts are accounted
      (`participation.Poisson`): "pld" composes the truncated event and
      charges nothing to delta; "rdp" composes the Poisson event and charges
      the overflow to delta. A plan built for "rdp" is valid under either
      accountant (looser under "pld"); one built for "pld" is refused by
      the RDP accountant.

  Returns:
    The plan, or None when the aggregator makes no privacy statement.

  Raises:
    ValueError: the participation cannot account for the mechanism (e.g.
      DP-FTRL with Poisson cohorts), naming both.
  """
  privacy = aggregator.privacy
  if privacy is None:
    return None
  participation.round_event(privacy, 0, accountant)  # Refuses an unaccountable pairing now.
  return PrivacyPlan("user", None, None, participation.name,
                     float(participation.sampling_rate),
                     functools.partial(participation.round_event, privacy,
                                       accountant=accountant),
                     float(participation.charged_overflow_probability(privacy, accountant)),
                     participation_lib.neighbouring(participation, privacy),
                     privacy.description)


def example_plan(example_dp: ExampleDP, client_sizes: np.ndarray, batching: Batching
                 ) -> PrivacyPlan:
  """DP-SGD's per-round event in every client, from the `ExampleDP` that runs.

  The accountant charges every round to the worst-off example (the smallest
  client, largest q) as if its client trained every round; this is exact when
  every client takes part in every round and an upper bound otherwise (no
  amplification by cohort sampling is claimed).

  Truncated batches are charged to delta under either accountant: the
  truncated-Poisson event (`participation.Poisson.truncation_event`) is for
  one dataset size and rate, but clients differ in both (q_i = b / n_i,
  one shared capacity), and no client is shown to be the worst case of
  that event, as the smallest one is for the untruncated event.
  """
  smallest = int(np.min(client_sizes))
  step = example_dp.step_event(smallest)
  event = dp_accounting.SelfComposedDpEvent(step, batching.num_steps)
  rate = min(1.0, float(example_dp.expected_batch_size) / smallest)
  return PrivacyPlan("example", float(example_dp.clip_norm),
                     float(example_dp.noise_multiplier), "poisson", rate, lambda r: event,
                     float(batching.num_steps * batching.overflow_probability), EXAMPLE_RELATION,
                     f"DP-SGD in every client: {example_dp.noise_multiplier} x "
                     f"{batching.num_steps} steps")


def total_event(plan: PrivacyPlan, rounds: int):
  """The composed DpEvent of the first `rounds` rounds of `plan`."""
  ledger = PrivacyLedger()
  for r in range(rounds):
    ledger.record(plan.event_at(r))
  return ledger.event


def calibrate_mechanism(make_plan: Callable[[float], PrivacyPlan], rounds: int,
                        target_epsilon: float, delta: float, accountant: str = "rdp") -> float:
  """The smallest noise multiplier whose plan meets `target_epsilon` over `rounds` rounds.

  Works for any mechanism: `make_plan(sigma)` builds the plan of the
  mechanism with multiplier sigma (e.g. `lambda s: user_plan(dp_mean(C, s,
  m), participation)`), and the event that is calibrated is the one that
  mechanism reports.
  """
  return float(accounting.calibrate_noise_multiplier(
      lambda sigma: total_event(make_plan(sigma), rounds), target_epsilon, delta, accountant))


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """How a run is driven: rounds, evaluation, checkpoints, accounting, backend.

  Attributes:
    rounds: rounds to train.
    seed: seed of init, cohorts, batches and noise.
    eval_every, checkpoint_every: rounds between evaluations / checkpoints
      (0: only at the end).
    checkpoint_seconds: also checkpoint at the end of the first block of
      rounds that ends this many seconds after the last checkpoint, so a
      killed run loses bounded work (0: off). Default 300 s.
    backend, client_chunk_size: the round builder's (`simulation.build_round`).
    data_on_device: keep the population on the device and scan many rounds
      per call.
    delta, accountant: the reported (epsilon, delta) and how it is computed.
    epsilon_budget: > 0: stop before the round that would take any level
      past it, or its delta_total past delta (`budget`).
    log_to: metric sinks (`metric_writers.SINKS`): "csv", "tensorboard",
      "wandb", "mlflow".
    description: JSON-serialisable record of what was built (the resolved
      config for `fedjax-priv run`), written to config.json and compared on
      resume.
    allow_delta_overflow: accept a planned delta_total above delta (see
      `budget.check_planned_delta`).
  """
  rounds: int
  seed: int = 0
  eval_every: int = 10
  checkpoint_every: int = 0
  backend: str = "chunked"
  client_chunk_size: int = 64
  data_on_device: bool = True
  delta: float = 1e-5
  accountant: str = "rdp"
  epsilon_budget: float = 0.0
  checkpoint_seconds: float = 300.0
  log_to: tuple[str, ...] = ("csv", "tensorboard")
  description: dict = dataclasses.field(default_factory=dict)
  allow_delta_overflow: bool = False

  def __post_init__(self):
    check_int("rounds", self.rounds, 1)
    check_int("seed", self.seed, 0)
    check_int("eval_every", self.eval_every, 1)
    check_int("checkpoint_every", self.checkpoint_every, 0)
    check_int("client_chunk_size", self.client_chunk_size, 1)
    check_delta(self.delta)
    if self.backend not in BACKENDS:
      raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
    if self.accountant not in ("rdp", "pld"):
      raise ValueError(f"accountant must be rdp or pld, got {self.accountant!r}")
    if not (self.checkpoint_seconds >= 0 and math.isfinite(self.checkpoint_seconds)):
      raise ValueError(f"checkpoint_seconds must be a finite number >= 0, got "
                       f"{self.checkpoint_seconds!r}")
    if not (self.epsilon_budget >= 0 and math.isfinite(self.epsilon_budget)):
      raise ValueError(f"epsilon_budget must be a finite number >= 0, got "
                       f"{self.epsilon_budget!r}")


class Experiment(NamedTuple):
  """Everything a run needs, as objects; `assemble` builds it, `runner.run_experiment` runs it."""
  config: Config | None                 # the config it was built from; None from `assemble`
  train: FederatedDataset | ClientSource  # a ClientSource (the open store) under data.stream
  x_test: np.ndarray
  y_test: np.ndarray
  model: Model
  sampler: Any
  client_update: Callable
  aggregator: Aggregator
  server_optimizer: optax.GradientTransformation
  round_fn: RoundFn
  batching: Batching
  privacy: PrivacyPlan | None           # the primary level: the user level under unit = both
  levels: tuple[PrivacyPlan, ...]      # every accounted level (empty without privacy)
  participation: Participation
  settings: RunSettings


def assemble(model: Model, train: FederatedDataset | ClientSource, test: tuple[np.ndarray,
             np.ndarray], aggregator: Aggregator, participation: Participation,
             settings: RunSettings, *, client_optimizer: optax.GradientTransformation | None = None,
             client_update: Callable | None = None, example_dp: ExampleDP | None = None,
             local_steps: int = 10, batch_size: int = 16,
             server_optimizer: optax.GradientTransformation | None = None,
             round_wrapper: Callable | None = None, config: Config | None = None) -> Experiment:
  """The open experiment API: objects in, a runnable `Experiment` out.

  The privacy of the run is read from the objects that run: the user level
  from `aggregator.privacy` wrapped by `participation`, the example level
  from `example_dp`. Nothing is typed twice. Run it with
  `runner.run_experiment(exp, out_dir)` (checkpoints, resume, metrics,
  budget stop, evaluation).

  Args:
    model: any `Model` (e.g. `models.from_nnx(...)`).
    train: the training clients (`FederatedDataset`, or a store's `ClientSource`
      with settings.data_on_device = False).
    test: (x_test, y_test) arrays.
    aggregator: any aggregator: `dp_mean`, `transforms.as_aggregator(chain)`,
      `adaptive_clip_mean`, `dp_ftrl_aggregator`, `secure.secure_sum`, the
      distributed-DP and HE aggregators, or `weighted_mean`.
    participation: `simulation.participation.Full | FixedSize | Poisson |
      ShuffledEpochs | Cyclic` over `train.num_clients` clients.
    settings: rounds, seed, evaluation, checkpoints, backend, accounting.
    client_optimizer: the local optimizer (default SGD at 0.1) when
      `client_update` is not given.
    client_update: a ready `make_client_update(...)` (FedProx, ...);
      with DP-SGD inside clients pass `example_dp` instead.
    example_dp: DP-SGD inside every client (Poisson batches, accounted).
    local_steps, batch_size: local steps per round and (expected) batch size.
    server_optimizer: default FedAvg (SGD at 1.0).
    round_wrapper: `fn -> fn` applied to the round (e.g. stragglers).
    config: the Config this was built from, if any.

  Raises:
    ValueError: inconsistent objects (named), before anything compiles.
  """
  if participation.num_clients != train.num_clients:
    raise ValueError(f"participation.num_clients ({participation.num_clients}) must equal the "
                     f"training clients ({train.num_clients})")
  if example_dp is not None and client_update is not None:
    raise ValueError("pass example_dp or a ready client_update, not both: the example level is "
                     "accounted from example_dp")
  if example_dp is not None:
    if int(np.min(train.client_sizes)) == 0:
      raise ValueError("example-level DP needs every client to hold at least one example")
    batching = dp_sgd_batching(train.client_sizes, example_dp.expected_batch_size, local_steps)
  else:
    batching = Batching(local_steps, batch_size)
  if client_update is None:
    client_update = make_client_update(model, client_optimizer or optax.sgd(0.1), example_dp)
  server_optimizer = server_optimizer or optax.sgd(1.0)
  round_fn = build_round(client_update, aggregator, server_optimizer, settings.backend,
                         settings.client_chunk_size)
  if round_wrapper is not None:
    round_fn = round_fn.wrap(round_wrapper)
  levels = []
  user = user_plan(aggregator, participation, settings.accountant)
  if user is not None:
    # Refuses now, not mid-run, a run longer than a whole-run mechanism (MF) covers.
    user.event_at(settings.rounds - 1)
    levels.append(user)
  # Traced multipliers (`sweep.sweep_experiment` builds the program from
  # them) are accounted from the host's build of the same point.
  if example_dp is not None and all(tree_util.is_concrete_number(v) for v in (
      example_dp.clip_norm, example_dp.noise_multiplier)):
    levels.append(example_plan(example_dp, train.client_sizes, batching))
  if not settings.description:
    # What a resumed run must match: the run's settings and its mechanisms.
    settings = dataclasses.replace(settings, description={
        "simulation": {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
                       if f.name != "description"},
        "privacy": {"participation": repr(participation),
                    "levels": [plan.description for plan in levels]}})
  x_test, y_test = _checked_test_set(*test)
  return Experiment(config, train, x_test, y_test, model, participation.sampler(settings.seed),
                    client_update, aggregator, server_optimizer, round_fn, batching,
                    levels[0] if levels else None, tuple(levels), participation, settings)


def _checked_test_set(x_test, y_test) -> tuple[np.ndarray, np.ndarray]:
  """The test set, refused when evaluating it would report nan or index out of range."""
  x_test, y_test = np.asarray(x_test), np.asarray(y_test)
  if x_test.ndim < 1 or y_test.shape != x_test.shape[:1] or not len(y_test):
    raise ValueError(f"the test set needs x [n, ...] and y [n] with n >= 1, got x "
                     f"{x_test.shape} and y {y_test.shape}")
  if not np.issubdtype(y_test.dtype, np.integer) or y_test.min() < 0:
    raise ValueError(f"test labels must be integers >= 0, got dtype {y_test.dtype} and minimum "
                     f"{y_test.min()}")
  if np.issubdtype(x_test.dtype, np.inexact) and not np.all(np.isfinite(x_test)):
    bad = np.flatnonzero(~np.all(np.isfinite(x_test.reshape(len(x_test), -1)), axis=1))
    raise ValueError(f"the test features hold NaN or inf in {len(bad)} examples (first: "
                     f"{int(bad[0])}); a test loss over them would be nan")
  return x_test, y_test


def make_optimizer(name: str, learning_rate: Any,
                   adaptivity: float | None = None) -> optax.GradientTransformation:
  """The optax optimizer a config names (client.optimizer / server.optimizer); lr may be traced.

  `adaptivity` is the tau of Reddi et al. 2021 ("Adaptive Federated
  Optimization"), the epsilon of Adam, Yogi and Adagrad (1e-3 in the paper);
  None keeps optax's defaults.
  """
  eps = {} if adaptivity is None else {"eps": adaptivity}
  return {
      "sgd": lambda: optax.sgd(learning_rate),
      "momentum": lambda: optax.sgd(learning_rate, momentum=MOMENTUM),
      "adam": lambda: optax.adam(learning_rate, **eps),
      "yogi": lambda: optax.yogi(learning_rate, **eps),
      "adagrad": lambda: optax.adagrad(learning_rate, **eps),
  }[name]()


def _model(config: Config, input_shape, num_classes) -> Model:
  name = config.model.name
  if name == "logistic_regression":
    return logistic_regression(input_shape, num_classes)
  if name == "mlp":
    return mlp(input_shape, num_classes, config.model.hidden)
  if name == "tanh_cnn":
    return tanh_cnn(input_shape, num_classes)
  return cnn(input_shape, num_classes, conv_impl=config.model.conv_impl)


def _fixed(config: Config, num_clients: int) -> Participation:
  cohort_size = config.simulation.cohort_size
  if cohort_size == num_clients:
    return participation_lib.Full(num_clients)
  return participation_lib.FixedSize(num_clients, cohort_size,
                                     account_as_poisson=config.privacy.fixed_as_poisson)


# simulation.sampling -> (config, num_clients) -> its participation. A new
# scheme adds an entry here and its name to config.CHOICES (and, if it can
# account correlated noise, to config.NOISE_SAMPLING).
PARTICIPATIONS: dict[str, Callable[[Config, int], Participation]] = {
    "fixed": _fixed,
    "poisson": lambda config, n: participation_lib.Poisson(
        n, float(config.simulation.cohort_size)),
    "cyclic": lambda config, n: participation_lib.Cyclic(n, config.simulation.cohort_size),
    "shuffled_epochs": lambda config, n: participation_lib.ShuffledEpochs(
        n, config.simulation.cohort_size),
    "cyclic_poisson": lambda config, n: participation_lib.CyclicPoisson(
        n, min_separation(config, n), float(config.simulation.cohort_size)),
    "balls_in_bins": lambda config, n: participation_lib.BallsInBins(n, min_separation(config, n)),
    # The rate p that gives an expected cohort of K: N / (b - 1 + 1 / p) = K.
    "min_separation": lambda config, n: participation_lib.MinSeparation(
        n, min_separation(config, n),
        1 / (n / config.simulation.cohort_size - min_separation(config, n) + 1)),
}


def participation_of(config: Config, num_clients: int) -> Participation:
  """The participation simulation.sampling and cohort_size name (`PARTICIPATIONS`).

  fixed: `FixedSize(N, K)`, or `Full(N)` for a cohort of all; poisson:
  `Poisson(N, K)` (K expected); cyclic: `Cyclic(N, K)`; shuffled_epochs:
  `ShuffledEpochs(N, K)`; with b = simulation.min_separation (0: N // K):
  cyclic_poisson: `CyclicPoisson(N, b, K)`; balls_in_bins: `BallsInBins(N, b)`
  (expected cohort N / b); min_separation: `MinSeparation(N, b, p)` with p
  such that the expected cohort is K.
  """
  return PARTICIPATIONS[config.simulation.sampling](config, num_clients)


def mf_workload(config: Config) -> mf.Workload:
  """The workload A the server applies to the noisy updates, for simulation.rounds rounds.

  Prefix sums (server SGD, the DP-FTRL workload), with heavy-ball momentum
  `MOMENTUM` under server.optimizer = momentum. Adaptive server optimizers
  are not linear and a cosine schedule is left out (it would make the
  optimisation O(rounds^2)): the strategy is then optimised for prefix sums.
  Any strategy is private; the workload only decides which has least error.
  """
  momentum = MOMENTUM if config.server.optimizer == "momentum" else 0.0
  return mf.Workload(config.simulation.rounds, momentum)


def mf_bands(config: Config, participation: participation_lib.Separated) -> int:
  """privacy.mf_bands, or where it is 0, b = N // K capped at simulation.rounds.

  With at most b bands the sensitivity under (k, b)-participation is exact
  for any coefficients (Choquette-Choo et al. 2023b), so the optimiser is
  unconstrained.
  """
  return config.privacy.mf_bands or min(participation.min_separation, config.simulation.rounds)


@functools.lru_cache(maxsize=8)
def _optimized_strategy(noise: str, workload: tuple[int, float], size: int, k: int, b: int
                        ) -> mf.Strategy:
  # In memory only: build, calibration and a sweep's points ask for the same
  # strategy, and its optimisation takes seconds.
  rounds, momentum = workload
  if noise == "banded_mf":
    return mf.optimize_banded_toeplitz(mf.Workload(rounds, momentum), size, k, b)
  return mf.optimize_blt(mf.Workload(rounds, momentum), size, k, b)


def mf_strategy(config: Config, participation: participation_lib.Separated) -> mf.Strategy:
  """C of privacy.noise (banded_mf, blt or tree) for the run and the participation's (k, b).

  banded_mf: `optimize_banded_toeplitz(mf_workload, mf_bands, k, b)` (BandMF,
  Choquette-Choo et al. 2023; McKenna 2024); blt: `optimize_blt(mf_workload,
  privacy.blt_buffers, k, b)` (McMahan, Xu & Zhang 2024); tree:
  `binary_tree_strategy(rounds)` (Kairouz et al. 2021), not optimised.
  k = ceil(rounds / b) and b = N // K (`Cyclic.max_participations`,
  `min_separation`).
  """
  rounds, noise = config.simulation.rounds, config.privacy.noise
  if noise == "tree":
    return mf.binary_tree_strategy(rounds)
  size = mf_bands(config, participation) if noise == "banded_mf" else config.privacy.blt_buffers
  workload = mf_workload(config)
  return _optimized_strategy(noise, (workload.n, workload.momentum), size,
                             participation.max_participations(rounds),
                             participation.min_separation)


def user_aggregator_factory(config: Config, participation: Participation
                            ) -> Callable[[Any, Any], Aggregator]:
  """(clip_norm, noise_multiplier) -> the user-level aggregator privacy.noise names.

  The strategy is built once, here; the returned function takes plain or
  traced numbers (a sweep vmaps over them). privacy.noise_multiplier is the
  sigma of the mechanism's own event:

  - independent: `dp_mean` (DP-FedAvg, McMahan et al. 2018), N(0, sigma^2 C^2)
    on every round's sum, accounted by the participation round by round.
  - banded_mf, blt, tree under cyclic sampling: `mf_mean` with `mf_strategy`
    for the run's rounds and Cyclic's (k, b): the whole run is one
    `GaussianDpEvent(sigma)` (noise sigma C sens(C)), zero-out relation.
    The tree is the binary-tree strategy over the whole run (no restarts),
    so its multi-participation sensitivity applies.
  - tree under shuffled_epochs: `dp_ftrl_aggregator` restarted every epoch
    of N // K rounds (Kairouz et al. 2021, DP-FTRL with one participation
    per epoch): sigma is each tree node's, the event
    `SingleEpochTreeAggregationDpEvent(sigma, N // K)` once per epoch (RDP
    only). ShuffledEpochs guarantees each user at most once per epoch, not
    a (k, b) pattern, so it accounts this tree and refuses `mf_mean`.

  The aggregator's description (the run's `mechanism` in summary.json)
  starts with privacy.noise and its strategy parameters.

  Raises:
    ValueError: a combination config.validate refuses (`NOISE_SAMPLING`).
  """
  noise = config.privacy.noise
  cohort = participation.expected_cohort_size
  if noise == "independent":
    return lambda clip_norm, sigma: dp_mean(clip_norm, sigma, cohort)
  if isinstance(participation, participation_lib.ShuffledEpochs) and noise == "tree":
    epoch = participation.rounds_per_epoch
    return _labelled(f"tree (DP-FTRL restarted every epoch of {epoch} rounds)",
                     lambda clip_norm, sigma: dp_ftrl_aggregator(clip_norm, sigma, cohort, epoch))
  if not isinstance(participation, participation_lib.SEPARATED):
    raise ValueError(f"privacy.noise = {noise} cannot be accounted with {participation.name} "
                     "participation: use simulation.sampling = "
                     f"{' | '.join(config_lib.SEPARATED_SAMPLING)}")
  rounds = config.simulation.rounds
  k, b = participation.max_participations(rounds), participation.min_separation
  strategy = mf_strategy(config, participation)
  label = {"banded_mf": f"banded_mf ({mf_bands(config, participation)} bands)",
           "blt": f"blt ({config.privacy.blt_buffers} buffers)",
           "tree": "tree (binary-tree strategy over the whole run)"}[noise]
  return _labelled(label, lambda clip_norm, sigma: mf_mean(strategy, clip_norm, sigma, cohort,
                                                          rounds, k, b))


def _labelled(label: str, make: Callable[[Any, Any], Aggregator]
              ) -> Callable[[Any, Any], Aggregator]:
  def labelled(clip_norm, sigma):
    aggregator = make(clip_norm, sigma)
    return aggregator._replace(privacy=aggregator.privacy._replace(
        description=f"{label}: {aggregator.privacy.description}"))
  return labelled


def dp_sgd_batching(client_sizes: np.ndarray, expected_batch_size: float,
                    local_steps: int) -> Batching:
  """Poisson batches for DP-SGD with a static capacity that almost never overflows.

  Client i samples each example with q_i = min(1, b / n_i), fixed from its
  (public) size n_i. Under add/remove the neighbouring client holds n_i + 1
  examples sampled at the same q_i, so the capacity covers Binomial(n_i + 1, q_i)
  for every client size up to an overflow probability of 1e-12 per step.
  """
  sizes = [int(n) for n in np.unique(client_sizes)]
  rates = [min(1.0, expected_batch_size / n) for n in sizes]
  capacity = max(poisson_capacity(n + 1, q, BATCH_OVERFLOW_PROBABILITY)
                 for n, q in zip(sizes, rates))
  overflow = max(float(poisson_overflow_probability(n + 1, q, capacity))
                 for n, q in zip(sizes, rates))
  return Batching(local_steps, capacity, "poisson", float(expected_batch_size), overflow)


def _with_mf_bands(config: Config, participation: Participation) -> Config:
  """Under privacy.noise = banded_mf, privacy.mf_bands set to the bands that run (0 is b)."""
  if config.privacy.noise != "banded_mf":
    return config
  return dataclasses.replace(config, privacy=dataclasses.replace(
      config.privacy, mf_bands=mf_bands(config, participation)))


def _user_level(config: Config, participation: Participation,
                make_aggregator: Callable[[Any, Any], Aggregator], sigma: float) -> PrivacyPlan:
  clip_norm = config.privacy.clip_norm
  aggregator = make_aggregator(clip_norm, sigma)
  return user_plan(aggregator, participation, config.privacy.accountant)._replace(
      clip_norm=clip_norm, noise_multiplier=float(sigma))


def _example_level(config: Config, train, batching: Batching, clip_norm: float,
                   sigma: float) -> PrivacyPlan:
  return example_plan(ExampleDP(clip_norm, float(sigma), float(config.client.batch_size)),
                      train.client_sizes, batching)


def _resolved_sigma(make_plan: Callable[[float], PrivacyPlan], sigma: float | None,
                    target_epsilon: float, config: Config) -> float:
  """sigma as given, calibrated to target_epsilon when that is set (config.validate forbids both)."""
  if target_epsilon > 0:
    return calibrate_mechanism(make_plan, config.simulation.rounds, target_epsilon,
                               config.privacy.delta, config.privacy.accountant)
  return float(config_lib.DEFAULT_NOISE_MULTIPLIER if sigma is None else sigma)


def privacy_levels(config: Config, train: FederatedDataset | ClientSource,
                   participation: Participation, batching: Batching
                   ) -> tuple[PrivacyPlan, ...]:
  """One PrivacyPlan per accounted level (user first), sigma calibrated where a target is set.

  Each plan is the plan of the mechanism built with the resolved sigma: the
  user-level aggregator privacy.noise names (`user_aggregator_factory`)
  under the config's participation, `ExampleDP` in every client.
  """
  privacy = config.privacy
  levels = []
  if privacy.unit in ("user", "both"):
    make = functools.partial(_user_level, config, participation,
                             user_aggregator_factory(config, participation))
    levels.append(make(_resolved_sigma(make, privacy.noise_multiplier, privacy.target_epsilon,
                                       config)))
  example_clip = privacy.clip_norm if privacy.unit == "example" else privacy.example_clip_norm
  if privacy.unit in ("example", "both"):
    sigma, target = ((privacy.noise_multiplier, privacy.target_epsilon)
                     if privacy.unit == "example" else
                     (privacy.example_noise_multiplier, privacy.example_target_epsilon))
    make = functools.partial(_example_level, config, train, batching, example_clip)
    levels.append(make(_resolved_sigma(make, sigma, target, config)))
  return tuple(levels)


def resolved(config: Config, levels: tuple[PrivacyPlan, ...]) -> Config:
  """The config with each level's noise multiplier set to the sigma the run uses.

  Targets stay as given; config.json records both, so a reader sees what was
  asked and what ran.
  """
  by_unit = {plan.unit: plan.noise_multiplier for plan in levels}
  privacy = config.privacy
  if privacy.unit == "both":
    privacy = dataclasses.replace(privacy, noise_multiplier=by_unit["user"],
                                  example_noise_multiplier=by_unit["example"])
  elif privacy.unit != "none":
    privacy = dataclasses.replace(privacy, noise_multiplier=by_unit[privacy.unit])
  return dataclasses.replace(config, privacy=privacy)


def calibrate(config: Config) -> Config:
  """The config with every targeted noise multiplier calibrated and its target cleared.

  Returns a new Config whose privacy.noise_multiplier (and, under unit = both,
  example_noise_multiplier) is the smallest sigma meeting privacy.target_epsilon
  (example_target_epsilon) over simulation.rounds rounds at privacy.delta; the
  targets are set to 0, so building the result does no further calibration.
  """
  config = resolved(config, build(config).levels)
  return dataclasses.replace(config, privacy=dataclasses.replace(
      config.privacy, target_epsilon=0.0, example_target_epsilon=0.0))


class Hyperparameters(NamedTuple):
  """The values a sweep may trace: Python floats in `build`, scalars under `jax.vmap` in a sweep.

  The example-level fields hold DP-SGD's clip norm and sigma whichever
  privacy.unit asked for it (example or both).
  """
  client_learning_rate: Any
  server_learning_rate: Any
  clip_norm: Any
  noise_multiplier: Any
  example_clip_norm: Any
  example_noise_multiplier: Any


def hyperparameters(config: Config, levels: tuple[PrivacyPlan, ...]) -> Hyperparameters:
  """The config's values, with each level's (calibrated) sigma from its plan."""
  by_unit = {plan.unit: plan for plan in levels}
  user, example = by_unit.get("user"), by_unit.get("example")
  return Hyperparameters(
      config.client.learning_rate, config.server.learning_rate,
      user.clip_norm if user else config.privacy.clip_norm,
      user.noise_multiplier if user else 0.0,
      example.clip_norm if example else config.privacy.example_clip_norm,
      example.noise_multiplier if example else 0.0)


class Training(NamedTuple):
  client_update: Callable
  aggregator: Aggregator
  server_optimizer: optax.GradientTransformation
  round_fn: RoundFn


def make_training(config: Config, model: Model, participation: Participation,
                  hp: Hyperparameters) -> Training:
  """Client update, aggregator, server optimizer and round function for `hp`.

  Structural choices (optimizers, privacy unit, backend) come from `config`;
  the numbers from `hp`, which may be traced (a sweep vmaps this over a grid).
  """
  privacy, sim = config.privacy, config.simulation
  client_optimizer = make_optimizer(config.client.optimizer, hp.client_learning_rate)
  example_dp = None
  if privacy.unit in ("example", "both"):
    example_dp = ExampleDP(hp.example_clip_norm, hp.example_noise_multiplier,
                           float(config.client.batch_size))
  client_update = make_client_update(model, client_optimizer, example_dp,
                                     proximal_mu=config.client.proximal_mu)
  if privacy.unit in ("user", "both"):
    aggregator = user_aggregator_factory(config, participation)(hp.clip_norm,
                                                                hp.noise_multiplier)
  else:
    # Example level alone: the server's mean is post-processing of DP-SGD outputs.
    aggregator = weighted_mean(privacy.weighting)
  server_lr = hp.server_learning_rate
  if config.server.schedule == "cosine":
    # The server takes one optimizer step per round. Decaying its step size is
    # post-processing of the private updates, so it costs no privacy.
    server_lr = optax.cosine_decay_schedule(server_lr, sim.rounds)
  server_optimizer = make_optimizer(config.server.optimizer, server_lr, config.server.adaptivity)
  round_fn = build_round(client_update, aggregator, server_optimizer, sim.backend,
                         sim.client_chunk_size)
  if sim.straggler_fraction > 0:
    round_fn = round_fn.wrap(lambda fn: with_stragglers(fn, sim.straggler_fraction,
                                                        sim.straggler_policy))
  return Training(client_update, aggregator, server_optimizer, round_fn)


def settings_of(config: Config) -> RunSettings:
  """The `RunSettings` of a config; `description` is the config as a dict."""
  sim, privacy = config.simulation, config.privacy
  return RunSettings(sim.rounds, sim.seed, sim.eval_every, sim.checkpoint_every, sim.backend,
                     sim.client_chunk_size, sim.data_on_device, privacy.delta, privacy.accountant,
                     privacy.epsilon_budget, sim.checkpoint_seconds, sim.log_to,
                     config_lib.to_dict(config),
                     allow_delta_overflow=privacy.allow_delta_overflow)


def load_store(path: str, stream: bool = False
               ) -> tuple[FederatedDataset | ClientSource, np.ndarray, np.ndarray]:
  """(train, x_test, y_test) from a `fedjax-priv data prepare` store and the test store beside it.

  The test clients are pooled into one test set, held in memory. With
  `stream`, `train` is the open store as a `ClientSource`
  (`FederatedStore.source()`): only its client sizes are read now, and
  `pack_cohort` reads each cohort with one query.
  """
  # Imported here: the store (sqlite3) is only needed for data.dataset = store.
  from fedjax_priv.data.prepare import heldout_store_path
  from fedjax_priv.data.store import FederatedStore
  test_path = heldout_store_path(path)
  for p, what in ((Path(path), "data.store"), (test_path, "the test store beside data.store")):
    if not p.exists():
      raise config_lib.ConfigError(f"{what}: {p} does not exist (write it with "
                                   "`fedjax-priv data prepare NAME --out PATH`)")
  if stream:
    train = FederatedStore(path).source()
  else:
    with FederatedStore(path) as store:
      train = store.to_federated()
  with FederatedStore(test_path) as store:
    test = store.to_federated()
  return train, test.x, test.y


def _store_num_classes(path: str) -> tuple[int, int]:
  """The metadata num_classes of the store at `path` and of its test store (0 where unrecorded)."""
  from fedjax_priv.data.prepare import heldout_store_path
  from fedjax_priv.data.store import FederatedStore
  recorded = []
  for p in (path, heldout_store_path(path)):
    with FederatedStore(p) as store:
      recorded.append(store.info.num_classes or 0)
  return tuple(recorded)


def build(config: Config) -> Experiment:
  """Builds the experiment a config describes: one way to make the objects `assemble` takes.

  Raises:
    ValueError: inconsistent settings, before compiling.
  """
  if config.data.dataset == "store":
    train, x_test, y_test = load_store(config.data.store, config.data.stream)
    # The store fixes the population; checks that depend on it run again.
    config = dataclasses.replace(config, data=dataclasses.replace(
        config.data, num_clients=train.num_clients))
    config_lib.validate(config, population_known=True)
  else:
    data = config.data
    train, x_test, y_test = federated_digits(data.num_clients, data.partition,
                                             data.dirichlet_alpha, data.seed, data.test_fraction)
  x_test, y_test = _checked_test_set(x_test, y_test)
  privacy = config.privacy
  # A streamed store is scanned once, label blobs only, for the same class count.
  train_max_label = train.max_label() if config.data.stream else train.y.max()
  num_classes = int(max(train_max_label, y_test.max())) + 1
  if config.data.dataset == "store":
    # A store's recorded class count (labels were checked against it when read)
    # sizes the model, even if no example holds the top class.
    num_classes = max(num_classes, *_store_num_classes(config.data.store))
  model = _model(config, train.feature_shape, num_classes)
  participation = participation_of(config, train.num_clients)
  config = _with_mf_bands(config, participation)
  if privacy.unit in ("example", "both"):
    if int(train.client_sizes.min()) == 0:
      raise ValueError(f"privacy.unit = {privacy.unit} needs every client to hold at least one "
                       "example")
    batching = dp_sgd_batching(train.client_sizes, config.client.batch_size,
                               config.client.local_steps)
  else:
    batching = Batching(config.client.local_steps, config.client.batch_size)
  # Shapes only (no allocation): the exact model and example sizes, checked
  # before anything is allocated on the device.
  params = jax.eval_shape(model.init, jax.random.key(0))
  config_lib.check_sizes(
      config, example_bytes=math.prod(train.feature_shape) * np.dtype(train.x_dtype).itemsize,
      param_bytes=sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params)),
      batch_size=batching.batch_size)
  levels = privacy_levels(config, train, participation, batching)
  config = resolved(config, levels)
  training = make_training(config, model, participation, hyperparameters(config, levels))
  return Experiment(config, train, x_test, y_test, model,
                    participation.sampler(config.simulation.seed), training.client_update,
                    training.aggregator, training.server_optimizer, training.round_fn, batching,
                    levels[0] if levels else None, levels, participation, settings_of(config))
