"""Round builder (backends vmap | chunked | loop) and multi-round programs."""

from fedjax_priv.simulation.program import (Batching, cohort_to_batch, round_from_cohort,
                                            rounds_on_device)
from fedjax_priv.simulation.round import BACKENDS, build_round

__all__ = [
    "BACKENDS", "Batching", "build_round", "cohort_to_batch", "round_from_cohort",
    "rounds_on_device",
]
