"""Matrix-factorization (correlated-noise) mechanisms: workloads, strategies, sensitivity, noise.

A = B C; the server adds row t of C^-1 Z to round t's clipped sum, with Z iid
N(0, (sigma * clip * sens(C))^2), and the whole run is one Gaussian mechanism
of noise multiplier sigma (`dp_accounting.GaussianDpEvent(sigma)`) under
zero-out / add-remove of one user's contributions across all of its
participations. See docs/matrix_factorization.md.

Pure math and pure streams only; aggregators build on `stream_init` /
`stream_next`.
"""

from fedjax_priv.privacy.matrix_factorization._optimization import (optimize_banded_toeplitz,
                                                                     optimize_blt)
from fedjax_priv.privacy.matrix_factorization._sensitivity import (best_pattern_sum,
                                                                    brute_force_sensitivity,
                                                                    earliest_pattern_squared,
                                                                    participations_possible,
                                                                    sensitivity,
                                                                    sensitivity_upper_bound)
from fedjax_priv.privacy.matrix_factorization._strategies import (
    BandedToeplitz, BufferedToeplitz, DenseStrategy, ExpectedError, InverseBandedToeplitz,
    Strategy, Workload, banded_inverse_square_root, banded_square_root, binary_tree_strategy,
    check_strategy, cooldown_learning_rates, expected_error, inverse_square_root_coefs,
    inverse_toeplitz_coefs, noise_to_error_matrix, rational_form, square_root_coefs,
    strategy_matrix, toeplitz_coefs)
from fedjax_priv.privacy.matrix_factorization._streaming import (StreamState, stream_init,
                                                                  stream_next, stream_slots)

__all__ = [
    "BandedToeplitz", "BufferedToeplitz", "DenseStrategy", "ExpectedError",
    "InverseBandedToeplitz", "Strategy", "StreamState", "Workload", "banded_inverse_square_root",
    "banded_square_root", "best_pattern_sum", "binary_tree_strategy", "brute_force_sensitivity",
    "check_strategy", "cooldown_learning_rates", "earliest_pattern_squared", "expected_error",
    "inverse_square_root_coefs", "inverse_toeplitz_coefs", "noise_to_error_matrix",
    "optimize_banded_toeplitz", "optimize_blt", "participations_possible", "rational_form",
    "sensitivity", "sensitivity_upper_bound", "square_root_coefs", "strategy_matrix",
    "stream_init", "stream_next", "stream_slots", "toeplitz_coefs",
]
