"""The scikit-learn 8x8 handwritten digits, split and partitioned into clients.

The data ships inside the scikit-learn wheel (1797 images, 10 classes), so it
loads without network access; that makes it the smallest real image task for
tests, examples and quick sweeps.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.partition import dirichlet_label_partition, iid_partition

# Pixel intensities in the scikit-learn digits are integers in [0, 16].
_MAX_PIXEL = 16.0
_PARTITIONS = ("dirichlet", "iid")


class Split(NamedTuple):
  """A train/test split of an image classification dataset.

  Attributes:
    x_train: Training images ``[n_train, 8, 8, 1]`` float32 in ``[0, 1]``.
    y_train: Training labels ``[n_train]`` int32 in ``[0, 10)``.
    x_test: Test images ``[n_test, 8, 8, 1]`` float32 in ``[0, 1]``.
    y_test: Test labels ``[n_test]`` int32 in ``[0, 10)``.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def _check_test_fraction(test_fraction) -> float:
  if (
      not isinstance(test_fraction, numbers.Real)
      or isinstance(test_fraction, bool)
      or not 0 < test_fraction < 1
  ):
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  return float(test_fraction)


def _check_seed(seed) -> int:
  if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  return int(seed)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
  """Loads the digits as images with a fixed stratified train/test split.

  Args:
    test_fraction: Fraction of examples in the test set, in ``(0, 1)``;
      the test size is rounded up (360 of 1797 at the default 0.2).
    seed: Non-negative seed of the split; the same seed gives the same split.

  Returns:
    A ``Split``; images are float32 ``[n, 8, 8, 1]`` scaled to ``[0, 1]``
    (pixel / 16), labels int32. With the defaults, 1437 train and 360 test
    examples, every class in the same proportion in both.

  Raises:
    ValueError: If ``test_fraction`` or ``seed`` is out of range.
  """
  test_fraction = _check_test_fraction(test_fraction)
  seed = _check_seed(seed)
  # Imported here so that `import fedjax_priv.data` does not pay for sklearn.
  import sklearn.datasets
  import sklearn.model_selection

  digits = sklearn.datasets.load_digits()
  x = (digits.images / _MAX_PIXEL).astype(np.float32)[..., np.newaxis]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
      x, y, test_size=test_fraction, stratify=y, random_state=seed
  )
  return Split(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def federated_digits(
    num_clients: int,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> tuple[FederatedDataset, np.ndarray, np.ndarray]:
  """Splits the digits' training set into clients; keeps the test set pooled.

  Args:
    num_clients: Number of clients, between 1 and the training-set size.
    partition: ``"dirichlet"`` (label skew, see
      ``dirichlet_label_partition``) or ``"iid"``.
    alpha: Dirichlet concentration (smaller is more skewed); ignored by
      ``"iid"``.
    seed: Non-negative seed of both the train/test split and the partition
      (``np.random.default_rng(seed)``).
    test_fraction: Fraction of examples held out for testing.

  Returns:
    ``(train, x_test, y_test)``: the training clients as a
    ``FederatedDataset`` with ``x`` of shape ``[n_train, 8, 8, 1]``, and the
    test images ``[n_test, 8, 8, 1]`` float32 and labels ``[n_test]`` int32.

  Raises:
    ValueError: If ``partition`` is unknown or another argument is out of
      range.
  """
  if partition not in _PARTITIONS:
    raise ValueError(f"partition must be one of {_PARTITIONS}, got {partition!r}")
  split = load_digits(test_fraction=test_fraction, seed=seed)
  rng = np.random.default_rng(seed)
  if partition == "dirichlet":
    parts = dirichlet_label_partition(split.y_train, num_clients, alpha, rng)
  else:
    parts = iid_partition(len(split.y_train), num_clients, rng)
  train = FederatedDataset.from_partition(split.x_train, split.y_train, parts)
  return train, split.x_test, split.y_test
