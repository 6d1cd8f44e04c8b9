"""Tests for fedjax_priv.data.synthetic: FedProx's Synthetic(alpha, beta) and IID."""

import numpy as np
import pytest

from fedjax_priv.data import fedprox_synthetic, synthetic_clients


def test_same_seed_same_data_and_paper_shapes():
  a = list(synthetic_clients(0.5, 0.5, seed=1))
  b = list(synthetic_clients(0.5, 0.5, seed=1))
  c = list(synthetic_clients(0.5, 0.5, seed=2))
  assert [cid for cid, _, _ in a] == [f"f_{k:05d}" for k in range(30)]
  for (_, xa, ya), (_, xb, yb) in zip(a, b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(a[0][1][:50], c[0][1][:50])
  sizes = np.array([len(y) for _, _, y in a])
  assert sizes.min() >= 50  # floor(LogNormal(4, 2)) + 50.
  for _, x, y in a:
    assert x.shape[1:] == (60,) and x.dtype == np.float32 and y.dtype == np.int32
    assert y.min() >= 0 and y.max() < 10


def test_iid_inputs_follow_the_shared_diagonal_gaussian():
  x = np.concatenate([x for _, x, _ in synthetic_clients(1.0, 1.0, iid=True, seed=0,
                                                        num_clients=200)])
  j = np.arange(1, 61)
  np.testing.assert_allclose(x.mean(0), 0, atol=5 * np.sqrt(j ** -1.2 / len(x)).max())
  np.testing.assert_allclose(x.var(0), j ** -1.2, rtol=0.05)


def test_iid_devices_share_one_model_and_non_iid_devices_do_not():
  """A linear probe fitted on one device predicts the others' labels only under IID."""
  def label_agreement(clients):
    # Least squares on device 0's one-hot labels, scored on the other devices.
    _, x0, y0 = clients[0]
    x0, y0 = x0[:2000], y0[:2000]
    design = np.c_[x0, np.ones(len(x0))]
    coef, *_ = np.linalg.lstsq(design, np.eye(10)[y0], rcond=None)
    rates = [np.mean(np.argmax(np.c_[x, np.ones(len(x))] @ coef, 1) == y)
             for _, x, y in clients[1:]]
    return np.mean(rates)
  # Fit on the largest device.
  iid = sorted(synthetic_clients(0, 0, iid=True, num_clients=8, seed=3), key=lambda c: -len(c[2]))
  skewed = sorted(synthetic_clients(1, 1, num_clients=8, seed=3), key=lambda c: -len(c[2]))
  print(f"probe agreement: iid {label_agreement(iid):.2f}, (1, 1) {label_agreement(skewed):.2f}")
  assert label_agreement(iid) > 0.6
  assert label_agreement(skewed) < label_agreement(iid) - 0.2


def test_beta_moves_device_input_means():
  def spread(beta):
    means = [x.mean() for _, x, _ in synthetic_clients(0, beta, num_clients=60, seed=0)]
    return np.std(means)
  # mean over j of v_k[j] ~ N(B_k, 1/60), B_k ~ N(0, beta^2).
  assert spread(0.0) < 0.3
  assert 3 < spread(5.0) < 8


def test_train_test_split_is_fedproxs_ninety_ten():
  clients = list(synthetic_clients(0, 0, num_clients=5, seed=4))
  train, test = fedprox_synthetic(0, 0, num_clients=5, seed=4)
  assert train.client_ids == test.client_ids == tuple(c for c, _, _ in clients)
  for i, (_, x, y) in enumerate(clients):
    assert len(train.client(i)[1]) == int(0.9 * len(y))
    assert len(train.client(i)[1]) + len(test.client(i)[1]) == len(y)
    pooled = np.concatenate([train.client(i)[0], test.client(i)[0]])
    np.testing.assert_array_equal(np.sort(pooled, axis=0), np.sort(x, axis=0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=-1.0, beta=0.0), "alpha"),
    (dict(alpha=0.0, beta=float("nan")), "beta"),
    (dict(alpha=0.0, beta=0.0, num_clients=0), "num_clients"),
    (dict(alpha=0.0, beta=0.0, seed=-1), "seed"),
])
def test_bad_arguments_fail_when_called(kwargs, match):
  with pytest.raises(ValueError, match=match):
    synthetic_clients(**kwargs)
