"""Stragglers: FedProx's systems heterogeneity, simulated with the step mask.

Each round a fraction of the cohort's real clients are stragglers: each does
only s local steps, s uniform in {1, ..., S}, drawn from the round's key (the
FedProx paper's setting of 0%, 50% or 90% stragglers). Two policies:

  "drop"     the straggler is left out of the round (client_mask 0), as in the
             paper's FedAvg baseline, which discards devices that miss the
             deadline;
  "partial"  the straggler's steps past s are masked, so its partial work is
             aggregated, as FedProx does.

Masked steps leave params and optimizer state untouched in plain local
training. Under example-level DP-SGD a masked step still releases a noisy
step (see `client_update`), so "partial" then adds noise instead of skipping
the step; use "drop" or no stragglers with `ExampleDP`. Which clients straggle
depends on no data, so neither policy changes a privacy guarantee; with
`dp_mean`, dropped clients still count in the public expected cohort size.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in
  Heterogeneous Networks", MLSys 2020, section 5.2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_priv.types import ClientBatch

STRAGGLER_POLICIES = ("drop", "partial")


def check_stragglers(fraction: float, policy: str) -> None:
  """Raises ValueError naming `straggler_fraction` or `straggler_policy` when invalid."""
  if not 0 <= fraction <= 1:
    raise ValueError(f"straggler_fraction must be in [0, 1], got {fraction}")
  if policy not in STRAGGLER_POLICIES:
    raise ValueError(f"straggler_policy must be one of {STRAGGLER_POLICIES}, got {policy!r}")


def straggler_steps(key: jax.Array, client_mask: jax.Array, num_steps: int,
                    fraction: float) -> tuple[jax.Array, jax.Array]:
  """Draws which real clients straggle and how many steps each does.

  Args:
    key: PRNG key of the round.
    client_mask: [K] float32, 1.0 for real clients.
    num_steps: S, the full number of local steps.
    fraction: floor(fraction * number of real clients) clients straggle,
      chosen uniformly among the real ones.

  Returns:
    steps [K] int32 (S for non-stragglers, uniform in [1, S] for stragglers)
    and stragglers [K] float32 (1.0 for a straggler).
  """
  choose_key, steps_key = jax.random.split(key)
  real = client_mask > 0
  # Padded slots rank last, so the first `count` ranks are random real clients.
  scores = jnp.where(real, jax.random.uniform(choose_key, client_mask.shape), 2.0)
  rank = jnp.argsort(jnp.argsort(scores))
  count = jnp.floor(fraction * jnp.sum(real)).astype(jnp.int32)
  stragglers = real & (rank < count)
  drawn = jax.random.randint(steps_key, client_mask.shape, 1, num_steps + 1)
  return jnp.where(stragglers, drawn, num_steps).astype(jnp.int32), stragglers.astype(jnp.float32)


def apply_stragglers(batch: ClientBatch, key: jax.Array, fraction: float,
                     policy: str) -> tuple[ClientBatch, jax.Array]:
  """The cohort's batch with stragglers dropped or cut short, and the [K] straggler flags."""
  check_stragglers(fraction, policy)
  num_steps = batch.example_mask.shape[1]
  steps, stragglers = straggler_steps(key, batch.client_mask, num_steps, fraction)
  if policy == "drop":
    keep = batch.client_mask * (1.0 - stragglers)
    return batch._replace(client_mask=keep,
                          example_mask=batch.example_mask * keep[:, None, None]), stragglers
  step_on = (jnp.arange(num_steps)[None, :] < steps[:, None]).astype(batch.example_mask.dtype)
  return batch._replace(example_mask=batch.example_mask * step_on[:, :, None]), stragglers


def with_stragglers(round_fn, fraction: float, policy: str):
  """Wraps `round_fn(state, batch, key)` so each round has stragglers.

  The round's key is split into the stragglers' key and the inner round's
  key; the metrics gain `stragglers`, the number of straggling clients. Works
  for traced backends and for "loop" (the draw then runs eagerly).
  """
  check_stragglers(fraction, policy)

  def run(state, batch, key):
    straggler_key, round_key = jax.random.split(key)
    batch, stragglers = apply_stragglers(batch, straggler_key, fraction, policy)
    state, metrics = round_fn(state, batch, round_key)
    return state, {**metrics, "stragglers": jnp.sum(stragglers)}

  return run
