"""`data.stream`: training from a store read cohort by cohort equals training from memory."""

import json

import jax
import numpy as np
import pytest

from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv import runner
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data import FederatedDataset, federated_digits
from fedjax_priv.data.prepare import heldout_store_path
from fedjax_priv.data.store import StoreSource, write_store
from fedjax_priv.experiment import build

# User-level DP-FedAvg, Poisson cohorts of expected size 4 out of 9 clients of
# unequal sizes (so cohorts pad slots and examples), noise on.
BASE = [
    "model.name=logistic_regression",
    "client.learning_rate=0.5",
    "client.local_steps=2",
    "client.batch_size=8",
    "simulation.cohort_size=4",
    "simulation.sampling=poisson",
    "simulation.rounds=4",
    "simulation.eval_every=2",
    "simulation.client_chunk_size=3",
    "privacy.unit=user",
    "privacy.noise_multiplier=0.5",
]


# The runs and resumes compile the same programs several times.
pytestmark = pytest.mark.usefixtures("module_compilation_cache")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
  """A 9-client digits store (Dirichlet sizes differ) and its test store, as `data prepare` does."""
  train, x_test, y_test = federated_digits(9, "dirichlet", 0.5, seed=1)
  path = tmp_path_factory.mktemp("store") / "digits.sqlite"
  write_store(path, train, name="digits")
  test = FederatedDataset.from_partition(x_test, y_test, [np.arange(len(y_test))])
  write_store(heldout_store_path(path), test, name="digits", split="test")
  return path, train


def _config(path, *overrides):
  return config_lib.load(None, BASE + ["data.dataset=store", f"data.store={path}"]
                         + list(overrides))


def _run(config, out):
  summary = runner.run(config, out, progress=False)
  exp = build(config)
  template = server_init(exp.model.init(jax.random.key(0)), exp.server_optimizer, exp.aggregator)
  state, _ = ckpt.load_checkpoint(out / "checkpoint.npz", template)
  metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return summary, state, metrics


@pytest.fixture(scope="module")
def in_memory(store, tmp_path_factory):
  config = _config(store[0], "simulation.data_on_device=false")
  return _run(config, tmp_path_factory.mktemp("in_memory"))


@pytest.fixture(scope="module")
def streamed(store, tmp_path_factory):
  config = _config(store[0], "data.stream=true", "simulation.data_on_device=false")
  return _run(config, tmp_path_factory.mktemp("streamed"))


def test_build_streams_the_store_with_its_sizes_and_population(store):
  path, train = store
  exp = build(_config(path, "data.stream=true", "simulation.data_on_device=false"))
  whole = build(_config(path, "simulation.data_on_device=false"))
  assert isinstance(exp.train, StoreSource)
  assert exp.train.num_clients == 9 and exp.config.data.num_clients == 9
  np.testing.assert_array_equal(exp.train.client_sizes, train.client_sizes)
  assert exp.sampler.num_clients == 9
  # The accountant sees the same population: the same event, the same sigma.
  assert repr(exp.privacy.round_event) == repr(whole.privacy.round_event)
  # The label scan of the store finds the same number of classes: the same model.
  shapes = [jax.tree.map(np.shape, e.model.init(jax.random.key(0))) for e in (exp, whole)]
  assert shapes[0] == shapes[1]
  np.testing.assert_array_equal(exp.y_test, whole.y_test)


def test_example_level_batching_uses_the_stored_client_sizes(store):
  path, _ = store
  example = ["privacy.unit=example", "privacy.noise_multiplier=0.8"]
  exp = build(_config(path, "data.stream=true", "simulation.data_on_device=false", *example))
  whole = build(_config(path, "simulation.data_on_device=false", *example))
  assert exp.batching == whole.batching
  assert repr(exp.privacy.round_event) == repr(whole.privacy.round_event)


def test_streamed_training_equals_in_memory_training(in_memory, streamed):
  (want_summary, want_state, want_metrics), (summary, state, metrics) = in_memory, streamed
  moved = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(state.params))
  assert moved > 1e-2  # It trained: equal untouched params would prove nothing.
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for key in ("test_accuracy", "test_loss", "rounds", "num_clients"):
    assert summary[key] == want_summary[key], key
  assert summary["privacy"]["epsilon"] == want_summary["privacy"]["epsilon"]
  assert summary["privacy"]["dp_event"] == want_summary["privacy"]["dp_event"]
  drop = ("wall_time_s", "compile_time_s", "eval_time_s")
  assert ([{k: v for k, v in m.items() if k not in drop} for m in metrics]
          == [{k: v for k, v in m.items() if k not in drop} for m in want_metrics])


@pytest.mark.parametrize("overrides,message", [
    (["data.stream=true"], "simulation.data_on_device = false"),
    (["data.stream=true", "simulation.data_on_device=true"], "data.stream"),
])
def test_streaming_with_the_population_on_device_is_refused(store, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    _config(store[0], *overrides)


def test_streaming_needs_a_store():
  with pytest.raises(config_lib.ConfigError, match="data.stream.*data.dataset = store"):
    config_lib.load(None, ["data.stream=true", "simulation.data_on_device=false"])


def test_missing_store_is_named_before_compiling(tmp_path):
  config = _config(tmp_path / "nope.sqlite", "data.stream=true",
                   "simulation.data_on_device=false")
  with pytest.raises(config_lib.ConfigError, match="data.store.*nope.sqlite does not exist"):
    build(config)
