"""How clients take part in rounds: one object gives the cohorts and turns a mechanism's event
into the round's event.

A mechanism (an `Aggregator`, or DP-SGD inside clients) states what one round
releases about a user who takes part (`RoundPrivacy`); a participation
object samples the cohorts and wraps that statement into the DpEvent of one
round of the run, with the neighbouring relation it holds under:

| participation | sampler | relation | round event |
| --- | --- | --- | --- |
| `Full(N)` | every client every round | add/remove (else zero-out) | the mechanism's event |
| `FixedSize(N, K)` | K of N without replacement | replace one user | `SampledWithoutReplacement(N, K, event)`: RDP bound, or tight under PLD |
| `Poisson(N, m)` | each client with q = m / N, truncated to a capacity | add/remove (else zero-out) | `PoissonSampled(q, event)`; `TruncatedSubsampledGaussian` under PLD |
| `ShuffledEpochs(N, K)` | each epoch a permutation cut into N // K cohorts of K | zero-out | the event once per epoch |
| `Cyclic(N, K)` | a fixed partition into N // K groups of K, in turn | zero-out | a whole-run (MF) event once; else once per cycle of N // K rounds |
| `CyclicPoisson(N, b, m)` | b fixed groups in turn, each Poisson-sampled at q = m / (N // b) | zero-out | `PoissonSampled(q, event)` per cycle; banded MF: amplified BandMF |
| `BallsInBins(N, b)` | each user in one random bin of b, bins in turn | zero-out | as `Cyclic` with b rounds per cycle (no amplification claimed) |
| `MinSeparation(N, b, p)` | Poisson at p among users absent for b - 1 rounds | zero-out | as `Cyclic` with b rounds per cycle (no amplification claimed) |

Mechanisms whose server sees each upload (local DP) are not amplified: every
round is charged the mechanism's own event. A mechanism whose event covers
E rounds (a DP-FTRL tree) needs each user at most once in those E rounds,
which only `ShuffledEpochs` with epochs of E rounds guarantees. A
matrix-factorization mechanism's event covers the whole run and needs each
user in at most k rounds, any two at least b apart (`RoundPrivacy.participation`),
which `Cyclic`, `CyclicPoisson`, `BallsInBins` and `MinSeparation` guarantee.

The accountant ("rdp" or "pld", `RunSettings.accountant`) reaches the
participation as an argument of `round_event` and
`charged_overflow_probability`, passed by whoever builds the plan
(`experiment.user_plan`) from the one setting that also computes epsilon.
It matters only for `Poisson`: its static capacity truncates rare large
cohorts, which under "rdp" is charged to delta (`privacy.truncation`) and
under "pld" is accounted exactly by dp_accounting's
`TruncatedSubsampledGaussianDpEvent` with nothing charged to delta.

References:
  Mironov, Talwar & Zhang 2019 (Poisson-sampled Gaussian). Wang, Balle &
  Kasiviswanathan 2019 (sampling without replacement, replace-one, RDP);
  Balle, Barthe & Gaboardi 2018 and Zhu, Dong & Wang 2022 (its tight
  dominating pair, used under PLD). Kairouz
  et al. 2021, "Practical and Private (Deep) Learning without Sampling or
  Shuffling" (DP-FTRL with one participation per epoch). Choquette-Choo,
  McMahan, Rush & Thakurta 2023, "Multi-Epoch Matrix Factorization
  Mechanisms for Private Machine Learning" ((k, b)-participation, cyclic).
  Chua, Ghazi, Kamath, Kumar, Manurangsi, Sinha & Zhang 2024, "Scalable
  DP-SGD: Shuffling vs. Poisson Subsampling" (truncation charged to delta);
  "Tighter Privacy Analysis for Truncated Poisson Sampling",
  arXiv:2508.15089 (the truncated event, as dp_accounting cites it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import warnings

import dp_accounting

from fedjax_priv.checks import check_int, check_positive
from fedjax_priv.data.sampling import (BallsInBinsSampler, CyclicPoissonSampler, CyclicSampler,
                                       FixedSizeSampler, MinSeparationSampler, PoissonSampler,
                                       ShuffledEpochSampler, poisson_overflow_probability)
from fedjax_priv.privacy.aggregation import ADD_OR_REMOVE, REPLACE_ONE, ZERO_OUT, RoundPrivacy

ACCOUNTANTS = ("rdp", "pld")

RELATION_WORDS = {ADD_OR_REMOVE: "add/remove one user's whole dataset",
                  REPLACE_ONE: "replace one user's whole dataset",
                  ZERO_OUT: "zero out one user's contribution (the cohort is unchanged)"}


def _first_supported(privacy: RoundPrivacy, preferred: tuple, scheme: str):
  for relation in preferred:
    if relation in privacy.relations:
      return relation
  raise ValueError(f"{scheme} participation is accounted under "
                   f"{', '.join(r.name for r in preferred)}, but {privacy.description or 'the mechanism'}"
                   f" is stated only under {', '.join(r.name for r in privacy.relations)}")


def _no_participation_pattern(privacy: RoundPrivacy, scheme: str) -> None:
  if privacy.participation is not None:
    k, b = privacy.participation
    raise ValueError(f"{privacy.description or 'the mechanism'} needs each user in at most {k} of "
                     f"its {privacy.rounds_per_event} rounds, any two at least {b} apart; "
                     f"{scheme} participation does not guarantee that: use Cyclic")


def _one_round_events(privacy: RoundPrivacy, scheme: str) -> None:
  _no_participation_pattern(privacy, scheme)
  if privacy.rounds_per_event != 1:
    raise ValueError(f"{privacy.description or 'the mechanism'} accounts {privacy.rounds_per_event}"
                     f" rounds per event and needs each user at most once in them; {scheme} "
                     "participation does not guarantee that: use ShuffledEpochs with epochs of "
                     f"{privacy.rounds_per_event} rounds")


def _check_accountant(accountant: str) -> None:
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


class _NeverTruncated:
  """Cohorts of a fixed size: nothing is ever truncated, nothing charged to delta."""
  overflow_probability_per_round = 0.0

  def charged_overflow_probability(self, privacy: RoundPrivacy, accountant: str = "rdp"
                                   ) -> float:
    """0: the cohorts never exceed their capacity (see `Poisson`)."""
    del privacy
    _check_accountant(accountant)
    return 0.0


@dataclasses.dataclass(frozen=True)
class Full(_NeverTruncated):
  """Every client in every round (cross-silo)."""
  num_clients: int
  name = "full"

  def __post_init__(self):
    check_int("num_clients", self.num_clients, 1)

  @property
  def expected_cohort_size(self) -> float:
    return float(self.num_clients)

  @property
  def sampling_rate(self) -> float:
    return 1.0

  def sampler(self, seed: int) -> FixedSizeSampler:
    return FixedSizeSampler(self.num_clients, self.num_clients, seed)

  def relation(self, privacy: RoundPrivacy):
    return _first_supported(privacy, (ADD_OR_REMOVE, ZERO_OUT, REPLACE_ONE), self.name)

  def round_event(self, privacy: RoundPrivacy, round_index: int, accountant: str = "rdp"
                  ) -> dp_accounting.DpEvent:
    """The DpEvent of round `round_index` (0-based); the same under either accountant."""
    del round_index
    _check_accountant(accountant)
    _one_round_events(privacy, self.name)
    return privacy.event(self.relation(privacy))


class _ExactCohorts(_NeverTruncated):
  """expected_cohort_size and sampling_rate of participation with exactly cohort_size clients."""
  num_clients: int
  cohort_size: int

  @property
  def expected_cohort_size(self) -> float:
    return float(self.cohort_size)

  @property
  def sampling_rate(self) -> float:
    return self.cohort_size / self.num_clients


@dataclasses.dataclass(frozen=True)
class FixedSize(_ExactCohorts):
  """Exactly `cohort_size` distinct clients per round, uniformly without replacement.

  Fixed-size sampling is analysed for a population of fixed, public size, so
  the relation is replace-one and the round is
  `SampledWithoutReplacement(N, K, event)`. The accountant decides how
  tightly it is bounded:

  - "rdp": Wang, Balle & Kasiviswanathan (2019), Thm. 27, a valid but loose
    bound (on digits, 100 clients, K = 20, sigma = 1, 200 rounds:
    epsilon = 346 at delta = 1e-5);
  - "pld", for a Gaussian mechanism: the tight dominating pair of sampling
    without replacement under replace-one, (q P + (1 - q) Q, Q) with
    q = K / N (Balle, Barthe & Gaboardi 2018, Thm. 10; Zhu, Dong & Wang
    2022), in both orders (`privacy.accountant`): epsilon = 88.2 on the same
    run. It is larger than the Poisson add/remove 23.4 of the same sigma
    because replacing a user moves the sum by 2C where removing moves it by C.

  `account_as_poisson=True` accounts it as Poisson with q = K / N under
  add/remove instead: an approximation many papers use, not a proof (Chua et
  al. 2024), warned by `events.user_level_event`'s rule and reported.
  """
  num_clients: int
  cohort_size: int
  account_as_poisson: bool = False
  name = "fixed"

  def __post_init__(self):
    check_int("num_clients", self.num_clients, 1)
    check_int("cohort_size", self.cohort_size, 1)
    if self.cohort_size > self.num_clients:
      raise ValueError(f"cohort_size ({self.cohort_size}) must be <= num_clients "
                       f"({self.num_clients})")
    if self.account_as_poisson:
      warnings.warn(
          f"fixed-size cohorts of {self.cohort_size} out of {self.num_clients} are accounted as "
          f"Poisson sampling with q = {self.sampling_rate:g} (add/remove relation): an "
          "approximation, not a proven bound for fixed-size sampling.", UserWarning, stacklevel=3)

  def sampler(self, seed: int) -> FixedSizeSampler:
    return FixedSizeSampler(self.num_clients, self.cohort_size, seed)

  def relation(self, privacy: RoundPrivacy):
    if self.account_as_poisson:
      return _first_supported(privacy, (ADD_OR_REMOVE, ZERO_OUT), self.name)
    return _first_supported(privacy, (REPLACE_ONE,), self.name)

  def round_event(self, privacy: RoundPrivacy, round_index: int, accountant: str = "rdp"
                  ) -> dp_accounting.DpEvent:
    """The DpEvent of round `round_index`; the same under either accountant.

    Never a truncated-Poisson event, even accounted as Poisson: nothing is
    truncated, and that event's analysis is for Poisson sampling only.
    """
    del round_index
    _check_accountant(accountant)
    _one_round_events(privacy, self.name)
    event = privacy.event(self.relation(privacy))
    if not privacy.amplified_by_sampling or self.cohort_size == self.num_clients:
      return event
    if self.account_as_poisson:
      return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)
    return dp_accounting.SampledWithoutReplacementDpEvent(self.num_clients, self.cohort_size,
                                                          event)


@dataclasses.dataclass(frozen=True)
class Poisson:
  """Each client joins each round independently with probability q = m / N.

  The cohort has a static capacity (default: overflow probability 1e-12 for
  the neighbour with one more client); a larger cohort is truncated to a
  uniformly random subset of `capacity` of its clients (`PoissonSampler`).
  How that is accounted depends on the accountant:

  - "pld", for a Gaussian mechanism on a sum of per-user contributions
    (`truncation_event` says when): the round is
    `TruncatedSubsampledGaussianDpEvent(N + 1, q, capacity, sigma)`, the exact
    analysis of this sampler (arXiv:2508.15089), and nothing is charged to
    delta.
  - otherwise (RDP, which cannot process that event, or another mechanism):
    `PoissonSampled(q, event)` of the untruncated sampler, and the overflow
    probability is charged to delta (`privacy.truncation.overflow_delta`).
  """
  num_clients: int
  expected_cohort_size: float
  capacity: int | None = None
  name = "poisson"

  def __post_init__(self):
    check_int("num_clients", self.num_clients, 1)
    check_positive("expected_cohort_size", self.expected_cohort_size)
    if self.expected_cohort_size > self.num_clients:
      raise ValueError(f"expected_cohort_size ({self.expected_cohort_size}) must be <= "
                       f"num_clients ({self.num_clients})")

  @property
  def sampling_rate(self) -> float:
    return self.expected_cohort_size / self.num_clients

  def sampler(self, seed: int) -> PoissonSampler:
    return PoissonSampler(self.num_clients, self.sampling_rate, seed, self.capacity)

  @functools.cached_property
  def _capacity(self) -> int:
    return self.sampler(0).capacity

  @property
  def overflow_probability_per_round(self) -> float:
    """P[Binomial(N + 1, q) > capacity]: the overflow bound for both datasets of a pair."""
    # Under add/remove the neighbour may hold one more client.
    return float(poisson_overflow_probability(self.num_clients + 1, self.sampling_rate,
                                              self._capacity))

  def relation(self, privacy: RoundPrivacy):
    if not privacy.amplified_by_sampling:
      return _first_supported(privacy, (REPLACE_ONE, ADD_OR_REMOVE, ZERO_OUT), self.name)
    return _first_supported(privacy, (ADD_OR_REMOVE, ZERO_OUT), self.name)

  def truncation_event(self, privacy: RoundPrivacy, accountant: str
                       ) -> dp_accounting.TruncatedSubsampledGaussianDpEvent | None:
    """The round as truncated Poisson sampling of a Gaussian sum, or None where that does not apply.

    dp_accounting's event (Poisson sample of a dataset of `dataset_size`,
    truncate to a uniformly random subset of `truncated_batch_size`, add
    N(0, sigma^2) to the sum of the kept records, each of norm <= 1) is
    accounted under add/remove one record, and when truncation lets the
    added record push another out of the cohort it analyses that as
    replacing one record, with multiplier sigma / 2 (sensitivity 2). So it
    is used only when all of these hold:

    - the accountant is "pld" (the RDP accountant cannot process it);
    - the mechanism is central (amplified by sampling) and one round per
      event;
    - the capacity can truncate (capacity < N + 1; else the Poisson event
      is already exact);
    - the mechanism is stated under add/remove as exactly
      `GaussianDpEvent(sigma)` with a finite sigma > 0, and under replace-one
      as a `GaussianDpEvent` of multiplier >= sigma / 2: the Gaussian
      mechanism on a sum of contributions clipped to C, noise std sigma C
      (`gaussian_sum_privacy`, a central-noise chain). Laplace, composed or
      RDP-curve events keep the charged-delta accounting.

    `dataset_size` is N + 1: the pair (N + 1 clients, N clients) is the
    larger of the two add/remove pairs of an N-client population, and the
    event's epsilon grows with dataset_size (tested), so it bounds both.

    Args:
      privacy: the mechanism's statement of one round.
      accountant: "rdp" or "pld".

    Returns:
      The event, or None.
    """
    _check_accountant(accountant)
    _one_round_events(privacy, self.name)
    if (accountant != "pld" or not privacy.amplified_by_sampling
        or self._capacity >= self.num_clients + 1
        or self.relation(privacy) != ADD_OR_REMOVE or REPLACE_ONE not in privacy.relations):
      return None
    add_remove = privacy.event(ADD_OR_REMOVE)
    # Exact types: a subclass or another event may not be a Gaussian sum.
    # A traced sigma (the program a sweep vmaps) is accounted from the host's
    # build of each point, never from this one.
    if (type(add_remove) is not dp_accounting.GaussianDpEvent
        or not isinstance(add_remove.noise_multiplier, numbers.Real)):
      return None
    sigma = float(add_remove.noise_multiplier)
    replace = privacy.event(REPLACE_ONE)
    if not (math.isfinite(sigma) and sigma > 0
            and type(replace) is dp_accounting.GaussianDpEvent
            and isinstance(replace.noise_multiplier, numbers.Real)
            and replace.noise_multiplier >= sigma / 2):
      return None
    return dp_accounting.TruncatedSubsampledGaussianDpEvent(
        dataset_size=self.num_clients + 1, sampling_probability=self.sampling_rate,
        truncated_batch_size=self._capacity, noise_multiplier=sigma)

  def round_event(self, privacy: RoundPrivacy, round_index: int, accountant: str = "rdp"
                  ) -> dp_accounting.DpEvent:
    """The DpEvent of round `round_index` under `accountant` (see the class docstring)."""
    del round_index
    truncated = self.truncation_event(privacy, accountant)
    if truncated is not None:
      return truncated
    event = privacy.event(self.relation(privacy))
    if not privacy.amplified_by_sampling or self.sampling_rate == 1:
      return event
    return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)

  def charged_overflow_probability(self, privacy: RoundPrivacy, accountant: str = "rdp"
                                   ) -> float:
    """The per-round overflow probability charged to delta with `round_event`'s event.

    0 where the event accounts the truncation itself (`truncation_event`);
    else `overflow_probability_per_round`.
    """
    if self.truncation_event(privacy, accountant) is not None:
      return 0.0
    return self.overflow_probability_per_round


@dataclasses.dataclass(frozen=True)
class ShuffledEpochs(_ExactCohorts):
  """Each user takes part at most once per epoch of N // K rounds (no amplification claimed).

  The population is fixed and public (a permutation needs it), so the
  relation is zero-out. A mechanism's per-round event is charged once per
  epoch, at the epoch's first round: an upper bound at every round boundary.
  A DP-FTRL tree of E leaves needs epochs of E rounds (Kairouz et al. 2021).
  """
  num_clients: int
  cohort_size: int
  name = "shuffled_epochs"

  def __post_init__(self):
    ShuffledEpochSampler(self.num_clients, self.cohort_size, 0)

  @property
  def rounds_per_epoch(self) -> int:
    return self.num_clients // self.cohort_size

  def sampler(self, seed: int) -> ShuffledEpochSampler:
    return ShuffledEpochSampler(self.num_clients, self.cohort_size, seed)

  def relation(self, privacy: RoundPrivacy):
    return _first_supported(privacy, (ZERO_OUT, REPLACE_ONE), self.name)

  def round_event(self, privacy: RoundPrivacy, round_index: int, accountant: str = "rdp"
                  ) -> dp_accounting.DpEvent:
    """The DpEvent of round `round_index`; the same under either accountant."""
    _check_accountant(accountant)
    _no_participation_pattern(privacy, self.name)
    if privacy.rounds_per_event not in (1, self.rounds_per_epoch):
      raise ValueError(f"{privacy.description or 'the mechanism'} accounts "
                       f"{privacy.rounds_per_event} rounds per event, but an epoch of "
                       f"{self.num_clients} // {self.cohort_size} clients has "
                       f"{self.rounds_per_epoch} rounds: make them equal")
    if round_index % self.rounds_per_epoch:
      return dp_accounting.NoOpDpEvent()
    return privacy.event(self.relation(privacy))


def _separated_round_event(privacy: RoundPrivacy, round_index: int, max_participations: int,
                           min_separation: int, scheme: str) -> dp_accounting.DpEvent:
  """The event of round `round_index` when each user takes part at most once in any b rounds.

  No amplification is claimed: the schedule is independent of the data
  (zero-out), and only its (k, b) pattern is used. A mechanism whose event
  covers the whole run (`RoundPrivacy.participation` = its required (k, b),
  rounds_per_event = R) is charged once, at round 0, after checking that
  the scheme's k <= its k and b >= its b; a run longer than R rounds is
  refused. A one-round mechanism is charged once per window of b rounds, at
  the window's first round: two participations b apart never share an
  aligned window, so this bounds every round boundary, and it gives the
  epsilon of the identity strategy (independent noise) accounted as one
  Gaussian mechanism over k rounds.

  Args:
    privacy: the mechanism's statement of one round.
    round_index: 0-based.
    max_participations: k, the scheme's most participations of one user in
      the mechanism's R rounds (one-round mechanisms: unused).
    min_separation: b.
    scheme: the participation, for messages.

  Raises:
    ValueError: a multi-round mechanism without a (k, b) requirement, a
      pattern the mechanism's (k, b) does not cover (naming both), or a
      round past the mechanism's run.
  """
  rounds = privacy.rounds_per_event
  description = privacy.description or "the mechanism"
  if privacy.participation is None:
    if rounds == 1:
      if round_index % min_separation:
        return dp_accounting.NoOpDpEvent()
      return privacy.event(_first_supported(privacy, (ZERO_OUT, REPLACE_ONE), scheme))
    raise ValueError(f"{description} accounts {rounds} rounds per event with each user at most "
                     "once in them; use ShuffledEpochs with epochs of that many rounds")
  _check_pattern(privacy, round_index, max_participations, min_separation, scheme)
  event = privacy.event(_first_supported(privacy, (ZERO_OUT, REPLACE_ONE), scheme))
  return event if round_index == 0 else dp_accounting.NoOpDpEvent()


def _check_pattern(privacy: RoundPrivacy, round_index: int, max_participations: int,
                   min_separation: int, scheme: str) -> None:
  """Refuses a (k, b) pattern a whole-run mechanism was not calibrated for, or a round past it."""
  k_required, b_required = privacy.participation
  if max_participations > k_required or min_separation < b_required:
    raise ValueError(
        f"{privacy.description or 'the mechanism'} requires each user in at most k={k_required}"
        f" of its {privacy.rounds_per_event} rounds, any two at least b={b_required} apart, but "
        f"{scheme} gives k={max_participations} participations b={min_separation} apart")
  if round_index >= privacy.rounds_per_event:
    raise ValueError(f"{privacy.description or 'the mechanism'} is calibrated for a run of "
                     f"{privacy.rounds_per_event} rounds; round {round_index + 1} is past it: run "
                     "at most that many rounds, or build the mechanism for the run's length")


class _MinSeparated(_NeverTruncated):
  """Accounting of schemes whose public schedule keeps a user's participations >= b rounds apart.

  The schedule never depends on the data, so the relation is zero-out and
  a truncated cohort costs nothing (both neighbours drop the same clients);
  see `_separated_round_event`.
  """
  min_separation: int

  def max_participations(self, rounds: int) -> int:
    """k = ceil(rounds / b): most participations of one user in `rounds` rounds."""
    return -(-check_int("rounds", rounds, 1) // self.min_separation)

  def relation(self, privacy: RoundPrivacy):
    return _first_supported(privacy, (ZERO_OUT, REPLACE_ONE), self.name)

  def round_event(self, privacy: RoundPrivacy, round_index: int, accountant: str = "rdp"
                  ) -> dp_accounting.DpEvent:
    """The DpEvent of round `round_index` (0-based); the same under either accountant."""
    round_index = check_int("round_index", round_index, 0)
    _check_accountant(accountant)
    return _separated_round_event(privacy, round_index,
                                  self.max_participations(privacy.rounds_per_event),
                                  self.min_separation, repr(self))


@dataclasses.dataclass(frozen=True)
class Cyclic(_MinSeparated, _ExactCohorts):
  """A fixed seeded partition into b = N // K groups of K clients; round r uses group r mod b.

  Each user takes part exactly every b rounds, so in a run of R rounds at
  most k = ceil(R / b) times, any two b apart: the (k, b)-participation of
  multi-epoch matrix factorization (Choquette-Choo et al. 2023). The
  partition is public given the seed, so the relation is zero-out and no
  amplification is claimed (`_separated_round_event`).
  """
  num_clients: int
  cohort_size: int
  name = "cyclic"

  def __post_init__(self):
    CyclicSampler(self.num_clients, self.cohort_size, 0)

  @property
  def min_separation(self) -> int:
    """b: rounds between two participations of a user, N // K."""
    return self.num_clients // self.cohort_size

  def sampler(self, seed: int) -> CyclicSampler:
    return CyclicSampler(self.num_clients, self.cohort_size, seed)


