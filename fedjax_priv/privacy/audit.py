"""Empirical privacy lower bounds from canary membership guesses in one training run.

The auditor plants m canaries and includes each one independently with
probability 1/2. After ONE run it scores every canary (a larger score means
"more likely included"), guesses "in" for the k+ highest scores, "out" for the
k- lowest, and abstains on the rest. If the mechanism is (eps, delta)-DP with
respect to adding or removing one canary, the number W of correct guesses among
the r = k+ + k- made satisfies (Steinke, Nasr & Jagielski 2023, main theorem)

    P[W >= v] <= P[Bin(r, p) >= v] + 2 m delta max_{1<=i<=v} P[v - i <= Bin(r, p) < v] / i
    with p = e^eps / (1 + e^eps)

for every v. This right-hand side is the p-value of the hypothesis "the
mechanism is (eps, delta)-DP"; it grows with eps. Every eps whose p-value is
below beta = 1 - confidence is rejected, so the supremum of the rejected eps is
an eps lower bound that holds with probability >= confidence over the
canaries' coin flips and the mechanism's noise. The delta term is the paper's,
not dropped: with delta = 0 the bound is the pure-eps one.

Neighbouring relation: add/remove one canary. A canary must be the privacy
unit of the audited claim (one example for example-level DP, one user's whole
dataset for user-level DP); the bound then lower-bounds the eps of that claim.

This module is pure statistics (numpy/scipy): it knows nothing of rounds,
models or datasets. `fedjax_priv.canary_audit` plants the canaries and
scores them.

References:
  Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run",
  NeurIPS 2023, arXiv:2305.08846 (the main theorem's (eps, delta) case, and
  the p-value and its inversion as the paper's appendix spells them out).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import scipy.special
import scipy.stats

from fedjax_priv.privacy.accounting import check_int

# Bisection on log(eps) stops when the bracket is this tight relative to eps.
_RELATIVE_TOLERANCE = 1e-9
# eps below this is reported as 0: the test cannot tell it from no leakage.
_SMALLEST_EPSILON = 1e-9
# At eps = 40, p = 1 - 4e-18 rounds to 1.0 in float64, so every v <= r is
# plausible and no larger eps can be rejected.
_LARGEST_EPSILON = 40.0


def _check_counts(num_guesses, num_correct, num_canaries) -> tuple[int, int, int]:
  r = check_int("num_guesses", num_guesses, 0)
  v = check_int("num_correct", num_correct, 0)
  m = check_int("num_canaries", num_canaries, minimum=1)
  if v > r:
    raise ValueError(f"num_correct ({v}) must be <= num_guesses ({r})")
  if r > m:
    raise ValueError(f"num_guesses ({r}) must be <= num_canaries ({m})")
  return r, v, m


def _check_delta(delta) -> float:
  if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 <= delta < 1:
    raise ValueError(f"delta must be a number in [0, 1), got {delta!r}")
  return float(delta)


def _check_confidence(confidence) -> float:
  if (isinstance(confidence, bool) or not isinstance(confidence, numbers.Real)
      or not 0 < confidence < 1):
    raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
  return float(confidence)


def log_p_value(num_guesses: int, num_correct: int, num_canaries: int, epsilon: float,
                delta: float = 0.0) -> float:
  """Natural log of the one-run audit's p-value for the hypothesis "(eps, delta)-DP".

  Computed in log space throughout, so tails far below float64's smallest
  number (e.g. thousands of correct guesses) stay exact enough to compare.

  Args:
    num_guesses: r, guesses made (abstentions excluded), in [0, num_canaries].
    num_correct: v, correct guesses, in [0, r].
    num_canaries: m, canaries planted (each included with probability 1/2);
      only the delta term uses it.
    epsilon: eps >= 0 of the null hypothesis, in nats.
    delta: delta in [0, 1) of the null hypothesis.

  Returns:
    log of min(1, P[Bin(r, p) >= v] + 2 m delta alpha) with p = e^eps / (1 + e^eps)
    and alpha = max_{1<=i<=v} P[v - i <= Bin(r, p) < v] / i (Steinke et al.
    2023).
  """
  r, v, m = _check_counts(num_guesses, num_correct, num_canaries)
  delta = _check_delta(delta)
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon >= 0:
    raise ValueError(f"epsilon must be a number >= 0, got {epsilon!r}")
  return _log_p_value(r, v, m, float(epsilon), delta)


def _log_p_value(r: int, v: int, m: int, epsilon: float, delta: float) -> float:
  if v == 0:
    return 0.0
  # Sums of log pmfs, not scipy's logsf: logsf takes the log of an sf that
  # underflows to 0 once the tail drops below ~1e-308 (e.g. 1200 of 1200 right).
  log_pmf = scipy.stats.binom.logpmf(np.arange(r + 1), r, scipy.special.expit(epsilon))
  log_tail = float(scipy.special.logsumexp(log_pmf[v:]))
  if delta == 0:
    return min(0.0, log_tail)
  # alpha: the largest average mass per step of the i values just below v.
  below = np.logaddexp.accumulate(log_pmf[v - 1::-1])
  log_alpha = float(np.max(below - np.log(np.arange(1, v + 1))))
  return min(0.0, float(np.logaddexp(log_tail, math.log(2 * m * delta) + log_alpha)))


def epsilon_lower_bound(num_guesses: int, num_correct: int, num_canaries: int,
                        delta: float = 0.0, confidence: float = 0.95) -> float:
  """The largest eps that the one-run audit rejects at the given confidence.

  Inverts `log_p_value` in eps by bisection on log(eps): the p-value grows
  with eps, and every eps whose p-value is below 1 - confidence is rejected.

  Args:
    num_guesses: r, guesses made, in [0, num_canaries].
    num_correct: v, correct guesses, in [0, r].
    num_canaries: m, canaries planted, >= 1.
    delta: delta in [0, 1) at which eps is bounded (0: a pure-eps bound).
    confidence: 1 - beta in (0, 1), e.g. 0.95.

  Returns:
    eps_lb >= 0 in nats: with probability >= confidence the mechanism is not
    (eps, delta)-DP for any eps < eps_lb. 0 when even eps = 0 is plausible.
  """
  r, v, m = _check_counts(num_guesses, num_correct, num_canaries)
  delta = _check_delta(delta)
  log_beta = math.log1p(-_check_confidence(confidence))

  def rejected(epsilon: float) -> bool:
    return _log_p_value(r, v, m, epsilon, delta) < log_beta

  if not rejected(_SMALLEST_EPSILON):
    return 0.0
  # Invariant: exp(lo) is rejected, exp(hi) is not (at _LARGEST_EPSILON the p-value is 1).
  lo, hi = math.log(_SMALLEST_EPSILON), math.log(_LARGEST_EPSILON)
  while hi - lo > _RELATIVE_TOLERANCE:
    mid = 0.5 * (lo + hi)
    if rejected(math.exp(mid)):
      lo = mid
    else:
      hi = mid
  # exp(lo) is rejected: reporting it (not the midpoint) keeps the bound valid.
  return math.exp(lo)


def count_correct_guesses(scores: np.ndarray, is_member: np.ndarray, num_positive: int,
                          num_negative: int) -> tuple[int, int]:
  """Guesses "in" for the num_positive highest scores, "out" for the num_negative lowest.

  Ties are broken by canary index (a stable sort), which does not depend on
  membership, so the guesses stay a function of the scores alone.

  Args:
    scores: [m] float scores, larger meaning "more likely included".
    is_member: [m] bool, whether each canary was included.
    num_positive: k+ >= 0.
    num_negative: k- >= 0, with k+ + k- <= m.

  Returns:
    (r, v): guesses made (k+ + k-) and how many of them are correct.
  """
  scores = np.asarray(scores, dtype=np.float64)
  is_member = np.asarray(is_member)
  if scores.ndim != 1 or scores.size == 0:
    raise ValueError(f"scores must be a non-empty 1-D array [m], got shape {scores.shape}")
  if is_member.shape != scores.shape or is_member.dtype != np.bool_:
    raise ValueError(f"is_member must be a bool array of shape {scores.shape} like scores, got "
                     f"shape {is_member.shape} and dtype {is_member.dtype}")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"scores must be finite, got {int(np.sum(~np.isfinite(scores)))} non-finite")
  k_pos = check_int("num_positive", num_positive, 0)
  k_neg = check_int("num_negative", num_negative, 0)
  if k_pos + k_neg > scores.size:
    raise ValueError(f"num_positive + num_negative ({k_pos} + {k_neg}) must be <= the number of "
                     f"canaries ({scores.size})")
  order = np.argsort(scores, kind="stable")
  correct = (int(np.sum(is_member[order[scores.size - k_pos:]])) +
             int(np.sum(~is_member[order[:k_neg]])))
  return k_pos + k_neg, correct


class AuditBound(NamedTuple):
  """The best of several pre-registered guess counts, each tested at a corrected level.

  Attributes:
    epsilon: eps lower bound in nats (the largest over the candidates).
    num_guesses: r of the candidate that gave it.
    num_correct: v of that candidate.
    num_positive: its k+.
    num_negative: its k-.
    num_candidates: L, the candidates tried; each was tested at confidence
      1 - beta / L (Bonferroni), so the maximum holds at 1 - beta.
  """
  epsilon: float
  num_guesses: int
  num_correct: int
  num_positive: int
  num_negative: int
  num_candidates: int


def default_guess_counts(num_canaries: int) -> tuple[tuple[int, int], ...]:
  """Symmetric (k+, k-) = (k, k) for k from 1% to 50% of the canaries.

  Few guesses pay off when only the extreme scores are informative (strong
  noise); guessing every canary pays off when the scores separate well.
  """
  m = check_int("num_canaries", num_canaries, minimum=2)
  ks = sorted({max(1, int(round(m * f))) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.35)} |
              {m // 2})
  return tuple((k, k) for k in ks)


def audit_scores(scores: np.ndarray, is_member: np.ndarray, delta: float = 0.0,
                 confidence: float = 0.95,
                 guess_counts: Sequence[tuple[int, int]] | None = None) -> AuditBound:
  """eps lower bound of one run from canary scores and memberships.

  The (k+, k-) candidates must be fixed before the scores are seen; trying
  several and keeping the best is paid for with a Bonferroni correction, so
  the result is still a (1 - beta)-confidence lower bound.

  Args:
    scores: [m] float scores, larger meaning "more likely included".
    is_member: [m] bool memberships, each drawn with probability 1/2.
    delta: delta in [0, 1) of the audited claim.
    confidence: 1 - beta in (0, 1).
    guess_counts: (k+, k-) candidates; `default_guess_counts(m)` if None.

  Returns:
    The best candidate's `AuditBound`.
  """
  scores = np.asarray(scores)
  candidates = (default_guess_counts(scores.size) if guess_counts is None
                else tuple(tuple(c) for c in guess_counts))
  if not candidates or any(len(c) != 2 for c in candidates):
    raise ValueError(f"guess_counts must be a non-empty sequence of (k+, k-) pairs, got "
                     f"{guess_counts!r}")
  beta = 1.0 - _check_confidence(confidence)
  corrected = 1.0 - beta / len(candidates)
  best = None
  for k_pos, k_neg in candidates:
    r, v = count_correct_guesses(scores, is_member, k_pos, k_neg)
    epsilon = epsilon_lower_bound(r, v, scores.size, delta, corrected)
    if best is None or epsilon > best.epsilon:
      best = AuditBound(epsilon, r, v, k_pos, k_neg, len(candidates))
  return best
