"""Secure aggregation, simulated: quantisation to Z_{2^b}, Shamir sharing, pairwise masks
(SecAgg / SecAgg+) with dropout recovery, the `secure_sum` aggregator, and distributed DP
(discrete Gaussian and Skellam noise added by clients in the integers), and `he`:
additively homomorphic (RLWE, BFV-style) aggregation with a shared secret key.

What is simulated and what is not: docs/secure_aggregation.md.
"""

from fedjax_priv.secure import aggregators, distributed_dp, he, quantization, secagg, shamir
from fedjax_priv.secure.aggregators import SecureSumFailed, check_threshold, secure_sum

__all__ = ["SecureSumFailed", "aggregators", "check_threshold", "distributed_dp", "he",
           "quantization", "secagg", "secure_sum", "shamir"]
