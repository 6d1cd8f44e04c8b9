"""Sensitivity of a strategy C under (k, b)-participation.

Neighbouring relation: user level, zero-out. A user takes part in the rounds
of a pattern pi from Pi(k, b): at most k rounds, any two at least b apart
(b-min-separation; b = 1 allows consecutive rounds). Its neighbour replaces
all of that user's contributions by zero, which for a fixed participation
schedule is the same as removing the user (add/remove). Each contribution
g_i is clipped to ||g_i|| <= 1 (in units of the clip norm), so

  sens(C)^2 = max_{pi in Pi(k, b)} max_{||g_i|| <= 1} ||sum_{i in pi} C[:, i] g_i^T||_F^2
            = max_pi max_g sum_{i, j in pi} X[i, j] <g_i, g_j>,   X = C^T C,

and the release C x + sigma * sens(C) * Z is the Gaussian mechanism of
noise multiplier sigma for the whole run: one `GaussianDpEvent(sigma)`,
not one per round. Replacing a user by another one (replace-one) moves two
patterns and is not what this computes.

Exact values (Choquette-Choo et al. 2023, "(Amplified) banded MF", for
banded C and its Alg. 3; Kalinin & Lampert 2024, Thm. 2, for decreasing
Toeplitz C):

- k = 1: the largest column norm of C.
- C with at most b bands: columns of one pattern are orthogonal, so
  sens^2 = max_pi sum_{i in pi} ||C[:, i]||^2, a dynamic programme over
  positions; for Toeplitz C the column norms fall with i, so the earliest
  pattern 0, b, 2b, ... attains it.
- Toeplitz C with non-negative, non-increasing coefficients: the earliest
  pattern attains the maximum. Proof: for s <= t, X[s, t] =
  sum_{u=0}^{n-1-t} c_u c_(u + t - s) grows as the gap t - s shrinks (each
  term grows) and as t shrinks (more non-negative terms); the earliest
  pattern has, pair by pair, smaller gaps and earlier positions than any
  other pattern of the same size, and X >= 0 makes more participations and
  g_i all equal the worst case.

Upper bounds for any C: Toeplitz C by the smallest non-increasing majorant
c' of |c| (|X| <= X' entrywise, and the bound sum |X[pi, pi]| is exact for
C'); dense C by Alg. 4 of Choquette-Choo et al. 2023 (best row-wise patterns
of |X|, then the best pattern of those row values).
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Any

import numpy as np

from fedjax_priv.privacy.matrix_factorization._strategies import (
    TOEPLITZ_KINDS, BandedToeplitz, Strategy, check_strategy, strategy_matrix, toeplitz_coefs)


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def participations_possible(n: int, max_participations: int, min_separation: int) -> int:
  """k' = min(k, ceil(n / b)): participations one pattern can actually hold in n rounds."""
  n = _check_int("n", n, 1)
  k = _check_int("max_participations", max_participations, 1)
  b = _check_int("min_separation", min_separation, 1)
  return min(k, -(-n // b))


def earliest_pattern_squared(coefs: Any, min_separation: int, participations: int, xp=np) -> Any:
  """||sum_{j < k} C[:, j b]||^2 for Toeplitz C with first column `coefs` (length n).

  Entry t of the sum is sum_{j <= min(k - 1, t // b)} c_(t - j b): a cumulative
  sum along stride b minus the same sum k strides back, O(n). Works for numpy
  (`xp=np`, float64 host values) and jax.numpy (`xp=jnp`, inside the
  optimiser's loss, differentiable).

  Args:
    coefs: [n] coefficients of C.
    min_separation: b >= 1.
    participations: k' from `participations_possible` (a Python int).
    xp: numpy or jax.numpy.
  """
  n = coefs.shape[0]
  b = min_separation
  padded = xp.concatenate([coefs, xp.zeros((-n) % b, coefs.dtype)])
  sums = xp.cumsum(padded.reshape(-1, b), axis=0).reshape(-1)
  shift = min(participations * b, sums.shape[0])
  earlier = xp.concatenate([xp.zeros(shift, sums.dtype), sums[:sums.shape[0] - shift]])
  column_sum = (sums - earlier)[:n]
  return xp.dot(column_sum, column_sum)


def best_pattern_sum(weights: np.ndarray, min_separation: int, participations: int) -> np.ndarray:
  """max over patterns pi in Pi(k, b) of sum_{i in pi} weights[..., i], for every leading index.

  The dynamic programme VecSens (Choquette-Choo et al. 2023, Alg. 3):
  f_k[i] = max(f_k[i + 1], w[i] + f_{k-1}[i + b]), vectorised over i and over
  leading axes of `weights`; O(k n) per row. The empty pattern counts, so
  the result is >= 0.

  Args:
    weights: [..., n] float.
    min_separation: b >= 1.
    participations: k >= 1.

  Returns:
    [...] float64.
  """
  weights = np.asarray(weights, np.float64)
  n = weights.shape[-1]
  b = min_separation
  best = np.zeros(weights.shape[:-1] + (n + b,))
  for _ in range(participations):
    take = np.zeros_like(best)
    take[..., :n] = weights + best[..., b:b + n]
    best = np.maximum.accumulate(take[..., ::-1], axis=-1)[..., ::-1]
  return best[..., 0]


def _is_non_increasing_non_negative(coefs: np.ndarray) -> bool:
  return bool(np.all(coefs >= 0) and np.all(np.diff(coefs) <= 0))


def _bandwidth(matrix: np.ndarray) -> int:
  rows, cols = np.nonzero(matrix)
  return int(np.max(rows - cols)) + 1


def sensitivity(strategy: Strategy, n: int, max_participations: int = 1,
                min_separation: int = 1) -> float:
  """Exact L2 sensitivity of C (n x n) under (k, b)-participation, zero-out neighbours.

  Exact where a theorem gives it (see the module docstring): k' = 1; C with
  at most b bands (BandedToeplitz, or a DenseStrategy whose non-zeros lie
  within b diagonals); Toeplitz C with non-negative, non-increasing
  coefficients (BISR, BLT with w >= 0 and sum w <= 1, BSR).

  Args:
    strategy: C.
    n: rounds, >= 1 (a DenseStrategy must be n x n).
    max_participations: k >= 1.
    min_separation: b >= 1 rounds between two participations of a user.

  Returns:
    sens(C) in units of the clip norm.

  Raises:
    ValueError: a bad argument, or no exact method applies (then use
      `sensitivity_upper_bound`, a valid bound for any C).
  """
  check_strategy(strategy, n)
  k = participations_possible(n, max_participations, min_separation)
  b = min_separation
  if isinstance(strategy, TOEPLITZ_KINDS):
    coefs = toeplitz_coefs(strategy, n)
    banded = isinstance(strategy, BandedToeplitz) and len(strategy.coefs) <= b
    if k == 1 or banded or _is_non_increasing_non_negative(coefs):
      return float(math.sqrt(earliest_pattern_squared(coefs, b, k)))
    raise ValueError(
        f"no exact sensitivity for {type(strategy).__name__} under k={k} participations "
        f"{b} apart: its Toeplitz coefficients are not non-negative and non-increasing"
        + (f" and it has {len(strategy.coefs)} > {b} bands" if isinstance(strategy, BandedToeplitz)
           else "") + "; use sensitivity_upper_bound")
  matrix = strategy_matrix(strategy, n)
  column_squares = np.sum(np.square(matrix), axis=0)
  if k == 1:
    return float(math.sqrt(np.max(column_squares)))
  if _bandwidth(matrix) <= b:
    return float(math.sqrt(best_pattern_sum(column_squares, b, k)))
  raise ValueError(
      f"no exact sensitivity for a DenseStrategy with {_bandwidth(matrix)} > {b} bands under "
      f"k={k} participations; use sensitivity_upper_bound")


def sensitivity_upper_bound(strategy: Strategy, n: int, max_participations: int = 1,
                            min_separation: int = 1) -> float:
  """An upper bound on sens(C) that holds for every C (signs of any kind).

  Toeplitz kinds: the exact sensitivity of the Toeplitz matrix whose
  coefficients are the smallest non-increasing majorant of |c|
  (c'_j = max_{i >= j} |c_i|), O(n); equal to `sensitivity` when c is
  already non-negative and non-increasing. Dense C: Alg. 4 of
  Choquette-Choo et al. 2023 on |C^T C|, O(k n^2) time and O(n^2) memory.

  Args and units as `sensitivity`.
  """
  check_strategy(strategy, n)
  k = participations_possible(n, max_participations, min_separation)
  b = min_separation
  if isinstance(strategy, TOEPLITZ_KINDS):
    coefs = np.abs(toeplitz_coefs(strategy, n))
    majorant = np.maximum.accumulate(coefs[::-1])[::-1]
    return float(math.sqrt(earliest_pattern_squared(majorant, b, k)))
  matrix = strategy_matrix(strategy, n)
  gram = np.abs(matrix.T @ matrix)
  row_best = best_pattern_sum(gram, b, k)
  return float(math.sqrt(best_pattern_sum(row_best, b, k)))


def _patterns(n: int, participations: int, min_separation: int):
  for size in range(1, participations + 1):
    for pattern in itertools.combinations(range(n), size):
      if all(q - p >= min_separation for p, q in zip(pattern, pattern[1:])):
        yield pattern


def brute_force_sensitivity(matrix: Any, max_participations: int = 1,
                            min_separation: int = 1) -> float:
  """sens(C) by enumerating every pattern of Pi(k, b) and every sign vector (small n only).

  For each pattern pi and signs s in {-1, +1}^|pi| (contributions g_i =
  s_i u for one unit vector u) it takes s^T X[pi, pi] s. This is the exact
  sensitivity when X = C^T C >= 0 entrywise (all signs + are then optimal)
  or when no two columns of a pattern interact (banded C), and a lower bound
  attained by real neighbours otherwise (the worst g may not be collinear).
  Cost: (number of patterns) * 2^(k-1) * k^2.

  Args:
    matrix: C, [n, n] float.
    max_participations: k >= 1.
    min_separation: b >= 1.
  """
  matrix = np.asarray(matrix, np.float64)
  n = matrix.shape[0]
  k = participations_possible(n, max_participations, min_separation)
  gram = matrix.T @ matrix
  best = 0.0
  for pattern in _patterns(n, k, min_separation):
    block = gram[np.ix_(pattern, pattern)]
    for tail in itertools.product((1.0, -1.0), repeat=len(pattern) - 1):
      signs = np.array((1.0,) + tail)
      best = max(best, float(signs @ block @ signs))
  return math.sqrt(best)
