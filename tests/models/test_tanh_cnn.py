"""Tests for `tanh_cnn`, the DP-SGD CNN of Papernot et al. 2021, and its per-example clipping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from fedjax_priv.algorithms.client_update import ExampleDP, make_client_update
from fedjax_priv.algorithms.per_example_norms import ghost_coverage
from fedjax_priv.models.model import example_losses
from fedjax_priv.models.zoo import tanh_cnn

# Semantics, not speed: XLA's lowest backend optimisation level compiles faster.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
B, CLIP = 6, 0.05


def reference_logits(params, x, act):
  """The TF-Privacy layer list written out in lax, independently of flax."""
  def conv(h, layer, stride, padding):
    out = lax.conv_general_dilated(h, params[layer]["kernel"], (stride, stride), padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + params[layer]["bias"]

  def pool(h):  # 2x2 max-pool, stride 1, no padding.
    return lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 1, 1), "VALID")

  # TF's SAME for 28 -> 14 with an 8x8 kernel at stride 2 pads 3 before and 3 after.
  h = pool(act(conv(x, "Conv_0", 2, ((3, 3), (3, 3)))))
  h = pool(act(conv(h, "Conv_1", 2, "VALID")))
  h = h.reshape(h.shape[0], -1)
  h = act(h @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
  return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


@pytest.fixture(scope="module")
def setup():
  model = tanh_cnn()
  params = jit(model.init)(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((B, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, B), jnp.int32)
  return model, params, x, y


def test_param_shapes_and_count(setup):
  """Conv 16 8x8 -> conv 32 4x4 -> dense 4*4*32 -> 32 -> 10: 26,010 parameters by hand."""
  model, params, x, _ = setup
  shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), params)
  assert shapes == {"Conv_0": {"kernel": (8, 8, 1, 16), "bias": (16,)},
                    "Conv_1": {"kernel": (4, 4, 16, 32), "bias": (32,)},
                    "Dense_0": {"kernel": (512, 32), "bias": (32,)},
                    "Dense_1": {"kernel": (32, 10), "bias": (10,)}}
  hand = (8 * 8 * 1 * 16 + 16) + (4 * 4 * 16 * 32 + 32) + (512 * 32 + 32) + (32 * 10 + 10)
  assert hand == 26010
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == hand
  assert model.input_shape == (28, 28, 1) and model.num_classes == 10


@pytest.mark.parametrize("activation, act", [("tanh", jnp.tanh), ("relu", jax.nn.relu)])
def test_matches_the_layer_list(setup, activation, act):
  """Logits equal the lax reference with the chosen activation, and not with the other one."""
  _, params, x, _ = setup
  model = tanh_cnn(activation=activation)
  logits = jit(model.apply)(params, x)
  assert logits.shape == (B, 10)
  np.testing.assert_allclose(logits, reference_logits(params, x, act), rtol=1e-4, atol=1e-5)
  other = jax.nn.relu if activation == "tanh" else jnp.tanh
  assert np.max(np.abs(logits - reference_logits(params, x, other))) > 1e-2


def test_other_image_sizes_and_classes():
  """Any image of side >= 13 works: 32x32x3 flattens to 5*5*32 = 800 features."""
  model = tanh_cnn((32, 32, 3), 7)
  params = jax.eval_shape(model.init, jax.random.key(0))
  assert params["Conv_0"]["kernel"].shape == (8, 8, 3, 16)
  assert params["Dense_0"]["kernel"].shape == (800, 32)
  assert params["Dense_1"]["kernel"].shape == (32, 7)
  assert jax.eval_shape(tanh_cnn((13, 13, 1)).init, jax.random.key(0))


@pytest.mark.parametrize("kwargs, field", [
    ({"activation": "sigmoid"}, "activation"),
    ({"input_shape": (28, 28)}, "input_shape"),
    ({"input_shape": (12, 28, 1)}, "too small"),
])
def test_rejects_bad_arguments(kwargs, field):
  """Bad arguments fail at construction, naming the field."""
  with pytest.raises(ValueError, match=field):
    tanh_cnn(**kwargs)


def test_ghost_norms_cover_every_parameter(setup):
  """Every parameter sits in one flax Conv or Dense call, so "auto" runs ghost norms."""
  model, params, x, y = setup
  coverage = ghost_coverage(model, params, x, y)
  assert coverage.error is None
  assert coverage.ghost_fraction == 1.0 and coverage.materialised == ()


def test_auto_clipping_equals_vmap_and_explicit_clipping(setup):
  """One DP-SGD step: "auto" (ghost) == "vmap" == clipping hand-made per-example gradients.

  C is small enough that clipping binds for every example, and one example is
  masked out, so both the clip factors and the mask are exercised.
  """
  model, params, x, y = setup
  mask = jnp.asarray([1, 1, 0, 1, 1, 1], jnp.float32)
  lr, b = 0.5, 4.0

  def delta(method):
    update = make_client_update(model, optax.sgd(lr), ExampleDP(CLIP, 0.0, b, method))
    return jit(update)(params, x[None], y[None], mask[None], jax.random.key(3))[0]

  one_loss = lambda p, xi, yi: example_losses(model, p, xi[None], yi[None])[0]
  grads = jax.vmap(jax.grad(one_loss), in_axes=(None, 0, 0))(params, x, y)
  norms = jnp.sqrt(sum(jnp.sum(g.reshape(B, -1) ** 2, axis=1) for g in jax.tree.leaves(grads)))
  assert float(jnp.min(norms)) > CLIP  # Clipping binds for every example.
  weights = mask * jnp.minimum(1.0, CLIP / norms)
  expected = jax.tree.map(lambda g: -lr * jnp.tensordot(weights, g, 1) / b, grads)

  for method in ("auto", "vmap"):
    got = delta(method)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7)
  # Noise with the same key is the same whatever the clipping method:
  # tests/algorithms/test_client_update.py checks that for ghost norms and vmap.
