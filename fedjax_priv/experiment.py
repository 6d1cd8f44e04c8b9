"""Builds every piece of an experiment from a `Config`, before anything compiles.

`build(config)` returns an `Experiment`: data, model, sampler, client update,
aggregator, round function, batching and the privacy plan (the per-round
DpEvent and what it protects). The runner executes it; tests and benchmarks
use the pieces directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple

import dp_accounting
import numpy as np
import optax

from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.algorithms.stragglers import with_stragglers
from fedjax_priv import config as config_lib
from fedjax_priv.config import Config
from fedjax_priv.data import FederatedDataset, federated_digits
from fedjax_priv.data.population import ClientSource
from fedjax_priv.data.sampling import (FixedSizeSampler, PoissonSampler, poisson_capacity,
                                       poisson_overflow_probability)
from fedjax_priv.models import Model, cnn, logistic_regression, mlp
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.aggregation import Aggregator, dp_mean, weighted_mean
from fedjax_priv.simulation.program import Batching
from fedjax_priv.simulation.round import RoundFn, build_round

# Bound on P[a Poisson batch overflows its static capacity] in one DP-SGD step;
# the accountant charges (1 + e^eps) * steps * this to delta.
BATCH_OVERFLOW_PROBABILITY = 1e-12

NEIGHBOURING = {
    "none": "no privacy",
    "user": {"poisson": "add/remove one user's whole dataset",
             "full": "add/remove one user's whole dataset",
             "fixed": "replace one user's whole dataset"},
    "example": "add/remove one example of one client's dataset",
}


class PrivacyPlan(NamedTuple):
  """What one round releases at one privacy level, and how it is accounted.

  Attributes:
    unit: "none", "user" or "example".
    clip_norm: the level's clip norm C (0.0 without privacy).
    noise_multiplier: sigma actually used (after calibration).
    sampling: "fixed", "poisson" or "full" (user level); "poisson" (example level).
    sampling_rate: q of the accounted sampling (worst client at example level).
    round_event: the DpEvent of one round (None without privacy).
    overflow_probability_per_round: bound charged to delta per round.
    neighbouring: the neighbouring relation in words.
  """
  unit: str
  clip_norm: float
  noise_multiplier: float
  sampling: str
  sampling_rate: float
  round_event: Any
  overflow_probability_per_round: float
  neighbouring: str


class Experiment(NamedTuple):
  config: Config
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
  privacy: PrivacyPlan                 # the primary level: the user level under unit = both
  levels: tuple[PrivacyPlan, ...]      # every accounted level (empty without privacy)


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
      "momentum": lambda: optax.sgd(learning_rate, momentum=0.9),
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
  return cnn(input_shape, num_classes, conv_impl=config.model.conv_impl)


def make_sampler(config: Config, num_clients: int):
  """The cohort sampler simulation.sampling names, seeded by simulation.seed."""
  sim = config.simulation
  if sim.sampling == "poisson":
    return PoissonSampler(num_clients, sim.cohort_size / num_clients, sim.seed)
  return FixedSizeSampler(num_clients, sim.cohort_size, sim.seed)


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


def _calibrated(round_event, sigma: float, target_epsilon: float, config: Config) -> float:
  if target_epsilon <= 0:
    return float(sigma)
  return float(accounting.calibrate_noise_multiplier(
      lambda s: dp_accounting.SelfComposedDpEvent(round_event(s), config.simulation.rounds),
      target_epsilon, config.privacy.delta, config.privacy.accountant))


def _user_plan(config: Config, train: FederatedDataset | ClientSource, sampler) -> PrivacyPlan:
  """DP-FedAvg's per-round event, with sigma calibrated to privacy.target_epsilon if set."""
  privacy, sim = config.privacy, config.simulation
  full = sim.sampling == "fixed" and sim.cohort_size == train.num_clients
  sampling = "full" if full else sim.sampling
  rate = sampler.sampling_rate
  relation = NEIGHBOURING["user"][sampling]
  if privacy.fixed_as_poisson:
    # accounting.user_level_event warns that this is an approximation.
    relation = (NEIGHBOURING["user"]["poisson"] + " (fixed-size cohorts accounted as Poisson "
                "sampling: an approximation, not a proof)")
  # Under add/remove the neighbour may hold one more client: bound its overflow.
  overflow = (0.0 if sim.sampling != "poisson" else
              float(poisson_overflow_probability(train.num_clients + 1, rate, sampler.capacity)))

  def round_event(sigma):
    return accounting.user_level_event(sigma, 1, sampling, train.num_clients,
                                       sampler.expected_cohort_size,
                                       fixed_as_poisson=privacy.fixed_as_poisson)
  sigma = _calibrated(round_event, privacy.noise_multiplier, privacy.target_epsilon, config)
  return PrivacyPlan("user", privacy.clip_norm, sigma, sampling, float(rate), round_event(sigma),
                     overflow, relation)


