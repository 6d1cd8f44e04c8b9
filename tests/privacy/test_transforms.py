"""Tests for fedjax_priv.privacy.transforms and the examples of docs/privacy.md."""

import functools
import math
import pathlib
import re

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.client_update import make_client_update
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.models.zoo import logistic_regression
from fedjax_priv.privacy import accounting
from fedjax_priv.privacy import transforms as T
from fedjax_priv.privacy.aggregation import ClientContext, RoundContext, dp_mean
from fedjax_priv.privacy.clipping import clip_by_l2_norm
from fedjax_priv.privacy.noise import gaussian_like
from fedjax_priv.simulation.round import build_round

# Semantics, not speed: the lowest XLA optimisation level roughly halves CPU compile time.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

ADD_REMOVE = T.NeighboringRelation.ADD_OR_REMOVE_ONE
REPLACE = T.NeighboringRelation.REPLACE_ONE
DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "privacy.md"

K = 6  # Units per test cohort; the last is padding unless a test adds it.
SHAPES = {"w": (6, 5), "b": (7,)}
PER_LAYER = {"b": 0.3, "w": 0.4}  # Total L2 bound 0.5.


def random_units(rng, num_units=K, log_scale=(-1.0, 1.5)):
  """Units with norms spread around the clip norms, so clipping is sometimes active."""
  scales = 10.0 ** rng.uniform(*log_scale, size=num_units)
  return {name: jnp.asarray(rng.normal(size=(num_units, *shape))
                            * scales.reshape(-1, *([1] * len(shape))) / 5, jnp.float32)
          for name, shape in SHAPES.items()}


def flat(tree):
  return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def set_unit(units, k, new_units, j):
  return jax.tree.map(lambda a, b: a.at[k].set(b[j]), units, new_units)


def correlation(u, v):
  return float(np.corrcoef(np.ravel(u), np.ravel(v))[0, 1])


# --- Sensitivity: noise off, change one unit, output moves <= the declared bound --------


def sensitivity_chains(relation):
  """Every transform, alone and chained, with noise off (multiplier 0)."""
  return {
      "clip_l2": T.chain(T.clip_l2(0.7), T.sum_units(), relation=relation),
      "clip_l2_per_layer": T.chain(T.clip_l2_per_layer(PER_LAYER), T.sum_units(),
                                   relation=relation),
      "clip_l1": T.chain(T.clip_l1(1.3), T.sum_units(), relation=relation),
      "dp_fedavg": T.chain(T.clip_l2(0.7), T.sum_units(), T.gaussian(0.0), T.mean(4.0),
                           relation=relation),
      "laplace_mean": T.chain(T.clip_l1(1.3), T.sum_units(), T.mean(5.0), T.laplace(0.0),
                              relation=relation),
      "l1_then_l2": T.chain(T.clip_l1(2.0), T.clip_l2(0.5), T.sum_units(), T.mean(2.0),
                            relation=relation),
  }


EXPECTED_BOUNDS = {  # (L2, L1) of the output per unit of relation factor.
    "clip_l2": (0.7, math.inf), "clip_l2_per_layer": (0.5, math.inf), "clip_l1": (1.3, 1.3),
    "dp_fedavg": (0.7 / 4, math.inf), "laplace_mean": (1.3 / 5, 1.3 / 5),
    "l1_then_l2": (0.25, 1.0),
}


