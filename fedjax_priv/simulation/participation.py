"""How clients take part in rounds: one object gives the cohorts and turns a mechanism's event
into the round's event.

A mechanism (an `Aggregator`, or DP-SGD inside clients) states what one round
releases about a user who takes part (`RoundPrivacy`); a participation
object samples the cohorts and wraps that statement into the DpEvent of one
round of the run, with the neighbouring relation it holds under:

| participation | sampler | relation | round event |
| --- | --- | --- | --- |
| `Full(N)` | every client every round | add/remove (else zero-out) | the mechanism's event |
| `FixedSize(N, K)` | K of N without replacement | replace one user | `SampledWithoutReplacement(N, K, event)` |
| `Poisson(N, m)` | each client with q = m / N | add/remove (else zero-out) | `PoissonSampled(q, event)` |
| `ShuffledEpochs(N, K)` | each epoch a permutation cut into N // K cohorts of K | zero-out | the event once per epoch |
| `Cyclic(N, K)` | a fixed partition into N // K groups of K, in turn | zero-out | a whole-run (MF) event once; else once per cycle of N // K rounds |

Mechanisms whose server sees each upload (local DP) are not amplified: every
round is charged the mechanism's own event. A mechanism whose event covers
E rounds (a DP-FTRL tree) needs each user at most once in those E rounds,
which only `ShuffledEpochs` with epochs of E rounds guarantees. A
matrix-factorization mechanism's event covers the whole run and needs each
user in at most k rounds, any two at least b apart (`RoundPrivacy.participation`),
which only `Cyclic` guarantees.

References:
  Mironov, Talwar & Zhang 2019 (Poisson-sampled Gaussian). Wang, Balle &
  Kasiviswanathan 2019 (sampling without replacement, replace-one). Kairouz
  et al. 2021, "Practical and Private (Deep) Learning without Sampling or
  Shuffling" (DP-FTRL with one participation per epoch). Choquette-Choo,
  McMahan, Rush & Thakurta 2023, "Multi-Epoch Matrix Factorization
  Mechanisms for Private Machine Learning" ((k, b)-participation, cyclic).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import dp_accounting

from fedjax_priv.checks import check_int, check_positive
from fedjax_priv.data.sampling import (CyclicSampler, FixedSizeSampler, PoissonSampler,
                                       ShuffledEpochSampler, poisson_overflow_probability)
from fedjax_priv.privacy.aggregation import ADD_OR_REMOVE, REPLACE_ONE, ZERO_OUT, RoundPrivacy

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


@dataclasses.dataclass(frozen=True)
class Full:
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

  def round_event(self, privacy: RoundPrivacy, round_index: int) -> dp_accounting.DpEvent:
    """The DpEvent of round `round_index` (0-based)."""
    del round_index
    _one_round_events(privacy, self.name)
    return privacy.event(self.relation(privacy))

  overflow_probability_per_round = 0.0


class _ExactCohorts:
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
  the relation is replace-one (Wang, Balle & Kasiviswanathan 2019; RDP
  accountant only). `account_as_poisson=True` accounts it as Poisson with
  q = K / N instead: an approximation many papers use, not a proof (Chua et
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

  def round_event(self, privacy: RoundPrivacy, round_index: int) -> dp_accounting.DpEvent:
    del round_index
    _one_round_events(privacy, self.name)
    event = privacy.event(self.relation(privacy))
    if not privacy.amplified_by_sampling or self.cohort_size == self.num_clients:
      return event
    if self.account_as_poisson:
      return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)
    return dp_accounting.SampledWithoutReplacementDpEvent(self.num_clients, self.cohort_size,
                                                          event)

  overflow_probability_per_round = 0.0


@dataclasses.dataclass(frozen=True)
class Poisson:
  """Each client joins each round independently with probability q = m / N.

  The cohort has a static capacity (default: overflow probability 1e-12 for
  the neighbour with one more client); the rare overflow is truncated and
  charged to delta (`privacy.truncation`).
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
    # Under add/remove the neighbour may hold one more client.
    return float(poisson_overflow_probability(self.num_clients + 1, self.sampling_rate,
                                              self._capacity))

  def relation(self, privacy: RoundPrivacy):
    if not privacy.amplified_by_sampling:
      return _first_supported(privacy, (REPLACE_ONE, ADD_OR_REMOVE, ZERO_OUT), self.name)
    return _first_supported(privacy, (ADD_OR_REMOVE, ZERO_OUT), self.name)

  def round_event(self, privacy: RoundPrivacy, round_index: int) -> dp_accounting.DpEvent:
    del round_index
    _one_round_events(privacy, self.name)
    event = privacy.event(self.relation(privacy))
    if not privacy.amplified_by_sampling or self.sampling_rate == 1:
      return event
    return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)


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

  def round_event(self, privacy: RoundPrivacy, round_index: int) -> dp_accounting.DpEvent:
    _no_participation_pattern(privacy, self.name)
    if privacy.rounds_per_event not in (1, self.rounds_per_epoch):
      raise ValueError(f"{privacy.description or 'the mechanism'} accounts "
                       f"{privacy.rounds_per_event} rounds per event, but an epoch of "
                       f"{self.num_clients} // {self.cohort_size} clients has "
                       f"{self.rounds_per_epoch} rounds: make them equal")
    if round_index % self.rounds_per_epoch:
      return dp_accounting.NoOpDpEvent()
    return privacy.event(self.relation(privacy))

  overflow_probability_per_round = 0.0


