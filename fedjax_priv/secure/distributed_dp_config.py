"""DistributedDPConfig: one place that derives every scale of a distributed-DP round.

See `secure.distributed_dp` for the pipeline and the papers.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from fedjax_priv.checks import check_positive
from fedjax_priv.secure import quantization


@dataclasses.dataclass(frozen=True)
class DistributedDPConfig:
  """Hyper-parameters of one distributed-DP round and the scales derived from them.

  Attributes:
    clip_norm: C > 0, L2 clip of each client's delta, in model units.
    noise_multiplier: z >= 0: the summed noise of `num_clients` shares has
      per-coordinate std z * C in model units (variance z^2 C^2 / gamma^2 in
      integer units); 0 adds no noise (epsilon = inf).
    num_clients: n >= 1, the noise shares per round (the cohort size) and the
      public denominator of the mean.
    dim: d >= 1, the number of model parameters.
    bits: b in [1, 32], the modulus 2^b of secure aggregation.
    beta: in [0, 1), the conditional-rounding parameter of Kairouz et al.
      (Thm. 1): rounding is retried until the L2 norm is <= the inflated
      bound, which each try meets with probability >= 1 - beta. 0 disables
      the conditioning (bound C / gamma + sqrt(d')). Default exp(-1/2).
    k_stddevs: k > 0, how many standard deviations of a coordinate of the
      noisy sum the ring must hold when gamma is derived from `bits`.
    granularity: gamma > 0, one integer step in model units; None derives
      it from `bits` (see `gamma`).
    max_rounding_tries: >= 1, conditional-rounding retries before giving up
      and sending the zero vector (a legal, norm-0 contribution).
    min_shares: m in [1, num_clients], the fewest noise shares a round may
      sum; a round with fewer fails (zero update) and the accounting holds
      for m shares. None: num_clients (fixed-size cohorts without dropouts).
      Under Poisson cohorts use `distributed_dp.min_shares_for`.
    max_shares: the most shares a round may sum (the cohort's capacity),
      >= num_clients; None: num_clients. The discrete Gaussian bound grows
      slowly with the number of shares, so it is evaluated at this many.
  """
  clip_norm: float
  noise_multiplier: float
  num_clients: int
  dim: int
  bits: int = 16
  beta: float = math.exp(-0.5)
  k_stddevs: float = 4.0
  granularity: float | None = None
  max_rounding_tries: int = 100
  min_shares: int | None = None
  max_shares: int | None = None

  def __post_init__(self):
    check_positive("clip_norm", self.clip_norm)
    z = self.noise_multiplier
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not (math.isfinite(z) and z >= 0):
      raise ValueError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
    for name, minimum in (("num_clients", 1), ("dim", 1), ("max_rounding_tries", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if self.min_shares is not None and not (
        isinstance(self.min_shares, int) and not isinstance(self.min_shares, bool)
        and 1 <= self.min_shares <= self.num_clients):
      raise ValueError(f"min_shares must be an int in [1, num_clients={self.num_clients}], got "
                       f"{self.min_shares!r}")
    if self.max_shares is not None and not (
        isinstance(self.max_shares, int) and not isinstance(self.max_shares, bool)
        and self.max_shares >= self.num_clients):
      raise ValueError(f"max_shares must be an int >= num_clients={self.num_clients}, got "
                       f"{self.max_shares!r}")
    if (isinstance(self.bits, bool) or not isinstance(self.bits, int)
        or not 1 <= self.bits <= quantization.MAX_BITS):
      raise ValueError(f"bits must be an int in [1, {quantization.MAX_BITS}], got {self.bits!r}")
    if not (isinstance(self.beta, (int, float)) and 0 <= self.beta < 1):
      raise ValueError(f"beta must be in [0, 1), got {self.beta!r}")
    check_positive("k_stddevs", self.k_stddevs)
    if self.granularity is None:
      if 4.0**self.bits <= self.k_stddevs**2 * self.num_clients:
        raise ValueError(
            f"bits={self.bits} is too small for num_clients={self.num_clients} and "
            f"k_stddevs={self.k_stddevs}: the rounding noise alone overflows 2^bits; "
            "raise bits or set granularity")
    else:
      check_positive("granularity", self.granularity)

  @property
  def padded_dim(self) -> int:
    """d' = the power of two >= dim that the rotation works in; noise is added to d' coordinates."""
    return quantization.padded_dim(self.dim)

  @functools.cached_property
  def gamma(self) -> float:
    """Granularity: one integer step, in model units.

    Unless given, the gamma of Kairouz et al. (Sec. 4.4) solving
    2^b = 2 k sqrt(C^2 n^2 / d' + n (gamma^2 / 4 + sigma_local^2)) / gamma,
    where sigma_local^2 n = z^2 C^2: k standard deviations of a rotated
    coordinate of the sum (signal at its worst, n aligned clients; rounding
    error; noise) span the ring.
    """
    if self.granularity is not None:
      return float(self.granularity)
    c, n, k = self.clip_norm, self.num_clients, self.k_stddevs
    signal_and_noise = c * c * n * n / self.padded_dim + (self.noise_multiplier * c) ** 2
    return 2 * k * math.sqrt(signal_and_noise) / math.sqrt(4.0**self.bits - k * k * n)

  @property
  def guaranteed_shares(self) -> int:
    """m: the fewest noise shares a round that does not fail sums."""
    return self.num_clients if self.min_shares is None else self.min_shares

  @property
  def most_shares(self) -> int:
    """The most noise shares a round may sum."""
    return self.num_clients if self.max_shares is None else self.max_shares

  @property
  def local_stddev(self) -> float:
    """Per-client noise scale in integer units: z C / (gamma sqrt(n))."""
    return self.noise_multiplier * self.clip_norm / (self.gamma * math.sqrt(self.num_clients))

  @functools.cached_property
  def l2_sensitivity(self) -> float:
    """Delta_2: L2 bound of one client's rounded vector, in integer units.

    Kairouz et al. (Thm. 1, conditional randomized rounding): with c = C /
    gamma, min{c + sqrt(d'), sqrt(c^2 + d'/4 + sqrt(2 ln(1/beta)) (c +
    sqrt(d')/2))}; the first bound holds for any stochastic rounding, the
    second is what conditioning on the norm enforces.
    """
    c, d = self.clip_norm / self.gamma, self.padded_dim
    bound = c + math.sqrt(d)
    if self.beta > 0:
      squared = c * c + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (c + math.sqrt(d) / 2)
      bound = min(bound, math.sqrt(squared))
    return bound

  @property
  def l1_sensitivity(self) -> float:
    """Delta_1 = Delta_2 min(sqrt(d'), Delta_2): L1 <= sqrt(d') L2, and L1 <= L2^2 on integers."""
    return self.l2_sensitivity * min(math.sqrt(self.padded_dim), self.l2_sensitivity)


