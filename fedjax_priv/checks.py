"""Argument checks shared by every layer (standard library only).

Each check returns the value as a plain Python number or raises a ValueError
that names the argument and shows the value, so bad input fails before
anything is built or compiled. The name always comes first:
`check_int("rounds", rounds, 0)`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def check_real(name: str, value: Any) -> float:
  """`value` as a finite float, or ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a real number, got {value!r}.")
  if not math.isfinite(value):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  return float(value)


def check_int(name: str, value: Any, minimum: int) -> int:
  """`value` as an int >= minimum, or ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
  return int(value)


def check_positive(name: str, value: Any) -> float:
  """`value` as a finite float > 0, or ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      math.isfinite(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
  return float(value)


def check_non_negative(name: str, value: Any) -> float:
  """`value` as a finite float >= 0, or ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      math.isfinite(value) and value >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  return float(value)


def check_probability(name: str, value: Any, *, allow_zero: bool) -> float:
  """`value` as a float in (0, 1] ([0, 1] with allow_zero), or ValueError naming `name`."""
  value = check_real(name, value)
  low_ok = value >= 0 if allow_zero else value > 0
  if not (low_ok and value <= 1):
    interval = "[0, 1]" if allow_zero else "(0, 1]"
    raise ValueError(f"{name} must be in {interval}, got {value!r}.")
  return value


def check_delta(delta: Any) -> float:
  """`delta` as a float in (0, 1), or ValueError."""
  delta = check_real("delta", delta)
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta!r}.")
  return delta

