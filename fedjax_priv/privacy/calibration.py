"""Calibration: the smallest noise multiplier meeting a target ε, and how many rounds fit a budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dp_accounting import dp_event

from fedjax_priv.checks import check_delta, check_int, check_real
from fedjax_priv.privacy.accountant import DEFAULT_PLD_DISCRETIZATION, compute_epsilon
from fedjax_priv.privacy.events import check_event

# Calibration searches σ in [_MIN_NOISE_MULTIPLIER, _MAX_NOISE_MULTIPLIER].
_MIN_NOISE_MULTIPLIER = 1e-6
_MAX_NOISE_MULTIPLIER = 1e4



def calibrate_noise_multiplier(
    make_event: Callable[[float], dp_event.DpEvent],
    target_epsilon: float,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 1e-3,
    *,
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
) -> float:
  """Smallest σ (to relative `tolerance`) with ε(make_event(σ)) <= target.

  Brackets by doubling (or halving) from σ = 1, then bisects. Only σ whose
  computed ε met the target is ever returned, so the guarantee holds for the
  returned value even if ε(σ) is not exactly monotone (PLD discretisation).

  Args:
    make_event: σ ↦ DpEvent, e.g.
      ``lambda s: user_level_event(s, 1000, "poisson", 10**6, 100)``.
    target_epsilon: target ε, finite and > 0.
    delta: δ in (0, 1).
    accountant: ``"rdp"`` or ``"pld"``.
    tolerance: relative width of the final bracket, in (0, 1).
    orders, value_discretization_interval: as `compute_epsilon`.

  Returns:
    σ with ε(σ) <= target_epsilon and ε(σ·(1 - tolerance)) > target (up to
    monotonicity). σ below 1e-6 is not searched: if even 1e-6 meets the
    target, 1e-6 is returned.

  Raises:
    ValueError: target_epsilon <= 0, a bad argument, or the target is not
      reached even with σ = 1e4.
  """
  target = check_real("target_epsilon", target_epsilon)
  if target <= 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}.")
  delta = check_delta(delta)
  tolerance = check_real("tolerance", tolerance)
  if not 0 < tolerance < 1:
    raise ValueError(f"tolerance must be in (0, 1), got {tolerance!r}.")

  def meets_target(sigma: float) -> bool:
    event = check_event("make_event(noise_multiplier)", make_event(sigma))
    return (
        compute_epsilon(
            event,
            delta,
            accountant,
            orders=orders,
            value_discretization_interval=value_discretization_interval,
        )
        <= target
    )

  # Invariant after bracketing: meets_target(hi) and not meets_target(lo).
  if meets_target(1.0):
    hi = 1.0
    lo = 0.5
    while meets_target(lo):
      hi = lo
      if lo <= _MIN_NOISE_MULTIPLIER:
        return hi
      lo = max(lo / 2, _MIN_NOISE_MULTIPLIER)
  else:
    lo = 1.0
    hi = 2.0
    while not meets_target(hi):
      if hi >= _MAX_NOISE_MULTIPLIER:
        raise ValueError(
            f"target_epsilon={target!r} at delta={delta!r} is not reached "
            f"with noise_multiplier up to {_MAX_NOISE_MULTIPLIER:g}."
        )
      lo = hi
      hi = min(2 * hi, _MAX_NOISE_MULTIPLIER)

  while hi - lo > tolerance * hi:
    mid = 0.5 * (lo + hi)
    if meets_target(mid):
      hi = mid
    else:
      lo = mid
  return hi


def steps_within_budget(
    make_event: Callable[[int], dp_event.DpEvent],
    target_epsilon: float,
    delta: float,
    max_steps: int,
    accountant: str = "rdp",
    *,
    orders: Sequence[float] | None = None,
    value_discretization_interval: float = DEFAULT_PLD_DISCRETIZATION,
) -> int:
  """Largest T in [0, max_steps] with ε(make_event(T)) <= target_epsilon.

  The budget counterpart of `calibrate_noise_multiplier`: with σ fixed, how
  many rounds (or steps) can run before the next one would exceed the
  budget. ε must be non-decreasing in T, which holds for every composition
  of mechanisms. Exponential search from T = 1, then bisection: O(log T)
  accountant calls, each composing one event.

  Args:
    make_event: T ↦ DpEvent of the first T steps, e.g.
      ``lambda t: user_level_event(1.1, t, "poisson", 10**6, 100)``; must
      accept T = 0 (usually ``NoOpDpEvent()``).
    target_epsilon: ε budget, finite and > 0.
    delta: δ in (0, 1).
    max_steps: upper end of the search, >= 0.
    accountant, orders, value_discretization_interval: as `compute_epsilon`.

  Returns:
    T: make_event(T) meets the budget and make_event(T + 1) does not (or
    T = max_steps). 0 when even one step exceeds it.

  Raises:
    ValueError: a bad argument (named).
  """
  target = check_real("target_epsilon", target_epsilon)
  if target <= 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon!r}.")
  delta = check_delta(delta)
  max_steps = check_int("max_steps", max_steps, 0)

  def within(steps: int) -> bool:
    event = check_event("make_event(steps)", make_event(steps))
    return compute_epsilon(
        event, delta, accountant, orders=orders,
        value_discretization_interval=value_discretization_interval) <= target

  # Invariant: within(lo) and (hi > max_steps or not within(hi)).
  lo, hi = 0, 1
  while hi <= max_steps and within(hi):
    lo, hi = hi, 2 * hi
  hi = min(hi, max_steps + 1)
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if within(mid):
      lo = mid
    else:
      hi = mid
  return lo

