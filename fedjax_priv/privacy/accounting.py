"""Privacy accounting, one import: events, accountants, calibration, truncation, the ledger.

The parts live in modules of one concept each; this module gathers their
public names so `from fedjax_priv.privacy import accounting` keeps working:

* `events`: the DpEvents of what the engine runs, their neighbouring
  relations (`relation_of`), `RdpCurveDpEvent` and the JSON codec;
* `accountant`: `compute_epsilon` / `compute_delta` with dp_accounting's RDP
  or PLD accountant (RDP curves composed exactly);
* `calibration`: the smallest σ meeting a target ε, rounds within a budget;
* `truncation`: the δ paid for truncated Poisson cohorts and batches;
* `ledger`: `PrivacyLedger`, what ran, round by round.
"""

from fedjax_priv.checks import check_delta, check_int, check_positive, check_probability
from fedjax_priv.privacy.accountant import (DEFAULT_PLD_DISCRETIZATION, DEFAULT_RDP_ORDERS,
                                            INTEGER_RDP_ORDERS, compute_delta, compute_epsilon,
                                            poisson_subsampled_rdp)
from fedjax_priv.privacy.calibration import calibrate_noise_multiplier, steps_within_budget
from fedjax_priv.privacy.events import (NeighboringRelation, RdpCurveDpEvent, event_from_json,
                                        event_to_json, example_level_event, relation_of,
                                        tree_aggregation_event, user_level_event)
from fedjax_priv.privacy.ledger import PrivacyLedger
from fedjax_priv.privacy.truncation import epsilon_with_overflow, overflow_delta

__all__ = [
    "DEFAULT_PLD_DISCRETIZATION", "DEFAULT_RDP_ORDERS", "INTEGER_RDP_ORDERS",
    "NeighboringRelation", "PrivacyLedger", "RdpCurveDpEvent", "calibrate_noise_multiplier",
    "check_delta", "check_int", "check_positive", "check_probability", "compute_delta",
    "compute_epsilon", "epsilon_with_overflow", "event_from_json", "event_to_json",
    "example_level_event", "overflow_delta", "poisson_subsampled_rdp", "relation_of",
    "steps_within_budget", "tree_aggregation_event", "user_level_event",
]
