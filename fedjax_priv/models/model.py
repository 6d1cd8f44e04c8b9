"""Models as a pure pair of functions, and the adapters that make one from Flax.

The engine never sees a Flax module: it sees `Model(init, apply)` where

  init(key) -> params                      # a pytree of float32 arrays
  apply(params, x) -> logits               # x: [B, *input_shape], logits: [B, C]

so that parameters can be stacked, vmapped, clipped and noised as plain
pytrees. Any Flax linen module becomes one with `from_linen`, any Flax NNX module
with `from_nnx`; see README.md for a worked example.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

Params = Any


class Model(NamedTuple):
  """A model as two pure functions.

  Attributes:
    init: key -> params.
    apply: (params, x [B, *input_shape]) -> logits [B, num_classes].
    input_shape: shape of one example, without the batch axis.
    num_classes: number of output logits.
  """
  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  input_shape: tuple[int, ...]
  num_classes: int


def from_linen(module: Any, input_shape: Sequence[int], num_classes: int) -> Model:
  """Wraps a `flax.linen.Module` whose `__call__(x)` returns logits.

  Args:
    module: the linen module (hyper-parameters are bound in its fields).
    input_shape: shape of one example, e.g. (28, 28, 1).
    num_classes: number of logits the module returns.
  """
  input_shape = tuple(int(d) for d in input_shape)

  def init(key: jax.Array) -> Params:
    return module.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]

  def apply(params: Params, x: jax.Array) -> jax.Array:
    return module.apply({"params": params}, x)

  return Model(init, apply, input_shape, int(num_classes))


def from_nnx(make_module: Callable[[Any], Any], input_shape: Sequence[int],
             num_classes: int) -> Model:
  """Wraps a Flax NNX module given as `make_module(rngs) -> module`.

  NNX modules are stateful objects; the split/merge below turns one into the
  pure pair the engine vmaps over. Only the `nnx.Param` state is trained.
  """
  from flax import nnx  # Imported lazily: NNX is optional for linen users.

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: make_module(nnx.Rngs(0))))

  def init(key: jax.Array) -> Params:
    module = make_module(nnx.Rngs(params=key))
    return nnx.split(module)[1]

  def apply(params: Params, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params)(x)

  return Model(init, apply, tuple(int(d) for d in input_shape), int(num_classes))


def example_losses(model: Model, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy of each example.

  Args:
    x: [B, *input_shape] float32.
    y: [B] int32 labels in [0, num_classes).

  Returns:
    [B] float32 losses in nats.
  """
  logits = model.apply(params, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)


def evaluate(model: Model, params: Params, x: jax.Array, y: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Masked sums for evaluation.

  Returns:
    (sum of losses, number of correct predictions, number of examples), each a
    float32 scalar over the examples where `mask` [B] is 1.
  """
  logits = model.apply(params, x).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
  return jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.sum(mask)
