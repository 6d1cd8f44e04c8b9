"""Local DP: every client clips and noises its own update before it leaves the device.

The server (or anyone who sees the uploads) gets each client's noised update,
so the guarantee holds without trusting the aggregator: one client's upload in
one round is the event `Chain.local_dp_event`, and a client that takes part in
T rounds composes T of them (`per_client_event`). Subsampling gives no
amplification here: the server knows who uploaded.

Neighbouring relation: replace one client's input by any other input
(the definition of local DP), so after `clip_l2(C)` the sensitivity of the
upload is 2C and `gaussian(sigma)` adds N(0, (2 sigma C)^2) per coordinate;
after `clip_l1(C)`, `laplace(b)` adds Laplace(0, 2 b C), which is
(1/b, 0)-local-DP per upload. The aggregate is post-processing of the uploads,
so it is at least as private, but the noise of K clients adds up: the mean's
noise std is sqrt(K) * 2 sigma C / m, against sigma C / m for central DP.

References:
  Kasiviswanathan, Lee, Nissim, Raskhodnikova & Smith 2008/2011, "What Can We
  Learn Privately?" (local model). Erlingsson, Pihur & Korolova 2014,
  "RAPPOR" (local DP in deployment). Dwork & Roth 2014 (Gaussian and Laplace
  mechanisms).
"""

from __future__ import annotations

import numbers

import dp_accounting

from fedjax_priv.privacy.transforms import (Chain, NeighboringRelation, chain, clip_l1, clip_l2,
                                            gaussian, laplace, mean, sum_units)


def gaussian_local_dp(clip_norm: float, noise_multiplier: float,
                      expected_cohort_size: float) -> Chain:
  """Each client clips to L2 norm C and adds N(0, (2 sigma C)^2); the server averages.

  Use `as_aggregator(...)` to plug it into `build_round`.

  Args:
    clip_norm: C > 0.
    noise_multiplier: sigma >= 0, relative to the replace-one sensitivity 2C.
    expected_cohort_size: public denominator m > 0.

  Returns:
    chain(clip_l2(C), gaussian(sigma), sum_units(), mean(m)) under
    REPLACE_ONE; its `local_dp_event` is `GaussianDpEvent(sigma)`.
  """
  return chain(clip_l2(clip_norm), gaussian(noise_multiplier), sum_units(),
               mean(expected_cohort_size), relation=NeighboringRelation.REPLACE_ONE)


def laplace_local_dp(clip_norm: float, noise_multiplier: float,
                     expected_cohort_size: float) -> Chain:
  """Each client clips to L1 norm C and adds Laplace(0, 2 b C); the server averages.

  Args:
    clip_norm: C > 0, an L1 bound.
    noise_multiplier: b >= 0, the Laplace scale over the replace-one L1
      sensitivity 2C; one upload is (1/b, 0)-local-DP.
    expected_cohort_size: public denominator m > 0.

  Returns:
    chain(clip_l1(C), laplace(b), sum_units(), mean(m)) under REPLACE_ONE;
    its `local_dp_event` is `LaplaceDpEvent(b)`.
  """
  return chain(clip_l1(clip_norm), laplace(noise_multiplier), sum_units(),
               mean(expected_cohort_size), relation=NeighboringRelation.REPLACE_ONE)


def per_client_event(local_chain: Chain, participations: int) -> dp_accounting.DpEvent:
  """The local-DP event of one client over all the rounds it takes part in.

  Args:
    local_chain: a chain with noise before its sum, e.g. `gaussian_local_dp(...)`.
    participations: rounds the client uploads in, >= 0 (a public bound, or
      the client's own count for its own guarantee).

  Returns:
    `SelfComposedDpEvent(local_chain.local_dp_event, participations)`
    (`NoOpDpEvent` for 0); account it with `accounting.compute_epsilon`.

  Raises:
    ValueError: `participations` is not an integer >= 0, or the chain adds
      no noise before its sum (its uploads would not be private).
  """
  if isinstance(participations, bool) or not isinstance(participations, numbers.Integral) or (
      participations < 0):
    raise ValueError(f"participations must be an integer >= 0, got {participations!r}")
  event = local_chain.local_dp_event
  if isinstance(event, dp_accounting.NonPrivateDpEvent):
    raise ValueError("local_chain adds no noise before sum_units(): its uploads are not "
                     "locally private")
  if participations == 0:
    return dp_accounting.NoOpDpEvent()
  return dp_accounting.SelfComposedDpEvent(event, int(participations))
