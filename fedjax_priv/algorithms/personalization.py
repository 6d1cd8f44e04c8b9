"""Personalisation by local fine-tuning, evaluated per client.

Each evaluation client starts from the global model, takes the S local steps
of its train split (the same local training as a round's, so masked steps are
skipped), and is evaluated on its test split before and after. The clients
are vmapped (in chunks when `client_chunk_size` is set), so one jitted call
evaluates them all. Reported means are uniform over clients, as in the
personalisation literature: each client's accuracy counts once, whatever its
test-set size.

This evaluation releases per-client metrics and is not differentially
private; run it on held-out evaluation clients.

References:
  Wang, Mathews, Kiddon, Eichner, Beaufays and Ramage, "Federated Evaluation
  of On-device Personalization", arXiv:1910.10252, 2019.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_priv.algorithms.client_update import make_local_training
from fedjax_priv.types import ClientBatch
from fedjax_priv.models.model import Model, Params, evaluate


class FinetuneResult(NamedTuple):
  """Per-client test metrics before and after fine-tuning, each [K] float32.

  Attributes:
    loss_before, loss_after: mean test loss (nats per example).
    accuracy_before, accuracy_after: fraction of test examples right.
    counted: 1.0 for a real client with at least one test example; 0.0 for
      padded slots and empty test splits, whose metrics are 0.
  """
  loss_before: jax.Array
  accuracy_before: jax.Array
  loss_after: jax.Array
  accuracy_after: jax.Array
  counted: jax.Array


def make_finetune_evaluation(model: Model, optimizer: optax.GradientTransformation,
                             proximal_mu: float | jax.Array = 0.0,
                             client_chunk_size: int | None = None):
  """Builds `fn(params, train, test_x, test_y, test_mask) -> FinetuneResult`.

  Args:
    model: the model.
    optimizer: the local fine-tuning optimizer (e.g. `optax.sgd(0.1)`).
    proximal_mu: optional FedProx-style pull towards the global model.
    client_chunk_size: None vmaps all clients at once; an int vmaps chunks of
      that many clients and loops over chunks (`jax.lax.map`), bounding memory.

  Args (of the returned function):
    params: the global model.
    train: `ClientBatch` of the clients' train splits, x [K, S, B, ...]; the
      number of fine-tuning steps is S. `num_examples` is not used.
    test_x: [K, T, *input_shape] float32; test_y: [K, T] int32;
    test_mask: [K, T] float32, 1.0 for a real test example.
  """
  if client_chunk_size is not None and not (
      isinstance(client_chunk_size, int) and client_chunk_size >= 1):
    raise ValueError(f"client_chunk_size must be None or an int >= 1, got {client_chunk_size!r}")
  train = make_local_training(model, optimizer, proximal_mu=proximal_mu)

  def test_metrics(params, x, y, mask):
    loss_sum, correct, count = evaluate(model, params, x, y, mask)
    count = jnp.maximum(count, 1.0)
    return loss_sum / count, correct / count

  def one_client(params, inputs):
    x, y, mask, client_mask, test_x, test_y, test_mask = inputs
    # Zeroing the test padding first keeps a NaN in an unused slot out of the sums.
    test_x = jnp.where(test_mask.reshape(test_mask.shape + (1,) * (test_x.ndim - 1)) > 0,
                       test_x, jnp.zeros_like(test_x))
    loss_before, accuracy_before = test_metrics(params, test_x, test_y, test_mask)
    tuned, _ = train(params, x, y, mask)
    loss_after, accuracy_after = test_metrics(tuned, test_x, test_y, test_mask)
    counted = ((client_mask > 0) & (jnp.sum(test_mask) > 0)).astype(jnp.float32)
    metrics = (loss_before, accuracy_before, loss_after, accuracy_after)
    return FinetuneResult(*(jnp.where(counted > 0, m, 0.0) for m in metrics), counted)

  def run(params: Params, train_batch: ClientBatch, test_x, test_y, test_mask) -> FinetuneResult:
    num_clients = train_batch.x.shape[0]
    for name, value in (("test_x", test_x), ("test_y", test_y), ("test_mask", test_mask)):
      if value.shape[0] != num_clients:
        raise ValueError(f"{name} must have {num_clients} clients on axis 0 to match the train "
                         f"batch, got shape {tuple(value.shape)}")
    if tuple(test_y.shape) != tuple(test_mask.shape) or tuple(test_x.shape[:2]) != tuple(
        test_y.shape):
      raise ValueError(f"test_x [K, T, ...], test_y [K, T] and test_mask [K, T] disagree: "
                       f"{tuple(test_x.shape)}, {tuple(test_y.shape)}, {tuple(test_mask.shape)}")
    inputs = (train_batch.x, train_batch.y, train_batch.example_mask, train_batch.client_mask,
              test_x, test_y, test_mask)
    per_client = lambda client: one_client(params, client)
    if client_chunk_size is None:
      return jax.vmap(per_client)(inputs)
    return jax.lax.map(per_client, inputs, batch_size=client_chunk_size)

  return run


def summarize_finetune(result: FinetuneResult) -> dict[str, jax.Array]:
  """Means over the counted clients, and the accuracy gain, as float32 scalars."""
  clients = jnp.sum(result.counted)
  mean = lambda value: jnp.sum(value) / jnp.maximum(clients, 1.0)
  summary = {name: mean(getattr(result, name)) for name in
             ("loss_before", "accuracy_before", "loss_after", "accuracy_after")}
  summary["accuracy_gain"] = summary["accuracy_after"] - summary["accuracy_before"]
  summary["clients"] = clients
  return summary