@dataclasses.dataclass(frozen=True)
class Cyclic(_ExactCohorts):
  """A fixed seeded partition into b = N // K groups of K clients; round r uses group r mod b.

  Each user takes part exactly every b rounds, so in a run of R rounds at
  most k = ceil(R / b) times, any two b apart: the (k, b)-participation of
  multi-epoch matrix factorization (Choquette-Choo et al. 2023). The
  partition is public given the seed, so the relation is zero-out and no
  amplification is claimed. A mechanism whose event covers the whole run
  (`RoundPrivacy.participation` = its required (k, b), rounds_per_event = R)
  is charged once, at round 0, after checking k <= its k and b >= its b; a
  run longer than R rounds is refused. A one-round mechanism is charged its
  own event once per cycle of b rounds, at the cycle's first round (each
  user takes part once per cycle): an upper bound at every round boundary,
  as for `ShuffledEpochs`, and the same epsilon as the identity strategy
  (independent noise) accounted as one Gaussian mechanism over k rounds.
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

  def max_participations(self, rounds: int) -> int:
    """k = ceil(rounds / b): most participations of one user in `rounds` rounds."""
    return -(-check_int("rounds", rounds, 1) // self.min_separation)

  def sampler(self, seed: int) -> CyclicSampler:
    return CyclicSampler(self.num_clients, self.cohort_size, seed)

  def relation(self, privacy: RoundPrivacy):
    return _first_supported(privacy, (ZERO_OUT, REPLACE_ONE), self.name)

  def round_event(self, privacy: RoundPrivacy, round_index: int) -> dp_accounting.DpEvent:
    """The DpEvent of round `round_index` (0-based).

    Raises:
      ValueError: a multi-round mechanism without a (k, b) requirement, a
        participation pattern the mechanism's (k, b) does not cover (naming
        both), or a round past the mechanism's run.
    """
    round_index = check_int("round_index", round_index, 0)
    rounds = privacy.rounds_per_event
    description = privacy.description or "the mechanism"
    if privacy.participation is None:
      if rounds == 1:
        # Every user takes part once per cycle of b rounds: charging the
        # event at each cycle's first round bounds every round boundary.
        if round_index % self.min_separation:
          return dp_accounting.NoOpDpEvent()
        return privacy.event(self.relation(privacy))
      raise ValueError(f"{description} accounts {rounds} rounds per event with each user at most "
                       "once in them; use ShuffledEpochs with epochs of that many rounds")
    k_required, b_required = privacy.participation
    k, b = self.max_participations(rounds), self.min_separation
    if k > k_required or b < b_required:
      raise ValueError(
          f"{description} requires each user in at most k={k_required} of its {rounds} rounds, "
          f"any two at least b={b_required} apart, but Cyclic({self.num_clients}, "
          f"{self.cohort_size}) gives k={k} participations b={b} apart")
    if round_index >= rounds:
      raise ValueError(f"{description} is calibrated for a run of {rounds} rounds; round "
                       f"{round_index + 1} is past it: run at most {rounds} rounds, or build the "
                       "mechanism for the run's length")
    event = privacy.event(self.relation(privacy))
    return event if round_index == 0 else dp_accounting.NoOpDpEvent()

  overflow_probability_per_round = 0.0


Participation = Full | FixedSize | Poisson | ShuffledEpochs | Cyclic


def neighbouring(participation: Participation, privacy: RoundPrivacy | None) -> str:
  """The relation a run with `participation` and mechanism `privacy` is accounted under, in words."""
  if privacy is None:
    return "no privacy"
  words = RELATION_WORDS[participation.relation(privacy)]
  if isinstance(participation, FixedSize) and participation.account_as_poisson:
    words += " (fixed-size cohorts accounted as Poisson sampling: an approximation, not a proof)"
  return words


__all__ = ["Cyclic", "Full", "FixedSize", "Participation", "Poisson", "ShuffledEpochs", "neighbouring"]
