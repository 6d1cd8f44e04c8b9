"""A character-level LSTM for next-character prediction, as a `Model`.

The network (McMahan et al. 2017; Reddi et al. 2021, Shakespeare) embeds each
character id in `embed_dim` dimensions, runs a stack of LSTM layers and maps
every output to logits over the vocabulary: ids [B, T] -> logits [B, T, V].

The engine's `Model` contract is one label per example (`apply(params, x [B,
...]) -> logits [B, C]`, `y [B]`, `mask [B]`), while a language model has one
label per position. `next_char_lstm` meets the contract without changing it by
laying sequences out *position-major*: one engine example is one character
position, and a batch of `B * T` rows holds `B` whole sequences of `T`
positions, row `b * T + t` being position `t` of sequence `b`:

  x [B*T, 1] int ids  --reshape-->  [B, T]  --LSTM-->  [B, T, V]  -->  logits [B*T, V]
  y [B*T] int ids (the character after each position), mask [B*T] float 0/1.

The engine's masked mean of example losses is then exactly the mean
cross-entropy over the non-padding positions, and `evaluate` counts correct
next characters over the same positions. The one obligation this puts on the
caller is to keep a batch's rows in whole, ordered sequences: shuffle
sequences, never rows (`to_positions` does the layout). Per-example gradient
tools (DP-SGD's clipping) must not be used with this layout, because one
sequence spans many engine examples; user-level DP (clip the client's delta)
is unaffected.

References:
  Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.
  McMahan, Moore, Ramage, Hampson & Aguera y Arcas, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data", AISTATS 2017 (the
  Shakespeare LSTM: embedding 8, two LSTM layers of 256 units).
  Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar & McMahan, "Adaptive
  Federated Optimization", ICLR 2021 (the same model, sequences of 80).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv.models.model import Model, from_linen


class LSTMLayer(nn.Module):
  """One LSTM layer over a whole sequence, gates ordered (input, forget, cell, output).

  The input projection of all T positions is one large matmul outside the
  time loop, so the sequential `lax.scan` over time carries only the small
  recurrent matmul of each step. The forget gate's bias starts at 1
  (Jozefowicz et al. 2015; Keras' `unit_forget_bias`, which the papers' TFF
  model uses) so that early training does not forget everything.

  References:
    Jozefowicz, Zaremba & Sutskever, "An Empirical Exploration of Recurrent
    Network Architectures", ICML 2015.

  Attributes:
    hidden_size: h, units of the layer.
  """
  hidden_size: int

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """inputs [B, T, d] float32 -> hidden states [B, T, h] float32 (zero initial state)."""
    h = self.hidden_size
    input_kernel = self.param("input_kernel", nn.initializers.glorot_uniform(),
                              (inputs.shape[-1], 4 * h))
    recurrent_kernel = self.param("recurrent_kernel", _stacked_orthogonal(4), (h, 4 * h))
    bias = self.param("bias", lambda key, shape: jnp.zeros(shape).at[h:2 * h].set(1.0), (4 * h,))
    projected = jnp.einsum("btd,dg->tbg", inputs, input_kernel) + bias

    def step(carry, gates_in):
      cell, hidden = carry
      gates = gates_in + hidden @ recurrent_kernel
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      cell = jax.nn.sigmoid(f) * cell + jax.nn.sigmoid(i) * jnp.tanh(g)
      hidden = jax.nn.sigmoid(o) * jnp.tanh(cell)
      return (cell, hidden), hidden

    zeros = jnp.zeros((inputs.shape[0], h), projected.dtype)
    _, hidden = jax.lax.scan(step, (zeros, zeros), projected)
    return jnp.swapaxes(hidden, 0, 1)


def _stacked_orthogonal(num_blocks: int):
  """Initialiser of an [h, num_blocks * h] kernel as `num_blocks` orthogonal [h, h] blocks."""
  orthogonal = nn.initializers.orthogonal()

  def init(key, shape, dtype=jnp.float32):
    rows, cols = shape
    keys = jax.random.split(key, num_blocks)
    return jnp.concatenate([orthogonal(k, (rows, cols // num_blocks), dtype) for k in keys], -1)

  return init


class CharLSTM(nn.Module):
  """Embedding -> stacked LSTM layers -> dense logits, for every position.

  Attributes:
    vocab_size: V, number of character ids (inputs and outputs).
    embed_dim: E, embedding width.
    hidden_sizes: widths of the LSTM layers, bottom first.
  """
  vocab_size: int
  embed_dim: int
  hidden_sizes: tuple[int, ...]

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids [B, T] (any numeric dtype holding ints in [0, V)) -> logits [B, T, V] float32."""
    x = nn.Embed(self.vocab_size, self.embed_dim)(ids.astype(jnp.int32))
    for width in self.hidden_sizes:
      x = LSTMLayer(width)(x)
    return nn.Dense(self.vocab_size)(x)


