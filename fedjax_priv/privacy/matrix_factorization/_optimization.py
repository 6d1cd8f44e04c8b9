"""Optimising BandMF and BLT strategies in JAX.

Both minimise log sens(C)^2 + log err(C)^2: sigma * clip * sens(C) is the
noise Z needs and err(C) the error per unit of it, so their product is the
error of the calibrated mechanism, and the loss is invariant to rescaling C
(c_0 = 1 is fixed). err is the RMSE (or the max error) of `expected_error`.

The loss never forms an n x n matrix for a constant learning rate: C^-1's
first column comes from a `lax.scan` over n rounds (the BandMF recursion with
a window of bands - 1 values, or the BLT buffers), B's from an FFT product
with the workload's coefficients, and the sensitivity from
`earliest_pattern_squared`; so a value and gradient cost O(n (bands +
log n)). A learning-rate schedule costs O(n^2) (see `expected_error`).
L-BFGS (optax, zoom line search) runs in float64 inside one `lax.while_loop`.

The parameterisations keep the sensitivity formula exact (see
`sensitivity.py`):

- BandMF with bands <= b, or k' = 1: any coefficients c = (1, u).
- BandMF with more bands than b and k' > 1: c non-negative and
  non-increasing, c_j = prod_{i <= j} sigmoid(u_i).
- BLT: theta = sigmoid(alpha), w = softmax(kappa, 0)[:m], so w >= 0 and
  sum w < 1 = c_0: c is non-negative and non-increasing for every parameter
  value (the cone McMahan, Xu & Zhang 2024 also optimise over for
  multiple participations).

References:
  McKenna 2024, "Scaling up the Banded Matrix Factorization Mechanism for
  Differentially Private ML" (Toeplitz BandMF, its loss in O(n bands)).
  Choquette-Choo et al. 2023, "(Amplified) Banded Matrix Factorization".
  Dvijotham et al. 2024, "Efficient and Near-Optimal Noise Generation for
  Streaming Differential Privacy"; McMahan, Xu & Zhang 2024, "A Hassle-free
  Algorithm for Private Learning in Practice" (BLT optimisation).
  Liu & Nocedal 1989 (L-BFGS).
"""

from __future__ import annotations

import numbers
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.scipy.signal import fftconvolve

from fedjax_priv.privacy.matrix_factorization._sensitivity import (earliest_pattern_squared,
                                                                    participations_possible)
from fedjax_priv.privacy.matrix_factorization._strategies import (BandedToeplitz,
                                                                   BufferedToeplitz, Workload,
                                                                   square_root_coefs)

ERRORS = ("rmse", "max")


def _check_common(workload: Workload, error: str, max_steps: int) -> None:
  if not isinstance(workload, Workload):
    raise TypeError(f"workload must be a Workload, got {type(workload).__name__}")
  if error not in ERRORS:
    raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
  if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
    raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")


def _banded_inverse_column(coefs: jax.Array, n: int) -> jax.Array:
  """C^-1[:, 0] for banded Toeplitz C: e = 1 / c as a power series, [n]."""
  window = coefs.shape[0] - 1
  impulse = jnp.zeros(n, coefs.dtype).at[0].set(1.0)
  if window == 0:
    return impulse / coefs[0]

  def step(recent, delta):  # recent: e_(t-1), ..., e_(t-window)
    e = (delta - jnp.dot(coefs[1:], recent)) / coefs[0]
    return jnp.concatenate([e[None], recent[:-1]]), e

  return lax.scan(step, jnp.zeros(window, coefs.dtype), impulse)[1]


def _blt_inverse_column(decay: jax.Array, scale: jax.Array, n: int) -> jax.Array:
  """C^-1[:, 0] for a BLT: its stream (Alg. 3 of McMahan et al. 2024) run on an impulse."""
  impulse = jnp.zeros(n, decay.dtype).at[0].set(1.0)

  def step(buffers, delta):
    w = delta - jnp.dot(scale, buffers)
    return decay * buffers + w, w

  return lax.scan(step, jnp.zeros_like(decay), impulse)[1]


def _blt_coefs(decay: jax.Array, scale: jax.Array, n: int) -> jax.Array:
  powers = decay[None, :] ** jnp.arange(n - 1, dtype=decay.dtype)[:, None]
  return jnp.concatenate([jnp.ones(1, decay.dtype), powers @ scale])


def _error_squared(inverse_column: jax.Array, workload: Workload, error: str) -> jax.Array:
  """err(C)^2 of `expected_error` from C^-1[:, 0] (jnp, differentiable)."""
  n = workload.n
  if workload.is_toeplitz:
    b = fftconvolve(jnp.asarray(workload.toeplitz_coefs()), inverse_column)[:n]
    squares = jnp.square(b)
    if error == "max":  # Rows of B are nested prefixes of b: the last is the largest.
      return jnp.sum(squares)
    return jnp.dot(jnp.arange(n, 0, -1, dtype=squares.dtype), squares) / n
  f = fftconvolve(jnp.asarray(workload.momentum_coefs()), inverse_column)[:n]
  lag = np.arange(n)[:, None] - np.arange(n)[None, :]
  g = jnp.where(lag >= 0, jnp.asarray(workload.rates())[:, None] * f[np.maximum(lag, 0)], 0.0)
  row_squares = jnp.sum(jnp.square(jnp.cumsum(g, axis=0)), axis=1)
  return jnp.max(row_squares) if error == "max" else jnp.mean(row_squares)


