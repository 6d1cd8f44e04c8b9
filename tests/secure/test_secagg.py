"""Tests for fedjax_priv.secure.secagg and the secure_sum aggregator.

Compiles are shared: each protocol configuration is jitted once for a fixed
number of slots, and cohorts of different sizes are real clients in a prefix
of the slots (cohort_mask), with dropouts passed as data.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.secure import quantization as quant
from fedjax_priv.secure import secagg
from fedjax_priv.secure.aggregators import SecureSumFailed, check_threshold, secure_sum
from fedjax_priv.simulation.round import build_round

jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def protocol(num_slots, dim, bits, degree, kind="hash", threshold=None):
  return _protocol(num_slots, dim, bits, degree, kind, threshold)  # One cache key per config.


@functools.cache
def _protocol(num_slots, dim, bits, degree, kind, threshold):
  """Jitted (inputs, cohort_mask, included, round_key) -> (unmasked, ok, plain sum, masked)."""

  def run(x, cohort_mask, included, round_key):
    graph = secagg.masking_graph(cohort_mask, round_key, degree)
    secrets = secagg.client_secrets(round_key, num_slots)
    masked = jax.vmap(lambda xi, i: secagg.mask_client(xi, i, graph, secrets, round_key, bits,
                                                       kind))(x, jnp.arange(num_slots))
    total = quant.modular_sum(included, masked, bits)
    # The aggregator's form: self masks per client, each pair's stream once.
    self_masked = jax.vmap(lambda xi, i: secagg.self_mask_client(xi, i, secrets, round_key, bits,
                                                                 kind))(x, jnp.arange(num_slots))
    alive = (cohort_mask > 0) & (included > 0)
    edgewise = secagg.add_pair_masks(quant.modular_sum(included, self_masked, bits), alive, graph,
                                     secrets, round_key, bits, kind, chunk=5)
    if threshold == "round majority":  # The default: set per round, traced.
      t = None
    else:
      t = secagg.default_threshold(graph) if threshold is None else threshold
    plain, ok, stats = secagg.unmask(total, graph, secrets, round_key, cohort_mask, included,
                                     bits, t, degree is None, kind)
    return plain, ok, quant.modular_sum(included, x, bits), masked, stats, (total, edgewise)

  return jit(run)


def cohort(num_slots, num_real, num_dropped, dim, bits, seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 2**bits, (num_slots, dim), dtype=np.uint64).astype(np.uint32)
  cohort_mask = (np.arange(num_slots) < num_real).astype(np.float32)
  included = cohort_mask.copy()
  included[rng.choice(num_real, num_dropped, replace=False)] = 0.0
  return jnp.asarray(x), jnp.asarray(cohort_mask), jnp.asarray(included)


def check_sum(num_slots, num_real, num_dropped, dim, bits, degree, kind="hash", seed=0,
              threshold=None):
  x, cohort_mask, included = cohort(num_slots, num_real, num_dropped, dim, bits, seed)
  plain, ok, expected, masked, stats, (total, edgewise) = protocol(
      num_slots, dim, bits, degree, kind, threshold)(x, cohort_mask, included,
                                                     jax.random.key(seed))
  assert bool(ok)
  np.testing.assert_array_equal(plain, expected)
  np.testing.assert_array_equal(edgewise, total)
  assert float(stats["secagg_survivors"]) == num_real - num_dropped
  assert float(stats["secagg_dropouts"]) == num_dropped
  if num_real - num_dropped >= 2:  # The masks hide the inputs.
    live = np.flatnonzero(np.asarray(included))
    assert np.mean(np.asarray(masked)[live] == np.asarray(x)[live]) < 0.1
  return masked


# --- Masks cancel -------------------------------------------------------------------

# SecAgg (complete graph) on 64 slots, t = 33 of 64: cohorts of 2 ... 64 clients.
COMPLETE_SLOTS, COMPLETE_T = 64, 33


@pytest.mark.parametrize("num_real,num_dropped", [
    (64, 0), (64, 1), (64, 64 - COMPLETE_T), (40, 7), (33, 0)])
def test_secagg_masked_sum_equals_plain_sum(num_real, num_dropped):
  check_sum(COMPLETE_SLOTS, num_real, num_dropped, dim=8, bits=32, degree=None,
            seed=num_real + num_dropped)


@pytest.mark.parametrize("num_real,num_dropped", [(2, 0), (3, 1), (5, 2)])
def test_secagg_small_cohorts_with_low_threshold(num_real, num_dropped):
  """Cohorts of 2-5 clients with t = 2 on 8 slots, 20-bit ring, threefry masks."""
  check_sum(8, num_real, num_dropped, dim=6, bits=20, degree=None, kind="threefry",
            seed=num_real, threshold=2)


# SecAgg+ on 4096 slots, degree 24, t = 13 of the 25 holders (self + neighbours).
PLUS_SLOTS, PLUS_DEGREE = 4096, 24


@pytest.mark.parametrize("num_real,num_dropped", [(4096, 0), (4096, 300), (1000, 100), (30, 5)])
def test_secagg_plus_masked_sum_equals_plain_sum(num_real, num_dropped):
  check_sum(PLUS_SLOTS, num_real, num_dropped, dim=2, bits=32, degree=PLUS_DEGREE,
            seed=num_real + num_dropped)


@pytest.mark.parametrize("num_slots,num_real,degree,t", [
    (COMPLETE_SLOTS, 20, None, 11),      # SecAgg: 11 of the round's 20, not 33 of 64 slots.
    (PLUS_SLOTS, 12, PLUS_DEGREE, 7)])   # SecAgg+: 12 holders each (R <= k), not 13 of 25.
def test_default_threshold_is_a_majority_of_each_clients_holders(num_slots, num_real, degree, t):
  """A Poisson round smaller than the slots' majority: t survivors unmask the sum, t - 1 do
  not, and the host check agrees on both."""
  key = jax.random.key(t)
  check_sum(num_slots, num_real, num_real - t, dim=2, bits=32, degree=degree, seed=t,
            threshold="round majority")
  check_threshold(*cohort(num_slots, num_real, num_real - t, 2, 32, seed=t)[1:], None, degree,
                  key)
  x, cohort_mask, included = cohort(num_slots, num_real, num_real - t + 1, 2, 32, seed=t)
  _, ok, _, _, stats, _ = protocol(num_slots, 2, 32, degree, threshold="round majority")(
      x, cohort_mask, included, key)
  assert not bool(ok) and float(stats["secagg_threshold"]) == t
  with pytest.raises(SecureSumFailed, match=f"threshold t={t}"):
    check_threshold(cohort_mask, included, None, degree, key)


@pytest.mark.parametrize("kind", ["hash", "threefry"])
def test_one_masked_vector_is_uniform(kind):
  """A client's masked vector of constant input is uniform over bytes (chi-square, 256 bins)."""
  num_slots, dim, bits = 8, 4096, 32
  key = jax.random.key(3)
  graph = secagg.complete_graph(jnp.ones(num_slots))
  secrets = secagg.client_secrets(key, num_slots)
  masked = jit(lambda x: secagg.mask_client(x, jnp.int32(5), graph, secrets, key, bits, kind))(
      jnp.full((dim,), 7, jnp.uint32))
  data = np.asarray(masked).view(np.uint8)
  assert scipy.stats.chisquare(np.bincount(data, minlength=256)).pvalue > 1e-3
  # Each byte lane separately too (a weak low byte would hide in the pooled count).
  for lane in range(4):
    lane_counts = np.bincount(data[lane::4], minlength=256)
    assert scipy.stats.chisquare(lane_counts).pvalue > 1e-3, lane


