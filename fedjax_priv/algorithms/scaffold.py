"""SCAFFOLD with option II control variates (Karimireddy et al. 2020).

Client drift under heterogeneous data is corrected with control variates: the
server keeps c, client i keeps c_i, and every local SGD step uses
g_i(y) - c_i + c. After K local steps of learning rate eta_l from x,

  c_i+  = c_i - c + (x - y) / (K eta_l)                    (option II)
  sends   (dy, dc) = (y - x, c_i+ - c_i)
  server  x <- server_optimizer(x, mean dy),  c <- c + (1 / N) sum_i dc_i

K counts the steps that ran (masked steps, e.g. stragglers', do not); a
client with K = 0 keeps c_i.

Where the state lives, chosen to change the engine least:
  * c_i: one stacked pytree [N, ...] outside the server state
    (`init_client_controls`), carried by `simulation.round.build_stateful_round`,
    which gathers the cohort's rows and writes back only those of clients that
    entered the sum.
  * c: in `ServerState.aggregator_state`, as `ScaffoldState.control`: the
    `scaffold_aggregator` wraps any aggregator and owns c, so `ServerState`,
    `server_init` and checkpoints stay as they are.

The wrapped aggregator receives the pair (dy, dc) as one pytree: a clipping
aggregator clips the pair jointly and noises both, so under `dp_mean` the
control-variate upload is covered by the same user-level guarantee
(neighbouring relation: the wrapped aggregator's, e.g. add/remove one user).
Since the aggregator returns a mean, c is advanced by `cohort_fraction` times
that mean: with uniform weighting and a cohort of exactly cohort_fraction * N
clients this is the paper's (1 / N) sum_i dc_i.

References:
  Karimireddy, Kale, Mohri, Reddi, Stich and Suresh, "SCAFFOLD: Stochastic
  Controlled Averaging for Federated Learning", ICML 2020.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import ExampleDP, make_local_training
from fedjax_priv.models.model import Model
from fedjax_priv.privacy.aggregation import Aggregator
from fedjax_priv.tree import PyTree


class ScaffoldState(NamedTuple):
  """The scaffold aggregator's state, kept in `ServerState.aggregator_state`.

  Attributes:
    inner: the wrapped aggregator's state.
    control: the server control variate c, a pytree like params.
  """
  inner: Any
  control: PyTree


def init_client_controls(params: PyTree, num_clients: int) -> PyTree:
  """Zero client control variates, stacked: leaves [num_clients, *param_shape]."""
  if not (isinstance(num_clients, int) and num_clients >= 1):
    raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")
  return jax.tree.map(lambda leaf: jnp.zeros((num_clients, *leaf.shape), leaf.dtype), params)


def scaffold_aggregator(inner: Aggregator, cohort_fraction: float) -> Aggregator:
  """Wraps `inner` so it aggregates (dy, dc) pairs and keeps the server variate c.

  Args:
    inner: any aggregator (e.g. `weighted_mean("uniform")`, `dp_mean(...)`);
      its state is initialised for the pair (params, params).
    cohort_fraction: public |cohort| / N in (0, 1]: the expected fraction of
      the population that takes part in a round (q for Poisson sampling).

  Returns:
    An Aggregator whose finalize returns mean dy as the server update and
    advances c by cohort_fraction * mean dc.
  """
  if not 0 < cohort_fraction <= 1:
    raise ValueError(f"cohort_fraction must be in (0, 1], got {cohort_fraction}")

  def init(params):
    return ScaffoldState(inner.init((params, params)), tree_util.zeros_like(params))

  def prepare(state, delta, num_examples, ctx):
    return inner.prepare(state.inner, delta, num_examples, ctx)

  def finalize(state, total, total_weight, ctx):
    (mean_dy, mean_dc), inner_state, stats = inner.finalize(state.inner, total, total_weight, ctx)
    control = tree_util.add(state.control, tree_util.scale(mean_dc, cohort_fraction))
    return mean_dy, ScaffoldState(inner_state, control), stats

  return Aggregator(init, prepare, finalize, inner.group_sum, inner.combine)


def make_scaffold_client_update(model: Model, learning_rate: float | jax.Array,
                                example_dp: ExampleDP | None = None):
  """Builds SCAFFOLD's stateful client update for `build_stateful_round`.

  `client_update(server_state, c_i, x, y, mask, key) -> ((dy, dc), c_i+, ClientMetrics)`,
  with x [S, B, ...], y [S, B], mask [S, B] as in `make_client_update`. The
  server variate c is read from `server_state.aggregator_state`, which must be
  a `ScaffoldState` (use `scaffold_aggregator`).

  Args:
    model: the model.
    learning_rate: eta_l > 0 of the local SGD steps (option II divides by it).
    example_dp: optional DP-SGD inside the client; the correction c - c_i
      depends on no example of this round, so it is post-processing.
  """
  if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  train = make_local_training(model, optax.sgd(learning_rate), example_dp)

  def client_update(server_state, client_control, x, y, mask, key):
    if not isinstance(server_state.aggregator_state, ScaffoldState):
      raise ValueError("SCAFFOLD needs ServerState.aggregator_state to be a ScaffoldState: build "
                       "the aggregator with scaffold_aggregator(...) and pass it to server_init, "
                       f"got {type(server_state.aggregator_state).__name__}")
    control = server_state.aggregator_state.control
    params, metrics = train(server_state.params, x, y, mask, key,
                            correction=tree_util.sub(control, client_control))
    dy = tree_util.sub(params, server_state.params)
    steps = metrics.steps_taken
    # Option II: c_i+ = c_i - c + (x - y) / (K eta_l); the max only guards K = 0.
    drift = tree_util.scale(dy, -1.0 / (jnp.maximum(steps, 1.0) * learning_rate))
    new_control = tree_util.select(
        steps > 0, tree_util.add(tree_util.sub(client_control, control), drift), client_control)
    return (dy, tree_util.sub(new_control, client_control)), new_control, metrics

  return client_update