def _minimize(loss: Callable, params: jax.Array, max_steps: int, tolerance: float) -> jax.Array:
  """L-BFGS with a zoom line search until the gradient norm is below `tolerance`."""
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def keep_going(carry):
    _, state = carry
    count = optax.tree_utils.tree_get(state, "count")
    grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
    return (count == 0) | ((count < max_steps) & (grad_norm >= tolerance))

  return lax.while_loop(keep_going, step, (params, solver.init(params)))[0]


def optimize_banded_toeplitz(workload: Workload, bands: int, max_participations: int = 1,
                             min_separation: int = 1, *, error: str = "rmse",
                             max_steps: int = 500, tolerance: float = 1e-8) -> BandedToeplitz:
  """BandMF in Toeplitz form: the coefficients minimising sens(C) * err(C).

  Starts from BSR (the truncated square root of the workload's momentum
  part), which is already within a few percent for prefix sums.

  Args:
    workload: A (its n fixes the horizon).
    bands: p in [1, n].
    max_participations: k >= 1.
    min_separation: b >= 1; bands <= b keeps any signs allowed.
    error: "rmse" or "max" (`expected_error`'s two numbers).
    max_steps: L-BFGS iterations at most.
    tolerance: stop when the loss gradient's norm falls below it.

  Returns:
    BandedToeplitz with float64 numpy coefficients, coefs[0] = 1.
  """
  _check_common(workload, error, max_steps)
  n = workload.n
  if isinstance(bands, bool) or not isinstance(bands, numbers.Integral) or not 1 <= bands <= n:
    raise ValueError(f"bands must be an integer in [1, {n}], got {bands!r}")
  k = participations_possible(n, max_participations, min_separation)
  b = min_separation
  start = square_root_coefs(bands, workload.momentum)
  monotone = bands > b and k > 1
  if bands == 1:
    return BandedToeplitz(np.ones(1))

  with jax.enable_x64(True):
    if monotone:
      # Strictly below 1, so the logits are finite.
      ratios = np.minimum(start[1:] / start[:-1], 1.0 - 1e-6)
      init = jnp.asarray(np.log(ratios) - np.log1p(-ratios))

      def coefficients(params):
        return jnp.exp(jnp.concatenate([jnp.zeros(1), jnp.cumsum(jax.nn.log_sigmoid(params))]))
    else:
      init = jnp.asarray(start[1:])

      def coefficients(params):
        return jnp.concatenate([jnp.ones(1), params])

    def loss(params):
      coefs = coefficients(params)
      full = jnp.concatenate([coefs, jnp.zeros(n - bands)])
      return (jnp.log(earliest_pattern_squared(full, b, k, xp=jnp))
              + jnp.log(_error_squared(_banded_inverse_column(coefs, n), workload, error)))

    params = jax.jit(lambda p: _minimize(loss, p, max_steps, tolerance))(init)
    coefs = np.asarray(coefficients(params), np.float64)
  return BandedToeplitz(coefs)


def optimize_blt(workload: Workload, buffers: int, max_participations: int = 1,
                 min_separation: int = 1, *, error: str = "rmse", max_steps: int = 500,
                 tolerance: float = 1e-8) -> BufferedToeplitz:
  """BLT parameters (theta, w) minimising sens(C) * err(C), with w >= 0 and sum w < 1.

  Starts from decays with 1 - theta spread geometrically over [2/n, 1/2]
  and equal scales summing to 1/2.

  Args:
    workload: A (its n fixes the horizon).
    buffers: m >= 1.
    max_participations, min_separation, error, max_steps, tolerance: as
      `optimize_banded_toeplitz`.

  Returns:
    BufferedToeplitz with float64 numpy parameters, decays sorted descending.
  """
  _check_common(workload, error, max_steps)
  if isinstance(buffers, bool) or not isinstance(buffers, numbers.Integral) or buffers < 1:
    raise ValueError(f"buffers must be an integer >= 1, got {buffers!r}")
  n = workload.n
  k = participations_possible(n, max_participations, min_separation)
  b = min_separation
  gaps = np.geomspace(min(2.0 / n, 0.5), 0.5, buffers)
  start_decay = 1.0 - gaps
  # softmax([kappa, 0]) with kappa_i = log(1 / m) puts 1/(2m) on each buffer, 1/2 on the slack.
  init = (jnp.asarray(np.log(start_decay / gaps)), jnp.full(buffers, -np.log(buffers)))

  def parameters(params):
    alpha, kappa = params
    scale = jax.nn.softmax(jnp.concatenate([kappa, jnp.zeros(1)]))[:buffers]
    return jax.nn.sigmoid(alpha), scale

  with jax.enable_x64(True):
    init = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), init)

    def loss(params):
      decay, scale = parameters(params)
      return (jnp.log(earliest_pattern_squared(_blt_coefs(decay, scale, n), b, k, xp=jnp))
              + jnp.log(_error_squared(_blt_inverse_column(decay, scale, n), workload, error)))

    params = jax.jit(lambda p: _minimize(loss, p, max_steps, tolerance))(init)
    decay, scale = (np.asarray(x, np.float64) for x in parameters(params))
  order = np.argsort(-decay)
  return BufferedToeplitz(decay[order], scale[order])
