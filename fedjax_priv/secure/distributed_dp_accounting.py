"""Accounting of distributed DP: RDP curves of the discrete Gaussian and Skellam sums.

Host side (numpy). One round of `distributed_discrete_gaussian_mean` or
`skellam_mean` is an `RdpCurveDpEvent` (`round_event`) under the zero-out
relation (replace one user's contribution by zero while the noise shares stay:
`REPLACE_SPECIAL`); `PrivacyLedger` and `compute_epsilon` compose it with
Poisson subsampling (Zhu & Wang 2019) and across rounds on the RDP curve.

Missing shares. The sum's noise is the sum of the shares that reach it. A
round accounted for n shares that ran with fewer had less noise than
accounted, so the accounting uses a *guaranteed minimum* `min_shares` (m):
the aggregators fail a round that has fewer shares (zero update, reported as
`shares_short`), which makes m a floor, and every bound below is evaluated
at its worst over m <= shares <= `max_shares`. Which rounds fail depends on
the cohort's size and simulated dropouts only, never on a user's data: a
non-finite update still sends its noise share with a zero update
(`Aggregator.sums_nonfinite_as_zero`), so zero-out neighbours fail the same
rounds. Under Poisson cohorts choose m with `min_shares_for`, which bounds
P[fewer than m clients sampled]: a failed round costs utility, never
privacy. This replaces the earlier assumption of exactly n shares every
round, which understated ε (N = 1,000, m = 20: rounds with fewer than 20
shares have probability 0.47).

References:
  Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism
  for Federated Learning with Secure Aggregation" (ICML), Prop. 14 / Thm. 1.
  Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for Differentially
  Private Federated Learning" (NeurIPS), Thm. 3.5.
  Zhu & Wang 2019, "Poisson Subsampled Renyi Differential Privacy" (ICML).
"""

from __future__ import annotations

import math
from typing import Sequence

import dp_accounting
import numpy as np
import scipy.stats

from fedjax_priv.checks import check_int, check_probability
from fedjax_priv.privacy.accountant import compute_epsilon
from fedjax_priv.privacy.aggregation import ZERO_OUT, RoundPrivacy, check_relation
from fedjax_priv.privacy.events import RdpCurveDpEvent
from fedjax_priv.secure.distributed_dp_config import DistributedDPConfig

NOISE_KINDS = ("discrete_gaussian", "skellam")
# The curve is tabulated at every integer order up to this one (the largest
# order of the default grid), which Poisson subsampling needs.
MAX_ORDER = 1024


def ddg_tau(local_stddev: float, num_clients: int) -> float:
  """tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1)) (Kairouz et al., Thm. 1).

  The distance, in the RDP bound, between a sum of n N_Z(0, s^2) and one
  N_Z(0, n s^2); it is ~1e-8 already at s = 1 for any n.
  """
  k = np.arange(1, num_clients, dtype=np.float64)
  return float(10 * np.sum(np.exp(-2 * math.pi**2 * local_stddev**2 * k / (k + 1))))


def ddg_rdp(config: DistributedDPConfig, orders: Sequence[float]) -> np.ndarray:
  """RDP of one round of the distributed discrete Gaussian, full participation.

  Kairouz et al. (Prop. 14; Thm. 1 is its concentrated-DP corollary): with
  n clients each adding N_Z(0, s^2), s >= 1/2, d' coordinates, tau =
  `ddg_tau`, a2 = Delta_2 / (sqrt(n) s), a1 = Delta_1 / (sqrt(n) s), taken
  at their worst over config.guaranteed_shares <= n <= config.most_shares:

    eps(alpha) = min{ alpha a2^2 / 2 + tau d',
                      alpha (a2^2 + 2 a1 tau + tau^2 d') / 2,
                      alpha (a2 + tau sqrt(d'))^2 / 2 }.

  Args:
    config: the mechanism; Delta_1, Delta_2 are its rounding-inflated
      sensitivities.
    orders: RDP orders > 1.

  Returns:
    float64[len(orders)]; +inf everywhere when noise_multiplier is 0.

  Raises:
    ValueError: the local scale s is below 1/2, where the bound is not proven.
  """
  orders = np.asarray(orders, np.float64)
  if config.noise_multiplier == 0:
    return np.full(orders.shape, np.inf)
  # Every term grows with a2, a1 and tau: a2, a1 at the fewest shares and
  # tau at the most make the bound hold for any number of shares in between.
  s, n, d = config.local_stddev, config.guaranteed_shares, config.padded_dim
  if s < 0.5:
    raise ValueError(
        f"the per-client discrete Gaussian scale must be >= 1/2 integer steps for the DDG "
        f"bound, got {s:.4g} (noise_multiplier={config.noise_multiplier}, gamma="
        f"{config.gamma:.4g}); raise noise_multiplier or bits")
  tau = ddg_tau(s, config.most_shares)
  a2 = config.l2_sensitivity / (math.sqrt(n) * s)
  a1 = config.l1_sensitivity / (math.sqrt(n) * s)
  return np.minimum.reduce([
      orders * a2**2 / 2 + tau * d,
      orders * (a2**2 + 2 * a1 * tau + tau**2 * d) / 2,
      orders * (a2 + tau * math.sqrt(d)) ** 2 / 2,
  ])