@dataclasses.dataclass(frozen=True)
class BallsInBins(_MinSeparated):
  """Each user is put in one of b bins uniformly at random (seeded); round r runs bin r mod b.

  Every user takes part exactly every b rounds; cohort sizes vary
  (Binomial(N, 1 / b)) and the capacity is the largest bin, so nothing is
  truncated. Accounting: the bound actually used is the (k, b) one of
  `_separated_round_event` (no amplification). Balls-in-bins sampling does
  amplify: Chua et al. 2025 ("Balls-and-Bins Sampling for DP-SGD") estimate
  its epsilon by Monte Carlo and Feldman & Shenfeld 2025 bound it
  ("Privacy Amplification by Random Allocation");
  `privacy.balls_in_bins.monte_carlo_epsilon` gives the estimate with its
  confidence interval for reference, never charged.
  """
  num_clients: int
  num_bins: int
  name = "balls_in_bins"

  def __post_init__(self):
    BallsInBinsSampler(self.num_clients, self.num_bins, 0)

  @property
  def min_separation(self) -> int:
    return self.num_bins

  @property
  def expected_cohort_size(self) -> float:
    return self.num_clients / self.num_bins

  @property
  def sampling_rate(self) -> float:
    return 1 / self.num_bins

  def sampler(self, seed: int) -> BallsInBinsSampler:
    return BallsInBinsSampler(self.num_clients, self.num_bins, seed)