def test_below_threshold_reports_failure():
  x, cohort_mask, included = cohort(COMPLETE_SLOTS, 64, 64 - COMPLETE_T + 1, 8, 32, seed=5)
  _, ok, *_ = protocol(COMPLETE_SLOTS, 8, 32, None)(x, cohort_mask, included, jax.random.key(5))
  assert not bool(ok)
  with pytest.raises(SecureSumFailed, match="threshold t=33"):
    check_threshold(cohort_mask, included, COMPLETE_T)
  check_threshold(cohort_mask, included, COMPLETE_T - 1)  # One fewer needed: fine.


def test_secagg_plus_fails_when_a_neighbourhood_dies():
  """SecAgg+: losing t of one client's 25 holders fails the round, though most clients live."""
  num_slots, degree = PLUS_SLOTS, PLUS_DEGREE
  key = jax.random.key(9)
  cohort_mask = jnp.ones(num_slots)
  graph = jit(secagg.masking_graph, static_argnums=2)(cohort_mask, key, degree)
  included = np.ones(num_slots, np.float32)
  included[np.asarray(graph.neighbours[0])[:degree // 2 + 1]] = 0.0  # 13 of client 0's holders.
  x = jnp.zeros((num_slots, 2), jnp.uint32)
  _, ok, *_ = protocol(num_slots, 2, 32, degree)(x, cohort_mask, jnp.asarray(included), key)
  assert not bool(ok)
  with pytest.raises(SecureSumFailed):
    check_threshold(cohort_mask, included, degree // 2 + 1, degree, key)


# --- Graphs, masking arithmetic, cost model ----------------------------------------------


@pytest.mark.parametrize("num_real", [3, 5, 6, 9, 30])
def test_harary_graph_is_symmetric_and_regular(num_real):
  degree, num_slots = 8, 32
  cohort_mask = (jnp.arange(num_slots) < num_real).astype(jnp.float32)
  graph = secagg.harary_graph(cohort_mask, degree, jax.random.key(num_real))
  nbrs, valid = np.asarray(graph.neighbours), np.asarray(graph.valid)
  edges = {(i, j) for i in range(num_slots) for m, j in enumerate(nbrs[i]) if valid[i, m]}
  assert all((j, i) in edges for i, j in edges)
  assert all(i != j and i < num_real and j < num_real for i, j in edges)
  degrees = np.bincount([i for i, _ in edges], minlength=num_slots)[:num_real]
  assert len(edges) == sum(degrees)  # No duplicate edges.
  np.testing.assert_array_equal(degrees, min(degree, num_real - 1))


def test_mask_input_matches_mask_client():
  """mask_client equals mask_input fed with the same PRG streams (the cross-check's hook)."""
  num_slots, dim, bits, slot = 4, 10, 16, 2
  key = jax.random.key(4)
  cohort_mask = jnp.ones(num_slots)
  graph = secagg.complete_graph(cohort_mask)
  secrets = secagg.client_secrets(key, num_slots)
  x = jnp.arange(dim, dtype=jnp.uint32)
  got = secagg.mask_client(x, jnp.int32(slot), graph, secrets, key, bits)
  self_mask = secagg.prg(secagg.self_mask_seed(key, slot, secrets.self_seed[slot]), dim, bits)
  others = [j for j in range(num_slots) if j != slot]
  streams = jnp.stack([secagg.prg(secagg.pair_mask_seed(
      key, slot, j, secagg.agree(secrets.secret_key[slot], secrets.public_key[j])), dim, bits)
      for j in others])
  signs = jnp.asarray([1 if slot < j else -1 for j in others], jnp.int32)
  np.testing.assert_array_equal(got, secagg.mask_input(x, self_mask, streams, signs, bits))
  # Key agreement is symmetric: both ends of a pair derive the same seed.
  sk, pk = secrets.secret_key, secrets.public_key
  assert int(secagg.agree(sk[1], pk[3])) == int(secagg.agree(sk[3], pk[1]))


def test_communication_cost():
  dim, bits, k = 1024, 16, 10
  cost = secagg.communication_cost(dim, bits, k, plain_dim=1000)
  per_neighbour = 2 * secagg.SHARE_BYTES + 2 * secagg.ID_BYTES + secagg.AEAD_BYTES \
      + secagg.SHARE_BYTES
  expected = 2 * secagg.KEY_BYTES + k * per_neighbour + dim * bits // 8
  assert float(cost["secagg_bytes_per_client"]) == expected
  np.testing.assert_allclose(cost["secagg_expansion"], expected / 4000.0, rtol=1e-6)


# --- The secure_sum aggregator in a round ---------------------------------------------

INPUT_SHAPE, NUM_CLASSES, K, S, B, CHUNK = (4, 4, 1), 3, 10, 2, 4, 4
LOGREG = logistic_regression(INPUT_SHAPE, NUM_CLASSES)
CLIENT_UPDATE = make_client_update(LOGREG, optax.sgd(1.0))
BITS, SCALE, CLIP, DENOM = 20, 2.0**10, 1.0, float(K)
# t = 6 = floor(10 / 2) + 1, the smallest threshold a 10-client complete graph accepts
# (checked against max_cohort: the chunked backend pads the cohort to 12 slots).
AGGREGATOR = secure_sum(BITS, SCALE, DENOM, clip_norm=CLIP, threshold=6, dropout_rate=0.3,
                        max_cohort=K)


@functools.cache
def secure_round(backend):
  fn = build_round(CLIENT_UPDATE, AGGREGATOR, optax.sgd(1.0), backend, client_chunk_size=CHUNK)
  return fn if backend == "loop" else jit(fn)


def make_batch(seed, num_real=K):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(K, S, B, *INPUT_SHAPE)) * 2.0
  return ClientBatch(
      jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, NUM_CLASSES, (K, S, B)), jnp.int32),
      jnp.ones((K, S, B), jnp.float32), jnp.full((K,), S * B, jnp.int32),
      jnp.asarray(np.arange(K) < num_real, jnp.float32))


