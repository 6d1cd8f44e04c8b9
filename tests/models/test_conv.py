"""models.conv: the explicit backward pass gives lax.conv_general_dilated's gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv.models.conv import conv_general_dilated
from fedjax_priv.models.model import example_losses, from_linen
from fedjax_priv.models.zoo import _CNN, _TanhCNN, cnn, tanh_cnn

CASES = [  # (input shape, kernel shape, strides, padding, kernel dilation)
    ((3, 9, 9, 2), (3, 3, 2, 4), (1, 1), "VALID", None),
    ((3, 9, 9, 2), (3, 3, 2, 4), (2, 2), "SAME", None),
    ((2, 28, 28, 1), (8, 8, 1, 5), (2, 2), "SAME", None),       # tanh_cnn's first layer
    ((2, 13, 13, 5), (4, 4, 5, 3), (2, 2), "VALID", None),      # ... and its second
    ((2, 10, 11, 3), (3, 2, 3, 4), (3, 2), ((1, 2), (0, 3)), (2, 1)),
    ((2, 12, 12, 2), (3, 3, 2, 2), (1, 2), "SAME_LOWER", (2, 2)),
    ((4, 17, 3), (5, 3, 6), (3,), "SAME", (2,)),                # 1-D
]


def numbers(ndim):
  return ("NWC", "WIO", "NWC") if ndim == 3 else ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("lhs_shape,rhs_shape,strides,padding,dilation", CASES)
def test_gradients_equal_lax(lhs_shape, rhs_shape, strides, padding, dilation):
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=lhs_shape), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=rhs_shape), jnp.float32)
  args = (strides, padding, None, dilation, numbers(len(lhs_shape)))
  ours, vjp_ours = jax.vjp(lambda a, b: conv_general_dilated(a, b, *args), lhs, rhs)
  theirs, vjp_lax = jax.vjp(lambda a, b: jax.lax.conv_general_dilated(a, b, *args), lhs, rhs)
  np.testing.assert_array_equal(ours, theirs)
  g = jnp.asarray(rng.normal(size=theirs.shape), jnp.float32)
  for mine, reference in zip(jax.jit(vjp_ours)(g), jax.jit(vjp_lax)(g)):
    assert mine.shape == reference.shape
    np.testing.assert_allclose(mine, reference, rtol=2e-5, atol=2e-5)


def test_other_layouts_and_groups_use_lax_rules():
  rng = np.random.default_rng(1)
  lhs = jnp.asarray(rng.normal(size=(2, 4, 7, 7)), jnp.float32)  # NCHW, 2 feature groups
  rhs = jnp.asarray(rng.normal(size=(6, 2, 3, 3)), jnp.float32)  # OIHW
  args = ((1, 1), ((1, 1), (1, 1)), (2, 2), None, ("NCHW", "OIHW", "NCHW"), 2)
  f = lambda conv: jax.grad(lambda a, b: jnp.sum(jnp.sin(conv(a, b, *args))), (0, 1))(lhs, rhs)
  for mine, reference in zip(f(conv_general_dilated), f(jax.lax.conv_general_dilated)):
    np.testing.assert_allclose(mine, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["tanh_cnn", "cnn_xla"])
def test_zoo_models_train_the_same_inside_a_scan(name):
  """The zoo's XLA-convolution models use this convolution on CPU: a scan of SGD steps gives
  the params of the same steps with flax's default convolution."""
  if name == "tanh_cnn":
    model = tanh_cnn((16, 16, 1), 3)
    plain = from_linen(_TanhCNN(3, "tanh"), (16, 16, 1), 3)
  else:
    model = cnn((12, 12, 1), 4, (3, 5), 8, conv_impl="xla")
    plain = from_linen(_CNN((3, 5), 8, 4, "xla"), (12, 12, 1), 4)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.random((3, 4, *model.input_shape)), jnp.float32)
  y = jnp.asarray(rng.integers(0, model.num_classes, (3, 4)), jnp.int32)
  params = model.init(jax.random.key(0))

  def train(model):
    def step(p, xy):
      g = jax.grad(lambda p: jnp.mean(example_losses(model, p, *xy)))(p)
      return jax.tree.map(lambda a, b: a - 0.5 * b, p, g), None
    return jax.jit(lambda p: jax.lax.scan(step, p, (x, y))[0])(params)

  ours, reference = train(model), train(plain)
  moved = max(float(jnp.max(jnp.abs(a - b)))
              for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(params)))
  assert moved > 1e-3  # The steps did train.
  for mine, theirs in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
