"""Privacy mechanisms (transforms, aggregators, clipping, noise), their accounting and audits."""

from fedjax_priv.privacy import accounting, audit, local_dp, matrix_factorization, transforms
from fedjax_priv.privacy.adaptive_clipping import (AdaptiveClipState, adaptive_clip_mean,
                                                   split_noise_multiplier)
from fedjax_priv.privacy.aggregation import (Aggregator, ClientContext, RoundContext, dp_mean,
                                             weighted_mean)
from fedjax_priv.privacy.clipping import clip_by_l2_norm, clip_factor
from fedjax_priv.privacy.dp_ftrl import TreeState, dp_ftrl_aggregator
from fedjax_priv.privacy.mf_aggregator import MFSensitivity, mf_mean, mf_sensitivity
from fedjax_priv.privacy.noise import gaussian_like, laplace_like

__all__ = [
    "AdaptiveClipState", "Aggregator", "ClientContext", "MFSensitivity", "RoundContext",
    "TreeState",
    "accounting", "adaptive_clip_mean", "audit", "clip_by_l2_norm", "clip_factor",
    "dp_ftrl_aggregator", "dp_mean", "gaussian_like", "laplace_like", "local_dp",
    "matrix_factorization", "mf_mean", "mf_sensitivity",
    "split_noise_multiplier", "transforms", "weighted_mean",
]