def num_parameters(vocab_size: int, embed_dim: int, hidden_sizes: Sequence[int]) -> int:
  """Parameter count of `CharLSTM`: V E + sum 4 (d h + h^2 + h) + (h V + V)."""
  count, width = vocab_size * embed_dim, embed_dim
  for h in hidden_sizes:
    count += 4 * (width * h + h * h + h)
    width = h
  return count + width * vocab_size + vocab_size


def next_char_lstm(vocab_size: int, seq_length: int, embed_dim: int = 8,
                   hidden_sizes: Sequence[int] = (256, 256)) -> Model:
  """The character LSTM as a position-major `Model` (see the module docstring).

  Args:
    vocab_size: V >= 2, character ids (e.g. `data.shakespeare.VOCABULARY_SIZE`, 81).
    seq_length: T >= 1, positions per sequence; every batch must hold a whole
      number of sequences.
    embed_dim: E >= 1 (8 in the papers).
    hidden_sizes: LSTM widths, bottom first ((256, 256) in the papers).

  Returns:
    `Model` with `input_shape == (1,)` and `num_classes == V`, whose
    `apply(params, x [B*T, 1]) -> logits [B*T, V]` float32.

  Raises:
    ValueError: a size is out of range (here), or `apply` gets a batch that is
      not a whole number of sequences (when traced, before compiling).
  """
  for name, value in (("vocab_size", vocab_size), ("seq_length", seq_length),
                      ("embed_dim", embed_dim)):
    if not (isinstance(value, (int, np.integer)) and value >= (2 if name == "vocab_size" else 1)):
      raise ValueError(f"next_char_lstm: {name} must be an int >= "
                       f"{2 if name == 'vocab_size' else 1}, got {value!r}")
  hidden_sizes = tuple(hidden_sizes)
  if not hidden_sizes or any(not (isinstance(w, (int, np.integer)) and w >= 1)
                             for w in hidden_sizes):
    raise ValueError(f"next_char_lstm: hidden_sizes must be one or more ints >= 1, "
                     f"got {hidden_sizes!r}")
  module = CharLSTM(int(vocab_size), int(embed_dim), tuple(int(w) for w in hidden_sizes))
  sequences = from_linen(module, (seq_length,), vocab_size)

  def apply(params, x: jax.Array) -> jax.Array:
    if x.ndim != 2 or x.shape[1] != 1 or x.shape[0] % seq_length:
      raise ValueError(f"next_char_lstm: x must be [B * {seq_length}, 1] (whole sequences of "
                       f"seq_length {seq_length}, position-major), got shape {tuple(x.shape)}")
    logits = sequences.apply(params, x.reshape(-1, seq_length))
    return logits.reshape(-1, vocab_size)

  return Model(sequences.init, apply, (1,), int(vocab_size))


def to_positions(inputs, targets, mask):
  """Lays whole sequences out position-major for `next_char_lstm`.

  Works on numpy and jax arrays alike (a reshape).

  Args:
    inputs: [..., B, T] character ids.
    targets: [..., B, T] the id that follows each position.
    mask: [..., B, T] 1 where the target is real, 0 for padding.

  Returns:
    (x [..., B*T, 1], y [..., B*T], mask [..., B*T]) with the input dtypes.

  Raises:
    ValueError: the three shapes differ or have fewer than two axes.
  """
  shapes = {tuple(a.shape) for a in (inputs, targets, mask)}
  if len(shapes) != 1 or len(inputs.shape) < 2:
    raise ValueError(f"to_positions: inputs, targets and mask must share one [..., B, T] shape, "
                     f"got {tuple(inputs.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}")
  flat = lambda a: a.reshape(*a.shape[:-2], a.shape[-2] * a.shape[-1])
  return flat(inputs)[..., None], flat(targets), flat(mask)
