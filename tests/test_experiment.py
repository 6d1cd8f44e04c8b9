"""What `experiment.build` wires from the config: stores, FedProx, stragglers, server adaptivity."""

import shutil
import sqlite3

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv import config as config_lib
from fedjax_priv import runner
from fedjax_priv import tree as tree_util
from fedjax_priv.data import FederatedDataset, federated_digits
from fedjax_priv.data.prepare import heldout_store_path
from fedjax_priv.data.store import write_store
from fedjax_priv.experiment import _checked_test_set, build, make_optimizer

TINY = ["model.name=logistic_regression", "client.local_steps=3", "client.batch_size=8",
        "simulation.rounds=2", "simulation.eval_every=2", "simulation.backend=vmap"]


def _config(*overrides):
  return config_lib.load(None, TINY + list(overrides))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A 7-client digits store and its test store, as `fedjax-priv data prepare` lays them out."""
  train, x_test, y_test = federated_digits(7, "iid", seed=3)
  path = tmp_path_factory.mktemp("store") / "digits.sqlite"
  write_store(path, train, name="digits")
  test = FederatedDataset.from_partition(x_test, y_test, [np.arange(len(y_test))])
  write_store(heldout_store_path(path), test, name="digits", split="test")
  return path, train, x_test, y_test


def test_store_dataset_trains_on_the_store(store, tmp_path):
  path, train, x_test, y_test = store
  config = _config("data.dataset=store", f"data.store={path}", "simulation.cohort_size=3")
  exp = build(config)
  assert exp.train.num_clients == 7 and exp.config.data.num_clients == 7
  np.testing.assert_array_equal(exp.train.client_sizes, train.client_sizes)
  np.testing.assert_array_equal(exp.y_test, y_test)
  summary = runner.run(config, tmp_path, progress=False)
  assert summary["num_clients"] == 7 and summary["rounds"] == 2


@pytest.mark.parametrize("overrides,message", [
    (["data.dataset=store"], "data.store"),
    (["data.store=/tmp/x.sqlite"], "data.store"),
])
def test_store_settings_must_agree(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    _config(*overrides)


def test_missing_store_is_named(tmp_path):
  config = _config("data.dataset=store", f"data.store={tmp_path / 'nope.sqlite'}")
  with pytest.raises(config_lib.ConfigError, match="data.store.*does not exist"):
    build(config)


def test_store_smaller_than_the_cohort_is_refused(store):
  # data.num_clients (default 10) is not the store's size: the config parses,
  # and build refuses with the store's 7 clients.
  path = store[0]
  config = _config("data.dataset=store", f"data.store={path}", "simulation.cohort_size=12")
  with pytest.raises(config_lib.ConfigError, match=r"cohort_size \(12\) must be <= "
                     r"data.num_clients \(7\)"):
    build(config)
  with pytest.raises(config_lib.ConfigError, match="cohort_size"):  # Digits: known at once.
    _config("simulation.cohort_size=12")


def test_store_population_checks_wait_for_the_store_size(store):
  # fixed_as_poisson needs cohorts smaller than the population: a cohort of 3 of the
  # store's 7 clients is, a cohort of all 7 is not, which only the store's size tells.
  path = store[0]
  settings = ("data.dataset=store", f"data.store={path}", "simulation.sampling=fixed",
              "privacy.unit=user", "privacy.fixed_as_poisson=true")
  with pytest.warns(UserWarning, match="approximation"):
    assert build(_config(*settings, "simulation.cohort_size=3")).train.num_clients == 7
  with pytest.raises(config_lib.ConfigError, match="fixed_as_poisson applies"):
    build(_config(*settings, "simulation.cohort_size=7"))


def test_proximal_mu_pulls_local_training_towards_the_server_model():
  """client.proximal_mu is FedProx's mu: larger mu, smaller local drift."""
  drifts = []
  for mu in (0.0, 0.5, 1.5):  # lr * mu < 1 keeps the proximal step a contraction.
    exp = build(_config(f"client.proximal_mu={mu}", "client.learning_rate=0.5"))
    params = exp.model.init(jax.random.key(0))
    n, b = exp.batching.num_steps, exp.batching.batch_size
    x = jnp.asarray(exp.train.x[: n * b].reshape(n, b, *exp.train.feature_shape))
    y = jnp.asarray(exp.train.y[: n * b].reshape(n, b))
    delta, _ = exp.client_update(params, x, y, jnp.ones((n, b)), jax.random.key(1))
    drifts.append(float(tree_util.l2_norm(delta)))
  assert drifts[0] > drifts[1] > drifts[2] and drifts[2] < 0.85 * drifts[0]


