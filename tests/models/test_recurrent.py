"""Tests for fedjax_priv.models.recurrent (the next-character LSTM)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.model import evaluate, example_losses
from fedjax_priv.models.recurrent import (CharLSTM, next_char_lstm, num_parameters,
                                          to_positions)
from fedjax_priv.privacy.aggregation import weighted_mean
from fedjax_priv.simulation.round import build_round

# Semantics, not speed: the lowest backend optimisation level halves CPU compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

V, E, HIDDEN, T = 7, 3, (5, 4), 4


@pytest.fixture(scope="module")
def model():
  return next_char_lstm(V, T, E, HIDDEN)


@pytest.fixture(scope="module")
def params(model):
  return jit(model.init)(jax.random.key(0))


@pytest.fixture(scope="module")
def apply(model):
  return jit(model.apply)


def sequences(seed, batch):
  """Random (inputs, targets, mask) [batch, T]; the last sequence is padded after position 1."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(0, V, (batch, T)).astype(np.int32)
  targets = rng.integers(0, V, (batch, T)).astype(np.int32)
  mask = np.ones((batch, T), np.float32)
  mask[-1, 2:] = 0.0
  return inputs, targets, mask


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def reference_logits(params, inputs):
  """The network written out in numpy, position by position: [B, T] ids -> [B, T, V]."""
  p = jax.tree.map(np.asarray, params)
  x = p["Embed_0"]["embedding"][inputs]
  for layer in range(len(HIDDEN)):
    lstm = p[f"LSTMLayer_{layer}"]
    h = np.zeros((x.shape[0], HIDDEN[layer]))
    c = np.zeros_like(h)
    outputs = []
    for t in range(x.shape[1]):
      gates = x[:, t] @ lstm["input_kernel"] + h @ lstm["recurrent_kernel"] + lstm["bias"]
      i, f, g, o = np.split(gates, 4, axis=-1)
      c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
      h = sigmoid(o) * np.tanh(c)
      outputs.append(h)
    x = np.stack(outputs, 1)
  return x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]


@functools.lru_cache
def _engine_loss(model):
  """The engine's loss, jitted once per model: masked mean of `example_losses`."""
  return jit(lambda p, x, y, m: jnp.sum(example_losses(model, p, x, y) * m) / jnp.sum(m))


def masked_mean_loss(model, params, inputs, targets, mask):
  """The engine's loss on [B, T] sequences, laid out position-major."""
  return float(_engine_loss(model)(params, *map(jnp.asarray, to_positions(inputs, targets, mask))))


# --- Shapes and parameters ----------------------------------------------------------


def test_shapes(model, params, apply):
  """Parameters have the documented shapes; x [B*T, 1] gives logits [B*T, V] float32."""
  shapes = jax.tree.map(lambda a: a.shape, params)
  assert shapes["Embed_0"] == {"embedding": (V, E)}
  assert shapes["LSTMLayer_0"] == {"input_kernel": (E, 20), "recurrent_kernel": (5, 20),
                                   "bias": (20,)}
  assert shapes["LSTMLayer_1"] == {"input_kernel": (5, 16), "recurrent_kernel": (4, 16),
                                   "bias": (16,)}
  assert shapes["Dense_0"] == {"kernel": (4, V), "bias": (V,)}
  inputs, targets, mask = sequences(0, 3)
  x, y, m = to_positions(inputs, targets, mask)
  assert x.shape == (12, 1) and y.shape == (12,) and m.shape == (12,)
  logits = apply(params, jnp.asarray(x))
  assert logits.shape == (12, V) and logits.dtype == jnp.float32
  assert model.input_shape == (1,) and model.num_classes == V
  # Row b*T + t is position t of sequence b.
  np.testing.assert_array_equal(x[5, 0], inputs[1, 1])
  np.testing.assert_array_equal(y[11], targets[2, 3])


def test_forget_bias_starts_at_one(params):
  """Gate order (i, f, g, o): only the forget block of the bias is 1 at init."""
  bias = np.asarray(params["LSTMLayer_0"]["bias"])
  np.testing.assert_array_equal(bias, np.repeat([0.0, 1.0, 0.0, 0.0], 5))


def test_parameter_count_matches_hand_count(params):
  """Leaf sizes add up to the hand count, for the tiny model and for the paper's."""
  # 7*3 + 4*(3*5 + 5*5 + 5) + 4*(5*4 + 4*4 + 4) + (4*7 + 7)
  assert num_parameters(V, E, HIDDEN) == 21 + 180 + 160 + 35
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == 396
  paper = next_char_lstm(81, 80, 8, (256, 256))
  shapes = jax.eval_shape(paper.init, jax.random.key(0))
  # 81*8 + 4*(8*256 + 256^2 + 256) + 4*(256*256 + 256^2 + 256) + (256*81 + 81)
  hand = 648 + 271_360 + 525_312 + 20_817
  assert sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes)) == hand
  assert num_parameters(81, 8, (256, 256)) == hand


@pytest.mark.parametrize("bad", [dict(vocab_size=1), dict(seq_length=0), dict(embed_dim=0),
                                 dict(hidden_sizes=()), dict(hidden_sizes=(8, 0)),
                                 dict(seq_length=2.5)])
def test_bad_configuration_names_the_field(bad):
  args = dict(vocab_size=V, seq_length=T, embed_dim=E, hidden_sizes=HIDDEN) | bad
  with pytest.raises(ValueError, match=next(iter(bad))):
    next_char_lstm(**args)