@pytest.mark.parametrize("relation", [ADD_REMOVE, REPLACE], ids=["add_remove", "replace"])
@pytest.mark.parametrize("name", list(EXPECTED_BOUNDS))
def test_sensitivity_of_every_transform_and_chain(name, relation):
  """Replace (replace-one) or add/remove (add/remove) one unit: output moves <= declared bound."""
  chain = sensitivity_chains(relation)[name]
  factor = 2.0 if relation == REPLACE else 1.0
  l2, l1 = EXPECTED_BOUNDS[name]
  assert chain.output.l2 == pytest.approx(factor * l2)
  assert chain.output.l1 == pytest.approx(factor * l1)
  run = jit(lambda units, mask: T.apply_to_units(chain, chain.init(None), units,
                                                 jax.random.key(0), mask)[0])
  rng = np.random.default_rng(sum(map(ord, name)))
  base_mask = jnp.asarray([1.0] * (K - 1) + [0.0])
  modes = ("replace",) if relation == REPLACE else ("add", "remove")
  largest = 0.0
  for _ in range(15):
    units, other = random_units(rng), random_units(rng, num_units=1)
    k = int(rng.integers(0, K - 1))
    out = flat(run(units, base_mask))
    for mode in modes:
      if mode == "replace":
        neighbour = run(set_unit(units, k, other, 0), base_mask)
      elif mode == "remove":
        neighbour = run(units, base_mask.at[k].set(0.0))
      else:
        neighbour = run(set_unit(units, K - 1, other, 0), base_mask.at[K - 1].set(1.0))
      diff = flat(neighbour) - out
      assert np.linalg.norm(diff) <= chain.output.l2 * (1 + 1e-5) + 1e-6
      assert np.abs(diff).sum() <= chain.output.l1 * (1 + 1e-5) + 1e-6
      largest = max(largest, np.linalg.norm(diff) / chain.output.l2,
                    np.abs(diff).sum() / chain.output.l1)
  # Large units come close to the bound (in L2 or L1), so a too-small bound would show.
  assert largest > 0.3


def test_sensitivity_bound_is_attained():
  """Removing a huge unit moves a clip_l2 mean by exactly C/m; replacing x by -x by 2C/m."""
  for relation, factor in ((ADD_REMOVE, 1.0), (REPLACE, 2.0)):
    chain = T.chain(T.clip_l2(0.7), T.sum_units(), T.mean(4.0), relation=relation)
    units = jax.tree.map(lambda leaf: leaf * 1e3, random_units(np.random.default_rng(1)))
    apply = jit(lambda u, m: T.apply_to_units(chain, chain.init(None), u, jax.random.key(0), m))
    run = lambda u, m: flat(apply(u, m)[0])
    mask = jnp.ones(K)
    if relation == ADD_REMOVE:
      neighbour = run(units, mask.at[2].set(0.0))
    else:
      neighbour = run(set_unit(units, 2, jax.tree.map(lambda a: -a, units), 2), mask)
    np.testing.assert_allclose(np.linalg.norm(run(units, mask) - neighbour),
                               factor * 0.7 / 4.0, rtol=1e-5)
    assert chain.output.l2 == pytest.approx(factor * 0.7 / 4.0)


def test_clip_transforms_bound_each_unit():
  """clip_l2 / clip_l1 / per-layer clip leave small units alone and bring large ones to C."""
  rng = np.random.default_rng(2)
  units = random_units(rng, num_units=20, log_scale=(-2.0, 2.0))
  for transform, norm, bound in (
      (T.clip_l2(0.7), lambda t: float(tree_util.l2_norm(t)), 0.7),
      (T.clip_l1(1.3), lambda t: float(np.abs(flat(t)).sum()), 1.3)):
    chain = T.chain(transform)
    for k in range(20):
      unit = jax.tree.map(lambda a: a[k], units)
      out = chain.update_unit(unit, chain.init(None), None)
      if norm(unit) <= bound:
        np.testing.assert_allclose(flat(out), flat(unit), rtol=1e-6)
      else:
        np.testing.assert_allclose(norm(out), bound, rtol=1e-5)
  per_layer = T.chain(T.clip_l2_per_layer(PER_LAYER))
  unit = jax.tree.map(lambda a: a[0] * 1e3, units)
  out = per_layer.update_unit(unit, per_layer.init(None), None)
  for name, bound in PER_LAYER.items():
    np.testing.assert_allclose(float(jnp.linalg.norm(out[name])), bound, rtol=1e-5)


# --- Padding and non-finite units contribute exactly zero -------------------------------


