"""Tests of fedjax_priv.privacy.audit: the one-run audit's p-value, its inversion and guesses."""

import math

import numpy as np
import pytest
from scipy import optimize, special, stats

from fedjax_priv.privacy import audit


def theorem_p_value(m, r, v, eps, delta):
  """Steinke et al. 2023's main theorem, written out term by term with plain probabilities."""
  pmf = stats.binom.pmf(np.arange(r + 1), r, math.exp(eps) / (1 + math.exp(eps)))
  alpha = max((pmf[v - i:v].sum() / i for i in range(1, v + 1)), default=0.0)
  return min(1.0, pmf[v:].sum() + 2 * m * delta * alpha)


def gaussian_epsilon(mu, delta):
  """Exact eps(delta) of mu-GDP: the Gaussian mechanism with shift mu, unit noise."""

  def delta_of(eps):
    return special.ndtr(-eps / mu + mu / 2) - math.exp(eps) * special.ndtr(-eps / mu - mu / 2)

  return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("m, r, v, eps, delta", [
    (100, 100, 70, 0.5, 0.0), (1000, 200, 172, 1.3, 1e-5), (50, 20, 20, 2.0, 1e-3),
    (1000, 1000, 560, 0.0, 1e-5), (30, 10, 3, 4.0, 1e-2)])
def test_p_value_matches_theorem(m, r, v, eps, delta):
  expected = theorem_p_value(m, r, v, eps, delta)
  assert math.exp(audit.log_p_value(r, v, m, eps, delta)) == pytest.approx(expected, rel=1e-9)


def test_pure_p_value_is_the_binomial_tail():
  for r, v, eps in [(100, 80, 1.0), (500, 400, 2.0), (10, 1, 0.1)]:
    p = math.exp(eps) / (1 + math.exp(eps))
    assert audit.log_p_value(r, v, r, eps) == pytest.approx(stats.binom.logsf(v - 1, r, p),
                                                            rel=1e-12)


def test_log_space_keeps_tails_below_float64():
  # P[Bin(5000, 1/2) >= 5000] = 2^-5000 underflows as a plain probability.
  assert audit.log_p_value(5000, 5000, 5000, 0.0) == pytest.approx(-5000 * math.log(2), rel=1e-9)


@pytest.mark.parametrize("r", [10, 100, 1000])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_perfect_guesses_match_closed_form(r, confidence):
  # All r guesses right: the p-value is p^r, so eps_lb = logit((1 - confidence)^(1/r)).
  root = (1 - confidence) ** (1 / r)
  expected = math.log(root / (1 - root))
  assert audit.epsilon_lower_bound(r, r, r, 0.0, confidence) == pytest.approx(expected, rel=1e-7)


def test_bound_is_on_the_rejection_boundary():
  m, r, v, delta, confidence = 1000, 300, 240, 1e-5, 0.95
  eps = audit.epsilon_lower_bound(r, v, m, delta, confidence)
  log_beta = math.log(1 - confidence)
  assert audit.log_p_value(r, v, m, eps, delta) < log_beta
  assert audit.log_p_value(r, v, m, eps * (1 + 1e-6), delta) >= log_beta


def test_bound_is_monotone():
  m = 1000
  by_correct = [audit.epsilon_lower_bound(200, v, m, 1e-5) for v in range(100, 201, 10)]
  assert all(a <= b for a, b in zip(by_correct, by_correct[1:]))
  assert by_correct[0] == 0.0 and by_correct[-1] > 3
  by_confidence = [audit.epsilon_lower_bound(200, 180, m, 1e-5, c) for c in (0.5, 0.9, 0.99)]
  assert by_confidence[0] > by_confidence[1] > by_confidence[2] > 0
  by_delta = [audit.epsilon_lower_bound(200, 190, m, d) for d in (0.0, 1e-5, 1e-4, 1e-3)]
  assert all(a > b for a, b in zip(by_delta, by_delta[1:]))
  # A larger delta term can only raise the p-value.
  for eps in (0.0, 0.5, 2.0):
    assert audit.log_p_value(200, 150, m, eps, 1e-3) >= audit.log_p_value(200, 150, m, eps)
  p_values = [audit.log_p_value(200, 150, m, eps, 1e-5) for eps in np.linspace(0, 5, 11)]
  # Once the p-value is ~1 its log is 0 up to the rounding of a sum of pmfs.
  assert all(a <= b + 1e-12 for a, b in zip(p_values, p_values[1:]))
  assert p_values[0] < -8 and p_values[-1] > -1e-12