@dataclasses.dataclass(frozen=True)
class MinSeparation(_MinSeparated):
  """b-min-sep: each round, each user who took no part in the last b - 1 rounds joins with probability p.

  Any two participations of a user are at least b apart
  (`MinSeparationSampler`, warm-started so the expected cohort is
  N / (b - 1 + 1 / p) from round 0). Accounting: the (k, b) bound of
  `_separated_round_event`, with no amplification claimed: the amplified
  analysis of b-min-sep is Monte Carlo only (arXiv:2602.09338). Pair it
  with a matrix-factorization mechanism built for min_separation = b.
  """
  num_clients: int
  min_separation: int
  sampling_rate: float
  name = "min_separation"

  def __post_init__(self):
    MinSeparationSampler(self.num_clients, self.min_separation, self.sampling_rate, 0)

  @property
  def expected_cohort_size(self) -> float:
    return self.num_clients / (self.min_separation - 1 + 1 / self.sampling_rate)

  def sampler(self, seed: int) -> MinSeparationSampler:
    return MinSeparationSampler(self.num_clients, self.min_separation, self.sampling_rate, seed)


@dataclasses.dataclass(frozen=True)
class CyclicPoisson(_MinSeparated):
  """Cyclic Poisson: b fixed seeded groups of N // b; round r Poisson-samples group r mod b at q.

  q = expected_cohort_size / (N // b). Each user is eligible once every b
  rounds and Poisson-sampled when eligible: the sampling of amplified BandMF
  (Choquette-Choo, Ganesh, McKenna, McMahan, Rush, Thakurta & Xu 2023,
  "(Amplified) Banded Matrix Factorization", Thm. 4). Relation: zero-out
  (the partition is public given the seed). Accounting, charged at the
  first round of each cycle of b rounds:

  - a one-round central mechanism (e.g. `dp_mean`):
    `PoissonSampled(q, event)`, once per cycle;
  - a banded MF mechanism whose bands fit in a cycle
    (`RoundPrivacy.banded` = (bands, sigma_1), bands <= b): amplified BandMF,
    `PoissonSampled(q, Gaussian(sigma_1))` once per cycle, sigma_1 the noise
    relative to one participation's sensitivity (the strategy's largest
    column norm): jax_privacy's `amplified_bandmf_event`;
  - any other MF mechanism (BLT, BISR, dense, more bands than b): the
    (k, b) bound without amplification (`_separated_round_event`);
  - a mechanism that sampling does not amplify (local DP): its event once
    per cycle.

  Truncation to the capacity is charged to delta where amplification is
  claimed (`charged_overflow_probability`, the argument of
  `privacy.truncation.overflow_delta`); where it is not, both neighbours
  drop the same clients and nothing is charged.
  """
  num_clients: int
  num_groups: int
  expected_cohort_size: float
  capacity: int | None = None
  name = "cyclic_poisson"

  def __post_init__(self):
    check_int("num_groups", self.num_groups, 1)
    check_positive("expected_cohort_size", self.expected_cohort_size)
    if self.expected_cohort_size > self.num_clients // self.num_groups:
      raise ValueError(f"expected_cohort_size ({self.expected_cohort_size}) must be <= the group "
                       f"size num_clients // num_groups ({self.num_clients // self.num_groups})")
    self.sampler(0)

  @property
  def min_separation(self) -> int:
    return self.num_groups

  @property
  def sampling_rate(self) -> float:
    """q: the probability that an eligible user joins its group's round."""
    return self.expected_cohort_size / (self.num_clients // self.num_groups)

  @functools.cached_property
  def overflow_probability_per_round(self) -> float:
    """P[Binomial(N // b, q) > capacity]: the population is fixed (zero-out)."""
    return self.sampler(0).overflow_probability_per_round

  def sampler(self, seed: int) -> CyclicPoissonSampler:
    return CyclicPoissonSampler(self.num_clients, self.num_groups, self.sampling_rate, seed,
                                self.capacity)

  def _amplified(self, privacy: RoundPrivacy) -> bool:
    if privacy.participation is None:
      return privacy.amplified_by_sampling and privacy.rounds_per_event == 1
    return privacy.banded is not None and privacy.banded[0] <= self.num_groups

  def round_event(self, privacy: RoundPrivacy, round_index: int, accountant: str = "rdp"
                  ) -> dp_accounting.DpEvent:
    """The DpEvent of round `round_index` (0-based); the same under either accountant."""
    if not self._amplified(privacy):
      return super().round_event(privacy, round_index, accountant)
    round_index = check_int("round_index", round_index, 0)
    _check_accountant(accountant)
    relation = self.relation(privacy)
    if privacy.participation is None:
      event = privacy.event(relation)
    else:
      # The (k, b) the noise was calibrated for must still hold.
      _check_pattern(privacy, round_index, self.max_participations(privacy.rounds_per_event),
                     self.min_separation, repr(self))
      event = dp_accounting.GaussianDpEvent(privacy.banded[1])
    if round_index % self.num_groups:
      return dp_accounting.NoOpDpEvent()
    return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)

  def charged_overflow_probability(self, privacy: RoundPrivacy, accountant: str = "rdp"
                                   ) -> float:
    """`overflow_probability_per_round` where amplification is claimed, else 0."""
    if not self._amplified(privacy):
      return super().charged_overflow_probability(privacy, accountant)
    _check_accountant(accountant)
    return self.overflow_probability_per_round


Participation = (Full | FixedSize | Poisson | ShuffledEpochs | Cyclic | CyclicPoisson | BallsInBins
                 | MinSeparation)
# The schemes that keep a user's participations >= min_separation rounds apart, at most
# max_participations(rounds) times: the (k, b) patterns matrix-factorization noise needs.
SEPARATED = (Cyclic, CyclicPoisson, BallsInBins, MinSeparation)
Separated = Cyclic | CyclicPoisson | BallsInBins | MinSeparation


def neighbouring(participation: Participation, privacy: RoundPrivacy | None) -> str:
  """The relation a run with `participation` and mechanism `privacy` is accounted under, in words."""
  if privacy is None:
    return "no privacy"
  words = RELATION_WORDS[participation.relation(privacy)]
  if isinstance(participation, FixedSize) and participation.account_as_poisson:
    words += " (fixed-size cohorts accounted as Poisson sampling: an approximation, not a proof)"
  return words


__all__ = ["BallsInBins", "Cyclic", "CyclicPoisson", "Full", "FixedSize", "MinSeparation",
           "Participation", "Poisson", "SEPARATED", "Separated", "ShuffledEpochs", "neighbouring"]
