"""The models the experiments use: logistic regression, an MLP and two small CNNs.

All take images or feature vectors of any shape and flatten where needed, so one
dataset format (e.g. digits as [n, 8, 8, 1]) feeds every model.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fedjax_priv.models.conv import conv_general_dilated
from fedjax_priv.models.model import Model, from_linen

CONV_IMPLEMENTATIONS = ("auto", "xla", "patches")
# Bounded (tanh) or unbounded (relu) hidden units: the comparison of Papernot et al. 2021.
TANH_CNN_ACTIVATIONS = {"tanh": nn.tanh, "relu": nn.relu}


class _MLP(nn.Module):
  hidden: tuple[int, ...]
  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)


def logistic_regression(input_shape: Sequence[int], num_classes: int) -> Model:
  """Multinomial logistic regression on the flattened input.

  (prod(input_shape) + 1) * num_classes parameters: 650 for the 8x8 digits
  and 10 classes, 7,850 for 28x28x1 images.
  """
  return from_linen(_MLP((), num_classes), input_shape, num_classes)


def mlp(input_shape: Sequence[int], num_classes: int,
        hidden: Sequence[int] = (200, 200)) -> Model:
  """ReLU multi-layer perceptron; `hidden` lists the widths of the hidden layers.

  199,210 parameters with the default (200, 200) on 28x28x1 images and 10
  classes; 4,810 with hidden = (64,) on the 8x8 digits (the config default).
  """
  if any(int(w) < 1 for w in hidden):
    raise ValueError(f"mlp: hidden widths must be >= 1, got {tuple(hidden)}")
  return from_linen(_MLP(tuple(int(w) for w in hidden), num_classes), input_shape, num_classes)


class _PatchConv(nn.Module):
  """Unpadded ("VALID") convolution computed as image patches times a dense kernel.

  Under vmap over clients a convolution with per-client weights becomes a
  grouped convolution, which XLA:CPU runs slowly; patches + matmul becomes a
  batched matmul instead, 3-4x faster there (DESIGN.md). The parameters have
  the same shapes as `nn.Conv`'s, so the two are interchangeable.
  """
  features: int
  kernel_size: tuple[int, int]

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    patches = lax.conv_general_dilated_patches(
        x, self.kernel_size, window_strides=(1, 1), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    # conv_general_dilated_patches orders the patch axis as (in_features, kh, kw).
    flat_kernel = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, self.features)
    return patches @ flat_kernel + bias


def _cpu_convolution():
  """`models.conv` on CPU, where lax's gradients are slow inside scans; flax's default elsewhere."""
  return conv_general_dilated if jax.default_backend() == "cpu" else None


class _CNN(nn.Module):
  features: tuple[int, ...]
  dense: int
  num_classes: int
  conv_impl: str
  convolution: Callable | None = None  # nn.Conv's conv_general_dilated; None: lax's

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.features):
      # Same names for both implementations, so checkpoints and params swap.
      if self.conv_impl == "patches":
        x = _PatchConv(width, (3, 3), name=f"Conv_{i}")(x)
      else:
        x = nn.Conv(width, (3, 3), padding="VALID", name=f"Conv_{i}",
                    conv_general_dilated=self.convolution)(x)
      x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense)(x))
    return nn.Dense(self.num_classes)(x)


def cnn(input_shape: Sequence[int], num_classes: int, features: Sequence[int] = (32, 64),
        dense: int = 128, conv_impl: str = "auto") -> Model:
  """The CNN of Reddi et al. 2021 for EMNIST: conv32-conv64-pool-dense128-dense.

  Reference: Reddi et al., "Adaptive Federated Optimization", ICLR 2021
  (dropout omitted: the engine trains deterministic models).

  1,199,882 parameters on 28x28x1 images with 10 classes (1,206,590 with
  EMNIST's 62), almost all of them in the dense layer after pooling. Under
  DP the noise added to the sum has this many coordinates while the clip
  norm bounds the whole update, so the signal-to-noise ratio per
  coordinate is far lower than for a small model.

  Args:
    input_shape: (height, width, channels).
    conv_impl: "xla" (lax.conv, cuDNN on GPUs; on CPU with `models.conv`'s
      backward pass, fast inside `lax.scan`), "patches" (patches + matmul,
      faster for per-client weights under vmap on XLA:CPU) or "auto"
      (patches on CPU, xla elsewhere).
  """
  if conv_impl not in CONV_IMPLEMENTATIONS:
    raise ValueError(f"cnn: conv_impl must be one of {CONV_IMPLEMENTATIONS}, got {conv_impl!r}")
  if len(input_shape) != 3:
    raise ValueError("cnn: input_shape must be (height, width, channels), got "
                     f"{tuple(input_shape)}")
  if conv_impl == "auto":
    conv_impl = "patches" if jax.default_backend() == "cpu" else "xla"
  module = _CNN(tuple(int(f) for f in features), int(dense), num_classes, conv_impl,
                _cpu_convolution())
  return from_linen(module, input_shape, num_classes)


class _TanhCNN(nn.Module):
  num_classes: int
  activation: str
  convolution: Callable | None = None  # nn.Conv's conv_general_dilated; None: lax's

  @nn.compact
  def __call__(self, x):
    act = TANH_CNN_ACTIVATIONS[self.activation]
    # Plain nn.Conv (not _PatchConv): per-example ghost norms recognise it,
    # and this model trains one set of weights (central DP-SGD), not one per client.
    x = act(nn.Conv(16, (8, 8), strides=(2, 2), padding="SAME",
                    conv_general_dilated=self.convolution)(x))
    x = nn.max_pool(x, (2, 2), strides=(1, 1))
    x = act(nn.Conv(32, (4, 4), strides=(2, 2), padding="VALID",
                    conv_general_dilated=self.convolution)(x))
    x = nn.max_pool(x, (2, 2), strides=(1, 1))
    x = x.reshape((x.shape[0], -1))
    x = act(nn.Dense(32)(x))
    return nn.Dense(self.num_classes)(x)


def tanh_cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
             activation: str = "tanh") -> Model:
  """The small CNN of Papernot et al. 2021 for DP-SGD on MNIST and Fashion-MNIST.

  Layers (TF-Privacy's MNIST tutorial architecture; shapes for a 28x28x1 input):
  conv 16 8x8 stride 2 SAME [14, 14, 16] -> act -> max-pool 2x2 stride 1
  [13, 13, 16] -> conv 32 4x4 stride 2 VALID [5, 5, 32] -> act -> max-pool 2x2
  stride 1 [4, 4, 32] -> flatten [512] -> dense 32 -> act -> dense
  `num_classes`. 26,010 parameters for 28x28x1 inputs and 10 classes. Kernels
  use flax's default (LeCun normal) initialisation, biases zero.

  Every parameter lives in a flax Conv or Dense layer called once, so
  per-example ghost norms cover the whole model (`clipping="auto"` uses them).
  On CPU the convolutions differentiate through `models.conv`, whose gradients
  stay fast inside `lax.scan`.

  Args:
    input_shape: (height, width, channels) of one image, e.g. (28, 28, 1);
      float32 pixels, the paper scales them to [0, 1].
    num_classes: number of logits.
    activation: "tanh" (the paper's bounded activation, the tempered sigmoid
      with scale 2, inverse temperature 2, offset 1) or "relu" (its baseline).

  Raises:
    ValueError: unknown activation, input_shape not (h, w, c), or an image
      too small to leave a 1x1 map after the second pooling.

  References:
    Papernot, Thakurta, Song, Chien & Erlingsson, "Tempered Sigmoid
    Activations for Deep Learning with Differential Privacy", AAAI 2021.
  """
  if activation not in TANH_CNN_ACTIVATIONS:
    raise ValueError(f"tanh_cnn: activation must be one of {tuple(TANH_CNN_ACTIVATIONS)}, "
                     f"got {activation!r}")
  if len(input_shape) != 3:
    raise ValueError(
        f"tanh_cnn: input_shape must be (height, width, channels), got {tuple(input_shape)}")
  if min(int(side) for side in input_shape[:2]) < 13:
    # 13 -> SAME stride-2 conv 7 -> pool 6 -> VALID 4x4 stride-2 conv 2 -> pool 1.
    raise ValueError(f"tanh_cnn: input_shape {tuple(input_shape)} is too small: height and "
                     f"width must be >= 13 for the layers to leave a 1x1 map")
  return from_linen(_TanhCNN(int(num_classes), activation, _cpu_convolution()), input_shape,
                    num_classes)