def test_stragglers_are_drawn_every_round(tmp_path):
  config = _config("simulation.straggler_fraction=0.5", "simulation.straggler_policy=partial",
                   "simulation.cohort_size=4")
  summary = runner.run(config, tmp_path, progress=False)
  metrics = (tmp_path / "metrics.jsonl").read_text()
  assert summary["rounds"] == 2 and '"stragglers": 2.0' in metrics


def test_bad_straggler_fraction_is_named():
  with pytest.raises(config_lib.ConfigError, match="straggler_fraction"):
    _config("simulation.straggler_fraction=1.0")


def test_server_adaptivity_is_the_epsilon_of_adaptive_optimizers():
  """FedAdam's first step is -lr * g / (|g| + tau): tau = server.adaptivity (Reddi et al. 2021)."""
  g = {"w": jnp.full((3,), 1e-3)}
  for name in ("adam", "yogi", "adagrad"):
    small, large = (make_optimizer(name, 1.0, tau) for tau in (1e-8, 1e-1))
    step_small = small.update(g, small.init(g))[0]["w"]
    step_large = large.update(g, large.init(g))[0]["w"]
    assert float(jnp.abs(step_large[0])) < 0.9 * float(jnp.abs(step_small[0])), name
  exp = build(_config("server.optimizer=adam", "server.adaptivity=0.25"))
  state = exp.server_optimizer.init(g)
  step = exp.server_optimizer.update(g, state)[0]["w"]
  np.testing.assert_allclose(step, -1e-3 / (1e-3 + 0.25), rtol=1e-4)


def test_every_zoo_image_model_is_reachable_from_the_config():
  """model.name = tanh_cnn builds the zoo's model (refused on 8x8 digits with a named reason)."""
  from fedjax_priv import config as config_lib
  from fedjax_priv.experiment import build
  config = config_lib.load(None, ["model.name=tanh_cnn", "simulation.rounds=1"])
  assert config.model.name == "tanh_cnn"
  with pytest.raises(ValueError, match="tanh_cnn: input_shape"):
    build(config)


def test_a_store_sizes_the_model_by_its_recorded_class_count(tmp_path):
  """Labels 0..9 in a store that records 12 classes build a 12-class model."""
  train, x_test, y_test = federated_digits(4, "iid", seed=0)
  path = tmp_path / "digits.sqlite"
  write_store(path, train, name="digits", num_classes=12)
  test = FederatedDataset.from_partition(x_test, y_test, [np.arange(len(y_test))])
  write_store(heldout_store_path(path), test, name="digits", split="test", num_classes=12)
  exp = build(_config("data.dataset=store", f"data.store={path}", "simulation.cohort_size=2"))
  params = exp.model.init(jax.random.key(0))
  assert {leaf.shape[-1] for leaf in jax.tree.leaves(params)} == {12}


def test_nan_in_the_test_store_is_refused_naming_it(store, tmp_path):
  path = tmp_path / "digits.sqlite"
  shutil.copy(store[0], path)
  shutil.copy(heldout_store_path(store[0]), heldout_store_path(path))
  with sqlite3.connect(heldout_store_path(path)) as db:
    x = np.frombuffer(db.execute("SELECT x FROM clients").fetchone()[0], np.float32).copy()
    x[5] = np.nan
    db.execute("UPDATE clients SET x = ?", (x.tobytes(),))
  db.close()
  with pytest.raises(ValueError, match=r"test\.sqlite.*x holds 1 non-finite"):
    build(_config("data.dataset=store", f"data.store={path}", "simulation.cohort_size=3"))


def test_nan_or_bad_labels_in_assembled_test_data_are_refused():
  x = np.zeros((3, 2), np.float32)
  x[1, 0] = np.inf
  with pytest.raises(ValueError, match="NaN or inf in 1 examples"):
    _checked_test_set(x, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="labels must be integers >= 0"):
    _checked_test_set(np.zeros((3, 2)), np.array([0, -1, 2]))
  with pytest.raises(ValueError, match=r"y \[n\]"):
    _checked_test_set(np.zeros((3, 2)), np.zeros(2, np.int32))