@pytest.mark.parametrize("relation", [ADD_REMOVE, REPLACE], ids=["add_remove", "replace"])
def test_padded_and_nonfinite_units_contribute_zero(relation):
  """Appending padded garbage and NaN/inf units (noise on) leaves the output unchanged."""
  chain = T.chain(T.clip_l2(0.7), T.sum_units(), T.gaussian(1.0), T.mean(4.0),
                  relation=relation)
  rng = np.random.default_rng(3)
  units = random_units(rng, num_units=4)
  garbage = jax.tree.map(lambda a: a * 1e4, random_units(rng, num_units=4))
  garbage["w"] = garbage["w"].at[2, 0, 0].set(jnp.nan).at[3, 1, 1].set(jnp.inf)
  padded = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), units, garbage)
  # Slots 4, 5 are padding (mask 0); 6, 7 are "real" but non-finite.
  mask = jnp.asarray([1.0] * 4 + [0.0, 0.0, 1.0, 1.0])
  run = jit(lambda u, m, key: T.apply_to_units(chain, chain.init(None), u, key, m)[0])
  key = jax.random.key(4)
  expected = flat(run(units, jnp.ones(4), key))
  got = flat(run(padded, mask, key))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  # The noise is on: the agreement needed equal keys.
  assert np.linalg.norm(flat(run(units, jnp.ones(4), jax.random.key(5))) - expected) > 1e-2


# --- Noise statistics -------------------------------------------------------------------

# Two leaves, 200k coordinates: the std estimate has relative error ~1/sqrt(2n) = 0.16%,
# far inside the 2% tolerance.
ZEROS = {"a": jnp.zeros((2, 200, 500), jnp.float32), "b": jnp.zeros((2, 100_000), jnp.float32)}


def noise_of(chain, keys):
  """The chain's output on zero units, for each key: pure noise."""
  run = jit(lambda key: T.apply_to_units(chain, chain.init(None), ZEROS, key)[0])
  return [run(key) for key in keys]


@pytest.mark.parametrize("relation", [ADD_REMOVE, REPLACE], ids=["add_remove", "replace"])
def test_gaussian_noise_statistics(relation):
  """Mean ~ 0 and std = sigma * (factor C) / m per coordinate; independent across keys, leaves."""
  factor = 2.0 if relation == REPLACE else 1.0
  chain = T.chain(T.clip_l2(2.0), T.sum_units(), T.gaussian(1.5), T.mean(10.0),
                  relation=relation)
  expected_std = 1.5 * factor * 2.0 / 10.0
  assert chain.output.noise_std == pytest.approx(expected_std)
  first, second = noise_of(chain, [jax.random.key(0), jax.random.key(1)])
  noise = flat(first)
  assert noise.size == 200_000
  np.testing.assert_allclose(noise.std(), expected_std, rtol=0.02)
  assert abs(noise.mean()) < 4 * expected_std / np.sqrt(noise.size)
  kurtosis = np.mean((noise / noise.std()) ** 4) - 3
  assert abs(kurtosis) < 0.1  # Gaussian: 0 (Laplace would give 3).
  n = 100_000
  bound = 4 / np.sqrt(n)
  assert abs(correlation(first["b"], second["b"])) < bound
  assert abs(correlation(first["a"].ravel()[:n], first["b"])) < bound


def test_laplace_noise_statistics():
  """Laplace(0, b * C1 / m): std = sqrt(2) b C1 / m, excess kurtosis 3, independent across keys."""
  chain = T.chain(T.clip_l1(3.0), T.sum_units(), T.laplace(0.5), T.mean(4.0))
  expected_std = math.sqrt(2) * 0.5 * 3.0 / 4.0
  assert chain.output.noise_std == pytest.approx(expected_std)
  first, second = noise_of(chain, [jax.random.key(2), jax.random.key(3)])
  noise = flat(first)
  np.testing.assert_allclose(noise.std(), expected_std, rtol=0.02)
  assert abs(noise.mean()) < 4 * expected_std / np.sqrt(noise.size)
  kurtosis = np.mean((noise / noise.std()) ** 4) - 3
  assert 2.6 < kurtosis < 3.4
  assert abs(correlation(first["b"], second["b"])) < 4 / np.sqrt(100_000)


def test_two_noise_stages_draw_independent_noise():
  """Two random stages in one phase get split keys: the variances add, std = hypot."""
  chain = T.chain(T.clip_l2(1.0), T.sum_units(), T.gaussian(1.0), T.gaussian(2.0))
  assert chain.output.noise_std == pytest.approx(math.sqrt(5.0))
  noise = flat(noise_of(chain, [jax.random.key(6)])[0])
  np.testing.assert_allclose(noise.std(), math.sqrt(5.0), rtol=0.02)


