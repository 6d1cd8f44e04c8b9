"""Privacy mechanisms (clipping, noise, aggregators) and their accounting."""

from fedjax_priv.privacy import accounting
from fedjax_priv.privacy.aggregation import (Aggregator, ClientContext, RoundContext, dp_mean,
                                             weighted_mean)
from fedjax_priv.privacy.clipping import clip_by_l2_norm, clip_factor
from fedjax_priv.privacy.noise import gaussian_like

__all__ = [
    "Aggregator", "accounting", "clip_by_l2_norm", "clip_factor", "dp_mean", "gaussian_like",
    "weighted_mean",
]