def test_no_guess_or_chance_level_gives_zero():
  assert audit.epsilon_lower_bound(0, 0, 10) == 0.0
  assert audit.epsilon_lower_bound(100, 50, 100) == 0.0


def test_count_correct_guesses_by_hand():
  scores = np.array([0.9, -1.0, 0.3, 2.0, 0.0, -0.5])
  member = np.array([True, False, False, True, True, False])
  # Top 2: indices 3, 0 (both members); bottom 3: 1, 5, 4 (4 is a member).
  assert audit.count_correct_guesses(scores, member, 2, 3) == (5, 4)
  assert audit.count_correct_guesses(scores, member, 0, 0) == (0, 0)
  assert audit.count_correct_guesses(scores, member, 6, 0) == (6, 3)


def test_random_scores_rarely_give_a_positive_bound():
  rng = np.random.default_rng(0)
  bounds = np.array([audit.audit_scores(rng.normal(size=500), rng.random(500) < 0.5, 1e-5).epsilon
                     for _ in range(100)])
  # Validity: P[bound > 0] <= 1 - confidence = 5% for a mechanism that leaks nothing.
  assert np.mean(bounds > 0) <= 0.1
  assert bounds.max() < 0.5


def test_gaussian_mechanism_bound_is_valid_and_informative():
  # Scores of a mu-GDP mechanism: members shifted by mu, unit Gaussian noise.
  rng = np.random.default_rng(1)
  delta, m = 1e-5, 1000
  for mu in (1.0, 3.0):
    true_eps = gaussian_epsilon(mu, delta)
    bounds = []
    for _ in range(10):
      member = rng.random(m) < 0.5
      bounds.append(audit.audit_scores(mu * member + rng.normal(size=m), member, delta).epsilon)
    assert max(bounds) <= true_eps
    assert min(bounds) > (0.5 if mu == 1.0 else 2.0)


def test_audit_scores_pays_for_every_candidate():
  m = 400
  member = np.arange(m) < m // 2
  scores = member.astype(float)
  one = audit.audit_scores(scores, member, guess_counts=[(200, 200)])
  assert one.epsilon == pytest.approx(audit.epsilon_lower_bound(m, m, m, 0.0, 0.95))
  several = audit.audit_scores(scores, member, guess_counts=[(10, 10), (100, 100), (200, 200)])
  assert several.num_candidates == 3 and several.num_guesses == m and several.num_correct == m
  assert several.epsilon == pytest.approx(audit.epsilon_lower_bound(m, m, m, 0.0, 1 - 0.05 / 3))
  assert several.epsilon < one.epsilon
  assert audit.default_guess_counts(1000)[-1] == (500, 500)


@pytest.mark.parametrize("call, match", [
    (lambda: audit.epsilon_lower_bound(10, 11, 20), "num_correct"),
    (lambda: audit.epsilon_lower_bound(30, 10, 20), "num_guesses"),
    (lambda: audit.epsilon_lower_bound(-1, 0, 20), "num_guesses"),
    (lambda: audit.epsilon_lower_bound(10, 5, 0), "num_canaries"),
    (lambda: audit.epsilon_lower_bound(10, 5, 20, delta=1.0), "delta"),
    (lambda: audit.epsilon_lower_bound(10, 5, 20, confidence=1.0), "confidence"),
    (lambda: audit.epsilon_lower_bound(10.0, 5, 20), "num_guesses"),
    (lambda: audit.log_p_value(10, 5, 20, -1.0), "epsilon"),
    (lambda: audit.count_correct_guesses(np.zeros(3), np.zeros(3), 1, 1), "is_member"),
    (lambda: audit.count_correct_guesses(np.zeros(3), np.zeros(4, bool), 1, 1), "is_member"),
    (lambda: audit.count_correct_guesses(np.zeros((2, 2)), np.zeros((2, 2), bool), 1, 1),
     "scores"),
    (lambda: audit.count_correct_guesses(np.array([0, np.nan]), np.zeros(2, bool), 1, 0),
     "finite"),
    (lambda: audit.count_correct_guesses(np.zeros(3), np.zeros(3, bool), 2, 2),
     "num_positive \\+ num_negative"),
    (lambda: audit.audit_scores(np.zeros(3), np.zeros(3, bool), guess_counts=[]),
     "guess_counts"),
])
def test_bad_input_names_the_field(call, match):
  with pytest.raises(ValueError, match=match):
    call()