# --- DpEvents -----------------------------------------------------------------------------


def test_chain_dp_events():
  """Each chain emits exactly the event of its noise stages, under either relation."""
  clip = T.clip_l2(1.0)
  for relation in (ADD_REMOVE, REPLACE):
    gauss = T.chain(clip, T.sum_units(), T.gaussian(1.3), T.mean(5.0), relation=relation)
    assert gauss.dp_event == dp_accounting.GaussianDpEvent(1.3)
    assert gauss.local_dp_event == dp_accounting.NonPrivateDpEvent()
  lap = T.chain(T.clip_l1(1.0), T.sum_units(), T.laplace(0.25))
  assert lap.dp_event == dp_accounting.LaplaceDpEvent(0.25)
  both = T.chain(T.clip_l1(1.0), T.sum_units(), T.gaussian(2.0), T.mean(3.0), T.laplace(0.5))
  assert both.dp_event == dp_accounting.ComposedDpEvent(
      [dp_accounting.GaussianDpEvent(2.0), dp_accounting.LaplaceDpEvent(0.5)])
  assert T.chain(clip, T.sum_units(), T.mean(3.0)).dp_event == dp_accounting.NonPrivateDpEvent()
  # A nested chain splices in: same stages, same event.
  nested = T.chain(T.chain(clip, T.sum_units()), T.gaussian(1.3))
  assert nested.dp_event == dp_accounting.GaussianDpEvent(1.3)
  assert len(nested.transforms) == 3


def test_chain_accounts_like_the_hand_written_mechanisms():
  """Poisson-wrapped dp_fedavg chain == user_level_event; replace-one chain == its 'fixed' event."""
  sigma, rounds, population, cohort = 1.1, 200, 1000, 50
  chain = T.chain(T.clip_l2(1.0), T.sum_units(), T.gaussian(sigma), T.mean(cohort))
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(cohort / population, chain.dp_event), rounds)
  assert event == accounting.user_level_event(sigma, rounds, "poisson", population, cohort)
  # Fixed cohorts: user_level_event(sigma') adds std sigma' C and accounts sigma' / 2; a
  # replace-one chain with gaussian(sigma' / 2) adds std (sigma' / 2) 2C: the same mechanism.
  replace = T.chain(T.clip_l2(1.0), T.sum_units(), T.gaussian(sigma / 2), T.mean(cohort),
                    relation=REPLACE)
  assert replace.output.noise_std == pytest.approx(sigma * 1.0 / cohort)
  fixed = dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(
      population, cohort, replace.dp_event), rounds)
  assert fixed == accounting.user_level_event(sigma, rounds, "fixed", population, cohort)


