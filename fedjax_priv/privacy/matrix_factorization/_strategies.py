"""Workloads A, strategies C and the expected error of B = A C^-1.

Notation (Denisov et al. 2022; Choquette-Choo et al. 2023). Over n rounds the
server wants A x, where row t of x in R^{n x d} is round t's clipped sum of
updates and A (n x n, lower triangular) is the workload: prefix sums for
DP-FTRL, or the map from gradients to SGD-with-momentum iterates. A matrix
mechanism factors A = B C and releases C x + Z (Z iid Gaussian rows), so the
server, which only post-processes, sees A x + B Z. Equivalently every round
adds row t of C^-1 Z to its sum (`streaming.py` draws that row), and the
prefix-sum error is B Z. Its expected size is `expected_error`; the noise
scale Z needs is sigma * clip * sens(C), with sens from `sensitivity.py`.

All strategies here are lower triangular. Four kinds, each a small frozen
dataclass registered as a pytree (its arrays are leaves, so a strategy passes
through `jax.jit` as an argument and its kind is static):

- `BandedToeplitz`: C Toeplitz with its first `bands` coefficients non-zero.
  BandMF (Choquette-Choo et al. 2023, "(Amplified) banded matrix
  factorization"; McKenna 2024 for the Toeplitz form), banded square root
  (BSR, Kalinin & Lampert 2024), and with bands = n any Toeplitz C, e.g. the
  square root of the prefix sum (Fichtenberger et al. 2023).
- `InverseBandedToeplitz`: C^-1 Toeplitz and banded: banded inverse square
  root (BISR, Kalinin, Upadhyay & Lampert 2025).
- `BufferedToeplitz`: BLT, C Toeplitz with c_0 = 1 and c_j = sum_i w_i
  theta_i^(j-1) (Dvijotham et al. 2024; McMahan, Xu & Zhang 2024).
- `DenseStrategy`: any invertible lower-triangular n x n C; the binary tree
  of DP-FTRL is one (`binary_tree_strategy`).

The first three are lower-triangular Toeplitz, i.e. the power series of a
rational function num(x)/den(x): host-side computations (coefficients of C,
C^-1 and B) are one `scipy.signal.lfilter` call each, in float64, with no n x n
matrix.

References:
  Denisov, McMahan, Rush, Smith & Thakurta 2022, "Improved Differential
  Privacy for SGD via Optimal Private Linear Operators on Adaptive Streams".
  Choquette-Choo, McMahan, Rush & Thakurta 2023, "Multi-Epoch Matrix
  Factorization Mechanisms for Private Machine Learning" (momentum and
  learning-rate cooldown workloads). Choquette-Choo, Ganesh, McKenna,
  McMahan, Rush, Thakurta & Xu 2023, "(Amplified) Banded Matrix
  Factorization: A unified approach to private training". McKenna 2024,
  "Scaling up the Banded Matrix Factorization Mechanism for Differentially
  Private ML". Fichtenberger, Henzinger & Upadhyay 2023, "Constant Matters:
  Fine-grained Error Bound on Differentially Private Continual Observation".
  Kalinin & Lampert 2024, "Banded Square Root Matrix Factorization for
  Differentially Private Model Training". Kalinin, Upadhyay & Lampert 2025,
  "Back to Square Roots: An Optimal Bound on the Matrix Factorization Error
  for Multi-Epoch Differentially Private SGD". Dvijotham, McMahan, Pillutla,
  Steinke & Thakurta 2024, "Efficient and Near-Optimal Noise Generation for
  Streaming Differential Privacy". McMahan, Xu & Zhang 2024, "A Hassle-free
  Algorithm for Private Learning in Practice: Don't Use Tree Aggregation, Use
  BLTs". Honaker 2015, "Efficient Use of Differentially Private Binary Trees";
  Kairouz et al. 2021, "Practical and Private (Deep) Learning without
  Sampling or Shuffling".
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple, Union

import jax
import numpy as np
import scipy.linalg
import scipy.signal


def _check_size(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return int(value)


def _float_vector(owner: str, name: str, value: Any) -> np.ndarray | None:
  """The value as float64, or None for a traced value once its shape is checked."""
  shape = np.shape(value)
  if len(shape) != 1 or shape[0] == 0:
    raise ValueError(f"{owner}.{name} must be a non-empty 1-D array, got shape {shape}")
  if isinstance(value, jax.core.Tracer):
    return None
  array = np.asarray(value, dtype=np.float64)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{owner}.{name} must be finite, got {array}")
  return array


# ----------------------------------------------------------------------------
# Workloads.


@dataclasses.dataclass(frozen=True, eq=False)
class Workload:
  """The workload A (n x n) of SGD with momentum and a learning-rate schedule.

  Heavy-ball momentum m_u = beta m_{u-1} + g_u and iterates theta_t =
  theta_0 - sum_{u <= t} eta_u m_u give theta_t - theta_0 = -(A g)_t with

    A[t, s] = sum_{u=s}^{t} eta_u beta^(u - s)      (s <= t, else 0),

  i.e. A = L diag(eta) M with L the prefix-sum matrix and M[u, s] =
  beta^(u - s). beta = 0 and eta = 1 give prefix sums (DP-FTRL). A is
  Toeplitz (coefficients a_j = sum_{i <= j} beta^i) when the learning rate is
  constant; a schedule such as a cooldown makes it the learning-rate-aware
  workload of Choquette-Choo et al. 2023 (multi-epoch MF, Sec. 5).

  Attributes:
    n: rounds, >= 1.
    momentum: beta in [0, 1).
    learning_rates: None (constant 1) or n non-negative finite numbers;
      only their ratios matter to the choice of strategy.
  """
  n: int
  momentum: float = 0.0
  learning_rates: Any = None

  def __post_init__(self):
    _check_size("Workload.n", self.n)
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"Workload.momentum must be in [0, 1), got {self.momentum!r}")
    if self.learning_rates is not None:
      rates = _float_vector("Workload", "learning_rates", self.learning_rates)
      if rates.shape != (self.n,) or np.any(rates < 0):
        raise ValueError(f"Workload.learning_rates must be {self.n} numbers >= 0, got shape "
                         f"{rates.shape} and minimum {rates.min()}")
      object.__setattr__(self, "learning_rates", rates)

  @property
  def is_toeplitz(self) -> bool:
    """Whether A is Toeplitz (constant learning rate)."""
    rates = self.learning_rates
    return rates is None or bool(np.all(rates == rates[0]))

  def momentum_coefs(self) -> np.ndarray:
    """beta^j for j < n: the Toeplitz coefficients of M, float64 [n]."""
    return self.momentum ** np.arange(self.n, dtype=np.float64)

  def rates(self) -> np.ndarray:
    """eta, float64 [n] (ones when no schedule is set)."""
    if self.learning_rates is None:
      return np.ones(self.n)
    return self.learning_rates

  def toeplitz_coefs(self) -> np.ndarray:
    """a_j = eta sum_{i <= j} beta^i, float64 [n]; requires a constant learning rate."""
    if not self.is_toeplitz:
      raise ValueError("Workload.toeplitz_coefs: A is not Toeplitz under a varying learning rate")
    return self.rates()[0] * np.cumsum(self.momentum_coefs())

  def matrix(self) -> np.ndarray:
    """A, float64 [n, n], lower triangular."""
    m = scipy.linalg.toeplitz(self.momentum_coefs(), np.zeros(self.n))
    return np.cumsum(self.rates()[:, None] * m, axis=0)


def cooldown_learning_rates(n: int, cooldown_steps: int, final_fraction: float = 0.0) -> np.ndarray:
  """A constant learning rate of 1 with a linear cooldown over the last rounds.

  Args:
    n: rounds, >= 1.
    cooldown_steps: rounds of linear decay at the end, in [0, n].
    final_fraction: learning rate of the last round, in [0, 1].

  Returns:
    float64 [n]: ones, then `cooldown_steps` values falling linearly to
    `final_fraction` (the cooldown of Choquette-Choo et al. 2023, Sec. 5).
  """
  n = _check_size("n", n)
  if (isinstance(cooldown_steps, bool) or not isinstance(cooldown_steps, numbers.Integral)
      or not 0 <= cooldown_steps <= n):
    raise ValueError(f"cooldown_steps must be an integer in [0, {n}], got {cooldown_steps!r}")
  if not 0.0 <= final_fraction <= 1.0:
    raise ValueError(f"final_fraction must be in [0, 1], got {final_fraction!r}")
  rates = np.ones(n)
  if cooldown_steps:
    rates[n - cooldown_steps:] = np.linspace(1.0, final_fraction, cooldown_steps + 1)[1:]
  return rates


def square_root_coefs(n: int, momentum: float = 0.0) -> np.ndarray:
  """Toeplitz coefficients of the square root of the momentum workload, float64 [n].

  With A(x) = 1 / ((1 - x)(1 - beta x)) the generating function of the
  constant-rate workload, these are the first n coefficients of
  (1 - x)^(-1/2) (1 - beta x)^(-1/2); with beta = 0 they are
  r_j = binom(2j, j) / 4^j, positive and decreasing, the factorization
  A = C C of Fichtenberger et al. 2023, truncated to bands by BSR (Kalinin &
  Lampert 2024).
  """
  n = _check_size("n", n)
  j = np.arange(1, n)
  r = np.concatenate([[1.0], np.cumprod((2 * j - 1) / (2 * j))])
  return np.convolve(r, r * momentum ** np.arange(n))[:n]


def inverse_square_root_coefs(n: int, momentum: float = 0.0) -> np.ndarray:
  """First n coefficients of (1 - x)^(1/2) (1 - beta x)^(1/2), float64 [n]: C^-1 of BISR."""
  n = _check_size("n", n)
  j = np.arange(1, n)
  s = np.concatenate([[1.0], np.cumprod((j - 1.5) / j)])
  return np.convolve(s, s * momentum ** np.arange(n))[:n]


# ----------------------------------------------------------------------------
# Strategies.


def _pytree(cls):
  fields = [field.name for field in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree
@dataclasses.dataclass(frozen=True, eq=False)
class BandedToeplitz:
  """C[i, j] = coefs[i - j] for 0 <= i - j < bands = len(coefs), else 0.

  BandMF in Toeplitz form, BSR, or any Toeplitz C (bands = n). Noise is
  generated by the recursion c_0 w_t = z_t - sum_{0<l<bands} c_l w_{t-l}.

  Attributes:
    coefs: [bands] float, coefs[0] != 0.
  """
  coefs: Any


@_pytree
@dataclasses.dataclass(frozen=True, eq=False)
class InverseBandedToeplitz:
  """C^-1 lower-triangular Toeplitz with coefficients `inverse_coefs` (banded).

  BISR (Kalinin, Upadhyay & Lampert 2025): the noise is the moving average
  w_t = sum_{l < bands} e_l z_{t-l}; C itself is a full Toeplitz matrix.

  Attributes:
    inverse_coefs: [bands] float, inverse_coefs[0] != 0.
  """
  inverse_coefs: Any


@_pytree
@dataclasses.dataclass(frozen=True, eq=False)
class BufferedToeplitz:
  """BLT: C Toeplitz with c_0 = 1 and c_j = sum_i output_scale_i buffer_decay_i^(j-1), j >= 1.

  C(x) = 1 + x sum_i w_i / (1 - theta_i x) is rational of degree m, so both
  C and C^-1 act on a stream with m buffers (Dvijotham et al. 2024; McMahan,
  Xu & Zhang 2024, Alg. 3).

  Attributes:
    buffer_decay: theta, [m] float in [0, 1).
    output_scale: w, [m] float.
  """
  buffer_decay: Any
  output_scale: Any


@_pytree
@dataclasses.dataclass(frozen=True, eq=False)
class DenseStrategy:
  """Any lower-triangular C with a non-zero diagonal, stored whole.

  Attributes:
    matrix: [n, n] float.
  """
  matrix: Any


Strategy = Union[BandedToeplitz, InverseBandedToeplitz, BufferedToeplitz, DenseStrategy]
TOEPLITZ_KINDS = (BandedToeplitz, InverseBandedToeplitz, BufferedToeplitz)


def banded_square_root(bands: int, momentum: float = 0.0) -> BandedToeplitz:
  """BSR: the square root of the momentum workload truncated to `bands` (Kalinin & Lampert 2024)."""
  return BandedToeplitz(square_root_coefs(bands, momentum))


def banded_inverse_square_root(bands: int, momentum: float = 0.0) -> InverseBandedToeplitz:
  """BISR: C^-1 = the inverse square root, truncated to `bands`.

  Kalinin, Upadhyay & Lampert 2025.
  """
  return InverseBandedToeplitz(inverse_square_root_coefs(bands, momentum))


def binary_tree_strategy(n: int) -> DenseStrategy:
  """The online binary-tree mechanism of DP-FTRL as a square C (n x n).

  Tree aggregation (Dwork et al. 2010; Honaker 2015; Kairouz et al. 2021)
  draws one new node per round: at round t (1-based) the dyadic block
  (t - 2^v, t], 2^v the lowest set bit of t; the prefix sum t adds the nodes
  of the binary decomposition of t. So row t - 1 of C is the indicator of
  that block, C is lower triangular with a unit diagonal, and B = A C^-1 is
  the 0/1 matrix choosing popcount(t) nodes: the same noise, round for round,
  as `fedjax_priv.privacy.dp_ftrl` without restarts. Column j has
  bit_length(n) ones at most (j = 0), so sens = sqrt(bit_length(n)) =
  sqrt(ceil(log2(n + 1))) for one participation.
  """
  n = _check_size("n", n)
  matrix = np.zeros((n, n))
  for t in range(1, n + 1):
    matrix[t - 1, t - (t & -t):t] = 1.0
  return DenseStrategy(matrix)


def check_strategy(strategy: Strategy, n: int | None = None) -> None:
  """Raises ValueError naming the field when `strategy` is not a valid C (of size n, if given).

  Checks shapes always and values (finite, invertible, decays in [0, 1),
  lower triangular) where the arrays are concrete: call it on the host
  before tracing, as `sensitivity` and `stream_init` do.
  """
  if n is not None:
    _check_size("n", n)
  name = type(strategy).__name__
  if isinstance(strategy, BandedToeplitz):
    coefs = _float_vector(name, "coefs", strategy.coefs)
    if coefs is not None and coefs[0] == 0:
      raise ValueError(f"{name}.coefs[0] must be non-zero (C is singular otherwise)")
  elif isinstance(strategy, InverseBandedToeplitz):
    coefs = _float_vector(name, "inverse_coefs", strategy.inverse_coefs)
    if coefs is not None and coefs[0] == 0:
      raise ValueError(f"{name}.inverse_coefs[0] must be non-zero (C^-1 is singular otherwise)")
  elif isinstance(strategy, BufferedToeplitz):
    decay = _float_vector(name, "buffer_decay", strategy.buffer_decay)
    _float_vector(name, "output_scale", strategy.output_scale)
    if np.shape(strategy.buffer_decay) != np.shape(strategy.output_scale):
      raise ValueError(f"{name}.buffer_decay and output_scale must have the same shape, got "
                       f"{np.shape(strategy.buffer_decay)} and {np.shape(strategy.output_scale)}")
    if decay is not None and (np.any(decay < 0) or np.any(decay >= 1)):
      raise ValueError(f"{name}.buffer_decay must lie in [0, 1), got {decay}")
  elif isinstance(strategy, DenseStrategy):
    shape = np.shape(strategy.matrix)
    if len(shape) != 2 or shape[0] != shape[1]:
      raise ValueError(f"{name}.matrix must be square, got shape {shape}")
    if n is not None and shape[0] != n:
      raise ValueError(f"{name}.matrix is {shape[0]} x {shape[0]}, but n = {n}")
    if isinstance(strategy.matrix, jax.core.Tracer):
      return
    matrix = np.asarray(strategy.matrix, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
      raise ValueError(f"{name}.matrix must be finite")
    if np.any(np.triu(matrix, 1) != 0):
      raise ValueError(f"{name}.matrix must be lower triangular")
    if np.any(np.diag(matrix) == 0):
      raise ValueError(f"{name}.matrix must have a non-zero diagonal (C is singular otherwise)")
  else:
    raise TypeError(f"not a matrix-factorization strategy: {type(strategy).__name__}")


def _blt_rational(decay: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  # C(x) = 1 + x sum_i w_i / (1 - theta_i x) = P(x) / Q(x) with
  # Q = prod_i (1 - theta_i x) and P = Q + x sum_i w_i prod_{j != i} (1 - theta_j x).
  factors = [np.array([1.0, -theta]) for theta in decay]
  den = np.array([1.0])
  for factor in factors:
    den = np.convolve(den, factor)
  num = np.concatenate([den, [0.0]])
  for i, w in enumerate(scale):
    others = np.array([1.0])
    for j, factor in enumerate(factors):
      if j != i:
        others = np.convolve(others, factor)
    num[1:1 + others.size] += w * others
  return num, den


def rational_form(strategy: Strategy) -> tuple[np.ndarray, np.ndarray]:
  """(num, den): C(x) = num(x) / den(x) as ascending float64 coefficients, for Toeplitz kinds."""
  check_strategy(strategy)
  if isinstance(strategy, BandedToeplitz):
    return np.asarray(strategy.coefs, np.float64), np.ones(1)
  if isinstance(strategy, InverseBandedToeplitz):
    return np.ones(1), np.asarray(strategy.inverse_coefs, np.float64)
  if isinstance(strategy, BufferedToeplitz):
    return _blt_rational(np.asarray(strategy.buffer_decay, np.float64),
                         np.asarray(strategy.output_scale, np.float64))
  raise TypeError(f"{type(strategy).__name__} is not a Toeplitz strategy")


def _series(num: np.ndarray, den: np.ndarray, signal: np.ndarray) -> np.ndarray:
  # Power series of num(x) / den(x) times signal(x), truncated to len(signal).
  return scipy.signal.lfilter(num, den, signal)


def _impulse(n: int) -> np.ndarray:
  impulse = np.zeros(n)
  impulse[0] = 1.0
  return impulse


def toeplitz_coefs(strategy: Strategy, n: int) -> np.ndarray:
  """C[:, 0] of a Toeplitz strategy of size n, float64 [n]."""
  num, den = rational_form(strategy)
  return _series(num, den, _impulse(_check_size("n", n)))


def inverse_toeplitz_coefs(strategy: Strategy, n: int) -> np.ndarray:
  """C^-1[:, 0] of a Toeplitz strategy of size n, float64 [n]."""
  num, den = rational_form(strategy)
  return _series(den, num, _impulse(_check_size("n", n)))


def strategy_matrix(strategy: Strategy, n: int) -> np.ndarray:
  """C as a dense float64 [n, n] matrix."""
  if isinstance(strategy, DenseStrategy):
    check_strategy(strategy, n)
    return np.asarray(strategy.matrix, np.float64)
  return scipy.linalg.toeplitz(toeplitz_coefs(strategy, n), np.zeros(n))


# ----------------------------------------------------------------------------
# Expected error.


class ExpectedError(NamedTuple):
  """Error of the prefix-sum (workload) estimates per unit of noise.

  For noise rows Z with iid N(0, 1) entries the error of estimate t is
  (B Z)_t, per coordinate N(0, ||B_t||^2). Multiply both numbers by
  sigma * clip * sens(C) for the error of the calibrated mechanism.

  Attributes:
    rmse: sqrt(mean_t ||B_t||^2) = ||B||_F / sqrt(n).
    max_error: max_t ||B_t|| (the largest per-round standard deviation).
  """
  rmse: float
  max_error: float


def _error_from_matrix(b: np.ndarray) -> ExpectedError:
  row_squares = np.sum(np.square(b), axis=1)
  return ExpectedError(float(np.sqrt(np.mean(row_squares))), float(np.sqrt(np.max(row_squares))))


def noise_to_error_matrix(strategy: Strategy, workload: Workload) -> np.ndarray:
  """B = A C^-1, float64 [n, n], computed directly from the dense matrices (the reference)."""
  n = workload.n
  c = strategy_matrix(strategy, n)
  # B C = A  <=>  C^T B^T = A^T.
  return scipy.linalg.solve_triangular(c.T, workload.matrix().T, lower=False).T


def expected_error(strategy: Strategy, workload: Workload) -> ExpectedError:
  """RMSE and max error of A x estimated with noise Z C^-1 (unit-variance Z).

  Toeplitz C with a Toeplitz workload (constant learning rate): B is Toeplitz
  with b = a * C^-1[:, 0] (power-series product), and row t of B holds
  b_0..b_t, so ||B||_F^2 = sum_j (n - j) b_j^2 and the last row is the
  largest: O(n * degree), no matrix. Toeplitz C with a learning-rate
  schedule: A C^-1 = L diag(eta) T(f) with f = beta-powers * C^-1[:, 0], so
  column s of B is a cumulative sum of eta_u f_(u - s): O(n^2) time and
  memory. Dense C: B by a triangular solve, O(n^3).

  Args:
    strategy: C; a DenseStrategy must be workload.n x workload.n.
    workload: A, with its n.

  Returns:
    ExpectedError(rmse, max_error), floats.
  """
  n = workload.n
  if isinstance(strategy, DenseStrategy):
    return _error_from_matrix(noise_to_error_matrix(strategy, workload))
  num, den = rational_form(strategy)
  if workload.is_toeplitz:
    b = _series(den, num, workload.toeplitz_coefs())
    squares = np.square(b)
    return ExpectedError(float(np.sqrt(np.dot(n - np.arange(n), squares) / n)),
                         float(np.sqrt(np.sum(squares))))
  f = _series(den, num, workload.momentum_coefs())
  lag = np.arange(n)[:, None] - np.arange(n)[None, :]
  g = np.where(lag >= 0, workload.rates()[:, None] * f[np.maximum(lag, 0)], 0.0)
  return _error_from_matrix(np.cumsum(g, axis=0))