def test_batch_that_is_not_whole_sequences_is_refused(model, params):
  with pytest.raises(ValueError, match=r"x must be \[B \* 4, 1\]"):
    model.apply(params, jnp.zeros((6, 1), jnp.int32))
  with pytest.raises(ValueError, match="share one"):
    to_positions(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 3)))


# --- Loss ---------------------------------------------------------------------------


def test_zero_network_loss_is_log_vocab(model, params):
  """With every weight 0 the logits are 0 and each position's loss is log V exactly."""
  zeros = tree_util.zeros_like(params)
  inputs, targets, mask = sequences(1, 2)
  assert masked_mean_loss(model, zeros, inputs, targets, mask) == pytest.approx(math.log(V),
                                                                                rel=1e-6)


def test_output_bias_alone_gives_hand_computed_loss(model, params):
  """Only the output bias b nonzero: loss at a position with target k is logsumexp(b) - b_k."""
  b = np.array([0.0, 1.0, 2.0, -1.0, 0.5, 0.0, 3.0], np.float32)
  only_bias = tree_util.zeros_like(params)
  only_bias["Dense_0"]["bias"] = jnp.asarray(b)
  inputs = np.zeros((1, T), np.int32)
  targets = np.array([[6, 1, 3, 0]], np.int32)
  mask = np.array([[1, 1, 1, 0]], np.float32)   # the last position is padding
  lse = math.log(sum(math.exp(v) for v in b))
  hand = ((lse - 3.0) + (lse - 1.0) + (lse + 1.0)) / 3
  assert masked_mean_loss(model, only_bias, inputs, targets, mask) == pytest.approx(hand, 1e-6)


def test_loss_matches_numpy_lstm_over_real_positions(model, params):
  """The engine's masked mean equals the mean cross-entropy of a numpy LSTM over real positions."""
  inputs, targets, mask = sequences(2, 3)
  logits = reference_logits(params, inputs)
  log_probs = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  picked = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  hand = -np.sum(picked * mask) / np.sum(mask)
  assert masked_mean_loss(model, params, inputs, targets, mask) == pytest.approx(hand, 1e-5)
  # `evaluate` sums the same losses and counts argmax hits over the real positions.
  x, y, m = map(jnp.asarray, to_positions(inputs, targets, mask))
  loss_sum, correct, count = jit(functools.partial(evaluate, model))(params, x, y, m)
  assert float(count) == mask.sum()
  assert float(loss_sum) == pytest.approx(hand * mask.sum(), 1e-5)
  assert float(correct) == np.sum((logits.argmax(-1) == targets) * mask)


def test_padding_positions_and_other_sequences_do_not_leak(model, params, apply):
  """Causal and per-sequence: inputs at padded positions or in another sequence change nothing
  at the real positions of a sequence."""
  inputs, targets, mask = sequences(3, 2)
  base = masked_mean_loss(model, params, inputs, targets, mask)
  changed = inputs.copy()
  changed[-1, 2:] = (changed[-1, 2:] + 1) % V   # padded positions of the last sequence
  assert masked_mean_loss(model, params, changed, targets, mask) == pytest.approx(base, 1e-6)
  logits = apply(params, jnp.asarray(to_positions(inputs, targets, mask)[0]))
  other = inputs.copy()
  other[0] = (other[0] + 3) % V
  moved = apply(params, jnp.asarray(to_positions(other, targets, mask)[0]))
  np.testing.assert_allclose(moved[T:], logits[T:], rtol=1e-6, atol=1e-6)
  assert not np.allclose(moved[:T], logits[:T])


# --- Under the round builder --------------------------------------------------------


def cohort_batch(steps, batch):
  """Two real clients and one padded slot, position-major: x [3, S, B*T, 1]."""
  parts = [sequences(10 + k, steps * batch) for k in range(3)]
  x, y, m = (np.stack([p[i].reshape(steps, batch, T) for p in parts]) for i in range(3))
  x, y, m = to_positions(x, y, m)
  client_mask = np.array([1.0, 1.0, 0.0], np.float32)
  m = m * client_mask[:, None, None]
  return ClientBatch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(m),
                     jnp.asarray(m.sum((1, 2)).astype(np.int32)), jnp.asarray(client_mask))


def test_vmapped_round_is_sgd_on_the_sequence_loss(model, params):
  """Under `build_round(..., "vmap")`, one local SGD step per client and a uniform mean: the new
  params are params - lr * mean over real clients of the gradient of each client's mean
  cross-entropy over its real positions, written directly on [B, T] sequences; the padded
  slot contributes nothing."""
  lr = 0.5
  client_update = make_client_update(model, optax.sgd(lr))
  aggregator = weighted_mean("uniform")
  server = optax.sgd(1.0)
  state = server_init(params, server, aggregator)
  batch = cohort_batch(steps=1, batch=2)
  key = jax.random.key(5)
  vmapped, metrics = jit(build_round(client_update, aggregator, server, "vmap"))(state, batch,
                                                                                 key)
  assert float(metrics["clients"]) == 2.0

  module = CharLSTM(V, E, HIDDEN)

  def sequence_loss(p, inputs, targets, mask):
    logits = module.apply({"params": p}, inputs)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(losses * mask) / jnp.sum(mask)

  deltas = []
  for k in range(2):
    seq = lambda a: jnp.asarray(a[k, 0]).reshape(2, T)
    grad = jit(jax.grad(sequence_loss))(params, seq(batch.x[..., 0]), seq(batch.y),
                                   seq(batch.example_mask))
    deltas.append(tree_util.scale(grad, -lr))
  expected = tree_util.add(params, tree_util.scale(tree_util.add(*deltas), 0.5))
  for a, b in zip(jax.tree.leaves(vmapped.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
