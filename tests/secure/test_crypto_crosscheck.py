"""Cross-check of the masking arithmetic against real cryptography (the `cryptography` package).

Real X25519 key agreement per pair, HKDF-SHA256 to a 128-bit key, AES-128-CTR
keystreams as the pair and self masks: fed to secagg.mask_input, the masked
vectors equal an independent numpy computation, the masked sum over Z_2^32
equals the plain sum, and a client that drops after masking is recovered from
its Shamir-shared X25519 private key.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedjax_priv.secure import quantization as quant
from fedjax_priv.secure import secagg, shamir

DIM, BITS = 64, 32


def keystream(key: bytes, dim: int) -> np.ndarray:
  """AES-128-CTR keystream (encryption of zeros) as dim little-endian uint32 words."""
  encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
  return np.frombuffer(encryptor.update(b"\0" * (4 * dim)), "<u4").astype(np.uint32)


def kdf(secret: bytes, info: bytes) -> bytes:
  return HKDF(hashes.SHA256(), 16, salt=None, info=info).derive(secret)


def raw(private_key) -> bytes:
  return private_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption())


def pair_stream(private_key, peer_public, i, j):
  info = b"pair-%d-%d" % (min(i, j), max(i, j))
  return keystream(kdf(private_key.exchange(peer_public), info), DIM)


@pytest.mark.parametrize("num_clients", [3, 5])
def test_real_crypto_masks_cancel_and_match_mask_input(num_clients):
  rng = np.random.default_rng(num_clients)
  keys = [X25519PrivateKey.generate() for _ in range(num_clients)]
  publics = [k.public_key() for k in keys]
  self_seeds = [rng.bytes(16) for _ in range(num_clients)]
  x = rng.integers(-2**20, 2**20, (num_clients, DIM)).astype(np.int32)
  wrapped = np.asarray(quant.wrap(jnp.asarray(x), BITS))

  masked = []
  for i in range(num_clients):
    others = [j for j in range(num_clients) if j != i]
    streams = np.stack([pair_stream(keys[i], publics[j], i, j) for j in others])
    signs = np.asarray([1 if i < j else -1 for j in others], np.int32)
    self_mask = keystream(self_seeds[i], DIM)
    y = np.asarray(secagg.mask_input(jnp.asarray(wrapped[i]), jnp.asarray(self_mask),
                                     jnp.asarray(streams), jnp.asarray(signs), BITS))
    # Independent reference in Python integers modulo 2^32.
    ref = (wrapped[i].astype(object) + self_mask.astype(object)
           + sum(int(s) * st.astype(object) for s, st in zip(signs, streams))) % 2**32
    np.testing.assert_array_equal(y, ref.astype(np.uint32))
    assert np.mean(y == wrapped[i]) < 0.1
    masked.append(y)
  masked = np.stack(masked)

  # All survive: the pair masks cancel, leaving the plain sum plus the self masks.
  total = np.asarray(quant.modular_sum(jnp.ones(num_clients), jnp.asarray(masked), BITS))
  self_total = np.sum([keystream(s, DIM).astype(np.uint64) for s in self_seeds], 0) % 2**32
  plain = quant.unwrap(jnp.asarray(((total.astype(np.uint64) + 2**32 - self_total) % 2**32)
                                   .astype(np.uint32)), BITS)
  np.testing.assert_array_equal(plain, x.sum(0))

  # Client 0 drops after masking: the server reconstructs its X25519 private key
  # from t Shamir shares (one field element per key byte) held by survivors and
  # re-derives its pair masks with the survivors.
  dropped, survivors, t = 0, list(range(1, num_clients)), 2
  key_bytes = jnp.asarray(np.frombuffer(raw(keys[dropped]), np.uint8), jnp.uint32)
  holders = jnp.arange(1, num_clients + 1, dtype=jnp.uint32)
  shares = shamir.share(jax.random.key(0), key_bytes, holders, t)
  pick = np.asarray(survivors[:t])
  recovered = np.asarray(shamir.reconstruct(holders[pick], shares[:, pick])).astype(np.uint8)
  recovered_key = X25519PrivateKey.from_private_bytes(recovered.tobytes())
  orphans = np.asarray(secagg.mask_input(
      jnp.zeros(DIM, jnp.uint32), jnp.zeros(DIM, jnp.uint32),
      jnp.asarray(np.stack([pair_stream(recovered_key, publics[j], dropped, j)
                            for j in survivors])),
      jnp.asarray([1 if dropped < j else -1 for j in survivors], jnp.int32), BITS))
  total = np.asarray(quant.modular_sum(jnp.asarray([0.0] + [1.0] * len(survivors)),
                                       jnp.asarray(masked), BITS)).astype(np.uint64)
  self_total = np.sum([keystream(self_seeds[j], DIM).astype(np.uint64) for j in survivors],
                      0) % 2**32
  unmasked = (total + 2**32 - self_total + orphans.astype(np.uint64)) % 2**32
  np.testing.assert_array_equal(quant.unwrap(jnp.asarray(unmasked.astype(np.uint32)), BITS),
                                x[survivors].sum(0))
