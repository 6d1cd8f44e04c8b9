"""Local training of one client: a `lax.scan` over its S local steps.

Written for a single client; the round builder vmaps it over the cohort.
With `ExampleDP` each step is a DP-SGD step (Abadi et al. 2016, "Deep Learning
with Differential Privacy", CCS): per-example gradients, each clipped to L2
norm C, summed, N(0, sigma^2 C^2) added, divided by the public expected batch
size b. Neighbouring relation: add/remove one example of the client's dataset;
the client's dataset size n is treated as public, as in the DP-SGD literature,
because the per-step sampling rate is q = b / n.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_priv import tree as tree_util
from fedjax_priv.models.model import Model, example_losses
from fedjax_priv.privacy.clipping import clip_factor
from fedjax_priv.privacy.noise import gaussian_like


class ExampleDP(NamedTuple):
  """Example-level DP-SGD inside each client.

  Attributes:
    clip_norm: C > 0, per-example gradient L2 bound.
    noise_multiplier: sigma >= 0; the noise std on the gradient sum is sigma * C.
    expected_batch_size: b > 0, the public denominator (examples per step).
  """
  clip_norm: float
  noise_multiplier: float
  expected_batch_size: float


class ClientMetrics(NamedTuple):
  """Sums over one client's local steps (float32 scalars)."""
  loss_sum: jax.Array       # sum of example losses over every example seen
  examples_seen: jax.Array  # number of (real) examples processed, repeats counted


ClientUpdate = Callable[..., tuple]


def make_client_update(model: Model, optimizer: optax.GradientTransformation,
                       example_dp: ExampleDP | None = None) -> ClientUpdate:
  """Builds `client_update(server_params, x, y, mask, key) -> (delta, ClientMetrics)`.

  Args (of the returned function):
    server_params: the round's global model.
    x: [S, B, *input_shape] local batches; y: [S, B] int32; mask: [S, B] float32.
    key: this client's PRNG key (used for DP-SGD noise only).

  Returns:
    delta = local params - server params (a pytree like params), and metrics.
  """
  if example_dp is not None:
    if not example_dp.clip_norm > 0:
      raise ValueError(f"example_dp.clip_norm must be > 0, got {example_dp.clip_norm}")
    if not example_dp.noise_multiplier >= 0:
      raise ValueError(f"example_dp.noise_multiplier must be >= 0, got {example_dp.noise_multiplier}")
    if not example_dp.expected_batch_size > 0:
      raise ValueError(
          f"example_dp.expected_batch_size must be > 0, got {example_dp.expected_batch_size}")

  def mean_loss(params, x, y, mask):
    losses = example_losses(model, params, x, y)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0), jnp.sum(losses * mask)

  def one_example_loss(params, x, y):
    return example_losses(model, params, x[None], y[None])[0]

  def dp_sgd_gradient(params, x, y, mask, key):
    per_example = jax.vmap(jax.value_and_grad(one_example_loss), in_axes=(None, 0, 0))
    losses, grads = per_example(params, x, y)
    # Clipping folded into the sum's weights: one dot product, no clipped copies.
    factors = mask * clip_factor(jax.vmap(tree_util.l2_norm)(grads), example_dp.clip_norm)
    clipped_sum = tree_util.weighted_sum(factors, grads)
    noise = gaussian_like(key, clipped_sum, example_dp.noise_multiplier * example_dp.clip_norm)
    grad = tree_util.scale(tree_util.add(clipped_sum, noise), 1.0 / example_dp.expected_batch_size)
    return grad, jnp.sum(losses * mask)

  def step(carry, inputs):
    params, opt_state = carry
    x, y, mask, step_key = inputs
    # Padding must contribute exactly zero: 0 * NaN is NaN, so a non-finite
    # padded (or unsampled) example would otherwise poison the whole client,
    # through the loss and through its gradient.
    x = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)) > 0, x, jnp.zeros_like(x))
    if example_dp is None:
      (_, loss_sum), grad = jax.value_and_grad(mean_loss, has_aux=True)(params, x, y, mask)
      # A step with no real example (padding) must leave params and optimizer
      # state untouched; optimizers such as Adam move even on a zero gradient.
      active = jnp.sum(mask) > 0
    else:
      grad, loss_sum = dp_sgd_gradient(params, x, y, mask, step_key)
      # A DP-SGD step always releases its noisy update, even for an empty batch.
      active = jnp.bool_(True)
    updates, new_opt_state = optimizer.update(grad, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    carry = (tree_util.select(active, new_params, params),
             tree_util.select(active, new_opt_state, opt_state))
    return carry, (loss_sum, jnp.sum(mask))

  def client_update(server_params, x, y, mask, key):
    num_steps = x.shape[0]
    step_keys = jax.random.split(key, num_steps)
    init = (server_params, optimizer.init(server_params))
    (params, _), (loss_sums, counts) = jax.lax.scan(step, init, (x, y, mask, step_keys))
    delta = tree_util.sub(params, server_params)
    return delta, ClientMetrics(jnp.sum(loss_sums), jnp.sum(counts))

  return client_update
