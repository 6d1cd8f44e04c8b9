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
  pure pair the engine vmaps over. The module's whole state must be
  `nnx.Param`: clients train, clip and noise every leaf of `params`, so batch
  statistics or RNG streams stored in the module are refused rather than
  silently trained (use deterministic layers, as the engine does).

  Raises:
    ValueError: the module holds state other than `nnx.Param`.
  """
  from flax import nnx  # Imported lazily: NNX is optional for linen users.

  abstract = nnx.eval_shape(lambda: make_module(nnx.Rngs(0)))
  graphdef, _, other = nnx.split(abstract, nnx.Param, ...)
  if jax.tree.leaves(other):
    raise ValueError("from_nnx: the module holds state other than nnx.Param (e.g. BatchNorm "
                     "statistics or an RNG stream), which the engine cannot train per client: "
                     f"{sorted({'/'.join(map(str, path)) for path, _ in nnx.to_flat_state(other)})}")

  def init(key: jax.Array) -> Params:
    return nnx.split(make_module(nnx.Rngs(key)), nnx.Param)[1]

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