# --- Errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("build, message", [
    (lambda: T.chain(T.sum_units(), T.gaussian(1.0)), "needs a bounded sensitivity"),
    (lambda: T.chain(T.gaussian(1.0), T.sum_units()), "needs a bounded sensitivity"),
    (lambda: T.chain(T.clip_l2(1.0), T.sum_units(), T.laplace(1.0)), "laplace.*bounded"),
    (lambda: T.chain(T.clip_l2(1.0), T.gaussian(1.0), T.sum_units()), "REPLACE_ONE"),
    (lambda: T.chain(T.clip_l2(1.0), T.gaussian(1.0), T.sum_units(), T.gaussian(1.0),
                     relation=REPLACE), "stage 3.*bounded"),
    (lambda: T.chain(T.sum_units(), T.clip_l2(1.0)), "before sum_units"),
    (lambda: T.chain(T.mean(2.0), T.sum_units()), "after sum_units"),
    (lambda: T.chain(T.clip_l2(1.0), T.sum_units(), T.sum_units()), "only once"),
    (lambda: T.chain(T.clip_l2(1.0), T.sum_units(), T.Transform(T.no_state, None),
                     T.gaussian(1.0)), "stage 3.*bounded"),
    (lambda: T.chain(T.clip_l2(1.0), relation="add_remove"), "relation"),
    (lambda: T.clip_l2(0.0), r"clip_l2\(clip_norm\).*> 0"),
    (lambda: T.clip_l1(float("nan")), r"clip_l1\(clip_norm\)"),
    (lambda: T.clip_l2_per_layer({"w": 1.0, "b": -1.0}), r"clip_norms\)\['b'\]"),
    (lambda: T.gaussian(-1.0), r"gaussian\(noise_multiplier\)"),
    (lambda: T.laplace(True), r"laplace\(noise_multiplier\)"),
    (lambda: T.mean(0), r"mean\(denominator\)"),
    (lambda: T.as_aggregator(T.chain(T.clip_l2(1.0))), "sum_units"),
])
def test_bad_chains_fail_at_construction(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_bad_inputs_fail_at_trace_time():
  """Shape, structure, state and per-unit state errors name what is wrong, before compiling."""
  chain = T.chain(T.clip_l2(1.0), T.sum_units())
  units = random_units(np.random.default_rng(5))
  with pytest.raises(ValueError, match=r"unit_mask\) must have shape \(6,\)"):
    jax.jit(lambda u: T.apply_to_units(chain, chain.init(None), u, jax.random.key(0),
                                       jnp.ones(5)))(units)
  with pytest.raises(ValueError, match="disagree on the unit axis"):
    T.apply_to_units(chain, chain.init(None), {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))},
                     jax.random.key(0))
  with pytest.raises(ValueError, match="chain.init"):
    T.apply_to_units(chain, (), units, jax.random.key(0))
  per_layer = T.chain(T.clip_l2_per_layer({"w": 1.0}), T.sum_units())
  with pytest.raises(ValueError, match="clip_l2_per_layer.*structure"):
    T.apply_to_units(per_layer, per_layer.init(None), units, jax.random.key(0))
  learner = T.Transform(lambda params: jnp.zeros(()),
                        lambda tree, state, key, tracked: (tree, state + 1.0), T.shrinks_norms)
  stateful = T.chain(T.clip_l2(1.0), learner, T.sum_units())
  with pytest.raises(ValueError, match="stage 1.*changed its state"):
    T.apply_to_units(stateful, stateful.init(None), units, jax.random.key(0))
  with pytest.raises(TypeError, match="Transform or Chain"):
    T.chain(T.clip_l2(1.0), "sum")


# --- Equality with dp_mean ----------------------------------------------------------------

C, SIGMA, M = 0.3, 1.2, 8.0
DP_FEDAVG = T.chain(T.clip_l2(C), T.sum_units(), T.gaussian(SIGMA), T.mean(M))


def test_as_aggregator_equals_dp_mean_stage_by_stage():
  """prepare and finalize give bit-identical outputs and the same stats as dp_mean."""
  ours, ref = T.as_aggregator(DP_FEDAVG), dp_mean(C, SIGMA, M)
  delta = jax.tree.map(lambda a: a[0] * 10, random_units(np.random.default_rng(6)))
  mask = jnp.ones(4)
  cctx = ClientContext(jnp.int32(1), jax.random.key(1), jax.random.key(2), mask)
  rctx = RoundContext(jax.random.key(3), jax.random.key(2), mask, mask)
  state = ours.init(delta)
  for a, b in zip(ours.prepare(state, delta, jnp.int32(7), cctx),
                  ref.prepare((), delta, jnp.int32(7), cctx)):
    np.testing.assert_array_equal(flat(a), flat(b))
  update, new_state, stats = ours.finalize(state, delta, jnp.float32(3.0), rctx)
  ref_update, _, ref_stats = ref.finalize((), delta, jnp.float32(3.0), rctx)
  np.testing.assert_array_equal(flat(update), flat(ref_update))
  assert new_state == state
  assert stats.keys() == ref_stats.keys()
  np.testing.assert_allclose(float(stats["noise_stddev"]), float(ref_stats["noise_stddev"]))


# --- A round: dp_mean equality and the docs' top-k example --------------------------------

INPUT_SHAPE, NUM_CLASSES, S, B = (4, 4, 1), 3, 2, 4
LOGREG = logistic_regression(INPUT_SHAPE, NUM_CLASSES)
CLIENT_UPDATE = make_client_update(LOGREG, optax.sgd(1.0))