def skellam_rdp(config: DistributedDPConfig, orders: Sequence[float]) -> np.ndarray:
  """RDP of one round of the distributed Skellam mechanism, full participation.

  Agarwal, Kairouz & Liu (2021, multi-dimensional Skellam, Thm. 3.5): with
  the summed noise Sk of variance mu = m s^2 per coordinate at the fewest
  shares m = config.guaranteed_shares (z^2 C^2 / gamma^2 when m = n),

    eps(alpha) = alpha Delta_2^2 / (2 mu)
                 + min{ ((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2),
                        3 Delta_1 / (2 mu) }.

  Args:
    config: the mechanism; Delta_1, Delta_2 are its rounding-inflated
      sensitivities.
    orders: integer RDP orders > 1.

  Returns:
    float64[len(orders)]; +inf everywhere when noise_multiplier is 0.
  """
  orders = np.asarray(orders, np.float64)
  if config.noise_multiplier == 0:
    return np.full(orders.shape, np.inf)
  # The summed variance is smallest, and the bound largest, at the fewest shares.
  mu = config.guaranteed_shares * config.local_stddev**2
  l1, l2 = config.l1_sensitivity, config.l2_sensitivity
  return orders * l2**2 / (2 * mu) + np.minimum(
      ((2 * orders - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def round_event(config: DistributedDPConfig, kind: str) -> RdpCurveDpEvent:
  """The event of one round of the `kind` distributed mean of `config`, all users taking part.

  Args:
    config: the mechanism (its `min_shares` and `max_shares` bound the shares).
    kind: "discrete_gaussian" or "skellam".

  Returns:
    `RdpCurveDpEvent` at orders 2..MAX_ORDER under `REPLACE_SPECIAL`.
  """
  if kind not in NOISE_KINDS:
    raise ValueError(f"noise kind must be one of {NOISE_KINDS}, got {kind!r}")
  orders = np.arange(2, MAX_ORDER + 1)
  curve = (ddg_rdp if kind == "discrete_gaussian" else skellam_rdp)(config, orders)
  return RdpCurveDpEvent(tuple(float(v) for v in curve), ZERO_OUT,
                         f"{kind}(z={config.noise_multiplier}, C={config.clip_norm}, "
                         f"shares {config.guaranteed_shares}..{config.most_shares}, "
                         f"bits={config.bits})")


def round_privacy(config: DistributedDPConfig, kind: str) -> RoundPrivacy | None:
  """The `RoundPrivacy` of the `kind` distributed mean (None without noise)."""
  if config.noise_multiplier == 0:
    return None
  curve = round_event(config, kind)

  def event(relation):
    check_relation(relation, (ZERO_OUT,))
    return curve

  return RoundPrivacy(event, (ZERO_OUT,), description=curve.name)


def min_shares_for(num_clients: int, sampling_probability: float,
                   failure_probability: float = 1e-3) -> int:
  """The largest m with P[Binomial(num_clients, q) < m] <= failure_probability.

  With Poisson cohorts, a `DistributedDPConfig(min_shares=m)` fails about
  this share of rounds (utility, not privacy: see the module docstring).

  Args:
    num_clients: N >= 1.
    sampling_probability: q in (0, 1].
    failure_probability: in (0, 1).

  Returns:
    m >= 1 (1 when even one share is less likely than that).
  """
  n = check_int("num_clients", num_clients, 1)
  q = check_probability("sampling_probability", sampling_probability, allow_zero=False)
  p = check_probability("failure_probability", failure_probability, allow_zero=False)
  # P[X < m] = cdf(m - 1) <= p  <=>  m - 1 <= ppf-ish; search upward from the quantile.
  m = int(scipy.stats.binom.ppf(p, n, q))
  while m >= 1 and scipy.stats.binom.cdf(m - 1, n, q) > p:
    m -= 1
  while scipy.stats.binom.cdf(m, n, q) <= p:
    m += 1
  return max(1, m)


def _epsilon(config: DistributedDPConfig, kind: str, rounds: int, delta: float,
             sampling_probability: float) -> float:
  rounds = check_int("rounds", rounds, 0)
  q = check_probability("sampling_probability", sampling_probability, allow_zero=False)
  if rounds == 0:
    return 0.0
  if config.noise_multiplier == 0:
    return math.inf
  event = round_event(config, kind)
  if q < 1:
    event = dp_accounting.PoissonSampledDpEvent(q, event)
  return compute_epsilon(dp_accounting.SelfComposedDpEvent(event, rounds), delta)


def ddg_epsilon(config: DistributedDPConfig, rounds: int, delta: float,
                sampling_probability: float = 1.0) -> float:
  """epsilon of `rounds` rounds of `distributed_discrete_gaussian_mean(config)`.

  Composes `ddg_rdp` over rounds, amplified by Poisson sampling of users with
  probability q (`poisson_subsampled_rdp`; q = 1: every user every round),
  and converts RDP to (epsilon, delta) with `dp_accounting`'s conversion
  (Canonne, Kamath & Steinke 2020, Prop. 12). Relation: zero-out one user
  (module docstring).

  Args:
    config: the mechanism.
    rounds: >= 0.
    delta: in (0, 1).
    sampling_probability: q in (0, 1].

  Returns:
    epsilon >= 0 (inf without noise).
  """
  return _epsilon(config, "discrete_gaussian", rounds, delta, sampling_probability)


def skellam_epsilon(config: DistributedDPConfig, rounds: int, delta: float,
                    sampling_probability: float = 1.0) -> float:
  """epsilon of `rounds` rounds of `skellam_mean(config)`; arguments as `ddg_epsilon`."""
  return _epsilon(config, "skellam", rounds, delta, sampling_probability)