@jit
def encode_client(params, x, y, mask, train_key, agg_key, rotation):
  """One client's quantised, rotated, clipped delta as the round should compute it."""
  delta, _ = CLIENT_UPDATE(params, x, y, mask, train_key)
  flat = quant.ravel(delta)[0]
  flat = flat * jnp.minimum(1.0, CLIP / jnp.maximum(jnp.linalg.norm(flat), 1e-12))
  rotated = quant.hadamard_rotate(quant.pad(flat, quant.padded_dim(flat.shape[0])), rotation)
  return quant.quantize(rotated, SCALE, agg_key)


def expected_update(state, batch, key, included):
  """The plain quantised mean: each client's encoding with the round's keys, summed as ints."""
  client_key, _, round_key = jax.random.split(key, 3)
  rotation = jax.random.fold_in(round_key, 11)
  flat, unravel = quant.ravel(state.params)
  total = 0
  for k in np.flatnonzero(included):
    train_key, agg_key = jax.random.split(jax.random.fold_in(client_key, k))
    total += np.asarray(encode_client(state.params, batch.x[k], batch.y[k], batch.example_mask[k],
                                      train_key, agg_key, rotation), np.int64)
  assert np.abs(total).max() < 2 ** (BITS - 1)  # No wrap-around in this configuration.
  decoded = quant.hadamard_unrotate(quant.dequantize(jnp.asarray(total, jnp.int32), SCALE),
                                    rotation)
  return unravel(decoded[:flat.shape[0]] / DENOM)