def _example_plan(config: Config, train: FederatedDataset | ClientSource, batching: Batching,
                  clip_norm: float, noise_multiplier: float, target_epsilon: float
                  ) -> PrivacyPlan:
  """DP-SGD's per-round event in every client, sigma calibrated to `target_epsilon` if > 0.

  The accountant charges every round to the worst-off example (the smallest
  client, largest q) as if its client trained every round; this is exact when
  every client takes part in every round and an upper bound otherwise (no
  amplification by cohort sampling is claimed).
  """
  smallest = int(train.client_sizes.min())
  # The worst-off example lives in the smallest client: its rate q = b / n is largest.
  rate = min(1.0, config.client.batch_size / smallest)
  overflow = config.client.local_steps * batching.overflow_probability

  def round_event(sigma):
    return accounting.example_level_event(sigma, config.client.local_steps, rate)
  sigma = _calibrated(round_event, noise_multiplier, target_epsilon, config)
  return PrivacyPlan("example", clip_norm, sigma, "poisson", float(rate), round_event(sigma),
                     float(overflow), NEIGHBOURING["example"])


def privacy_levels(config: Config, train: FederatedDataset | ClientSource, sampler,
                   batching: Batching) -> tuple[PrivacyPlan, ...]:
  """One PrivacyPlan per accounted level (user first), sigma calibrated where a target is set."""
  privacy = config.privacy
  levels = []
  if privacy.unit in ("user", "both"):
    levels.append(_user_plan(config, train, sampler))
  if privacy.unit == "example":
    levels.append(_example_plan(config, train, batching, privacy.clip_norm,
                                privacy.noise_multiplier, privacy.target_epsilon))
  if privacy.unit == "both":
    levels.append(_example_plan(config, train, batching, privacy.example_clip_norm,
                                privacy.example_noise_multiplier,
                                privacy.example_target_epsilon))
  return tuple(levels)


def calibrate(config: Config) -> Config:
  """The config with every targeted noise multiplier calibrated and its target cleared.

  Returns a new Config whose privacy.noise_multiplier (and, under unit = both,
  example_noise_multiplier) is the smallest sigma meeting privacy.target_epsilon
  (example_target_epsilon) over simulation.rounds rounds at privacy.delta; the
  targets are set to 0, so building the result does no further calibration.
  """
  exp = build(config)
  by_unit = {plan.unit: plan.noise_multiplier for plan in exp.levels}
  privacy = config.privacy
  if privacy.unit == "both":
    privacy = dataclasses.replace(privacy, noise_multiplier=by_unit["user"],
                                  example_noise_multiplier=by_unit["example"],
                                  target_epsilon=0.0, example_target_epsilon=0.0)
  elif privacy.unit != "none":
    privacy = dataclasses.replace(privacy, noise_multiplier=by_unit[privacy.unit],
                                  target_epsilon=0.0)
  return dataclasses.replace(config, privacy=privacy)


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


def make_training(config: Config, model: Model, sampler, hp: Hyperparameters) -> Training:
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
    aggregator = dp_mean(hp.clip_norm, hp.noise_multiplier, sampler.expected_cohort_size)
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
    round_fn = with_stragglers(round_fn, sim.straggler_fraction, sim.straggler_policy)
  return Training(client_update, aggregator, server_optimizer, round_fn)


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


def build(config: Config) -> Experiment:
  """Builds the experiment; raises ValueError on inconsistent settings, before compiling."""
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
  sim, privacy = config.simulation, config.privacy
  # A streamed store is scanned once, label blobs only, for the same class count.
  train_max_label = train.max_label() if config.data.stream else train.y.max()
  num_classes = int(max(train_max_label, y_test.max())) + 1
  model = _model(config, train.feature_shape, num_classes)
  sampler = make_sampler(config, train.num_clients)
  example_level = privacy.unit in ("example", "both")
  if example_level:
    if int(train.client_sizes.min()) == 0:
      raise ValueError(f"privacy.unit = {privacy.unit} needs every client to hold at least one "
                       "example")
    batching = dp_sgd_batching(train.client_sizes, config.client.batch_size,
                               config.client.local_steps)
  else:
    batching = Batching(config.client.local_steps, config.client.batch_size)
  levels = privacy_levels(config, train, sampler, batching)
  primary = levels[0] if levels else PrivacyPlan(
      "none", 0.0, 0.0, sampler.name, sampler.sampling_rate, None, 0.0, NEIGHBOURING["none"])

  training = make_training(config, model, sampler, hyperparameters(config, levels))
  return Experiment(config, train, x_test, y_test, model, sampler, training.client_update,
                    training.aggregator, training.server_optimizer, training.round_fn, batching,
                    primary, levels)
