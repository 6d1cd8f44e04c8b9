"""Argument checks shared by the host-side data modules (numpy and the standard library only).

Each returns the value as a plain Python number or raises a ValueError that
names the argument, so bad input fails before anything is built.
"""

from __future__ import annotations

import math
import numbers


def check_int(value, name: str, minimum: int) -> int:
  """Returns ``value`` as an int, or raises if it is not an integer >= minimum."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def check_scale(value, name: str) -> float:
  """Returns ``value`` as a float, or raises if it is not a finite number >= 0."""
  if (not isinstance(value, numbers.Real) or isinstance(value, bool)
      or not math.isfinite(value) or value < 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  return float(value)