def make_batch(seed, num_clients, num_real):
  rng = np.random.default_rng(seed)
  return ClientBatch(
      jnp.asarray(rng.normal(size=(num_clients, S, B, *INPUT_SHAPE)) * 3, jnp.float32),
      jnp.asarray(rng.integers(0, NUM_CLASSES, (num_clients, S, B)), jnp.int32),
      jnp.ones((num_clients, S, B), jnp.float32),
      jnp.asarray(rng.integers(1, 20, num_clients), jnp.int32),
      jnp.asarray(np.arange(num_clients) < num_real, jnp.float32))


def doc_block(tag):
  """The python block that follows `<!-- doc-test: tag -->` in docs/privacy.md."""
  match = re.search(rf"<!-- doc-test: {tag} -->\s*```python\n(.*?)```", DOC.read_text(), re.S)
  assert match, f"docs/privacy.md has no doc-test block {tag!r}"
  return match.group(1)


def run_round(aggregator, batch, key):
  params = tree_util.zeros_like(LOGREG.init(jax.random.key(0)))
  state = server_init(params, optax.sgd(1.0), aggregator)
  round_fn = build_round(CLIENT_UPDATE, aggregator, optax.sgd(1.0), "vmap")
  # Zero start params and server SGD with lr 1: the new params are the update.
  return jit(round_fn)(state, batch, key)


def test_chain_round_equals_dp_mean_round():
  """build_round with as_aggregator(chain) == with dp_mean: same params and metrics, bit for bit."""
  batch, key = make_batch(7, num_clients=8, num_real=6), jax.random.key(8)
  ours, ours_metrics = run_round(T.as_aggregator(DP_FEDAVG), batch, key)
  ref, ref_metrics = run_round(dp_mean(C, SIGMA, M), batch, key)
  np.testing.assert_array_equal(flat(ours.params), flat(ref.params))
  assert ours_metrics.keys() == ref_metrics.keys()
  for name in ref_metrics:
    np.testing.assert_array_equal(np.asarray(ours_metrics[name]), np.asarray(ref_metrics[name]))


def test_doc_accounting_example_prints_the_documented_epsilon(capsys):
  exec(doc_block("accounting"), {})
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "0.01 0.01"
  expected = accounting.compute_epsilon(
      accounting.user_level_event(1.0, 1000, "poisson", 10_000, 100), 1e-6)
  assert lines[1] == f"eps = {expected:.3f} at delta = 1e-6"
  assert f"# {lines[1]}" in doc_block("accounting")


def test_doc_top_k_example_in_a_round():
  """The docs' top-k snippet, exec'd verbatim, plugs into build_round and does what it says."""
  namespace = {}
  exec(doc_block("top-k"), namespace)
  sparse_dp, aggregator, top_k = namespace["sparse_dp"], namespace["aggregator"], namespace["top_k"]
  assert sparse_dp.output.l2 == pytest.approx(0.5 / 8.0)
  assert sparse_dp.dp_event == dp_accounting.GaussianDpEvent(1.0)
  with pytest.raises(ValueError, match="bounded"):
    T.chain(T.clip_l2(0.5), T.sum_units(), top_k(4), T.gaussian(1.0))

  num_clients, num_real = 8, 6
  batch, key = make_batch(9, num_clients, num_real), jax.random.key(10)
  state, metrics = run_round(aggregator, batch, key)
  assert float(metrics["noise_stddev"]) == pytest.approx(1.0 * 0.5 / 8.0)

  # By hand, with the builder's keys: clip each real client's delta, keep its top 4
  # coordinates per leaf, sum, add N(0, (sigma C)^2) with the server key, divide by 8.
  client_key, server_key, _ = jax.random.split(key, 3)
  params = tree_util.zeros_like(LOGREG.init(jax.random.key(0)))
  total = tree_util.zeros_like(params)
  client_update = jit(CLIENT_UPDATE)
  for k in range(num_real):
    train_key = jax.random.split(jax.random.fold_in(client_key, k))[0]
    delta = client_update(params, batch.x[k], batch.y[k], batch.example_mask[k], train_key)[0]
    clipped = clip_by_l2_norm(delta, 0.5)[0]
    sparse = jax.tree.map(lambda leaf: jnp.where(
        jnp.abs(leaf) >= jnp.sort(jnp.abs(leaf).ravel())[-4], leaf, 0.0), clipped)
    assert all(int(jnp.sum(leaf != 0)) <= 4 for leaf in jax.tree.leaves(sparse))
    total = tree_util.add(total, sparse)
  expected = tree_util.scale(tree_util.add(total, gaussian_like(server_key, total, 0.5)), 1 / 8.0)
  np.testing.assert_allclose(flat(state.params), flat(expected), rtol=1e-5, atol=1e-6)


