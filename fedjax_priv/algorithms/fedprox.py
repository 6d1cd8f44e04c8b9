"""FedProx's proximal term (Li et al. 2020).

Each client minimises its local loss plus (mu / 2) ||w - w_global||^2, which
keeps local models near the round's global model when clients take many or
uneven numbers of local steps. The client update adds the term's gradient,
mu (w - w_global), to every local step: pass `proximal_mu` to
`make_client_update`. With mu = 0 the update is exactly FedAvg's.

Under example-level DP-SGD the term is added after the noisy clipped gradient:
it depends on no example, so it is post-processing and leaves the guarantee
(and the neighbouring relation, add/remove one example) unchanged.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in
  Heterogeneous Networks", MLSys 2020.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.tree import PyTree


def check_proximal_mu(proximal_mu) -> None:
  """Raises ValueError unless mu >= 0; a traced mu (a sweep) is checked by its caller."""
  if tree_util.is_concrete_number(proximal_mu) and not proximal_mu >= 0:
    raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")


def proximal_term(params: PyTree, anchor: PyTree, proximal_mu) -> jax.Array:
  """(mu / 2) ||params - anchor||^2 as a float32 scalar (anchor: the round's global model)."""
  return 0.5 * proximal_mu * jnp.square(tree_util.l2_norm(tree_util.sub(params, anchor)))


def proximal_gradient(params: PyTree, anchor: PyTree, proximal_mu) -> PyTree:
  """Gradient of `proximal_term` in `params`: mu (params - anchor), a pytree like params."""
  return tree_util.scale(tree_util.sub(params, anchor), proximal_mu)
