"""RLWE parameter sets, their security check, and the noise budget of summed ciphertexts.

The ring is R_q = Z_q[X] / (X^n + 1) with q = q_1 * ... * q_L a product of
distinct primes q_i = 1 (mod 2n), each below 2^26 so that one residue fits a
32-bit lane and a product of two residues can be reduced exactly with a
float32 quotient estimate and wrapping uint32 arithmetic (see `ntt.py`).

Security: only (n, log2 q) pairs at or below the 128-bit classical bound of
the Homomorphic Encryption Security Standard are accepted, for a uniform
ternary secret and an error of standard deviation sigma = 8 / sqrt(2 pi) ~ 3.19:

  n       1024  2048  4096  8192  16384  32768
  log2 q  27    54    109   218   438    881

As in Microsoft SEAL, errors are rounded normal samples clipped at 6 sigma,
so every error coefficient is bounded by `error_bound` = floor(6 sigma) = 19
and the noise bounds below are worst-case, not probabilistic.

Noise (BFV, Fan & Vercauteren 2012; with an n-of-n shared key). With M key
holders the secret is s = sum_j s_j (||s||_inf <= M) and the public key
b = -a s + e with e = sum_j e_j (||e||_inf <= M B). A fresh ciphertext of m,
c = (b u + e1 + Delta m, a u + e2), decrypts as c0 + c1 s = Delta m + v with

  v = e1 + e2 s + e u,   ||v||_inf <= B + n B M + n M B = B (1 + 2 n M)

(u ternary). A sum of K ciphertexts carries at most K times that, and each
of the M partial decryptions adds smudging noise of magnitude at most B_sm.
With Delta = floor(q / t) = (q - r) / t and K summed messages m_k in
(-t/2, t/2], t (Delta sum_k m_k + V) / q = sum_k m_k + (t V - r sum_k m_k) / q,
so rounding it and reducing mod t returns sum_k m_k mod t when
t |V| / q + K t^2 / (2q) < 1/2. The decryption computes the fraction in
float32 with an error below 2^-16 (ntt.py), so `check_noise_budget` enforces
2 t V_max + K t^2 < q (1 - 2^-15). Sums that leave (-t/2, t/2] wrap around
mod t, exactly like a modular secure sum.

References:
  Albrecht, Chase, Chen, Ding, Goldwasser, Gorbunov, Halevi, Hoffstein, Laine,
  Lauter, Lokam, Micciancio, Moody, Morrison, Sahai, Vaikuntanathan. 2018.
  Homomorphic Encryption Security Standard. HomomorphicEncryption.org,
  Section 5.4 (uniform ternary secret, classical 128-bit column).
  Fan & Vercauteren. 2012. Somewhat Practical Fully Homomorphic Encryption.
  IACR ePrint 2012/144.
  Microsoft SEAL (clipped normal error, max deviation 6 sigma).
"""

from __future__ import annotations

import dataclasses
import math

# n -> largest log2(q) at 128-bit classical security, uniform ternary secret
# (HomomorphicEncryption.org standard, Albrecht et al. 2018).
MAX_LOG_Q_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
STANDARD_SIGMA = 8.0 / math.sqrt(2.0 * math.pi)  # ~3.19, the standard's error width.
PRIME_BITS = 26  # q_i < 2^26: see ntt.mul_mod for why.
MAX_PLAIN_BITS = 25  # t < 2^25 < every q_i, which the RNS decryption relies on.


def _is_prime(p: int) -> bool:
  """Deterministic Miller-Rabin for p < 3.3e24 (the first 13 primes as bases)."""
  if p < 2:
    return False
  bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
  for b in bases:
    if p % b == 0:
      return p == b
  d, r = p - 1, 0
  while d % 2 == 0:
    d, r = d // 2, r + 1
  for b in bases:
    x = pow(b, d, p)
    if x in (1, p - 1):
      continue
    for _ in range(r - 1):
      x = x * x % p
      if x == p - 1:
        break
    else:
      return False
  return True


def ntt_primes(n: int, count: int, bits: int = PRIME_BITS) -> tuple[int, ...]:
  """The `count` largest primes p < 2^bits with p = 1 (mod 2n), largest first."""
  primes = []
  p = (2**bits - 1) // (2 * n) * (2 * n) + 1
  while len(primes) < count:
    if p < 2 * n:
      raise ValueError(f"only {len(primes)} primes p = 1 mod {2 * n} below 2^{bits}")
    if _is_prime(p):
      primes.append(p)
    p -= 2 * n
  return tuple(primes)