def test_per_layer_clipped_fraction_equals_a_direct_count():
  """A client counts as clipped when any layer is; each layer's fraction is reported too.

  The bias bound is huge, so the total-norm bound sqrt(C_k^2 + C_b^2) is
  never reached: comparing total norms (the old report) would say 0 while
  about half the clients have their kernel clipped.
  """
  num_clients, num_real = 8, 7
  batch, key = make_batch(11, num_clients, num_real), jax.random.key(12)
  # Each real client's own delta: the same round with only its slot real,
  # through a chain that does not clip (zero start params, server lr 1).
  plain = T.as_aggregator(T.chain(T.sum_units()))
  deltas = []
  for k in range(num_real):
    alone = batch._replace(client_mask=jnp.asarray(np.arange(num_clients) == k, jnp.float32))
    deltas.append(run_round(plain, alone, key)[0].params["Dense_0"])
  kernel_norms = np.array([float(jnp.linalg.norm(d["kernel"])) for d in deltas])
  bias_norms = np.array([float(jnp.linalg.norm(d["bias"])) for d in deltas])
  # Bounds halfway between two clients' norms, so float32 rounding cannot tip a count.
  between = lambda norms, i: float(np.mean(np.sort(norms)[i:i + 2]))
  bounds = {"Dense_0": {"kernel": between(kernel_norms, 3), "bias": between(bias_norms, 4)}}
  assert np.all(np.hypot(kernel_norms, bias_norms) < 1e3)
  chain = T.chain(T.clip_l2_per_layer({"Dense_0": {"kernel": bounds["Dense_0"]["kernel"],
                                                   "bias": 1e3}}), T.sum_units())
  _, metrics = run_round(T.as_aggregator(chain), batch, key)
  kernel_clipped = kernel_norms > bounds["Dense_0"]["kernel"]
  assert 0 < kernel_clipped.sum() < num_real
  assert float(metrics["clipped_fraction"]) == pytest.approx(kernel_clipped.mean())
  assert float(metrics["clipped_fraction/Dense_0/kernel"]) == pytest.approx(kernel_clipped.mean())
  assert float(metrics["clipped_fraction/Dense_0/bias"]) == 0.0
  # Both layers with finite bounds: clipped if either is.
  chain = T.chain(T.clip_l2_per_layer(bounds), T.sum_units())
  _, metrics = run_round(T.as_aggregator(chain), batch, key)
  either = kernel_clipped | (bias_norms > bounds["Dense_0"]["bias"])
  assert either.sum() > kernel_clipped.sum()
  assert float(metrics["clipped_fraction"]) == pytest.approx(either.mean())
  assert float(metrics["clipped_fraction/Dense_0/bias"]) == pytest.approx(
      (bias_norms > bounds["Dense_0"]["bias"]).mean())


def test_laplace_chain_is_restated_under_every_relation():
  """Replace-one doubles the L1 sensitivity, so the Laplace multiplier halves (as for Gaussian)."""
  privacy = T.as_aggregator(T.chain(T.clip_l1(1.0), T.sum_units(), T.laplace(2.0),
                                    T.mean(4.0))).privacy
  assert privacy.event(T.NeighboringRelation.ADD_OR_REMOVE_ONE) == dp_accounting.LaplaceDpEvent(2.0)
  assert privacy.event(T.NeighboringRelation.REPLACE_ONE) == dp_accounting.LaplaceDpEvent(1.0)
