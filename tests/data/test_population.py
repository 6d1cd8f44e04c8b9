"""Client sources: the generated population, the store read by cohort, packing from either."""

import sqlite3
import tracemalloc

import numpy as np
import pytest

from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.packing import pack_cohort
from fedjax_priv.data.population import ClientSource, GeneratedPopulation
from fedjax_priv.data.store import FederatedStore, write_store


def _as_dataset(source, num_clients):
  pairs = source.clients(np.arange(num_clients))
  return FederatedDataset(
      x=np.concatenate([x for x, _ in pairs]), y=np.concatenate([y for _, y in pairs]),
      offsets=np.concatenate([[0], np.cumsum([len(y) for _, y in pairs])]),
      client_ids=tuple(f"c{i}" for i in range(num_clients)))


def _assert_pairs_equal(got, want):
  assert len(got) == len(want)
  for (gx, gy), (wx, wy) in zip(got, want):
    np.testing.assert_array_equal(gx, wx)
    np.testing.assert_array_equal(gy, wy)


# --------------------------------------------------------------------------
# GeneratedPopulation


def test_generated_clients_are_deterministic_and_independent_of_the_population_size():
  small = GeneratedPopulation(40, seed=3, dimension=7, num_classes=4)
  large = GeneratedPopulation(5000, seed=3, dimension=7, num_classes=4)
  np.testing.assert_array_equal(large.client_sizes[:40], small.client_sizes)
  for i in (0, 17, 39):
    _assert_pairs_equal([large.client(i)], [small.client(i)])
    # Asking again, or asking among others, gives the same client.
    _assert_pairs_equal([small.client(i)], [GeneratedPopulation(40, seed=3, dimension=7,
                                                                num_classes=4).client(i)])
  _assert_pairs_equal(large.clients([39, 0, 17]), [small.client(39), small.client(0),
                                                   small.client(17)])
  other = GeneratedPopulation(40, seed=4, dimension=7, num_classes=4)
  assert not np.array_equal(other.client(0)[0][:1], small.client(0)[0][:1])


def test_generated_clients_have_the_stated_layout():
  pop = GeneratedPopulation(300, seed=1, dimension=5, num_classes=3, min_examples=4,
                            max_examples=20)
  assert isinstance(pop, ClientSource)
  sizes = pop.client_sizes
  assert sizes.dtype == np.int64 and sizes.shape == (300,)
  assert sizes.min() >= 4 and sizes.max() == 20  # The log-normal tail reaches the cap.
  assert len(np.unique(sizes)) > 5
  labels = []
  for i in range(0, 300, 30):
    x, y = pop.client(i)
    assert x.dtype == np.float32 and x.shape == (sizes[i], 5)
    assert y.dtype == np.int32 and y.shape == (sizes[i],)
    labels.append(y)
  labels = np.concatenate(labels)
  assert labels.min() >= 0 and labels.max() < 3 and len(np.unique(labels)) == 3
  with pytest.raises(ValueError):
    sizes[0] = 1  # Read-only: a caller cannot change the population.


def test_generated_heterogeneity_follows_alpha_and_beta():
  """With alpha = beta = 0 clients share input means; with beta large they differ."""
  def mean_spread(beta):
    pop = GeneratedPopulation(60, seed=0, alpha=0.0, beta=beta, dimension=4)
    return np.std([pop.client(i)[0].mean(axis=0)[0] for i in range(60)])
  assert mean_spread(5.0) > 3 * mean_spread(0.0)


def test_iid_clients_share_one_labelling_model():
  """Synthetic-IID: one linear model labels every client; non-IID clients disagree."""
  from sklearn.linear_model import LogisticRegression

  def pooled_fit(**kwargs):
    pop = GeneratedPopulation(30, seed=0, dimension=5, num_classes=3, **kwargs)
    x, y = (np.concatenate(parts) for parts in zip(*pop.clients(range(30))))
    return LogisticRegression(C=100.0, max_iter=2000).fit(x, y).score(x, y)
  assert pooled_fit(iid=True) > 0.95
  assert pooled_fit(alpha=1.0, beta=1.0) < 0.85


@pytest.mark.parametrize("kwargs,field", [
    ({"num_clients": 0}, "num_clients"),
    ({"num_clients": 5, "seed": -1}, "seed"),
    ({"num_clients": 5, "alpha": -1.0}, "alpha"),
    ({"num_clients": 5, "beta": float("nan")}, "beta"),
    ({"num_clients": 5, "dimension": 0}, "dimension"),
    ({"num_clients": 5, "min_examples": 8, "max_examples": 4}, "max_examples"),
])
def test_generated_population_rejects_bad_arguments(kwargs, field):
  with pytest.raises(ValueError, match=field):
    GeneratedPopulation(**kwargs)


@pytest.mark.parametrize("i", [-1, 5, 1.0, True])
def test_generated_client_index_is_checked(i):
  with pytest.raises(ValueError, match="i must"):
    GeneratedPopulation(5).client(i)


def test_a_million_generated_clients_cost_only_their_sizes():
  """The O(N) state is the int64 size array; packing a cohort allocates the cohort's arrays."""
  tracemalloc.start()
  try:
    pop = GeneratedPopulation(10**6, seed=0, dimension=20)
    built, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    rng = np.random.default_rng(0)
    indices = rng.choice(10**6, 64, replace=False)
    cohort = pack_cohort(pop, indices, np.ones(64))
    _, packing_peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert pop.client_sizes.nbytes == 8 * 10**6
  assert built < 9 * 10**6  # Sizes plus the sampling draw's transient, nothing per client.
  # The packed cohort is 64 x 64 x 20 float32 (330 kB). Drawing it holds a few copies of its
  # ~1,500 examples and, for non-IID clients, each example's client model (20 x 10 float64,
  # 1.6 kB): a few MB however large the population.
  assert cohort.x.shape == (64, 64, 20)
  assert packing_peak - built < 8 * 10**6


