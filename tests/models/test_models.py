"""Tests for fedjax_priv.models (the zoo and the Flax adapters)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.model import example_losses, from_linen, from_nnx
from fedjax_priv.models import zoo
from fedjax_priv.models.zoo import cnn, logistic_regression, mlp
from fedjax_priv.privacy.aggregation import weighted_mean
from fedjax_priv.simulation.round import build_round


# These tests check semantics, not speed: compiling at XLA's lowest backend
# optimisation level roughly halves CPU compile time, which dominates here.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def shapes(tree):
  return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def random_x(seed, batch, input_shape):
  return jax.random.normal(jax.random.key(seed), (batch, *input_shape), jnp.float32)


# --- The zoo ------------------------------------------------------------------------


def test_logistic_regression_shapes():
  """One dense layer on the flattened input: kernel [prod(input), C], logits [B, C]."""
  model = logistic_regression((4, 4, 1), 3)
  params = jit(model.init)(jax.random.key(0))
  assert shapes(params) == {"Dense_0": {"kernel": (16, 3), "bias": (3,)}}
  assert jit(model.apply)(params, random_x(1, 5, (4, 4, 1))).shape == (5, 3)
  assert model.input_shape == (4, 4, 1) and model.num_classes == 3


def test_mlp_shapes():
  """Hidden widths give the dense layers' shapes; logits are [B, num_classes]."""
  model = mlp((4, 4, 1), 3, (8, 5))
  params = jit(model.init)(jax.random.key(0))
  assert shapes(params) == {"Dense_0": {"kernel": (16, 8), "bias": (8,)},
                            "Dense_1": {"kernel": (8, 5), "bias": (5,)},
                            "Dense_2": {"kernel": (5, 3), "bias": (3,)}}
  assert jit(model.apply)(params, random_x(1, 7, (4, 4, 1))).shape == (7, 3)


def test_mlp_rejects_zero_width():
  """A hidden width of 0 fails at construction with a message naming `hidden`."""
  with pytest.raises(ValueError, match="hidden"):
    mlp((4, 4, 1), 3, (8, 0))


CNN_KWARGS = dict(input_shape=(8, 8, 3), num_classes=4, features=(2, 5), dense=6)
CNN_XLA = cnn(**CNN_KWARGS, conv_impl="xla")
CNN_PATCHES = cnn(**CNN_KWARGS, conv_impl="patches")
cnn_init = jit(CNN_XLA.init)


def test_cnn_shapes():
  """cnn: two VALID 3x3 convs, 2x2 max-pool, dense, logits [B, C]."""
  params = cnn_init(jax.random.key(0))
  assert shapes(params)["Conv_0"] == {"kernel": (3, 3, 3, 2), "bias": (2,)}
  assert shapes(params)["Conv_1"] == {"kernel": (3, 3, 2, 5), "bias": (5,)}
  # 8 -> 6 -> 4 (convs) -> 2 (pool): 2 * 2 * 5 = 20 features into the dense layer.
  assert shapes(params)["Dense_0"] == {"kernel": (20, 6), "bias": (6,)}
  assert jit(CNN_XLA.apply)(params, random_x(1, 3, (8, 8, 3))).shape == (3, 4)


def test_cnn_patches_equals_xla_conv():
  """conv_impl 'patches' and 'xla' share the parameter tree and compute the same logits."""
  params = cnn_init(jax.random.key(0))
  patches_params = jax.eval_shape(CNN_PATCHES.init, jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(patches_params)
  assert shapes(params) == shapes(patches_params)
  x = random_x(1, 6, (8, 8, 3))
  apply_xla, apply_patches = jit(CNN_XLA.apply), jit(CNN_PATCHES.apply)
  logits_xla = apply_xla(params, x)
  np.testing.assert_allclose(apply_patches(params, x), logits_xla, atol=1e-4, rtol=1e-4)
  # Non-trivial: other parameters give other logits, and both implementations agree again.
  other = cnn_init(jax.random.key(1))
  logits_other = apply_patches(other, x)
  assert not np.allclose(logits_other, logits_xla, atol=1e-3)
  np.testing.assert_allclose(logits_other, apply_xla(other, x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs,field", [
    (dict(input_shape=(8, 8, 1), num_classes=3, conv_impl="cudnn"), "conv_impl"),
    (dict(input_shape=(8, 8), num_classes=3), "input_shape"),
])
def test_cnn_rejects_bad_configuration(kwargs, field):
  with pytest.raises(ValueError, match=field):
    cnn(**kwargs)


# --- Flax adapters ---------------------------------------------------------------------


class _TinyLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3)(jnp.tanh(nn.Dense(6)(x)))


