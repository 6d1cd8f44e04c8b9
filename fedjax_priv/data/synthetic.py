"""FedProx's Synthetic(alpha, beta) and Synthetic-IID federated datasets.

Device ``k`` holds a softmax-regression task ``y = argmax(W_k x + b_k)``,
``x in R^60``, 10 classes. ``alpha`` controls how much the models differ
between devices, ``beta`` how much their inputs do:

- ``u_k ~ N(0, alpha^2)``, ``W_k[i, j] ~ N(u_k, 1)``, ``b_k[j] ~ N(u_k, 1)``;
- ``B_k ~ N(0, beta^2)``, ``v_k[j] ~ N(B_k, 1)``, ``x ~ N(v_k, Sigma)`` with
  ``Sigma`` diagonal, ``Sigma_jj = j^-1.2`` (``j`` from 1).

The paper writes ``N(0, alpha)``; its generator passes ``alpha`` and ``beta``
to ``np.random.normal`` as standard deviations, which is what is done here.
Synthetic-IID uses one ``W, b ~ N(0, 1)`` for every device and ``v_k = 0``.
Device ``k`` has ``floor(LogNormal(4, 2)) + 50`` examples (a heavy-tailed,
power-law-like spread), as in the generator, and each device's examples are
shuffled and split 90% / 10% into train and test (``int(0.9 n)`` train).

Everything is drawn from ``np.random.default_rng(seed)`` in a fixed order, so
a seed fixes the dataset; the numbers differ from the FedProx files, which
used the unseeded global numpy generator.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in
  Heterogeneous Networks", MLSys 2020, Section 5.1 and Appendix C.1; the
  generators ``data/synthetic_*/generate_synthetic.py`` and
  ``data/synthetic_iid/generate_iid.py`` of the FedProx repository.
  Shamir, Srebro & Zhang, "Communication-efficient distributed optimization
  using an approximate Newton-type method", ICML 2014 (the original setup).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np

from fedjax_priv.checks import check_non_negative
from fedjax_priv.data.federated import FederatedDataset

DIMENSION = 60
NUM_CLASSES = 10
NUM_CLIENTS = 30
TRAIN_FRACTION = 0.9


def _check_positive_int(value, name: str) -> int:
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


def synthetic_clients(
    alpha: float,
    beta: float,
    iid: bool = False,
    num_clients: int = NUM_CLIENTS,
    seed: int = 0,
    dimension: int = DIMENSION,
    num_classes: int = NUM_CLASSES,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Generates devices one at a time (memory bounded by one device).

  Args:
    alpha: Model heterogeneity, >= 0 (ignored when ``iid``).
    beta: Input heterogeneity, >= 0 (ignored when ``iid``).
    iid: Synthetic-IID instead of Synthetic(alpha, beta).
    num_clients: Number of devices (30 in the paper).
    seed: Non-negative seed.
    dimension: Input dimension (60 in the paper).
    num_classes: Number of classes (10 in the paper).

  Yields:
    ``(client_id, x, y)``: ids ``f_00000, f_00001, ...`` as in the FedProx
    files, float32 inputs ``[n_k, dimension]``, int32 labels ``[n_k]``, all
    examples of the device before the train/test split, in draw order.

  Raises:
    ValueError: If an argument is out of range.
  """
  alpha = check_non_negative("alpha", alpha)
  beta = check_non_negative("beta", beta)
  num_clients = _check_positive_int(num_clients, "num_clients")
  dimension = _check_positive_int(dimension, "dimension")
  num_classes = _check_positive_int(num_classes, "num_classes")
  if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  # Arguments are checked above, when called; devices are drawn lazily below.
  return _generate(alpha, beta, iid, num_clients, int(seed), dimension, num_classes)


def _generate(alpha, beta, iid, num_clients, seed, dimension, num_classes):
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  model_means = rng.normal(0, alpha, num_clients)
  input_means = rng.normal(0, beta, num_clients)
  std_x = np.arange(1, dimension + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
  if iid:
    shared_w = rng.normal(0, 1, (dimension, num_classes))
    shared_b = rng.normal(0, 1, num_classes)
  for k in range(num_clients):
    if iid:
      w, b, v = shared_w, shared_b, np.zeros(dimension)
    else:
      v = rng.normal(input_means[k], 1, dimension)
      w = rng.normal(model_means[k], 1, (dimension, num_classes))
      b = rng.normal(model_means[k], 1, num_classes)
    x = v + rng.standard_normal((sizes[k], dimension)) * std_x
    # argmax of softmax(z) is argmax of z.
    y = np.argmax(x @ w + b, axis=1).astype(np.int32)
    yield f"f_{k:05d}", x.astype(np.float32), y


def split_client(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator, train_fraction: float = TRAIN_FRACTION
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """Shuffles one device's examples and splits them as FedProx does.

  Returns:
    ``((x_train, y_train), (x_test, y_test))`` with ``int(train_fraction * n)``
    training examples.
  """
  order = rng.permutation(len(y))
  cut = int(train_fraction * len(y))
  return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def fedprox_synthetic(
    alpha: float,
    beta: float,
    iid: bool = False,
    num_clients: int = NUM_CLIENTS,
    seed: int = 0,
) -> tuple[FederatedDataset, FederatedDataset]:
  """Synthetic(alpha, beta) (or Synthetic-IID) split into train and test.

  Args:
    alpha: Model heterogeneity, >= 0; the paper uses 0, 0.5 and 1.
    beta: Input heterogeneity, >= 0; the paper uses 0, 0.5 and 1.
    iid: Synthetic-IID.
    num_clients: Number of devices.
    seed: Non-negative seed of the data and of the split.

  Returns:
    ``(train, test)`` with the same client ids; inputs float32 ``[n, 60]``,
    labels int32 in ``[0, 10)``.
  """
  clients = synthetic_clients(alpha, beta, iid, num_clients, seed)
  split_rng = np.random.default_rng([seed, 1])
  parts: tuple[list, list] = ([], [])
  ids = []
  for client_id, x, y in clients:
    ids.append(client_id)
    for part, xy in zip(parts, split_client(x, y, split_rng)):
      part.append(xy)
  return tuple(_concat(part, ids) for part in parts)


def _concat(pairs: list[tuple[np.ndarray, np.ndarray]], ids: list[str]) -> FederatedDataset:
  sizes = [len(y) for _, y in pairs]
  return FederatedDataset(
      x=np.concatenate([x for x, _ in pairs]),
      y=np.concatenate([y for _, y in pairs]),
      offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
      client_ids=tuple(ids),
  )