def test_secure_sum_round_matches_plain_quantised_mean_under_all_backends():
  params = jax.tree.map(jnp.zeros_like, jit(LOGREG.init)(jax.random.key(0)))
  state = server_init(params, optax.sgd(1.0), AGGREGATOR)
  batch = make_batch(1, num_real=K - 1)  # One padded slot.
  key = jax.random.key(2)
  results = {b: secure_round(b)(state, batch, key) for b in ("vmap", "chunked", "loop")}
  _, metrics = results["vmap"]
  dropped = float(metrics["secagg_dropouts"])
  assert 0 < dropped <= K - 1 - 6  # Some dropouts, still at least the threshold t = 6.
  assert float(metrics["secagg_survivors"]) == K - 1 - dropped
  assert float(metrics["secagg_failed"]) == 0.0
  assert 0 < float(metrics["quant_overflow_ratio"]) < 1
  assert float(metrics["secagg_expansion"]) > 0.5
  # The builder reports prepare's fraction of simulated dropouts over real clients.
  np.testing.assert_allclose(metrics["secagg_dropped"], dropped / (K - 1), rtol=1e-6)
  # Which clients survived: rerun the dropout draw as prepare does.
  round_key = jax.random.split(key, 3)[2]
  drop_key = jax.random.fold_in(round_key, 12)
  included = [k < K - 1 and float(jax.random.uniform(jax.random.fold_in(drop_key, k))) >= 0.3
              for k in range(K)]
  assert sum(included) == K - 1 - dropped
  expected = expected_update(state, batch, key, included)
  for backend, (new_state, backend_metrics) in results.items():
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=backend)
    for name in ("secagg_survivors", "secagg_bytes_per_client", "quant_range_used"):
      np.testing.assert_allclose(backend_metrics[name], metrics[name], rtol=1e-6)