def test_from_linen_custom_module_trains_in_a_round():
  """A custom linen module wrapped by from_linen runs in a jitted vmap round and learns."""
  model = from_linen(_TinyLinen(), (4, 4, 1), 3)
  round_fn = jit(build_round(make_client_update(model, optax.sgd(0.5)), weighted_mean(),
                                 optax.sgd(1.0), "vmap"))
  K, S, B = 4, 2, 4
  rng = np.random.default_rng(0)
  batch = ClientBatch(jnp.asarray(rng.normal(size=(K, S, B, 4, 4, 1)), jnp.float32),
                      jnp.asarray(rng.integers(0, 3, (K, S, B)), jnp.int32),
                      jnp.ones((K, S, B)), jnp.full((K,), S * B, jnp.int32), jnp.ones((K,)))
  state = server_init(jit(model.init)(jax.random.key(0)), optax.sgd(1.0))
  losses = []
  for r in range(4):
    new_state, metrics = round_fn(state, batch, jax.random.key(r))
    assert float(metrics["clients"]) == K
    assert float(metrics["update_norm"]) > 0
    assert jax.tree.structure(new_state.params) == jax.tree.structure(state.params)
    losses.append(float(metrics["train_loss"]))
    state = new_state
  assert np.all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses


class _TinyNnx(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(16, 6, rngs=rngs)
    self.out = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    return self.out(nnx.relu(self.hidden(x)))


def test_from_nnx_gives_logits_and_gradients():
  """from_nnx: a pure (init, apply) pair with [B, C] logits and nonzero gradients everywhere."""
  model = from_nnx(_TinyNnx, (4, 4, 1), 3)
  params = jit(model.init)(jax.random.key(0))
  x = random_x(1, 5, (4, 4, 1))
  y = jnp.array([0, 1, 2, 1, 0], jnp.int32)
  assert jit(model.apply)(params, x).shape == (5, 3)
  grads = jit(jax.grad(lambda p: jnp.mean(example_losses(model, p, x, y))))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == 4  # Two kernels, two biases.
  for leaf in leaves:
    assert float(jnp.linalg.norm(leaf)) > 0
  # init depends on the key, and params are plain pytrees the engine can use.
  other = jit(model.init)(jax.random.key(1))
  assert float(tree_util.l2_norm(tree_util.sub(params, other))) > 0
  assert tree_util.num_parameters(params) == 16 * 6 + 6 + 6 * 3 + 3


@pytest.mark.parametrize("make, count", [
    (lambda: zoo.logistic_regression((8, 8), 10), 650),
    (lambda: zoo.logistic_regression((28, 28, 1), 10), 7_850),
    (lambda: zoo.mlp((28, 28, 1), 10), 199_210),
    (lambda: zoo.mlp((8, 8), 10, (64,)), 4_810),
    (lambda: zoo.cnn((28, 28, 1), 10), 1_199_882),
    (lambda: zoo.cnn((28, 28, 1), 62), 1_206_590),
])
def test_parameter_counts_stated_in_the_docstrings(make, count):
  model = make()
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == count
  documented = {zoo.logistic_regression, zoo.mlp, zoo.cnn}
  assert any(f"{count:,}" in fn.__doc__ for fn in documented)
