"""The matrix-factorization mechanism as an aggregator: clipped sums plus streamed correlated noise.

Round t clips each client's delta to L2 norm C, sums the cohort's clipped
deltas into x_t and releases (x_t + w_t) / M, where w_t is row t of
C_s^-1 Z (C_s the strategy matrix, Z with iid N(0, (sigma C sens)^2) rows,
sens = sens(C_s) under (k, b)-participation over the run's n rounds) and M
the public expected cohort size. Summed over rounds, the server's iterate
holds A x + B Z with A = B C_s the prefix-sum workload: the rounds together
are the post-processing of one release C_s x + Z, a single Gaussian
mechanism with noise multiplier sigma (Denisov, McMahan, Rush, Smith &
Thakurta 2022; Choquette-Choo et al. 2023).

Neighbouring relation: user level, zero-out. A user's clipped contributions
in all of its participations (at most k rounds of the n, any two at least b
apart) are replaced by zero; for the fixed, public schedule of `Cyclic`
participation that is removing the user. The accounted event is
`GaussianDpEvent(sigma)` for the whole run of n rounds, charged once, with
no amplification by sampling. With `CyclicPoisson` participation and a
banded strategy of at most b bands, each cycle of b rounds is instead
charged `PoissonSampled(q, Gaussian(sigma_1))`, sigma_1 relative to one
participation's sensitivity: amplified BandMF (Choquette-Choo et al. 2023b,
Thm. 4; the event of jax_privacy's `amplified_bandmf_event`).

The stream's state lives in the aggregator state (`ServerState.aggregator_state`),
so a checkpointed run resumes with the exact noise it would have drawn.

References:
  Denisov, McMahan, Rush, Smith & Thakurta 2022, "Improved Differential
  Privacy for SGD via Optimal Private Linear Operators on Adaptive
  Streams". Choquette-Choo, McMahan, Rush & Thakurta 2023, "Multi-Epoch
  Matrix Factorization Mechanisms for Private Machine Learning";
  Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu 2023b,
  "(Amplified) Banded Matrix Factorization". McMahan, Xu & Zhang 2024 and
  Dvijotham et al. 2024 (BLT). Kairouz et al. 2021 (the tree as a special C).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv import tree as tree_util
from fedjax_priv.checks import check_int, check_non_negative, check_positive
from fedjax_priv.privacy import matrix_factorization as mf
from fedjax_priv.privacy.aggregation import (ZERO_OUT, Aggregator, RoundPrivacy, check_relation,
                                             clipping_prepare)


class MFSensitivity(NamedTuple):
  """sens(C_s) over `rounds` rounds under (k, b)-participation, in units of the clip norm.

  Attributes:
    value: the sensitivity the noise is scaled by.
    exact: True where a theorem gives the exact value (`mf.sensitivity`),
      False where it is `mf.sensitivity_upper_bound` (valid, maybe loose).
  """
  value: float
  exact: bool


def mf_sensitivity(strategy: mf.Strategy, rounds: int, max_participations: int,
                   min_separation: int) -> MFSensitivity:
  """The exact sensitivity where a theorem applies, else the stated upper bound."""
  try:
    return MFSensitivity(mf.sensitivity(strategy, rounds, max_participations, min_separation),
                         True)
  except ValueError as error:
    if "no exact sensitivity" not in str(error):
      raise
    return MFSensitivity(mf.sensitivity_upper_bound(strategy, rounds, max_participations,
                                                    min_separation), False)


def _inverse_row_norms(strategy: mf.Strategy, rounds: int) -> np.ndarray:
  # ||row t of C_s^-1||: the per-coordinate std of w_t in units of sigma C sens.
  if isinstance(strategy, mf.DenseStrategy):
    inverse = np.linalg.inv(mf.strategy_matrix(strategy, rounds))
    return np.sqrt(np.sum(np.square(inverse), axis=1))
  return np.sqrt(np.cumsum(np.square(mf.inverse_toeplitz_coefs(strategy, rounds))))


def _bands_and_largest_column(strategy: mf.Strategy, rounds: int) -> tuple[int, float] | None:
  """(non-zero diagonals, largest column norm) of C_s over `rounds` rounds; None if not banded."""
  if isinstance(strategy, mf.BandedToeplitz):
    coefs = np.asarray(strategy.coefs, np.float64)[:rounds]
    # Column 0 holds every coefficient; later columns are cut off at the bottom.
    return len(coefs), float(np.linalg.norm(coefs))
  if isinstance(strategy, mf.DenseStrategy):
    matrix = mf.strategy_matrix(strategy, rounds)
    rows, cols = np.nonzero(matrix)
    return int(np.max(rows - cols)) + 1, float(np.max(np.linalg.norm(matrix, axis=0)))
  return None


def mf_mean(strategy: mf.Strategy, clip_norm: float, noise_multiplier: float,
            expected_cohort_size: float, rounds: int, max_participations: int,
            min_separation: int) -> Aggregator:
  """User-level DP mean with matrix-factorization (correlated) noise over a run of `rounds` rounds.

  Args:
    strategy: C_s, a `matrix_factorization` strategy (BandedToeplitz for
      BandMF / BSR, InverseBandedToeplitz for BISR, BufferedToeplitz for BLT,
      DenseStrategy, e.g. `binary_tree_strategy(rounds)`); checked on the host.
    clip_norm: C > 0, per-client L2 bound on the delta (may be traced: a
      sweep vmaps over it; its range is then checked on the host).
    noise_multiplier: sigma >= 0 (0: clipping only, no privacy); may be traced.
    expected_cohort_size: M > 0, the public denominator.
    rounds: n >= 1, rounds of the run the noise is calibrated for; a run
      may not be longer (the participation refuses it).
    max_participations: k >= 1, most rounds of the n one user takes part in.
    min_separation: b >= 1, fewest rounds between two participations of a user.

  Returns:
    An Aggregator with state `mf.StreamState`. Finalize adds
    sigma C sens * (row t of C_s^-1 Z) to the clipped sum and divides by M;
    it reports `noise_stddev` (per-coordinate std of this round's noise over
    M). `privacy` is `GaussianDpEvent(sigma)` for the whole run
    (rounds_per_event = n), zero-out relation, not amplified, requiring
    (k, b)-participation; for a banded strategy (BandedToeplitz, or a
    banded DenseStrategy) `privacy.banded` = (bands, sigma sens / largest
    column norm), which `CyclicPoisson` with b >= bands groups accounts as
    amplified BandMF.

  Raises:
    ValueError: an argument out of range, or a strategy of another size,
      named, before anything is traced.
  """
  # Traced values (a sweep vmaps over them) are checked by the sweep, on the host.
  concrete = (tree_util.is_concrete_number(clip_norm)
              and tree_util.is_concrete_number(noise_multiplier))
  if tree_util.is_concrete_number(clip_norm):
    check_positive("clip_norm", clip_norm)
  if tree_util.is_concrete_number(noise_multiplier):
    check_non_negative("noise_multiplier", noise_multiplier)
  check_positive("expected_cohort_size", expected_cohort_size)
  rounds = check_int("rounds", rounds, 1)
  max_participations = check_int("max_participations", max_participations, 1)
  min_separation = check_int("min_separation", min_separation, 1)
  sens = mf_sensitivity(strategy, rounds, max_participations, min_separation)
  noise_scale = noise_multiplier * clip_norm * sens.value
  row_norms = jnp.asarray(_inverse_row_norms(strategy, rounds), jnp.float32)

  def init(params):
    return mf.stream_init(strategy, params)

  def finalize(state, weighted_sum, total_weight, ctx):
    del total_weight  # The realised count would leak participation.
    std_row = row_norms[jnp.minimum(state.step, rounds - 1)]
    noise, new_state = mf.stream_next(strategy, state, ctx.key)
    noisy = jax.tree.map(lambda s, w: s + (noise_scale * w).astype(s.dtype), weighted_sum, noise)
    update = tree_util.scale(noisy, 1.0 / expected_cohort_size)
    return update, new_state, {
        "noise_stddev": noise_scale * std_row / expected_cohort_size}

  def event(relation):
    check_relation(relation, (ZERO_OUT,))
    # Traced values are accounted from the host's build of the same mechanism.
    return dp_accounting.GaussianDpEvent(float(noise_multiplier) if concrete else math.nan)

  kind = type(strategy).__name__
  banded = _bands_and_largest_column(strategy, rounds)
  if banded is not None:
    # One participation moves the release C_s x by at most C times the largest column norm.
    sigma_1 = float(noise_multiplier) * sens.value / banded[1] if concrete else math.nan
    banded = (banded[0], sigma_1)
  values = (f"clip_norm={clip_norm}, noise_multiplier={noise_multiplier}" if concrete
            else "traced hyper-parameters")
  privacy = RoundPrivacy(
      event, (ZERO_OUT,), amplified_by_sampling=False, rounds_per_event=rounds,
      participation=(max_participations, min_separation), banded=banded,
      description=(f"mf_mean({kind}, {values}, "
                   f"rounds={rounds}, k={max_participations}, b={min_separation}, "
                   f"sensitivity={sens.value:.6g} ({'exact' if sens.exact else 'upper bound'}))"))
  return Aggregator(init, clipping_prepare(clip_norm), finalize, privacy=privacy)