def test_secure_sum_round_below_threshold_raises():
  """Three real clients cannot reach t = 6 surviving share holders: the jitted round raises."""
  params = jax.tree.map(jnp.zeros_like, jit(LOGREG.init)(jax.random.key(0)))
  state = server_init(params, optax.sgd(1.0), AGGREGATOR)
  with pytest.raises(Exception, match="threshold t=6"):
    jax.block_until_ready(secure_round("vmap")(state, make_batch(3, num_real=3),
                                                jax.random.key(0)))


def test_secure_sum_default_threshold_unmasks_a_small_poisson_round():
  """Four real clients in K = 10 slots: the default threshold is 3 of them, not 6 of the
  slots, so the round is unmasked and equals the plain quantised mean of its survivors."""
  aggregator = secure_sum(BITS, SCALE, DENOM, clip_norm=CLIP, max_cohort=K)
  params = jax.tree.map(jnp.zeros_like, jit(LOGREG.init)(jax.random.key(0)))
  state = server_init(params, optax.sgd(1.0), aggregator)
  batch, key = make_batch(4, num_real=4), jax.random.key(5)
  round_fn = jit(build_round(CLIENT_UPDATE, aggregator, optax.sgd(1.0), "vmap"))
  new_state, metrics = round_fn(state, batch, key)
  assert float(metrics["secagg_failed"]) == 0 and float(metrics["secagg_threshold"]) == 3
  expected = expected_update(state, batch, key, [k < 4 for k in range(K)])
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_secure_sum_rejects_bad_config():
  with pytest.raises(ValueError, match="bits"):
    secure_sum(1, 1.0, 1.0)
  with pytest.raises(ValueError, match="denominator"):
    secure_sum(16, 1.0, 0.0)
  with pytest.raises(ValueError, match="neighbours"):
    secure_sum(16, 1.0, 1.0, neighbours=3)
  with pytest.raises(ValueError, match="dropout_rate"):
    secure_sum(16, 1.0, 1.0, dropout_rate=1.0)


