"""Tests for fedjax_priv.secure.he.params: the security table, refusals, noise budget."""

import math

import pytest

from fedjax_priv.secure.he import params as he_params
from fedjax_priv.secure.he.params import RlweParams, ntt_primes, standard_params


@pytest.mark.parametrize("n,num_primes", [(2048, 2), (4096, 4), (8192, 8)])
def test_standard_params_stay_within_the_128_bit_table(n, num_primes):
  p = standard_params(n)
  assert len(p.primes) == num_primes
  assert p.log_q <= he_params.MAX_LOG_Q_128[n]
  assert all(q % (2 * n) == 1 and q < 2**26 for q in p.primes)


def test_refuses_insecure_or_malformed_parameter_sets():
  with pytest.raises(ValueError, match="n = 512 is not in the HE standard"):
    RlweParams(512, ntt_primes(512, 1), 17)
  with pytest.raises(ValueError, match="exceeds 54 for n = 2048: below 128-bit security"):
    RlweParams(2048, ntt_primes(2048, 3), 17)
  with pytest.raises(ValueError, match="sigma = 2.0 is below"):
    RlweParams(2048, ntt_primes(2048, 2), 17, sigma=2.0)
  with pytest.raises(ValueError, match="is not a prime = 1 mod 2n"):
    RlweParams(2048, (ntt_primes(2048, 1)[0] + 2,), 17)
  with pytest.raises(ValueError, match="plaintext modulus t"):
    RlweParams(2048, ntt_primes(2048, 2), 2**25)


def test_noise_budget_refusal_names_k_n_q_t():
  p = standard_params(2048, t=2**16)
  he_params.check_noise_budget(p, 4096, 1, 0)
  with pytest.raises(ValueError, match=r"K = 4096 .* n = 2048, log2 q = 5\d\.\d, t = 65536"):
    he_params.check_noise_budget(p, 4096, 3, 8)


def test_bounds_follow_their_formulas():
  p = standard_params(4096)
  assert he_params.fresh_noise_bound(p, 3) == 19 * (1 + 2 * 4096 * 3)
  summed = 10 * he_params.fresh_noise_bound(p, 3)
  assert he_params.smudging_bound(p, 10, 3, 40) == 2**(math.ceil(math.log2(summed)) + 40)
  assert he_params.smudging_bound(p, 10, 3, 0) == 0
  assert he_params.ciphertext_bytes(p, 100_000) == 25 * 2 * 4 * 4096 * 4