@dataclasses.dataclass(frozen=True)
class RlweParams:
  """A BFV parameter set; the constructor refuses anything below 128-bit security.

  Attributes:
    n: ring degree, a power of two from the standard's table.
    primes: the RNS primes q_i (each < 2^26, = 1 mod 2n); q is their product.
    t: plaintext modulus, 2 <= t < 2^25; messages are centred in (-t/2, t/2].
    sigma: standard deviation of the error distribution (>= the standard's 3.19).
  """
  n: int
  primes: tuple[int, ...]
  t: int
  sigma: float = STANDARD_SIGMA

  def __post_init__(self):
    if self.n not in MAX_LOG_Q_128:
      raise ValueError(f"n = {self.n} is not in the HE standard's table {sorted(MAX_LOG_Q_128)}")
    if not self.primes:
      raise ValueError("primes must hold at least one modulus")
    for p in self.primes:
      if not (isinstance(p, int) and _is_prime(p) and p % (2 * self.n) == 1
              and p < 2**PRIME_BITS):
        raise ValueError(f"modulus {p} in primes is not a prime = 1 mod 2n = {2 * self.n} "
                         f"below 2^{PRIME_BITS}")
    if len(set(self.primes)) != len(self.primes):
      raise ValueError(f"primes must be distinct, got {self.primes}")
    if self.log_q > MAX_LOG_Q_128[self.n]:
      raise ValueError(
          f"log2(q) = {self.log_q:.1f} exceeds {MAX_LOG_Q_128[self.n]} for n = {self.n}: below "
          "128-bit security (HomomorphicEncryption.org standard, ternary secret)")
    if self.sigma < STANDARD_SIGMA - 1e-9:
      raise ValueError(f"sigma = {self.sigma} is below the standard's {STANDARD_SIGMA:.3f}")
    if not (isinstance(self.t, int) and 2 <= self.t < 2**MAX_PLAIN_BITS):
      raise ValueError(f"plaintext modulus t = {self.t} must be an int in [2, 2^{MAX_PLAIN_BITS})")

  @property
  def q(self) -> int:
    return math.prod(self.primes)

  @property
  def log_q(self) -> float:
    return math.log2(self.q)

  @property
  def error_bound(self) -> int:
    """Largest |coefficient| of a sampled error: the 6 sigma clip."""
    return int(6 * self.sigma)

  @property
  def delta(self) -> int:
    """Delta = floor(q / t), the factor that lifts a message into the top bits."""
    return self.q // self.t


def standard_params(n: int = 4096, t: int = 2**24) -> RlweParams:
  """The most RNS primes below 2^26 that the 128-bit bound allows for this n.

  Args:
    n: ring degree (1024 ... 32768).
    t: plaintext modulus (see `RlweParams`); the default leaves room for the
      sum of many quantised clients.

  Returns:
    RlweParams with floor(max log2 q / 26) primes, e.g. 4 primes (~104 bits)
    for n = 4096 and 2 (~52 bits) for n = 2048.
  """
  if n not in MAX_LOG_Q_128:
    raise ValueError(f"n = {n} is not in the HE standard's table {sorted(MAX_LOG_Q_128)}")
  return RlweParams(n, ntt_primes(n, MAX_LOG_Q_128[n] // PRIME_BITS), t)


def fresh_noise_bound(params: RlweParams, num_key_holders: int) -> int:
  """Worst-case ||c0 + c1 s - Delta m||_inf of one fresh public-key ciphertext."""
  return params.error_bound * (1 + 2 * params.n * num_key_holders)


def smudging_bound(params: RlweParams, num_clients: int, num_key_holders: int,
                   statistical_bits: int) -> int:
  """B_sm: each key holder adds uniform noise on [-B_sm, B_sm) to its partial decryption.

  B_sm = 2^statistical_bits * 2^ceil(log2(K * fresh bound)), so a noise term
  of magnitude V <= K * fresh bound is hidden from whoever sees a partial
  decryption up to statistical distance V / B_sm <= 2^-statistical_bits per
  coefficient (Asharov et al. 2012, smudging). 0 when statistical_bits is 0:
  no smudging, which leaks the key shares' noise and only suits tests.
  """
  if statistical_bits == 0:
    return 0
  summed = num_clients * fresh_noise_bound(params, num_key_holders)
  return 2**((summed - 1).bit_length() + statistical_bits)


def decryption_noise_bound(params: RlweParams, num_clients: int, num_key_holders: int,
                           statistical_bits: int) -> int:
  """Worst-case noise of the decrypted sum of `num_clients` ciphertexts, smudging included."""
  return (num_clients * fresh_noise_bound(params, num_key_holders)
          + num_key_holders * smudging_bound(params, num_clients, num_key_holders,
                                             statistical_bits))


def check_noise_budget(params: RlweParams, num_clients: int, num_key_holders: int = 1,
                       statistical_bits: int = 0) -> None:
  """Raises ValueError unless the sum of `num_clients` ciphertexts always decrypts exactly.

  Args:
    params: the parameter set.
    num_clients: K, the most ciphertexts that are ever summed.
    num_key_holders: M, the parties holding additive shares of the secret key.
    statistical_bits: smudging margin of the threshold decryption (see
      `smudging_bound`; 0: no smudging).
  """
  for name, value in (("num_clients", num_clients), ("num_key_holders", num_key_holders)):
    if not (isinstance(value, int) and value >= 1):
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  if not (isinstance(statistical_bits, int) and statistical_bits >= 0):
    raise ValueError(f"statistical_bits must be an int >= 0, got {statistical_bits!r}")
  bound = decryption_noise_bound(params, num_clients, num_key_holders, statistical_bits)
  t = params.t
  if (2 * t * bound + num_clients * t * t) * 2**15 >= params.q * (2**15 - 1):
    room = params.q / (2 * t) - num_clients * t / 2
    raise ValueError(
        f"noise overflow: K = {num_clients} ciphertexts with M = {num_key_holders} key holders "
        f"and {statistical_bits} smudging bits have noise up to 2^{math.log2(bound):.1f}, but "
        f"n = {params.n}, log2 q = {params.log_q:.1f}, t = {params.t} decrypt correctly only "
        f"below about q / (2t) - K t / 2 = 2^{math.log2(max(room, 1)):.1f}: "
        "lower K, M, t or statistical_bits, or use a larger n")


def ciphertext_bytes(params: RlweParams, num_coordinates: int) -> int:
  """Bytes of the ciphertexts of one packed update of `num_coordinates` integers.

  Each of ceil(d / n) ciphertexts is two polynomials of n coefficients in L
  residues, every residue sent in a 32-bit word as it is stored here.
  """
  num_ciphertexts = -(-num_coordinates // params.n)
  return num_ciphertexts * 2 * len(params.primes) * params.n * 4
