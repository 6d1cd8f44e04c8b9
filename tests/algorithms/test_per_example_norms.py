"""Tests for fedjax_priv.algorithms.per_example_norms: ghost norms equal materialised ones."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv.algorithms import per_example_norms as pen
from fedjax_priv.models.model import Model, example_losses, from_linen
from fedjax_priv.models.zoo import cnn, mlp

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
B, NUM_CLASSES, VOCAB, SEQ = 6, 3, 11, 5
CLIP = 0.5


class _TokenModel(nn.Module):
  """Embedding, then a Dense per position in Gram form, one in direct form, mean, Dense."""

  @nn.compact
  def __call__(self, x):
    ids = x.astype(jnp.int32)  # Tokens travel as float32 like every input.
    h = nn.Embed(VOCAB, 4)(ids)                   # [B, T, 4]
    h = nn.relu(nn.Dense(16)(h))                  # T (4 + 16) < 4 * 16: Gram form
    h = nn.relu(nn.Dense(2)(h))                   # T (16 + 2) > 16 * 2: direct form
    return nn.Dense(NUM_CLASSES)(jnp.mean(h, axis=1))


class _Shared(nn.Module):
  """A Dense applied twice (shared weights) and one under nn.remat: materialised."""

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    shared = nn.Dense(x.shape[-1])
    x = shared(nn.tanh(shared(x)))
    x = nn.remat(nn.Dense)(7)(x)
    return nn.Dense(NUM_CLASSES)(nn.relu(x))


class _ConvShapes(nn.Module):
  """Convolutions whose kernel layout the book-kept sum must rebuild from patches:
  rectangular, strided, VALID, dilated, 1-D, and a Dense without bias."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (2, 3), strides=(2, 1), padding="VALID")(x))     # [B, 4, 6, 3]
    x = nn.relu(nn.Conv(2, (3, 2), kernel_dilation=(1, 2), padding="SAME")(x))
    x = x.reshape((x.shape[0], -1, 2))                                        # [B, 24, 2]
    x = nn.relu(nn.Conv(4, 3, strides=2, use_bias=False)(x))                 # 1-D
    return nn.Dense(NUM_CLASSES, use_bias=False)(x.reshape((x.shape[0], -1)))


def _tokens(rng):
  # Few distinct tokens per example, so repeated ids exercise the token-equality Gram.
  return rng.integers(0, 4, (B, SEQ)).astype(np.float32)


MODELS = {
    "mlp": (lambda: mlp((4, 4, 1), NUM_CLASSES, (8,)),
            lambda rng: rng.normal(size=(B, 4, 4, 1)) * 3),
    "cnn_xla": (lambda: cnn((8, 8, 1), NUM_CLASSES, (3, 4), 5, conv_impl="xla"),
                lambda rng: rng.normal(size=(B, 8, 8, 1))),
    "cnn_patches": (lambda: cnn((8, 8, 1), NUM_CLASSES, (3, 4), 5, conv_impl="patches"),
                    lambda rng: rng.normal(size=(B, 8, 8, 1))),
    "conv_shapes": (lambda: from_linen(_ConvShapes(), (8, 6, 2), NUM_CLASSES),
                    lambda rng: rng.normal(size=(B, 8, 6, 2))),
    "embed": (lambda: from_linen(_TokenModel(), (SEQ,), NUM_CLASSES), _tokens),
    "shared": (lambda: from_linen(_Shared(), (4,), NUM_CLASSES),
               lambda rng: rng.normal(size=(B, 4))),
}


@functools.cache
def setup(name):
  make_model, make_x = MODELS[name]
  model = make_model()
  rng = np.random.default_rng(len(name))
  x = jnp.asarray(make_x(rng), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, B), jnp.int32)
  mask = jnp.asarray([1, 1, 0, 1, 1, 1], jnp.float32)
  params = jit(model.init)(jax.random.key(1))

  def run(method, microbatch_size=None):
    fn = jit(lambda p, x, y, m: pen.clipped_gradient_sum(model, p, x, y, m, CLIP, method,
                                                         microbatch_size))
    return fn(params, x, y, mask)

  return model, params, x, y, mask, run


