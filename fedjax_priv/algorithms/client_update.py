"""Local training of one client: a `lax.scan` over its S local steps.

Short plain trainings (S <= `UNROLLED_LOCAL_STEPS`, no DP-SGD) are written out
step by step.

Written for a single client; the round builder vmaps it over the cohort.
With `ExampleDP` each step is a DP-SGD step (Abadi et al. 2016, "Deep Learning
with Differential Privacy", CCS): per-example gradients, each clipped to L2
norm C, summed, N(0, sigma^2 C^2) added, divided by the public expected batch
size b; the clipped sum comes from `per_example_norms.clipped_gradient_sum`
(ghost norms or materialised per-example gradients, per `ExampleDP.clipping`).
Neighbouring relation: add/remove one example of the client's dataset; the
client's dataset size n is treated as public, as in the DP-SGD literature,
because the per-step sampling rate is q = b / n.

`make_local_training` is the shared core: it trains from given params with an
optional FedProx proximal term and an optional constant gradient correction
(SCAFFOLD's c - c_i); `make_client_update` (FedAvg, FedProx) and
`make_fedsgd_client_update` (FedSGD) are thin wrappers around it.

References:
  McMahan, Moore, Ramage, Hampson and Aguera y Arcas, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data", AISTATS 2017 (FedAvg,
  FedSGD).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import optax

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.fedprox import check_proximal_mu, proximal_gradient
from fedjax_priv.algorithms.per_example_norms import (CLIPPING_METHODS, clipped_gradient_sum,
                                                      ghost_coverage)
from fedjax_priv.models.model import Model, example_losses
from fedjax_priv.privacy.noise import gaussian_like

# Plain local training of at most this many steps is written out step by
# step instead of run as a loop: on XLA:CPU the loop around a short client
# update costs a tenth of a small model's round (W1, 3 SGD steps of an MLP:
# the 200-round block 1.09-1.16x faster written out, for 0.3-0.5 s more
# compile, so a single uncached run gains from ~4,000 rounds on; 5 steps
# 1.14x), while at 10 steps it gains 1.02x for 0.8 s more compile, and a
# CNN's 3 steps gain nothing (`runner_vs_floor.py`). DP-SGD steps keep the
# loop: written out, the CNN workload's 2 DP-SGD steps ran 0.95x. Only the
# compiled program differs: SGD updates are the same bit for bit, others
# agree to rounding.
UNROLLED_LOCAL_STEPS = 5


class ExampleDP(NamedTuple):
  """Example-level DP-SGD inside each client.

  Attributes:
    clip_norm: C > 0, per-example gradient L2 bound.
    noise_multiplier: sigma >= 0; the noise std on the gradient sum is sigma * C.
    expected_batch_size: b > 0, the public denominator (examples per step).
    clipping: how per-example norms are computed: "ghost" (ghost norms, for
      models of flax Dense/Conv/Embed layers), "vmap" (materialised
      per-example gradients, any model) or "auto" (ghost where it covers most
      parameters). The released update is the same up to float rounding.
    batch_buckets: increasing static batch sizes (e.g. from
      `data.poisson_batch_buckets`). A step whose real examples all lie in its
      first s slots, s the smallest bucket (or the capacity B) that holds its
      last real slot, computes the clipped sum on those s slots only, through
      `lax.switch`; Poisson batches put their real examples first, so the
      expected cost follows the realised batch size instead of B. Same update
      up to float rounding; the noise is untouched. For a client that is not
      vmapped (central DP-SGD): under `vmap` the switch turns into a select
      that runs every bucket, so leave it empty in a vmapped cohort.
  """
  clip_norm: float
  noise_multiplier: float
  expected_batch_size: float
  clipping: str = "auto"
  batch_buckets: tuple[int, ...] = ()

  def step_event(self, num_examples: int) -> dp_accounting.DpEvent:
    """The DpEvent of one DP-SGD step in a client of `num_examples` (public) examples.

    Each example joins the step's Poisson batch with q = min(1, b / n); the
    clipped sum moves by <= C when one example is added or removed, and its
    noise has std sigma C (Abadi et al. 2016). Relation: add/remove one
    example of one client.
    """
    rate = min(1.0, float(self.expected_batch_size) / num_examples)
    gaussian = dp_accounting.GaussianDpEvent(float(self.noise_multiplier))
    return gaussian if rate == 1 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)


class ClientMetrics(NamedTuple):
  """Sums over one client's local steps (float32 scalars)."""
  loss_sum: jax.Array       # sum of example losses over every example seen (no proximal term)
  examples_seen: jax.Array  # number of (real) examples processed, repeats counted
  steps_taken: jax.Array    # local steps that updated the params (masked steps do not)


