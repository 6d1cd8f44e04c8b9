"""Server state and the server update of FedAvg-family algorithms.

The aggregated client delta is a pseudo-gradient: the server applies any optax
optimizer to its negation (Reddi et al. 2021, "Adaptive Federated
Optimization"). FedAvg is SGD with learning rate 1; FedAdam, FedYogi and
FedAdagrad are the corresponding optax optimizers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_priv import tree as tree_util


class ServerState(NamedTuple):
  """What the server carries from round to round.

  Attributes:
    params: the global model.
    opt_state: the server optimizer's state.
    round: int32 scalar, rounds completed.
    aggregator_state: the aggregator's state (e.g. an adaptive clip norm);
      `()` for stateless aggregators.
  """
  params: Any
  opt_state: Any
  round: jax.Array
  aggregator_state: Any = ()


def server_init(params: Any, optimizer: optax.GradientTransformation,
                aggregator: Any = None) -> ServerState:
  """Round-0 state; `aggregator` (an `Aggregator`, optional) initialises its own state."""
  aggregator_state = () if aggregator is None else aggregator.init(params)
  return ServerState(params, optimizer.init(params), jnp.int32(0), aggregator_state)


def server_update(state: ServerState, mean_delta: Any,
                  optimizer: optax.GradientTransformation) -> ServerState:
  """Applies the server optimizer to the pseudo-gradient -mean_delta."""
  pseudo_gradient = tree_util.scale(mean_delta, -1.0)
  updates, opt_state = optimizer.update(pseudo_gradient, state.opt_state, state.params)
  return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                        round=state.round + 1)
