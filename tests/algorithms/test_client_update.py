"""Tests for fedjax_priv.algorithms.client_update (local training, DP-SGD)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import (UNROLLED_LOCAL_STEPS, ExampleDP,
                                                  make_client_update)
from fedjax_priv.models.model import example_losses
from fedjax_priv.models.zoo import cnn, logistic_regression, mlp

# These tests check semantics, not speed: compiling at XLA's lowest backend
# optimisation level roughly halves CPU compile time, which dominates here.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

INPUT_SHAPE = (4, 4, 1)
NUM_CLASSES = 3
MLP = mlp(INPUT_SHAPE, NUM_CLASSES, (8,))
LOGREG = logistic_regression(INPUT_SHAPE, NUM_CLASSES)
S, B = 1, 6
LR = 0.7
DP = ExampleDP(clip_norm=0.4, noise_multiplier=0.0, expected_batch_size=5.0)


@functools.cache
def client_fn(model_name, optimizer_name, dp=None):
  """A jitted client update, built once per configuration."""
  model = {"mlp": MLP, "logreg": LOGREG}[model_name]
  optimizer = {"sgd": optax.sgd(LR), "adam": optax.adam(0.1)}[optimizer_name]
  return jit(make_client_update(model, optimizer, dp))


def mlp_params(seed=0):
  return jit(MLP.init)(jax.random.key(seed))


def make_data(seed, num_steps=S, batch=B, scale=1.0, mask_rate=0.7):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(num_steps, batch, *INPUT_SHAPE)) * scale, jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, (num_steps, batch)), jnp.int32)
  mask = jnp.asarray(rng.random((num_steps, batch)) < mask_rate, jnp.float32)
  mask = mask.at[:, 0].set(1.0)  # At least one real example per step.
  return x, y, mask


def assert_trees_close(a, b, rtol=0.0, atol=0.0):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def flat(tree):
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)]).astype(np.float64)


def distance(a, b):
  return float(tree_util.l2_norm(tree_util.sub(a, b)))


# --- Hand computations --------------------------------------------------------------


@functools.cache
def per_example_grad_fn():
  return jit(jax.value_and_grad(lambda p, xi, yi: example_losses(MLP, p, xi[None], yi[None])[0]))


def test_dp_sgd_step_matches_hand_computation():
  """sigma=0: delta = -lr/b * sum over unmasked examples of clip(per-example grad, C)."""
  params = mlp_params()
  x, y, mask = make_data(1, scale=3.0)
  delta, metrics = client_fn("mlp", "sgd", DP)(params, x, y, mask, jax.random.key(0))

  # By hand, in float64 numpy: one example at a time, clip, sum, divide by b.
  total, loss_sum, clipped_any = 0.0, 0.0, False
  for i in range(B):
    if mask[0, i] == 0:
      continue
    loss, grad = per_example_grad_fn()(params, x[0, i], y[0, i])
    g = flat(grad)
    norm = np.linalg.norm(g)
    clipped_any |= norm > DP.clip_norm
    total = total + g * min(1.0, DP.clip_norm / norm)
    loss_sum += float(loss)
  expected = -LR * total / DP.expected_batch_size
  assert clipped_any, "the test data should make clipping matter"
  np.testing.assert_allclose(flat(delta), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics.examples_seen, float(mask.sum()))
  np.testing.assert_allclose(metrics.loss_sum, loss_sum, rtol=1e-5)


def test_sgd_step_matches_hand_computation():
  """Non-DP: delta = -lr * grad of the mean loss over unmasked examples."""
  params = mlp_params()
  x, y, mask = make_data(2)
  delta, metrics = client_fn("mlp", "sgd")(params, x, y, mask, jax.random.key(0))

  def mean_loss(p):
    losses = example_losses(MLP, p, x[0], y[0])
    return jnp.sum(losses * mask[0]) / jnp.sum(mask[0])

  expected = -LR * flat(jit(jax.grad(mean_loss))(params))
  np.testing.assert_allclose(flat(delta), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics.loss_sum, mean_loss(params) * mask.sum(), rtol=1e-5)


@pytest.mark.parametrize("num_steps", [2, UNROLLED_LOCAL_STEPS + 2], ids=["written_out", "looped"])
def test_delta_is_local_minus_server_params(num_steps):
  """SGD by hand, step by step: delta equals the local params minus the server params,
  whether local training is written out (short) or a loop (long)."""
  params = mlp_params(3)
  x, y, mask = make_data(4, num_steps=num_steps)
  delta, _ = client_fn("mlp", "sgd")(params, x, y, mask, jax.random.key(0))

  @jit
  def grad_step(p, xs, ys, ms):
    def mean_loss(p):
      return jnp.sum(example_losses(MLP, p, xs, ys) * ms) / jnp.sum(ms)
    return jax.grad(mean_loss)(p)

  local = params
  for s in range(num_steps):
    local = tree_util.sub(local, tree_util.scale(grad_step(local, x[s], y[s], mask[s]), LR))
  assert_trees_close(delta, tree_util.sub(local, params), rtol=1e-5, atol=1e-6)


# --- Empty steps ---------------------------------------------------------------------


def test_all_zero_mask_leaves_params_untouched_with_adam():
  """Non-DP: a client with no real example returns delta exactly 0, even with Adam."""
  params = mlp_params()
  x, y, _ = make_data(5, num_steps=3)
  delta, metrics = client_fn("mlp", "adam")(params, x, y, jnp.zeros((3, B)), jax.random.key(0))
  assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(delta))
  assert float(metrics.examples_seen) == 0 and float(metrics.loss_sum) == 0


def test_empty_step_leaves_adam_state_untouched():
  """Steps [data, empty, data] equal steps [data, data]: the empty step moved neither params
  nor Adam's state (its step count and moments)."""
  params = mlp_params()
  x, y, mask = make_data(6, num_steps=2)
  with_gap = (jnp.stack([x[0], x[0] * 0 + 5.0, x[1]]), jnp.stack([y[0], y[0], y[1]]),
              jnp.stack([mask[0], jnp.zeros(B), mask[1]]))
  fn = client_fn("mlp", "adam")
  delta_plain, _ = fn(params, x, y, mask, jax.random.key(0))
  delta_gap, _ = fn(params, *with_gap, jax.random.key(0))
  assert_trees_close(delta_gap, delta_plain, rtol=1e-6, atol=1e-8)
  assert distance(delta_plain, tree_util.zeros_like(params)) > 0


