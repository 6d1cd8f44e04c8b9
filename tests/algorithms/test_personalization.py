"""Tests for local fine-tuning evaluation on a task where each client relabels the classes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv.algorithms.personalization import make_finetune_evaluation, summarize_finetune
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

C = 3
LOGREG = logistic_regression((C,), C)
K, S, B, T = 5, 8, 6, 12  # Slot 3 is padding; client 4 has an empty test split.


def client_data(rng, permutation, n):
  """Well-separated clusters whose labels this client permutes: a global model cannot fit all."""
  cluster = rng.integers(0, C, n)
  x = 4.0 * np.eye(C)[cluster] + 0.3 * rng.normal(size=(n, C))
  return x.astype(np.float32), permutation[cluster]


@pytest.fixture(scope="module")
def task():
  rng = np.random.default_rng(0)
  perms = [np.roll(np.arange(C), k) for k in range(K)]
  train = [client_data(rng, perms[k], S * B) for k in range(K)]
  test = [client_data(rng, perms[k], T) for k in range(K)]
  train_batch = ClientBatch(
      jnp.asarray(np.stack([x for x, _ in train]).reshape(K, S, B, C)),
      jnp.asarray(np.stack([y for _, y in train]).reshape(K, S, B), jnp.int32),
      jnp.ones((K, S, B), jnp.float32), jnp.full((K,), S * B, jnp.int32),
      jnp.asarray([1, 1, 1, 0, 1], jnp.float32))
  test_mask = np.ones((K, T), np.float32)
  test_mask[1, T // 2:] = 0.0
  test_mask[4] = 0.0
  test_x = np.stack([x for x, _ in test])
  test_x[1, -1] = np.nan  # Unused test slot: must not reach the metrics.
  test_arrays = (jnp.asarray(test_x), jnp.asarray(np.stack([y for _, y in test]), jnp.int32),
                 jnp.asarray(test_mask))
  params = jax.tree.map(jnp.zeros_like, LOGREG.init(jax.random.key(0)))
  return params, train_batch, test_arrays


@pytest.fixture(scope="module")
def results(task):
  params, train_batch, test_arrays = task
  return {chunk: jit(make_finetune_evaluation(LOGREG, optax.sgd(1.0), client_chunk_size=chunk))(
      params, train_batch, *test_arrays) for chunk in (None, 2)}


def test_fine_tuning_helps_on_client_specific_labels(results):
  summary = summarize_finetune(results[None])
  assert float(summary["clients"]) == 3.0  # Padding and the empty test split are not counted.
  assert float(summary["accuracy_before"]) < 0.6
  assert float(summary["accuracy_after"]) > 0.9
  assert float(summary["loss_after"]) < float(summary["loss_before"])
  assert float(summary["accuracy_gain"]) > 0.3


def test_before_metrics_match_a_hand_evaluation(task, results):
  params, _, (test_x, test_y, test_mask) = task
  result = results[None]
  # Zero params: uniform logits, loss log C, argmax predicts class 0.
  for k in (0, 1, 2):
    mask = np.asarray(test_mask[k])
    want = np.sum((np.asarray(test_y[k]) == 0) * mask) / mask.sum()
    np.testing.assert_allclose(float(result.accuracy_before[k]), want, rtol=1e-6)
    np.testing.assert_allclose(float(result.loss_before[k]), np.log(C), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(result.counted), [1, 1, 1, 0, 0])
  assert np.all(np.isfinite(np.asarray(result.loss_after)))


def test_chunked_and_per_client_runs_agree_with_the_vmapped_one(task, results):
  params, train_batch, test_arrays = task
  one = jit(make_finetune_evaluation(LOGREG, optax.sgd(1.0)))
  for k in range(K):
    alone = one(params, jax.tree.map(lambda a: a[k:k + 1], train_batch),
                *(a[k:k + 1] for a in test_arrays))
    for got_alone, got_vmap, got_chunked in zip(alone, results[None], results[2]):
      np.testing.assert_allclose(np.asarray(got_alone)[0], np.asarray(got_vmap)[k], rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_allclose(np.asarray(got_chunked)[k], np.asarray(got_vmap)[k], rtol=1e-5,
                                 atol=1e-6)


def test_mismatched_test_split_is_refused(task):
  params, train_batch, (test_x, test_y, test_mask) = task
  evaluate = make_finetune_evaluation(LOGREG, optax.sgd(1.0))
  with pytest.raises(ValueError, match="test_y"):
    evaluate(params, train_batch, test_x, test_y[:3], test_mask)
  with pytest.raises(ValueError, match="client_chunk_size"):
    make_finetune_evaluation(LOGREG, optax.sgd(1.0), client_chunk_size=0)
