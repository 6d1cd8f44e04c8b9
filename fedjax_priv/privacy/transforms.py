"""Composable privacy transforms: clipping, noise, sum and mean as pure functions on pytrees.

A privacy mechanism is written as a chain of small transforms, optax style:

  dp_fedavg = chain(clip_l2(1.0), sum_units(), gaussian(1.1), mean(100.0))

Stages before `sum_units()` run on one *unit* (a client's delta, or one
example's gradient); the sum adds the units up; stages after it run once on
the aggregate. The chain tracks, statically and at construction, what it knows
about the value entering each stage (`Tracked`): a bound on one unit's L2 and
L1 norm before the sum, the L2 and L1 sensitivity of the aggregate after it.
Noise is calibrated to that tracked sensitivity, so a clip norm is typed once:
after `clip_l2(C)` and the sum, `gaussian(sigma)` adds N(0, (sigma C)^2) to
every coordinate. Every noise stage emits its `dp_accounting` DpEvent and the
chain composes them (`Chain.dp_event`); noise whose input has no bounded
sensitivity is refused at construction rather than accounted as eps = inf.

Neighbouring relation. A chain is built for one relation (`relation=`):

* add/remove one unit (`ADD_OR_REMOVE_ONE`, the default): an absent unit
  contributes nothing, so a unit of norm <= C moves the sum by <= C;
* replace one unit (`REPLACE_ONE`): swapping one unit of norm <= C for
  another moves the sum by <= 2C.

A noise multiplier is always relative to the tracked sensitivity under the
chain's relation, so `gaussian(sigma)` always emits `GaussianDpEvent(sigma)`;
under replace-one its std is sigma * 2C. (`accounting.user_level_event` with
sampling="fixed" instead takes sigma relative to C and accounts sigma / 2:
its sigma is twice a replace-one chain's.) Noise before the sum is local
noise (see `local_dp`); it is only analysed under replace-one, the relation of
local DP, since under add/remove an absent unit would also remove its noise.

Running a chain:
* `as_aggregator(chain)` plugs it into the round builder: stages before the
  sum run per client in `prepare` (weight 1, never the example count), the
  builder's `group_sum` is the sum, stages after it run in `finalize`.
* `apply_to_units(chain, state, units, key, unit_mask)` runs it on an
  explicit leading unit axis ([K, ...] client deltas, [B, ...] per-example
  gradients): per-unit stages are vmapped, the sum is a dot product.

Writing a transform: a `Transform` is `init(params) -> state`,
`update(tree, state, key, tracked) -> (tree, state)` and
`propagate(tracked) -> tracked`, which states what the stage does to the
tracked bounds. The default `forget_bounds` assumes nothing survives (so
noise after it is refused until a clip); `shrinks_norms` is the rule for
per-unit maps that never increase a unit's L1 or L2 norm (masking,
sparsification). `docs/privacy.md` has a top-k example.

References:
  Dwork & Roth 2014, "The Algorithmic Foundations of Differential Privacy"
  (Gaussian and Laplace mechanisms, sensitivity). Abadi et al. 2016, "Deep
  Learning with Differential Privacy" (per-example clipping, DP-SGD). McMahan
  et al. 2018, "Learning Differentially Private Recurrent Language Models"
  (per-user clipping, per-layer clipping, DP-FedAvg).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp

from fedjax_priv import tree as tree_util
from fedjax_priv.checks import check_positive
from fedjax_priv.privacy.aggregation import (ADD_OR_REMOVE, REPLACE_ONE, ZERO_OUT, Aggregator,
                                             RoundPrivacy, check_relation)
from fedjax_priv.privacy.clipping import clip_by_l2_norm, clip_factor
from fedjax_priv.privacy.noise import gaussian_like, laplace_like

NeighboringRelation = dp_accounting.NeighboringRelation
PyTree = tree_util.PyTree

# How far one unit of norm <= C can move a sum: to or from zero (add/remove),
# or to another unit of norm <= C (replace-one).
_RELATION_FACTOR = {NeighboringRelation.ADD_OR_REMOVE_ONE: 1.0,
                    NeighboringRelation.REPLACE_ONE: 2.0}


class Tracked(NamedTuple):
  """What a chain knows, statically, about the value entering one of its stages.

  Attributes:
    relation: the chain's neighbouring relation.
    summed: False while stages run on one unit (before `sum_units`), True after.
    l2: before the sum, a bound on the L2 norm of one unit's value; after it,
      the L2 sensitivity of the aggregate under `relation`. `math.inf` when
      unbounded. In the units of the tree's leaves.
    l1: the same for the L1 norm.
    noise_std: std of the noise added so far to each coordinate (per unit
      before the sum); `math.nan` once a stage makes it unknown.
  """
  relation: NeighboringRelation
  summed: bool
  l2: float = math.inf
  l1: float = math.inf
  noise_std: float = 0.0

  @property
  def l2_sensitivity(self) -> float:
    """How far the value moves, in L2, between neighbouring inputs."""
    return self.l2 if self.summed else _RELATION_FACTOR[self.relation] * self.l2

  @property
  def l1_sensitivity(self) -> float:
    return self.l1 if self.summed else _RELATION_FACTOR[self.relation] * self.l1


def _reshaped_noise(tracked: Tracked) -> float:
  """noise_std after a stage that clips, masks or sums: zero stays zero, else it is unknown."""
  return 0.0 if tracked.noise_std == 0 else math.nan


def no_state(params: PyTree) -> tuple:
  """`init` of a stateless transform."""
  del params
  return ()


def forget_bounds(tracked: Tracked) -> Tracked:
  """Default `propagate`: assumes nothing about the output's norms or sensitivity.

  A random stage must declare its own noise (and its event); a deterministic
  one keeps a noise-free value noise-free, so only nonzero noise_std is lost.
  """
  return tracked._replace(l2=math.inf, l1=math.inf, noise_std=_reshaped_noise(tracked))


def shrinks_norms(tracked: Tracked) -> Tracked:
  """`propagate` of a per-unit map f with |f(x)|_2 <= |x|_2 and |f(x)|_1 <= |x|_1.

  Masking or sparsifying coordinates qualifies. One unit's norm bounds carry
  over; after the sum they do not (a norm-shrinking map need not shrink the
  distance between two aggregates), so there it forgets them.
  """
  if tracked.summed:
    return forget_bounds(tracked)
  return tracked._replace(noise_std=_reshaped_noise(tracked))


def _no_event(tracked: Tracked) -> None:
  del tracked


class Transform(NamedTuple):
  """One stage of a chain: pure functions on pytrees.

  Attributes:
    init: params -> state.
    update: (tree, state, key, tracked) -> (tree, state). `key` is a PRNG key
      private to this stage and call when `needs_key`, else None; `tracked`
      is the static `Tracked` of the stage's input (noise reads its
      sensitivity from it). Before the sum `update` runs once per unit and
      its returned state must be the input state (units run in parallel and
      cannot write shared state).
    propagate: Tracked -> Tracked, static: the tracked bounds of the output.
      Raises ValueError where the stage cannot go (e.g. a clip after the sum).
    dp_event: Tracked -> DpEvent or None: the event of the stage's release.
    needs_key: whether `update` draws randomness.
    clipped: for a clipping stage, `tree -> {part: bool scalar}`: whether the
      stage scales each part of its input down; the part is "" for a clip of
      the whole unit and the leaf's path ("Dense_0/kernel") per layer. None
      for stages that do not clip. Reported as `clipped_fraction` (see
      `as_aggregator`).
  """
  init: Callable[[PyTree], Any]
  update: Callable[[PyTree, Any, jax.Array | None, Tracked], tuple[PyTree, Any]]
  propagate: Callable[[Tracked], Tracked] = forget_bounds
  dp_event: Callable[[Tracked], dp_accounting.DpEvent | None] = _no_event
  needs_key: bool = False
  clipped: Callable[[PyTree], dict[str, jax.Array]] | None = None


# --------------------------------------------------------------------------
# Argument checks.


def _check_multiplier(name: str, value: Any) -> float:
  if isinstance(value, jax.core.Tracer):
    # A sweep traces the multiplier to build its one program; the same chain
    # built with the concrete value on the host is checked and accounted.
    return value
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      math.isfinite(value) and value >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  return float(value)


def _unit_only(name: str, tracked: Tracked) -> None:
  if tracked.summed:
    raise ValueError(f"{name} clips one unit and must come before sum_units()")


# --------------------------------------------------------------------------
# Clipping (per unit).


def clip_l2(clip_norm: float) -> Transform:
  """Scales one unit so its global L2 norm (all leaves as one vector) is <= C.

  The unit's L2 norm bound becomes C; its L1 bound is kept (scaling down never
  increases a norm).

  Args:
    clip_norm: C > 0, in the units of the leaves.

  References:
    Abadi et al. 2016 (per-example); McMahan et al. 2018 (per-user).
  """
  clip_norm = check_positive("clip_l2(clip_norm)", clip_norm)

  def update(tree, state, key, tracked):
    del key, tracked
    return clip_by_l2_norm(tree, clip_norm)[0], state

  def propagate(tracked):
    _unit_only("clip_l2", tracked)
    return tracked._replace(l2=min(tracked.l2, clip_norm),
                            noise_std=_reshaped_noise(tracked))

  def clipped(tree):
    return {"": tree_util.l2_norm(tree) > clip_norm}

  return Transform(no_state, update, propagate, clipped=clipped)


def clip_l2_per_layer(clip_norms: PyTree) -> Transform:
  """Clips every leaf of one unit to its own L2 bound C_l.

  The unit's L2 norm bound becomes sqrt(sum_l C_l^2); its L1 bound is kept.

  Args:
    clip_norms: pytree of Python floats C_l > 0 with the structure of the
      trees the chain will see (e.g. the model params).

  References:
    McMahan et al. 2018, Sec. 3 (per-layer clipping).
  """
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(clip_norms)
  if not with_paths:
    raise ValueError("clip_l2_per_layer(clip_norms) must have at least one leaf")
  leaves = [check_positive(f"clip_l2_per_layer(clip_norms){jax.tree_util.keystr(path)}", c)
            for path, c in with_paths]
  total = math.sqrt(sum(c * c for c in leaves))
  names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in with_paths]

  def update(tree, state, key, tracked):
    del key, tracked
    if jax.tree.structure(tree) != treedef:
      raise ValueError(f"clip_l2_per_layer(clip_norms) has structure {treedef}, but the "
                       f"unit has {jax.tree.structure(tree)}")
    clipped = [clip_by_l2_norm(leaf, c)[0] for leaf, c in zip(jax.tree.leaves(tree), leaves)]
    return jax.tree.unflatten(treedef, clipped), state

  def propagate(tracked):
    _unit_only("clip_l2_per_layer", tracked)
    return tracked._replace(l2=min(tracked.l2, total),
                            noise_std=_reshaped_noise(tracked))

  def clipped(tree):
    # Each layer against its own C_l: a unit can be clipped in one layer
    # while its total norm stays below sqrt(sum_l C_l^2).
    return {name: jnp.linalg.norm(jnp.ravel(leaf)) > c
            for name, leaf, c in zip(names, jax.tree.leaves(tree), leaves)}

  return Transform(no_state, update, propagate, clipped=clipped)


def clip_l1(clip_norm: float) -> Transform:
  """Scales one unit so its global L1 norm is <= C (the bound Laplace noise needs).

  The unit's L1 bound becomes C and its L2 bound min(previous, C), since
  |x|_2 <= |x|_1.

  Args:
    clip_norm: C > 0, in the units of the leaves.

  References:
    Dwork & Roth 2014, Sec. 3.3 (L1 sensitivity of the Laplace mechanism).
  """
  clip_norm = check_positive("clip_l1(clip_norm)", clip_norm)

  def update(tree, state, key, tracked):
    del key, tracked
    return tree_util.scale(tree, clip_factor(tree_util.l1_norm(tree), clip_norm)), state

  def propagate(tracked):
    _unit_only("clip_l1", tracked)
    return tracked._replace(l2=min(tracked.l2, clip_norm), l1=min(tracked.l1, clip_norm),
                            noise_std=_reshaped_noise(tracked))

  def clipped(tree):
    return {"": tree_util.l1_norm(tree) > clip_norm}

  return Transform(no_state, update, propagate, clipped=clipped)


# --------------------------------------------------------------------------
# Noise (per unit = local, or on the aggregate = central).


def _noise_propagate(name: str, sensitivity: Callable[[Tracked], float],
                     std: Callable[[Tracked], float]) -> Callable[[Tracked], Tracked]:
  """Shared rule of the noise stages; `sensitivity` picks the norm the noise is calibrated to."""

  def propagate(tracked):
    if not math.isfinite(sensitivity(tracked)):
      raise ValueError(
          f"{name} needs a bounded sensitivity, but the value entering it has none "
          f"(tracked {tracked}); put a clip (clip_l2, clip_l2_per_layer or clip_l1) before it")
    if not tracked.summed and tracked.relation != NeighboringRelation.REPLACE_ONE:
      raise ValueError(
          f"{name} before sum_units() is local noise, which is analysed under "
          "relation=REPLACE_ONE (local DP); under add/remove an absent unit also removes its "
          "noise. Build the chain with relation=NeighboringRelation.REPLACE_ONE")
    added = std(tracked)
    # A traced multiplier (a sweep's program) leaves the static std unknown.
    noise_std = (math.hypot(tracked.noise_std, added) if tree_util.is_concrete_number(added)
                 else math.nan)
    if tracked.summed:
      # Independent noise is post-processing: the aggregate's sensitivity stands.
      return tracked._replace(noise_std=noise_std)
    # A noised unit has no norm bound; central noise after it needs a new clip.
    return tracked._replace(l2=math.inf, l1=math.inf, noise_std=noise_std)

  return propagate


def gaussian(noise_multiplier: float) -> Transform:
  """Adds N(0, (sigma * Delta_2)^2) to every coordinate; Delta_2 is the tracked L2 sensitivity.

  After `clip_l2(C)` and `sum_units()` under add/remove, Delta_2 = C. Emits
  `GaussianDpEvent(sigma)`. Before the sum it is local noise on one unit
  (Delta_2 = 2C, replace-one only).

  Args:
    noise_multiplier: sigma >= 0 (0 adds nothing and gives eps = inf).

  References:
    Dwork & Roth 2014, Sec. 3.5.3 and App. A (Gaussian mechanism).
  """
  sigma = _check_multiplier("gaussian(noise_multiplier)", noise_multiplier)

  def update(tree, state, key, tracked):
    noise = gaussian_like(key, tree, sigma * tracked.l2_sensitivity)
    return tree_util.add(tree, noise), state

  return Transform(
      no_state, update,
      _noise_propagate(f"gaussian(noise_multiplier={sigma})", lambda t: t.l2_sensitivity,
                       lambda t: sigma * t.l2_sensitivity),
      lambda tracked: dp_accounting.GaussianDpEvent(sigma), needs_key=True)


def laplace(noise_multiplier: float) -> Transform:
  """Adds Laplace(0, b * Delta_1) to every coordinate; Delta_1 is the tracked L1 sensitivity.

  The std per coordinate is sqrt(2) * b * Delta_1. Emits `LaplaceDpEvent(b)`,
  which is (1/b, 0)-DP. Needs an L1 bound: put `clip_l1` before it.

  Args:
    noise_multiplier: b >= 0, the Laplace scale divided by Delta_1.

  References:
    Dwork & Roth 2014, Sec. 3.3 (Laplace mechanism).
  """
  b = _check_multiplier("laplace(noise_multiplier)", noise_multiplier)

  def update(tree, state, key, tracked):
    return tree_util.add(tree, laplace_like(key, tree, b * tracked.l1_sensitivity)), state

  return Transform(
      no_state, update,
      _noise_propagate(f"laplace(noise_multiplier={b})", lambda t: t.l1_sensitivity,
                       lambda t: math.sqrt(2) * b * t.l1_sensitivity),
      lambda tracked: dp_accounting.LaplaceDpEvent(b), needs_key=True)


# --------------------------------------------------------------------------
# Sum and mean.


def _sum_update(tree, state, key, tracked):
  raise ValueError("sum_units() marks where units are added up; run the chain with "
                   "apply_to_units(...) or as_aggregator(...)")


def sum_units() -> Transform:
  """Adds the units up: one unit's norm bound C becomes the sum's sensitivity.

  Under add/remove the sensitivity is C, under replace-one 2C. The sum
  itself is done by whoever runs the chain (`apply_to_units`, or the round
  builder's `group_sum` through `as_aggregator`), over real units only.
  """

  def propagate(tracked):
    if tracked.summed:
      raise ValueError("a chain may contain sum_units() only once")
    return tracked._replace(summed=True, l2=tracked.l2_sensitivity, l1=tracked.l1_sensitivity,
                            noise_std=_reshaped_noise(tracked))

  return Transform(no_state, _sum_update, propagate)


def mean(denominator: float) -> Transform:
  """Divides the sum by a PUBLIC denominator (e.g. the expected cohort or batch size).

  Never divide by the realised count in DP mode: it depends on who took part.
  Sensitivity and noise std are divided by the denominator too.

  Args:
    denominator: m > 0, public.
  """
  denominator = check_positive("mean(denominator)", denominator)

  def update(tree, state, key, tracked):
    del key, tracked
    return tree_util.scale(tree, 1.0 / denominator), state

  def propagate(tracked):
    if not tracked.summed:
      raise ValueError("mean(denominator) divides the sum and must come after sum_units()")
    return tracked._replace(l2=tracked.l2 / denominator, l1=tracked.l1 / denominator,
                            noise_std=tracked.noise_std / denominator)

  return Transform(no_state, update, propagate)


# --------------------------------------------------------------------------
# Chains.


def _compose(events: list) -> dp_accounting.DpEvent:
  if not events:
    # Nothing random ran: the output is released as is.
    return dp_accounting.NonPrivateDpEvent()
  return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


class Chain(NamedTuple):
  """Transforms with their statically tracked bounds; build with `chain(...)`.

  Attributes:
    transforms: the stages, in order.
    tracked: len(transforms) + 1 `Tracked`: the input of each stage, then the output.
    relation: the neighbouring relation all bounds and events refer to.
  """
  transforms: tuple[Transform, ...]
  tracked: tuple[Tracked, ...]
  relation: NeighboringRelation

  @property
  def sum_index(self) -> int | None:
    """Position of `sum_units()` in `transforms`, or None."""
    for i, (before, after) in enumerate(zip(self.tracked, self.tracked[1:])):
      if after.summed and not before.summed:
        return i
    return None

  @property
  def output(self) -> Tracked:
    """Tracked bounds of the chain's output (its sensitivity, once summed)."""
    return self.tracked[-1]

  def _events(self, stages: range) -> list:
    events = [self.transforms[i].dp_event(self.tracked[i]) for i in stages]
    return [e for e in events if e is not None]

  @property
  def dp_event(self) -> dp_accounting.DpEvent:
    """The event of one run of the chain (one round): every noise stage, composed.

    Composing is an upper bound when several noise stages act on one value:
    the output is post-processing of each of them alone. Sampling is not part
    of it: wrap it in the sampled event of your cohort (see docs/privacy.md).
    """
    return _compose(self._events(range(len(self.transforms))))

  @property
  def local_dp_event(self) -> dp_accounting.DpEvent:
    """The event of one unit's own release (stages before the sum), seen by the server.

    Under the replace-one relation, i.e. any two inputs of the unit: local DP.
    `NonPrivateDpEvent` when no noise runs before the sum.
    """
    end = len(self.transforms) if self.sum_index is None else self.sum_index
    return _compose(self._events(range(end)))

  def init(self, params: PyTree) -> tuple:
    """State of every stage, from the model params."""
    return tuple(t.init(params) for t in self.transforms)

  def _run(self, stages: range, tree, state, key, clipped: dict | None = None):
    if not isinstance(state, tuple) or len(state) != len(self.transforms):
      raise ValueError(f"state must be chain.init(params), a tuple of {len(self.transforms)} "
                       f"stage states, got {type(state).__name__} of length "
                       f"{len(state) if isinstance(state, tuple) else 'n/a'}")
    keyed = [i for i in stages if self.transforms[i].needs_key]
    # A lone random stage gets the key itself, which is what makes
    # chain(clip_l2, sum_units, gaussian, mean) draw exactly dp_mean's noise.
    if len(keyed) == 1:
      stage_keys = {keyed[0]: key}
    else:
      stage_keys = dict(zip(keyed, jax.random.split(key, len(keyed)))) if keyed else {}
    state = list(state)
    for i in stages:
      if clipped is not None and self.transforms[i].clipped is not None:
        for part, flag in self.transforms[i].clipped(tree).items():
          clipped[(i, part)] = flag
      tree, state[i] = self.transforms[i].update(tree, state[i], stage_keys.get(i),
                                                 self.tracked[i])
    return tree, tuple(state)

  def _unit_stages(self) -> range:
    return range(len(self.transforms) if self.sum_index is None else self.sum_index)

  def update_unit(self, tree: PyTree, state: tuple, key: jax.Array) -> PyTree:
    """Runs the stages before the sum on one unit.

    Raises:
      ValueError: a stage returned a state other than the one it was given.
    """
    return self.update_unit_clipped(tree, state, key)[0]

  def update_unit_clipped(self, tree: PyTree, state: tuple, key: jax.Array
                          ) -> tuple[PyTree, dict[tuple[int, str], jax.Array]]:
    """`update_unit`, and whether each clipping stage clipped each part of the unit.

    Returns:
      (output, {(stage index, part): bool scalar}); a part is "" for a clip
      of the whole unit and the leaf's path for `clip_l2_per_layer`.
    """
    clipped: dict[tuple[int, str], jax.Array] = {}
    out, new_state = self._run(self._unit_stages(), tree, state, key, clipped)
    for i in self._unit_stages():
      before, after = jax.tree.leaves(state[i]), jax.tree.leaves(new_state[i])
      if len(before) != len(after) or any(a is not b for a, b in zip(before, after)):
        raise ValueError(f"stage {i} of the chain runs per unit (before sum_units()) and "
                         "changed its state; per-unit stages cannot write state")
    return out, clipped

  def update_aggregate(self, tree: PyTree, state: tuple, key: jax.Array
                       ) -> tuple[PyTree, tuple]:
    """Runs the stages after the sum on the aggregate; returns (output, new state)."""
    if self.sum_index is None:
      raise ValueError("the chain has no sum_units(), so it has no aggregate stages")
    return self._run(range(self.sum_index + 1, len(self.transforms)), tree, state, key)


def chain(*transforms: Transform | Chain,
          relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE) -> Chain:
  """Composes transforms and tracks their bounds; fails here, not at run time.

  Args:
    *transforms: `Transform`s, or `Chain`s whose stages are spliced in (their
      relation must equal `relation`).
    relation: `NeighboringRelation.ADD_OR_REMOVE_ONE` or `REPLACE_ONE`.

  Returns:
    A `Chain`.

  Raises:
    ValueError: an unknown relation, a stage in a place it cannot be (noise
      without a bounded sensitivity, a clip after the sum, two sums, ...),
      naming the stage.
    TypeError: an argument is not a Transform or Chain.
  """
  if relation not in _RELATION_FACTOR:
    raise ValueError(f"relation must be a dp_accounting.NeighboringRelation in "
                     f"{tuple(_RELATION_FACTOR)}, got {relation!r}")
  stages = []
  for i, t in enumerate(transforms):
    if isinstance(t, Chain):
      if t.relation != relation:
        raise ValueError(f"chain argument {i} was built for {t.relation}, not {relation}")
      stages.extend(t.transforms)
    elif isinstance(t, Transform):
      stages.append(t)
    else:
      raise TypeError(f"chain argument {i} must be a Transform or Chain, got {type(t).__name__}")
  tracked = [Tracked(relation, summed=False)]
  for i, t in enumerate(stages):
    try:
      tracked.append(t.propagate(tracked[-1]))
    except ValueError as error:
      raise ValueError(f"chain stage {i}: {error}") from None
  return Chain(tuple(stages), tuple(tracked), relation)


# --------------------------------------------------------------------------
# Running a chain.


def _require_sum(chain_: Chain, caller: str) -> int:
  if not isinstance(chain_, Chain):
    raise TypeError(f"{caller} needs a Chain (from chain(...)), got {type(chain_).__name__}")
  if chain_.sum_index is None:
    raise ValueError(f"{caller} needs a chain with sum_units()")
  return chain_.sum_index


def apply_to_units(chain_: Chain, state: tuple, units: PyTree, key: jax.Array,
                   unit_mask: jax.Array | None = None) -> tuple[PyTree, tuple]:
  """Runs a chain on units stacked along a leading axis, e.g. [K, ...] deltas or [B, ...] grads.

  Per-unit stages are vmapped, unit k with key fold_in(unit_key, k); units
  that are masked out or hold a NaN/inf are zeroed before the per-unit
  stages and given weight 0, so they contribute exactly nothing; the sum is a
  dot product with the 0/1 weights; the aggregate stages run with agg_key,
  where (unit_key, agg_key) = split(key).

  Args:
    chain_: a Chain with `sum_units()`.
    state: `chain_.init(params)`.
    units: pytree whose leaves have shape [K, ...].
    key: PRNG key.
    unit_mask: [K], 1 for a real unit, 0 for padding; default all real.

  Returns:
    (chain output, new state).

  Raises:
    ValueError: leaves disagree on K, or unit_mask is not [K] (at trace time).
  """
  _require_sum(chain_, "apply_to_units")
  leaves = jax.tree.leaves(units)
  if not leaves or any(leaf.ndim == 0 for leaf in leaves):
    raise ValueError("apply_to_units(units) needs leaves with a leading unit axis [K, ...]")
  num_units = leaves[0].shape[0]
  if any(leaf.shape[0] != num_units for leaf in leaves):
    raise ValueError(f"apply_to_units(units) leaves disagree on the unit axis: "
                     f"{[leaf.shape for leaf in leaves]}")
  unit_mask = jnp.ones(num_units, jnp.float32) if unit_mask is None else jnp.asarray(unit_mask)
  if unit_mask.shape != (num_units,):
    raise ValueError(f"apply_to_units(unit_mask) must have shape ({num_units},), "
                     f"got {unit_mask.shape}")
  unit_key, agg_key = jax.random.split(key)

  def one_unit(unit, k):
    finite = tree_util.all_finite(unit)
    # select, not a product: 0 * NaN is NaN.
    unit = tree_util.select(finite, unit, tree_util.zeros_like(unit))
    out = chain_.update_unit(unit, state, jax.random.fold_in(unit_key, k))
    return out, finite

  prepared, finite = jax.vmap(one_unit)(units, jnp.arange(num_units))
  weights = jnp.where(finite & (unit_mask > 0), 1.0, 0.0).astype(jnp.float32)
  return chain_.update_aggregate(tree_util.weighted_sum(weights, prepared), state, agg_key)


def as_aggregator(chain_: Chain) -> Aggregator:
  """The chain as an `Aggregator` for `build_round`; one unit is one client.

  `prepare` runs the stages before the sum with `ClientContext.key` and gives
  every client weight 1 (the builder zeroes padded and non-finite slots);
  the builder's `group_sum` is the sum; `finalize` runs the stages after it
  with `RoundContext.key` and returns the new chain state. The total weight
  (the realised count) is never used.

  Stats: prepare reports `delta_norm` (L2 norm of the client's delta); when
  the chain clips, `clipped_fraction`: 1 for a client that any clipping
  stage scaled down in any part (so the round's metric is the fraction of
  clients clipped), and under `clip_l2_per_layer` also
  `clipped_fraction/<layer path>` per layer; and `local_noise_stddev`, the
  std of a client's own noise per coordinate, when there is local noise.
  (Comparing the delta's total norm with the chain's bound would miss a
  per-layer clip: one layer can be clipped 50x while the total norm stays
  below sqrt(sum_l C_l^2).) finalize reports
  `noise_stddev`, the std of the noise in each coordinate of the update,
  when the chain knows it (not after local noise: it depends on the count).

  Args:
    chain_: a Chain with `sum_units()`.
  """
  sum_index = _require_sum(chain_, "as_aggregator")
  local_noise_std = chain_.tracked[sum_index].noise_std
  noise_std = chain_.output.noise_std

  def prepare(state, delta, num_examples, ctx):
    del num_examples  # Weighting by example count would break the sensitivity bound.
    stats = {"delta_norm": tree_util.l2_norm(delta)}
    out, clipped = chain_.update_unit_clipped(delta, state, ctx.key)
    if clipped:
      stats["clipped_fraction"] = jnp.any(jnp.stack(list(clipped.values()))).astype(jnp.float32)
      for (_, part), flag in clipped.items():
        if part:
          stats[f"clipped_fraction/{part}"] = flag.astype(jnp.float32)
    if local_noise_std > 0:
      stats["local_noise_stddev"] = jnp.float32(local_noise_std)
    return out, jnp.float32(1.0), stats

  def finalize(state, total, total_weight, ctx):
    del total_weight
    update, state = chain_.update_aggregate(total, state, ctx.key)
    stats = {"noise_stddev": jnp.float32(noise_std)} if math.isfinite(noise_std) else {}
    return update, state, stats

  return Aggregator(chain_.init, prepare, finalize, privacy=chain_privacy(chain_))


def _rescaled(event: dp_accounting.DpEvent, ratio: float) -> dp_accounting.DpEvent:
  """`event` with every Gaussian and Laplace multiplier times `ratio`."""
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return dp_accounting.GaussianDpEvent(event.noise_multiplier * ratio)
  if isinstance(event, dp_accounting.LaplaceDpEvent):
    return dp_accounting.LaplaceDpEvent(event.noise_multiplier * ratio)
  if isinstance(event, dp_accounting.ComposedDpEvent):
    return dp_accounting.ComposedDpEvent([_rescaled(e, ratio) for e in event.events])
  return event


def chain_privacy(chain_: Chain) -> RoundPrivacy | None:
  """The chain's `RoundPrivacy`: its noise events, under each relation they can be stated in.

  A chain with central noise only (after `sum_units()`) is built for one
  relation, but the same noise protects the others: its multipliers are
  relative to the tracked sensitivity, which scales with how far one unit
  moves the sum (C for add/remove and zero-out, 2C for replace-one), so the
  event under another relation rescales them by the ratio. A chain with
  local noise (before the sum) is stated under replace-one only and is not
  amplified by sampling: the server sees each noised upload. None when no
  stage adds noise (nothing private is released).

  Args:
    chain_: a Chain.
  """
  own = chain_.dp_event
  if isinstance(own, dp_accounting.NonPrivateDpEvent):
    return None
  local = not isinstance(chain_.local_dp_event, dp_accounting.NonPrivateDpEvent)
  description = f"chain of {len(chain_.transforms)} stages ({chain_.relation.name})"
  if local:
    def local_event(relation):
      check_relation(relation, (REPLACE_ONE,))
      return own
    return RoundPrivacy(local_event, (REPLACE_ONE,), amplified_by_sampling=False,
                        description=description)
  moves = {ADD_OR_REMOVE: 1.0, ZERO_OUT: 1.0, REPLACE_ONE: 2.0}
  relations = (chain_.relation,) + tuple(r for r in moves if r != chain_.relation)

  def event(relation):
    check_relation(relation, relations)
    return _rescaled(own, moves[chain_.relation] / moves[relation])

  return RoundPrivacy(event, relations, description=description)