# --- Padded examples -------------------------------------------------------------------


@pytest.mark.parametrize("dp", [None, DP._replace(noise_multiplier=1.0)], ids=["sgd", "dp_sgd"])
def test_padded_examples_change_nothing(dp):
  """Garbage x/y in masked example slots leave the delta unchanged (same key for DP-SGD)."""
  params = mlp_params()
  x, y, mask = make_data(7, num_steps=2)
  rng = np.random.default_rng(8)
  garbage_x = jnp.asarray(rng.normal(size=x.shape) * 1e4, jnp.float32)
  garbage_y = jnp.asarray(rng.integers(0, NUM_CLASSES, y.shape), jnp.int32)
  x_g = jnp.where(mask[..., None, None, None] > 0, x, garbage_x)
  y_g = jnp.where(mask > 0, y, garbage_y)
  assert not np.array_equal(x_g, x)
  fn = client_fn("mlp", "sgd", dp)
  key = jax.random.key(9)
  delta, metrics = fn(params, x * mask[..., None, None, None], y, mask, key)
  delta_g, metrics_g = fn(params, x_g, y_g, mask, key)
  assert_trees_close(delta_g, delta, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(metrics_g.loss_sum, metrics.loss_sum, rtol=1e-6)
  assert float(metrics_g.examples_seen) == float(mask.sum())


@pytest.mark.parametrize("dp", [None, DP._replace(noise_multiplier=1.0)], ids=["sgd", "dp_sgd"])
def test_nan_padded_example_changes_nothing(dp):
  """A NaN in a masked-out example slot contributes exactly zero (DESIGN: padding
  contributes exactly zero): the client's delta stays finite and unchanged."""
  params = mlp_params()
  x, y, mask = make_data(12, num_steps=2)
  x = x * mask[..., None, None, None]
  padded = np.argwhere(np.asarray(mask) == 0)[0]
  x_bad = x.at[tuple(padded)].set(np.nan)
  fn = client_fn("mlp", "sgd", dp)
  key = jax.random.key(13)
  delta, _ = fn(params, x, y, mask, key)
  delta_bad, _ = fn(params, x_bad, y, mask, key)
  assert bool(tree_util.all_finite(delta_bad)), "a masked-out example poisoned the client"
  assert_trees_close(delta_bad, delta, rtol=1e-6, atol=1e-7)


# --- Per-example sensitivity -------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("mode", ["replace", "remove"])
def test_dp_sgd_step_sensitivity(mode, seed):
  """sigma=0, S=1, SGD from zero params: replacing one example moves delta by <= 2 lr C/b,
  masking it out (add/remove) by <= lr C/b."""
  fn = client_fn("logreg", "sgd", DP)
  params = tree_util.zeros_like(LOGREG.init(jax.random.key(0)))  # delta == -lr * grad exactly.
  x, y, mask = make_data(10 + seed, scale=10.0 ** seed)
  mask = jnp.ones_like(mask)
  i = seed % B
  if mode == "replace":
    rng = np.random.default_rng(seed)
    x2 = x.at[0, i].set(jnp.asarray(rng.normal(size=INPUT_SHAPE) * 100, jnp.float32))
    y2, mask2 = y.at[0, i].set((y[0, i] + 1) % NUM_CLASSES), mask
  else:
    x2, y2, mask2 = x, y, mask.at[0, i].set(0.0)
  key = jax.random.key(seed)
  delta, _ = fn(params, x, y, mask, key)
  delta2, _ = fn(params, x2, y2, mask2, key)
  bound = (2.0 if mode == "replace" else 1.0) * DP.clip_norm / DP.expected_batch_size * LR
  assert 0 < distance(delta, delta2) <= bound + 1e-6


# --- DP-SGD noise ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [1, 2])
def test_dp_sgd_noise_statistics(num_steps):
  """With no real example and sigma>0, S SGD steps give delta ~ N(0, S (lr sigma C / b)^2):
  the noise has the calibrated std, and each step draws fresh noise."""
  big = logistic_regression((2000,), 25)  # 50,025 parameters.
  dp = ExampleDP(clip_norm=1.5, noise_multiplier=2.0, expected_batch_size=8.0)
  fn = jit(make_client_update(big, optax.sgd(LR), dp))
  params = big.init(jax.random.key(0))
  x = jnp.zeros((num_steps, 4, 2000), jnp.float32)
  y = jnp.zeros((num_steps, 4), jnp.int32)
  mask = jnp.zeros((num_steps, 4), jnp.float32)
  noise = flat(fn(params, x, y, mask, jax.random.key(1))[0])
  expected_std = (np.sqrt(num_steps) * LR * dp.noise_multiplier * dp.clip_norm
                  / dp.expected_batch_size)
  np.testing.assert_allclose(noise.std(), expected_std, rtol=0.02)
  assert abs(noise.mean()) < 4 * expected_std / np.sqrt(noise.size)
  other = flat(fn(params, x, y, mask, jax.random.key(2))[0])
  assert abs(np.corrcoef(noise, other)[0, 1]) < 4 / np.sqrt(noise.size)


@pytest.mark.parametrize("field,value", [("clip_norm", 0.0), ("noise_multiplier", -1.0),
                                         ("expected_batch_size", 0.0)])
def test_bad_example_dp_fails_naming_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    make_client_update(MLP, optax.sgd(0.1), DP._replace(**{field: value}))


# --- Clipping methods ------------------------------------------------------------------------


def test_bad_clipping_method_fails_naming_the_field():
  with pytest.raises(ValueError, match="example_dp.clipping"):
    make_client_update(MLP, optax.sgd(0.1), DP._replace(clipping="fast"))


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_ghost_and_vmap_give_the_same_noised_step(model_name):
  """Two noised DP-SGD steps (sigma=1, same key) agree between ghost norms and vmap(grad), on
  the MLP and on zoo.cnn (XLA convolutions; patch convolutions, which ghost norms
  materialise, are checked in test_per_example_norms)."""
  dp = DP._replace(noise_multiplier=1.0)
  if model_name == "mlp":
    models, (x, y, mask) = [MLP], make_data(20, num_steps=2, scale=3.0)
  else:
    models = [cnn((6, 6, 1), NUM_CLASSES, (3, 4), 5, conv_impl=impl) for impl in ("xla",)]
    rng = np.random.default_rng(21)
    x = jnp.asarray(rng.normal(size=(2, B, 6, 6, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, (2, B)), jnp.int32)
    mask = make_data(21, num_steps=2)[2]
  for model in models:
    params = jit(model.init)(jax.random.key(3))
    deltas = [jit(make_client_update(model, optax.sgd(LR), dp._replace(clipping=method)))(
        params, x, y, mask, jax.random.key(4))[0] for method in ("ghost", "vmap")]
    assert_trees_close(deltas[0], deltas[1], rtol=1e-5, atol=1e-6)


# --- Batch buckets ---------------------------------------------------------------------------


def test_batch_buckets_give_the_same_noised_steps():
  """Steps whose last real slot falls in each bucket, past every bucket, in a hole-y mask and
  in an empty batch: the bucketed update equals the capacity-sized one (same noise key)."""
  batch = 12
  x, y, _ = make_data(30, num_steps=6, batch=batch, scale=3.0)
  mask = np.zeros((6, batch), np.float32)
  for step, last in enumerate([3, 4, 5, 9, 12]):  # Step 5 keeps an all-zero mask.
    mask[step, :last] = 1.0
  mask[3, 1:7] = 0.0  # Holes: the last real slot (9) picks the bucket, not the count (3).
  dp = DP._replace(noise_multiplier=1.0)
  plain = client_fn("mlp", "sgd", dp)
  bucketed = client_fn("mlp", "sgd", dp._replace(batch_buckets=(4, 8, 12, 20)))
  params = mlp_params(5)
  expected, expected_metrics = plain(params, x, y, jnp.asarray(mask), jax.random.key(6))
  delta, metrics = bucketed(params, x, y, jnp.asarray(mask), jax.random.key(6))
  assert_trees_close(delta, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics.loss_sum, expected_metrics.loss_sum, rtol=1e-5)
  # The bucketed step really branches (buckets 4 and 8, then the capacity 12).
  conds = [str(jax.make_jaxpr(make_client_update(MLP, optax.sgd(LR), example_dp))(
      params, x, y, jnp.asarray(mask), jax.random.key(6))).count("cond[")
           for example_dp in (dp, dp._replace(batch_buckets=(4, 8, 12, 20)))]
  assert conds[1] == conds[0] + 1


@pytest.mark.parametrize("buckets", [(8, 4), (4, 4), (0, 4), [4, 8], (4.0,), (True,)])
def test_bad_batch_buckets_fail_naming_the_field(buckets):
  with pytest.raises(ValueError, match="example_dp.batch_buckets"):
    make_client_update(MLP, optax.sgd(0.1), DP._replace(batch_buckets=buckets))
