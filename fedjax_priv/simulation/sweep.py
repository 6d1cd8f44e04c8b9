"""Whole training runs vmapped over a grid of traced hyper-parameters: a sweep is one program.

`make_sweep_program(exp)` returns a function that trains and evaluates G runs
at once, one per row of a `Hyperparameters` pytree whose leaves are [G]
arrays. Every run is exactly the run `runner.run` would do with the same
config: the same initial key split, the same per-round keys, the same cohorts
(sampled on the host and passed in), the same data kept on the device. What
changes shapes (cohort size, model, local steps, ...) cannot be traced; the
host-side driver (`fedjax_priv.sweep`) loops over such values outside.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.packing import CohortData
from fedjax_priv.simulation.program import rounds_on_device


def make_sweep_program(exp, make_training: Callable, evaluator: Callable,
                       max_parallel: int | None = None) -> Callable:
  """`(hp [G], seeds [G], population, indices [G, R, K], masks [G, R, K]) -> metrics [G]`.

  Args:
    exp: the `Experiment` whose structure (model, sampler, batching, privacy
      unit, optimizers, backend) every run shares.
    make_training: `hp -> Training` (round function and server optimizer)
      for one run's hyper-parameters, traced under the vmap.
    evaluator: `params -> (accuracy, loss)` on the test set, traceable.
    max_parallel: None vmaps all G runs at once; n >= 1 vmaps n runs at a
      time and scans over the groups (`jax.lax.map` with batch_size n), still
      one program. Memory grows with the width; on XLA:CPU narrow widths
      trained faster than the full vmap (experiments/benchmarks/sweep.py).

  Returns:
    A pure function to jit. `hp` is an `experiment.Hyperparameters` whose
    leaves are [G] float32 arrays; `seeds` [G] int32 (simulation.seed of each
    run); `population` the device-resident `CohortData` of every client;
    `indices`/`masks` each run's cohorts. It returns a dict of [G] arrays:
    test_accuracy, test_loss, and the mean over rounds of train_loss,
    clipped_fraction (when the aggregator clips) and nonfinite_clients; and
    each run's learning curve, evaluated at the rounds `evaluation_rounds`
    names (as `runner.run` evaluates): curve_test_accuracy and
    curve_test_loss [G, E], and curve_train_loss [G, R], every round's.
  """
  rounds = exp.settings.rounds
  every = min(exp.settings.eval_every, rounds)
  full_blocks, rest = divmod(rounds, every)

  def one_run(hp, seed, population: CohortData, indices, masks):
    training = make_training(hp)
    init_key, rounds_key = jax.random.split(jax.random.key(seed))
    state = server_init(exp.model.init(init_key), training.server_optimizer, training.aggregator)
    keys = jax.vmap(lambda r: jax.random.fold_in(rounds_key, r))(jnp.arange(rounds))
    run = rounds_on_device(training.round_fn, exp.batching)

    def block(state, inputs):
      state, metrics = run(state, population, *inputs)
      return state, (metrics, evaluator(state.params))

    # Blocks of eval_every rounds, each evaluated, then the rounds left over.
    head = full_blocks * every
    blocks = jax.tree.map(lambda a: a[:head].reshape(full_blocks, every, *a.shape[1:]),
                          (indices, masks, keys))
    state, (metrics, (accuracies, losses)) = jax.lax.scan(block, state, blocks)
    metrics = jax.tree.map(lambda m: m.reshape(head, *m.shape[2:]), metrics)
    if rest:
      state, (last, (accuracy, loss)) = block(
          state, jax.tree.map(lambda a: a[head:], (indices, masks, keys)))
      metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), metrics, last)
      accuracies = jnp.append(accuracies, accuracy)
      losses = jnp.append(losses, loss)
    summary = {"test_accuracy": accuracies[-1], "test_loss": losses[-1],
               "curve_test_accuracy": accuracies, "curve_test_loss": losses,
               "curve_train_loss": metrics["train_loss"],
               "train_loss": jnp.mean(metrics["train_loss"]),
               "nonfinite_clients": jnp.sum(metrics["nonfinite_clients"])}
    if "clipped_fraction" in metrics:
      summary["clipped_fraction"] = jnp.mean(metrics["clipped_fraction"])
    return summary

  if max_parallel is not None and not (isinstance(max_parallel, int) and max_parallel >= 1):
    raise ValueError(f"max_parallel must be None or an int >= 1, got {max_parallel!r}")
  every_run = jax.vmap(one_run, in_axes=(0, 0, None, 0, 0))

  def program(hp, seeds, population: CohortData, indices, masks):
    if max_parallel is None or max_parallel >= seeds.shape[0]:
      return every_run(hp, seeds, population, indices, masks)
    return jax.lax.map(lambda run: one_run(run[0], run[1], population, run[2], run[3]),
                       (hp, seeds, indices, masks), batch_size=max_parallel)

  return program


def evaluation_rounds(rounds: int, eval_every: int) -> list[int]:
  """The rounds after which a sweep's program (and `runner.run`) evaluates: every
  `eval_every`-th and the last."""
  every = min(eval_every, rounds)
  return list(range(every, rounds + 1, every)) + ([rounds] if rounds % every else [])