# --------------------------------------------------------------------------
# The store, read one cohort at a time


@pytest.fixture(scope="module", params=["none", "zlib"])
def stored(request, tmp_path_factory):
  pop = GeneratedPopulation(30, seed=2, dimension=6, num_classes=5, min_examples=1,
                            max_examples=12)
  dataset = _as_dataset(pop, 30)
  path = tmp_path_factory.mktemp("store") / f"pop_{request.param}.sqlite"
  write_store(path, dataset, name="generated", compression=request.param)
  store = FederatedStore(path)
  yield store, dataset
  store.close()


def test_clients_of_the_store_equal_client_by_client(stored):
  store, _ = stored
  positions = np.array([7, 0, 29, 7, 13])  # Any order, repeats allowed.
  got = store.clients(positions)
  want = [store.client(int(i)) for i in positions]
  assert [cid for cid, _, _ in got] == [cid for cid, _, _ in want]
  _assert_pairs_equal([(x, y) for _, x, y in got], [(x, y) for _, x, y in want])
  assert store.clients(np.zeros(0, np.int64)) == []


def test_a_cohort_is_one_query(stored):
  store, _ = stored
  source = store.source()
  statements = []
  store._db.set_trace_callback(statements.append)
  try:
    source.clients(np.arange(0, 30, 2))
  finally:
    store._db.set_trace_callback(None)
  assert len(statements) == 1 and "json_each" in statements[0]


def test_store_source_is_a_client_source(stored):
  store, dataset = stored
  source = store.source()
  assert isinstance(source, ClientSource)
  assert source.num_clients == 30 and source.feature_shape == (6,)
  assert source.x_dtype == np.float32
  np.testing.assert_array_equal(source.client_sizes, dataset.client_sizes)
  _assert_pairs_equal([source.client(4)], [dataset.client(4)])
  assert source.max_label() == dataset.y.max()


@pytest.mark.parametrize("positions,error,match", [
    ([0, 30], IndexError, r"\[0, 30\)"),
    ([-1], IndexError, r"\[0, 30\)"),
    ([[0, 1]], ValueError, "1-D"),
    ([0.5], ValueError, "integers"),
])
def test_store_clients_rejects_bad_positions(stored, positions, error, match):
  store, _ = stored
  with pytest.raises(error, match=match):
    store.clients(np.array(positions))


# --------------------------------------------------------------------------
# pack_cohort from a source equals pack_cohort from memory


def test_packing_a_source_equals_packing_the_dataset(stored):
  store, dataset = stored
  indices = np.array([3, -1, 28, 0, 11, -1])
  mask = np.array([1, 0, 1, 1, 1, 0])
  for max_examples in (None, 32):
    want = pack_cohort(dataset, indices, mask, max_examples)
    got = pack_cohort(store.source(), indices, mask, max_examples)
    for g, w in zip(got, want):
      assert g.dtype == w.dtype
      np.testing.assert_array_equal(g, w)
  empty = pack_cohort(store.source(), np.array([-1, -1]), np.zeros(2))
  assert empty.x.shape == (2, 8, 6) and not empty.x.any() and not empty.client_mask.any()


def test_packing_the_generated_population_equals_packing_it_in_memory():
  pop = GeneratedPopulation(25, seed=9, dimension=3, min_examples=2, max_examples=9)
  indices, mask = np.array([24, 3, 0, -1]), np.array([1, 1, 1, 0])
  for g, w in zip(pack_cohort(pop, indices, mask), pack_cohort(_as_dataset(pop, 25), indices,
                                                               mask)):
    np.testing.assert_array_equal(g, w)


class _LyingSource(GeneratedPopulation):
  """Claims one more example for client 1 than it returns (a corrupt source)."""

  @property
  def client_sizes(self):
    sizes = super().client_sizes.copy()
    sizes[1] += 1
    return sizes


def test_packing_refuses_a_source_whose_clients_disagree_with_its_sizes():
  source = _LyingSource(4, dimension=2)
  with pytest.raises(ValueError, match="client 1 of the source returned"):
    pack_cohort(source, np.array([0, 1]), np.ones(2))
  with pytest.raises(ValueError, match=r"client #1 has \d+ examples, more than max_examples=2"):
    pack_cohort(source, np.array([-1, 1]), np.array([0, 1]), max_examples=2)


def test_missing_store_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.sqlite"):
    FederatedStore(tmp_path / "nope.sqlite").source()


def test_store_source_reads_a_written_store_without_loading_it(tmp_path):
  """Clients come from disk on request: once the store is closed the source cannot answer."""
  pop = GeneratedPopulation(12, seed=5, dimension=4)
  path = write_store(tmp_path / "s.sqlite", _as_dataset(pop, 12), name="generated")
  with FederatedStore(path) as store:
    source = store.source()
    _assert_pairs_equal(source.clients([11, 2]), pop.clients([11, 2]))
  with pytest.raises(sqlite3.ProgrammingError):
    source.clients([0])  # Closed with its store: nothing was kept in memory.