ClientUpdate = Callable[..., tuple]
LocalTraining = Callable[..., tuple]


def make_local_training(model: Model, optimizer: optax.GradientTransformation,
                        example_dp: ExampleDP | None = None,
                        proximal_mu: float | jax.Array = 0.0) -> LocalTraining:
  """Builds `train(start_params, x, y, mask, key, correction=None) -> (params, ClientMetrics)`.

  Each of the S steps computes the gradient g of the mean loss over the step's
  real examples (or DP-SGD's noisy clipped mean), then hands the optimizer
  g + mu (w - start_params) + correction.

  Args:
    model: the model.
    optimizer: the client's local optimizer.
    example_dp: DP-SGD settings, or None for plain gradients.
    proximal_mu: FedProx's mu >= 0 (Python 0 adds nothing); may be traced.

  Args (of the returned function):
    start_params: the params training starts from, also FedProx's anchor.
    x: [S, B, *input_shape] float32; y: [S, B] int32; mask: [S, B] float32.
    key: PRNG key for DP-SGD noise; may be None without `example_dp`.
    correction: None, or a pytree like params added to every step's gradient.

  Returns:
    The params after the last step, and the client's metrics.
  """
  check_proximal_mu(proximal_mu)
  if example_dp is not None:
    # Traced values (a sweep vmaps over them) are checked by the sweep, on the host.
    clip, sigma = example_dp.clip_norm, example_dp.noise_multiplier
    if tree_util.is_concrete_number(clip) and not clip > 0:
      raise ValueError(f"example_dp.clip_norm must be > 0, got {clip}")
    if tree_util.is_concrete_number(sigma) and not sigma >= 0:
      raise ValueError(f"example_dp.noise_multiplier must be >= 0, got {sigma}")
    if not example_dp.expected_batch_size > 0:
      raise ValueError(
          f"example_dp.expected_batch_size must be > 0, got {example_dp.expected_batch_size}")
    if example_dp.clipping not in CLIPPING_METHODS:
      raise ValueError(
          f"example_dp.clipping must be one of {CLIPPING_METHODS}, got {example_dp.clipping!r}")
    buckets = example_dp.batch_buckets
    if (not isinstance(buckets, tuple)
        or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in buckets)
        or list(buckets) != sorted(set(buckets))):
      raise ValueError("example_dp.batch_buckets must be a tuple of strictly increasing "
                       f"positive ints, got {buckets!r}")
    if example_dp.clipping == "ghost":  # Shapes only: fails before any compile.
      params = jax.eval_shape(model.init, jax.random.key(0))
      x = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
      error = ghost_coverage(model, params, x, jax.ShapeDtypeStruct((1,), jnp.int32)).error
      if error is not None:
        raise ValueError(f"example_dp.clipping='ghost' cannot run on this model: {error}")

  def mean_loss(params, x, y, mask, count):
    losses = example_losses(model, params, x, y)
    return jnp.sum(losses * mask) / jnp.maximum(count, 1.0), jnp.sum(losses * mask)

  def clipped_sum_on_first(size, params, x, y, mask):
    clipped_sum, losses, _ = clipped_gradient_sum(model, params, x[:size], y[:size], mask[:size],
                                                  example_dp.clip_norm, example_dp.clipping)
    return clipped_sum, jnp.sum(losses * mask[:size])

  def dp_sgd_gradient(params, x, y, mask, key):
    capacity = x.shape[0]
    sizes = [size for size in example_dp.batch_buckets if size < capacity] + [capacity]
    if len(sizes) == 1:
      clipped_sum, loss_sum = clipped_sum_on_first(capacity, params, x, y, mask)
    else:
      last_real_slot = jnp.max(jnp.where(mask > 0, jnp.arange(1, capacity + 1), 0))
      bucket = jnp.searchsorted(jnp.asarray(sizes), last_real_slot)
      clipped_sum, loss_sum = jax.lax.switch(
          bucket, [functools.partial(clipped_sum_on_first, size) for size in sizes],
          params, x, y, mask)
    noise = gaussian_like(key, clipped_sum, example_dp.noise_multiplier * example_dp.clip_norm)
    grad = tree_util.scale(tree_util.add(clipped_sum, noise), 1.0 / example_dp.expected_batch_size)
    return grad, loss_sum

  use_proximal = not (isinstance(proximal_mu, (int, float)) and proximal_mu == 0)

  def step(carry, inputs, start_params, correction):
    params, opt_state = carry
    x, y, mask, count, step_key = inputs
    # Padding must contribute exactly zero: 0 * NaN is NaN, so a non-finite
    # padded (or unsampled) example would otherwise poison the whole client,
    # through the loss and through its gradient.
    x = jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)) > 0, x, jnp.zeros_like(x))
    if example_dp is None:
      (_, loss_sum), grad = jax.value_and_grad(mean_loss, has_aux=True)(params, x, y, mask,
                                                                        count)
      # A step with no real example (padding) must leave params and optimizer
      # state untouched; optimizers such as Adam move even on a zero gradient.
      active = count > 0
    else:
      grad, loss_sum = dp_sgd_gradient(params, x, y, mask, step_key)
      # A DP-SGD step always releases its noisy update, even for an empty batch.
      active = jnp.bool_(True)
    if use_proximal:
      grad = tree_util.add(grad, proximal_gradient(params, start_params, proximal_mu))
    if correction is not None:
      grad = tree_util.add(grad, correction)
    updates, new_opt_state = optimizer.update(grad, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    carry = (tree_util.select(active, new_params, params),
             tree_util.select(active, new_opt_state, opt_state))
    return carry, loss_sum

  def train(start_params, x, y, mask, key=None, correction=None):
    if key is None and example_dp is not None:
      raise ValueError("local training with example_dp needs a PRNG key for its noise")
    # Plain training draws no randomness, so it may run without a key.
    step_keys = None if key is None else jax.random.split(key, x.shape[0])
    init = (start_params, optimizer.init(start_params))
    # Each step's real-example count depends on the mask alone, so all S are
    # taken before the scan: one reduction per client instead of one in
    # every step, and the scan emits one metric per step, not three
    # (each a kernel of its own on XLA:CPU; `runner_vs_floor.py`).
    counts = jnp.sum(mask.reshape(mask.shape[0], -1), axis=1)
    (params, _), loss_sums = jax.lax.scan(
        functools.partial(step, start_params=start_params, correction=correction), init,
        (x, y, mask, counts, step_keys),
        unroll=example_dp is None and x.shape[0] <= UNROLLED_LOCAL_STEPS)
    # A DP-SGD step always updates; a plain one only with a real example.
    steps = jnp.float32(x.shape[0]) if example_dp is not None else jnp.sum(
        (counts > 0).astype(jnp.float32))
    return params, ClientMetrics(jnp.sum(loss_sums), jnp.sum(counts), steps)

  return train


def make_client_update(model: Model, optimizer: optax.GradientTransformation,
                       example_dp: ExampleDP | None = None,
                       proximal_mu: float | jax.Array = 0.0) -> ClientUpdate:
  """Builds `client_update(server_params, x, y, mask, key) -> (delta, ClientMetrics)`.

  FedAvg's local training; with `proximal_mu` > 0, FedProx's (see
  `algorithms.fedprox`).

  Args (of the returned function):
    server_params: the round's global model.
    x: [S, B, *input_shape] local batches; y: [S, B] int32; mask: [S, B] float32.
    key: this client's PRNG key (used for DP-SGD noise only).

  Returns:
    delta = local params - server params (a pytree like params), and metrics.
  """
  train = make_local_training(model, optimizer, example_dp, proximal_mu)

  def client_update(server_params, x, y, mask, key):
    params, metrics = train(server_params, x, y, mask, key)
    return tree_util.sub(params, server_params), metrics

  return client_update


def make_fedsgd_client_update(model: Model) -> ClientUpdate:
  """FedSGD's client: minus the gradient of the mean loss over all its S*B slots.

  All S steps are merged into one batch and one SGD step of learning rate 1 is
  taken, so delta = -grad. With the example-weighted mean
  (`weighted_mean("num_examples")`) and server `optax.sgd(eta)` the round is
  FedSGD: w <- w - eta * sum_k n_k g_k / sum_k n_k. For the exact full-batch
  gradient every example must fill exactly one slot (the rest masked): slots
  that repeat an example (e.g. shuffle batching with n_k < S*B) weight it more.
  """
  train = make_local_training(model, optax.sgd(1.0))

  def client_update(server_params, x, y, mask, key):
    merge = lambda a: a.reshape(1, a.shape[0] * a.shape[1], *a.shape[2:])
    params, metrics = train(server_params, merge(x), merge(y), merge(mask), key)
    return tree_util.sub(params, server_params), metrics

  return client_update
