"""One-run empirical privacy audit of an example-level DP experiment with gradient canaries.

`run_canary_audit(config, num_canaries)` trains the experiment `config`
describes ONCE, with m canary examples planted in its clients, and turns the
canaries' scores into an eps lower bound (`fedjax_priv.privacy.audit`) to set
next to the accountant's eps (Steinke, Nasr & Jagielski 2023).

The canaries are white-box gradient canaries ("Dirac canaries" in the paper):
the adversary may insert any per-example gradient, and the most detectable one
puts all of its norm on a coordinate that no real example touches. Here:

* The model is extended with m canary parameters (`canary_model`): canary i
  owns parameter w_i, real examples never read it, and the canary example's
  loss gradient is -G e_i with G = 2 C, so per-example clipping turns it into
  exactly -C e_i, the largest contribution the clipping allows. The canary's
  logits are 0 in the forward pass whatever w is (a straight-through term), so
  the gradient never depends on the training state.
* Canary i belongs to client i mod N and is added to that client's data with
  probability 1/2 (independently; `plant_canaries`). An example marks itself
  a canary through an extra input channel holding i + 1 (0 for real data),
  which the extended model strips before the real model sees the input.
* Each client's released delta is observed (`observe_canaries`, a wrapper
  around the experiment's aggregator): the example-level claim is that every
  hospital's update is private on its own, so the adversary sees each update,
  not only the server's average. Canary i's score is the sum over rounds of
  its owner's delta on w_i: lr * C / b per DP-SGD step in which it is
  included, plus that client's Gaussian noise, and nothing else.

The real model trains exactly as without canaries, except that clients hold
their member canaries too. To keep q = 1 (full-batch DP-GD as in the default
experiment) the expected batch b grows to the largest client with its
canaries and the client learning rate grows with it, which keeps lr / b and so
every SGD step unchanged. The accountant's eps is computed for the run that is
audited, by `fedjax_priv.experiment.build` with that batch size.

Neighbouring relation audited: add/remove one example of one client
(example level); user-level configs are refused.

References:
  Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
  NeurIPS 2023 (white-box Dirac gradient canaries).
  Abadi et al. 2016, "Deep Learning with Differential Privacy" (DP-SGD).
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.config import Config
from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.packing import pad_population
from fedjax_priv.experiment import build, dp_sgd_batching, make_optimizer
from fedjax_priv.models.model import Model, evaluate
from fedjax_priv.privacy import audit
from fedjax_priv.privacy.accounting import PrivacyLedger
from fedjax_priv.privacy.aggregation import Aggregator
from fedjax_priv.simulation.program import rounds_on_device
from fedjax_priv.simulation.round import build_round

# A canary's gradient norm, in units of the clip norm C: any factor > 1 makes
# clipping scale it to exactly C; 2 keeps that scaling exact in floating point.
CANARY_GRADIENT_FACTOR = 2.0


def canary_model(model: Model, num_canaries: int, clip_norm: float) -> Model:
  """Extends `model` with one parameter per canary and a canary-id input channel.

  Params become {"model": model's params, "canary": [m] float32 zeros}. Inputs
  gain one channel on the last axis holding the canary id: 0 for a real
  example, i + 1 for canary i. A real example's logits are `model.apply` on
  the input without that channel; canary i's logits are 0 in value, and the
  cross-entropy of label 0 has the gradient -G e_i (G = 2 * clip_norm) with
  respect to the canary parameters and 0 elsewhere.

  Args:
    model: the audited model; needs num_classes >= 2.
    num_canaries: m >= 1.
    clip_norm: C > 0, the per-example clip norm of the audited DP-SGD.

  Returns:
    The extended `Model`, input shape (*model.input_shape[:-1], last + 1).
  """
  if model.num_classes < 2:
    raise ValueError(f"canary_model needs model.num_classes >= 2, got {model.num_classes}")
  if not model.input_shape:
    raise ValueError("canary_model needs inputs with at least one axis, got input_shape ()")
  if not num_canaries >= 1:
    raise ValueError(f"num_canaries must be >= 1, got {num_canaries!r}")
  if not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm!r}")
  k = model.num_classes
  # d(cross-entropy of label 0)/d(logit 0) at all-zero logits is 1/k - 1.
  scale = CANARY_GRADIENT_FACTOR * clip_norm * k / (k - 1)
  input_shape = (*model.input_shape[:-1], model.input_shape[-1] + 1)

  def init(key):
    return {"model": model.init(key), "canary": jnp.zeros((num_canaries,), jnp.float32)}

  def apply(params, x):
    ids = jnp.round(x[..., -1].reshape(x.shape[0], -1)[:, 0]).astype(jnp.int32)
    real_logits = model.apply(params["model"], x[..., :-1])
    w = params["canary"][jnp.clip(ids - 1, 0, num_canaries - 1)]
    # Value 0, gradient `scale`: the canary's gradient is the same in every step.
    straight_through = scale * (w - jax.lax.stop_gradient(w))
    canary_logits = straight_through[:, None] * jax.nn.one_hot(0, k, dtype=real_logits.dtype)
    return jnp.where((ids > 0)[:, None], canary_logits, real_logits)

  return Model(init, apply, input_shape, k)


class PlantedCanaries(NamedTuple):
  """The population with canaries, and who owns which canary.

  Attributes:
    train: the clients' data with an id channel appended to every input and
      each client's member canaries after its real examples.
    owner: [m] int64, the client canary i belongs to (i mod N).
    is_member: [m] bool, whether canary i was added to its owner's data.
  """
  train: FederatedDataset
  owner: np.ndarray
  is_member: np.ndarray


def plant_canaries(train: FederatedDataset, num_canaries: int,
                   rng: np.random.Generator) -> PlantedCanaries:
  """Adds each of m canaries to client i mod N with probability 1/2.

  A canary's input is zero except for its id channel (i + 1); its label is 0.

  Args:
    train: the population, x [n, *feature_shape] (floating features).
    num_canaries: m >= 2.
    rng: the generator of the memberships.
  """
  if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 2:
    raise ValueError(f"num_canaries must be an integer >= 2, got {num_canaries!r}")
  if not np.issubdtype(train.x.dtype, np.floating):
    raise ValueError(f"canaries need floating input features, got train.x dtype {train.x.dtype}")
  if train.num_clients < 1:
    raise ValueError("plant_canaries needs at least one client")
  owner = np.arange(num_canaries) % train.num_clients
  is_member = rng.random(num_canaries) < 0.5
  ids = np.zeros((train.num_examples, *train.feature_shape[:-1], 1), train.x.dtype)
  real_x = np.concatenate([train.x, ids], axis=-1)
  xs, ys, sizes = [], [], []
  for c in range(train.num_clients):
    start, end = train.offsets[c], train.offsets[c + 1]
    members = np.flatnonzero(is_member & (owner == c))
    canary_x = np.zeros((len(members), *real_x.shape[1:]), train.x.dtype)
    canary_x[..., -1] = (members + 1).reshape(-1, *[1] * (canary_x.ndim - 2))
    xs += [real_x[start:end], canary_x]
    ys += [train.y[start:end], np.zeros(len(members), np.int32)]
    sizes.append(end - start + len(members))
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  planted = FederatedDataset(np.concatenate(xs), np.concatenate(ys), offsets, train.client_ids)
  return PlantedCanaries(planted, owner, is_member)


def observe_canaries(aggregator: Aggregator) -> Aggregator:
  """Wraps `aggregator` so each round also reports every client's delta on the canaries.

  The update and the wrapped aggregator's state are unchanged; finalize adds
  the stat "canary_deltas" [K, m]: row k is the canary part of the delta the
  client in slot k released (zero for slots not included in the sum).
  Expects deltas shaped like `canary_model` params.
  """

  def prepare(state, delta, num_examples, ctx):
    prepared, weight, stats = aggregator.prepare(state, delta, num_examples, ctx)
    slot = jax.nn.one_hot(ctx.slot, ctx.cohort_mask.shape[0], dtype=jnp.float32)
    return (prepared, slot, delta["canary"]), weight, stats

  def group_sum(weights, prepared):
    inner, slots, canary = prepared
    included = (weights > 0).astype(jnp.float32)
    # [K, m] = sum_c included_c * onehot(slot_c) outer canary_c, one dot product.
    per_slot = jnp.tensordot(slots * included[:, None], canary, axes=(0, 0))
    return aggregator.group_sum(weights, inner), per_slot

  def combine(a, b):
    return aggregator.combine(a[0], b[0]), a[1] + b[1]

  def finalize(state, total, total_weight, ctx):
    update, new_state, stats = aggregator.finalize(state, total[0], total_weight, ctx)
    return update, new_state, {**stats, "canary_deltas": total[1]}

  return Aggregator(aggregator.init, prepare, finalize, group_sum, combine)


class CanaryAuditResult(NamedTuple):
  """What one audited run measured.

  Attributes:
    epsilon_lower_bound: empirical eps lower bound (nats) at `confidence`.
    epsilon_accountant: the accountant's eps for the audited run.
    delta: delta_total of the accountant, at which both eps are stated.
    confidence: 1 - beta of the lower bound.
    bound: the `privacy.audit.AuditBound` (guesses made, correct, k+, k-).
    num_canaries: m.
    num_members: canaries that were included.
    noise_multiplier: sigma of the run.
    test_accuracy: accuracy of the trained real model on the test set.
    scores: [m] float64, canary i's summed observed delta on w_i.
    is_member: [m] bool.
    compile_time_s: seconds spent compiling the rounds.
    run_time_s: seconds the rounds ran, compilation excluded.
  """
  epsilon_lower_bound: float
  epsilon_accountant: float
  delta: float
  confidence: float
  bound: audit.AuditBound
  num_canaries: int
  num_members: int
  noise_multiplier: float
  test_accuracy: float
  scores: np.ndarray
  is_member: np.ndarray
  compile_time_s: float
  run_time_s: float


def _audited_config(config: Config, noise_multiplier: float, planted: FederatedDataset,
                    original: FederatedDataset) -> Config:
  """The config of the audited run: sigma fixed, and q = 1 kept for a full-batch experiment.

  Under q = 1 the per-round event does not depend on b, so the sigma
  calibrated for `config` gives the audited run the same accountant eps.
  """
  client = config.client
  privacy = dataclasses.replace(config.privacy, noise_multiplier=noise_multiplier,
                                target_epsilon=0.0)
  if client.batch_size < original.max_client_size:
    # Already Poisson-subsampled: canaries only lower some clients' q below the accounted one.
    return dataclasses.replace(config, privacy=privacy)
  batch = max(client.batch_size, planted.max_client_size)
  lr = client.learning_rate * batch / client.batch_size
  return dataclasses.replace(config, privacy=privacy, client=dataclasses.replace(
      client, batch_size=batch, learning_rate=lr))


def _scores(canary_deltas: np.ndarray, cohort_indices: np.ndarray, owner: np.ndarray,
            num_clients: int) -> np.ndarray:
  """Sums, over rounds, each canary's coordinate of its owner's released delta.

  Args:
    canary_deltas: [R, K', m] per-slot canary deltas (K' >= K: chunk padding).
    cohort_indices: [R, K] client index of every slot, -1 for empty slots.
    owner: [m] client of each canary.
    num_clients: N.

  Returns:
    [m] float64 scores; rounds in which a canary's owner did not take part add 0.
  """
  scores = np.zeros(owner.shape, np.float64)
  canaries = np.arange(owner.size)
  for deltas, indices in zip(canary_deltas, cohort_indices):
    slot_of = np.full(num_clients + 1, -1)  # The extra entry absorbs index -1 (empty slots).
    slot_of[indices] = np.arange(indices.size)
    slot = slot_of[owner]
    present = slot >= 0
    scores[present] += deltas[slot[present], canaries[present]]
  return scores


def run_canary_audit(config: Config, num_canaries: int, seed: int = 0, confidence: float = 0.95,
                     compiler_options: dict | None = None) -> CanaryAuditResult:
  """Trains `config`'s experiment once with m gradient canaries and audits it.

  Args:
    config: an example-level DP experiment (privacy.unit = "example"),
      backend vmap or chunked.
    num_canaries: m >= 2; each is a member with probability 1/2.
    seed: seed of the memberships (the run itself uses config.simulation.seed).
    confidence: 1 - beta of the lower bound.
    compiler_options: passed to `jax.jit` for the rounds, e.g.
      {"xla_backend_optimization_level": 0} to compile faster on CPU.

  Returns:
    The `CanaryAuditResult`.
  """
  if config.privacy.unit != "example":
    raise ValueError("run_canary_audit plants example canaries: privacy.unit must be 'example', "
                     f"got {config.privacy.unit!r}")
  if config.simulation.backend == "loop":
    raise ValueError("run_canary_audit scans rounds on the device: simulation.backend must be "
                     "'vmap' or 'chunked', got 'loop'")
  if config.data.stream:
    raise ValueError("run_canary_audit plants canaries in an in-memory population and keeps it "
                     "on the device: set data.stream = false")
  confidence = float(confidence)
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
  unaudited = build(config)
  planted = plant_canaries(unaudited.train, num_canaries, np.random.default_rng(seed))
  config = _audited_config(config, unaudited.privacy.noise_multiplier, planted.train,
                           unaudited.train)
  exp = build(config)
  sim, privacy = config.simulation, config.privacy

  model = canary_model(exp.model, num_canaries, privacy.clip_norm)
  client_update = make_client_update(
      model, make_optimizer(config.client.optimizer, config.client.learning_rate),
      ExampleDP(privacy.clip_norm, exp.privacy.noise_multiplier, float(config.client.batch_size)))
  aggregator = observe_canaries(exp.aggregator)
  round_fn = build_round(client_update, aggregator, exp.server_optimizer, sim.backend,
                         sim.client_chunk_size)
  batching = dp_sgd_batching(planted.train.client_sizes, config.client.batch_size,
                             config.client.local_steps)

  # The same keys and cohorts as `fedjax_priv.runner.run` for this seed.
  init_key, rounds_key = jax.random.split(jax.random.key(sim.seed))
  state = server_init(model.init(init_key), exp.server_optimizer, aggregator)
  cohorts = [exp.sampler.sample(r) for r in range(sim.rounds)]
  indices = np.stack([c.indices for c in cohorts])
  args = (state, jax.device_put(pad_population(planted.train)), indices,
          np.stack([c.mask for c in cohorts]),
          jnp.stack([jax.random.fold_in(rounds_key, r) for r in range(sim.rounds)]))
  start = time.perf_counter()
  compiled = jax.jit(rounds_on_device(round_fn, batching),
                     compiler_options=compiler_options).lower(*args).compile()
  compile_time = time.perf_counter() - start
  start = time.perf_counter()
  state, metrics = jax.block_until_ready(compiled(*args))
  run_time = time.perf_counter() - start

  scores = _scores(np.asarray(metrics["canary_deltas"]), indices, planted.owner,
                   planted.train.num_clients)
  ledger = PrivacyLedger()
  for _ in range(sim.rounds):
    ledger.record(exp.privacy.round_event, exp.privacy.overflow_probability_per_round)
  epsilon, delta_total = ledger.epsilon(privacy.delta, privacy.accountant)
  bound = audit.audit_scores(scores, planted.is_member, delta_total, confidence)
  _, correct, count = evaluate(exp.model, state.params["model"], jnp.asarray(exp.x_test),
                               jnp.asarray(exp.y_test), jnp.ones(len(exp.y_test), jnp.float32))
  return CanaryAuditResult(
      bound.epsilon, float(epsilon), float(delta_total), confidence, bound, num_canaries,
      int(planted.is_member.sum()), float(exp.privacy.noise_multiplier),
      float(correct / count), scores, planted.is_member, compile_time, run_time)
