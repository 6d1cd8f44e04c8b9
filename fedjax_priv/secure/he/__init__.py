"""Additively homomorphic aggregation: BFV over an RNS ring, vectorised in JAX uint32 arithmetic.

See docs/homomorphic_encryption.md for parameters, noise budget and what is simulated.
"""

from fedjax_priv.secure.he.aggregator import HeState, he_distributed_mean, he_mean
from fedjax_priv.secure.he.ntt import RnsRing
from fedjax_priv.secure.he.params import RlweParams, check_noise_budget, standard_params
from fedjax_priv.secure.he.rlwe import Ciphertext, PublicKey

__all__ = ["Ciphertext", "HeState", "PublicKey", "RlweParams", "RnsRing", "check_noise_budget",
           "he_distributed_mean", "he_mean", "standard_params"]