def _flat(tree):
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", list(MODELS))
def test_ghost_equals_vmap_and_hand_computation(name):
  """Norms, losses and the clipped sum agree between ghost and vmap (materialised)."""
  _, params, _, _, mask, run = setup(name)
  ghost, vmap = run("ghost"), run("vmap")
  np.testing.assert_allclose(ghost.norms, vmap.norms, rtol=1e-5)
  np.testing.assert_allclose(ghost.losses, vmap.losses, rtol=1e-6)
  assert np.sum((vmap.norms > CLIP) & (mask > 0)) >= 2, "clipping should matter here"
  np.testing.assert_allclose(_flat(ghost.grad_sum), _flat(vmap.grad_sum), rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(ghost.grad_sum) == jax.tree.structure(params)


def test_clipped_sum_matches_hand_computation():
  """Ghost norms and grad_sum = sum_i mask_i min(1, C/||g_i||) g_i, each g_i computed alone
  in float64."""
  model, params, x, y, mask, run = setup("embed")
  grad = jit(jax.grad(lambda p, xi, yi: example_losses(model, p, xi[None], yi[None])[0]))
  expected, norms = 0.0, []
  for i in range(B):
    g = _flat(grad(params, x[i], y[i])).astype(np.float64)
    norms.append(np.linalg.norm(g))
    expected = expected + mask[i] * min(1.0, CLIP / norms[-1]) * g
  ghost = run("ghost")
  np.testing.assert_allclose(ghost.norms, norms, rtol=1e-5)
  np.testing.assert_allclose(_flat(ghost.grad_sum), expected, rtol=1e-5, atol=1e-6)


def test_vmap_micro_batches_change_nothing():
  """Micro-batches of 4 (the last one padded) give what one batch of 6 gives."""
  *_, run = setup("mlp")
  whole, parts = run("vmap"), run("vmap", microbatch_size=4)
  np.testing.assert_allclose(parts.norms, whole.norms, rtol=1e-6)
  np.testing.assert_allclose(parts.losses, whole.losses, rtol=1e-6)
  np.testing.assert_allclose(_flat(parts.grad_sum), _flat(whole.grad_sum), rtol=1e-6, atol=1e-7)


def test_removing_one_example_moves_the_sum_by_at_most_c():
  """Add/remove neighbours: masking one example out moves grad_sum by <= C (ghost)."""
  model, params, x, y, mask, _ = setup("cnn_xla")
  fn = jit(lambda m: pen.clipped_gradient_sum(model, params, x, y, m, CLIP, "ghost").grad_sum)
  full = _flat(fn(jnp.ones(B)))
  for i in range(B):
    moved = np.linalg.norm(full - _flat(fn(jnp.ones(B).at[i].set(0.0))))
    assert 0 < moved <= CLIP * (1 + 1e-5)


def test_coverage():
  """Which parameters ghost norms cover, and which they materialise and why."""
  cov = {name: pen.ghost_coverage(*setup(name)[:4]) for name in MODELS}
  for name in ("mlp", "cnn_xla", "embed"):
    assert cov[name] == pen.GhostCoverage(None, 1.0, ())
  patches = cov["cnn_patches"]
  assert patches.error is None and 0 < patches.ghost_fraction < 1
  assert sorted(patches.materialised) == [f"Conv_{i}/{n}: not in a flax Dense, Conv or Embed layer"
                                          for i in (0, 1) for n in ("bias", "kernel")]
  shared = "\n".join(cov["shared"].materialised)
  assert "Dense_0/kernel: called more than once (shared weights)" in shared
  assert "CheckpointDense_0/kernel" in shared, shared


def test_auto_picks_vmap_when_ghost_covers_little():
  """A model of no flax layers: nothing is ghost; "auto" runs vmap, "ghost" materialises all,
  and both agree."""
  w = jnp.asarray(np.random.default_rng(0).normal(size=(4, NUM_CLASSES)), jnp.float32)
  model = Model(lambda key: {"w": w}, lambda p, x: jnp.tanh(x @ p["w"]) * 3, (4,), NUM_CLASSES)
  params, (_, _, x, y, mask, _) = {"w": w}, setup("shared")
  assert pen.ghost_coverage(model, params, x, y) == pen.GhostCoverage(None, 0.0, (
      "w: not in a flax Dense, Conv or Embed layer",))
  assert pen._resolve("auto", model, params, x, y) is None
  run = jit(lambda method: pen.clipped_gradient_sum(model, params, x, y, mask, CLIP, method),
            static_argnums=0)
  ghost, auto = run("ghost"), run("auto")
  np.testing.assert_allclose(ghost.norms, auto.norms, rtol=1e-5)
  np.testing.assert_allclose(_flat(ghost.grad_sum), _flat(auto.grad_sum), rtol=1e-5, atol=1e-5)


def test_norms_without_clipping():
  model, params, x, y, _, run = setup("embed")
  norms = jit(lambda p, x, y: pen.per_example_gradient_norms(model, p, x, y, "ghost"))
  np.testing.assert_allclose(norms(params, x, y), run("vmap").norms, rtol=1e-5)


def test_unknown_method_fails_naming_it():
  model, params, x, y, mask, _ = setup("mlp")
  with pytest.raises(ValueError, match="clipping must be one of"):
    pen.clipped_gradient_sum(model, params, x, y, mask, CLIP, "fast")