@pytest.mark.parametrize("kwargs, match", [
    # 10 clients x (1.0 * 2^20 + 1) > 2^(20 - 1): the sum would wrap around.
    (dict(bits=20, scale=2.0**20, clip_norm=1.0, max_cohort=10), r"bits = 20 cannot hold .* >= 25"),
    (dict(bits=16, scale=256.0, clip_norm=42.0, max_cohort=400), "would wrap around"),
    (dict(bits=32, scale=1.0, max_cohort=1), "at least 2 slots, got 1"),
    (dict(bits=32, scale=1.0, max_cohort=0), "at least 2 slots, got 0"),
    (dict(bits=32, scale=1.0, threshold=1, max_cohort=10), r"threshold = 1 must be in \[6, 10\]"),
    (dict(bits=32, scale=1.0, threshold=5, max_cohort=10), r"threshold = 5 must be in \[6, 10\]"),
    (dict(bits=32, scale=1.0, threshold=11, max_cohort=10), r"threshold = 11 must be in \[6, 10\]"),
    # SecAgg+: h = k + 1 holders, known without the cohort.
    (dict(bits=32, scale=1.0, neighbours=4, threshold=2), r"threshold = 2 must be in \[3, 5\]"),
    (dict(bits=32, scale=1.0, max_cohort=True), "max_cohort must be None or an int"),
])
def test_secure_sum_refuses_unsafe_cohorts_when_built(kwargs, match):
  with pytest.raises(ValueError, match=match):
    secure_sum(denominator=10.0, **kwargs)


def test_the_wrap_around_bound_is_tight_and_matches_the_reported_ratio():
  """The largest scale that passes has quant_overflow_ratio <= 1; one step more is refused."""
  bits, clip, cohort = 20, 1.0, 10
  largest = (2 ** (bits - 1) / cohort - 1) / clip
  secure_sum(bits, largest, 10.0, clip_norm=clip, max_cohort=cohort)
  assert float(quant.overflow_ratio(clip, largest, cohort, bits)) <= 1.0
  with pytest.raises(ValueError, match="wrap around"):
    secure_sum(bits, largest * 1.001, 10.0, clip_norm=clip, max_cohort=cohort)


def _state_and_batch(num_slots, num_real):
  params = jax.tree.map(jnp.zeros_like, jit(LOGREG.init)(jax.random.key(0)))
  rng = np.random.default_rng(0)
  batch = ClientBatch(
      jnp.asarray(rng.normal(size=(num_slots, S, B, *INPUT_SHAPE)), jnp.float32),
      jnp.zeros((num_slots, S, B), jnp.int32), jnp.ones((num_slots, S, B), jnp.float32),
      jnp.full((num_slots,), S * B, jnp.int32),
      jnp.asarray(np.arange(num_slots) < num_real, jnp.float32))
  return params, batch


def test_secure_sum_without_max_cohort_checks_the_traced_slots():
  """No ZeroDivisionError for one slot, and a wrap-around refused with the round's K."""
  params, batch = _state_and_batch(1, 1)
  aggregator = secure_sum(BITS, SCALE, 1.0, clip_norm=CLIP)
  fn = build_round(CLIENT_UPDATE, aggregator, optax.sgd(1.0), "vmap")
  with pytest.raises(ValueError, match="at least 2 slots, got 1"):
    fn(server_init(params, optax.sgd(1.0), aggregator), batch, jax.random.key(0))
  params, batch = _state_and_batch(K, K)
  aggregator = secure_sum(12, SCALE, float(K), clip_norm=CLIP)
  fn = build_round(CLIENT_UPDATE, aggregator, optax.sgd(1.0), "vmap")
  with pytest.raises(ValueError, match=f"bits = 12 cannot hold the sum of {K} clients"):
    fn(server_init(params, optax.sgd(1.0), aggregator), batch, jax.random.key(0))


def test_secure_sum_refuses_a_round_above_max_cohort():
  params, batch = _state_and_batch(K, K)
  aggregator = secure_sum(BITS, SCALE, float(K), clip_norm=CLIP, max_cohort=K - 2)
  fn = jit(build_round(CLIENT_UPDATE, aggregator, optax.sgd(1.0), "vmap"))
  with pytest.raises(Exception, match=f"{K} real clients, more than secure_sum's max_cohort"):
    jax.block_until_ready(fn(server_init(params, optax.sgd(1.0), aggregator), batch,
                             jax.random.key(0)))
