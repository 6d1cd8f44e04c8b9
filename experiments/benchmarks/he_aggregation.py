"""Encrypt-and-sum throughput of `fedjax_priv.secure.he` (BFV, coefficient packing).

Times, per client update of --dim parameters: encryption (vmapped over a chunk of clients,
keys included), ciphertext addition mod q over --clients clients, and one threshold decryption.
Peers (TenSEAL BFV, phe Paillier) are run in a subprocess of a separate virtual environment
under experiments/benchmarks/.venv-he (created on first use); phe is timed on a subset of
coordinates and extrapolated per client update (labelled). --no-peers skips them (GPU machines).

Usage:
  python experiments/benchmarks/he_aggregation.py [--clients 1000] [--dim 100000] [--n 4096]
      [--chunk 8] [--no-peers] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_priv.secure.he import params as he_params
from fedjax_priv.secure.he import rlwe
from fedjax_priv.secure.he.ntt import RnsRing

PEER_SCRIPT = r"""
import json, sys, time
import numpy as np
dim, clients = int(sys.argv[1]), int(sys.argv[2])
out = {}
rng = np.random.default_rng(0)
x = rng.integers(-100, 100, dim).tolist()
try:
  import tenseal as ts
  ctx = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=4096, plain_modulus=1032193)
  t0 = time.perf_counter(); acc = None
  for _ in range(clients):
    c = ts.bfv_vector(ctx, x)
    acc = c if acc is None else acc + c
  out["tenseal_s_per_client"] = (time.perf_counter() - t0) / clients
except Exception as e:
  out["tenseal_error"] = repr(e)
try:
  from phe import paillier
  pk, sk = paillier.generate_paillier_keypair(n_length=2048)
  sub = 50
  t0 = time.perf_counter()
  enc = [pk.encrypt(v) for v in x[:sub]]
  enc2 = [a + a for a in enc]
  out["phe_s_per_client_extrapolated"] = (time.perf_counter() - t0) / sub * dim
except Exception as e:
  out["phe_error"] = repr(e)
print(json.dumps(out))
"""


def peers(dim: int, clients: int) -> dict:
  venv = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv-he")
  python = os.path.join(venv, "bin", "python")
  if not os.path.exists(python):
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "tenseal", "phe", "numpy"], check=False)
  res = subprocess.run([python, "-c", PEER_SCRIPT, str(dim), str(clients)], capture_output=True,
                       text=True)
  try:
    return json.loads(res.stdout.strip().splitlines()[-1])
  except (IndexError, json.JSONDecodeError):
    return {"peer_error": res.stderr[-500:]}


def timed(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--clients", type=int, default=1000)
  ap.add_argument("--dim", type=int, default=100_000)
  ap.add_argument("--n", type=int, default=4096)
  ap.add_argument("--chunk", type=int, default=8)
  ap.add_argument("--peer-clients", type=int, default=5)
  ap.add_argument("--no-peers", action="store_true")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()
  params = he_params.standard_params(args.n)
  ring = RnsRing(params)
  num_ct = -(-args.dim // params.n)
  pk, s_hat = jax.jit(lambda k: rlwe.keygen(ring, k, 3))(jax.random.key(0))
  messages = jnp.asarray(np.random.default_rng(0).integers(-100, 100, (args.chunk, num_ct,
                                                                        params.n)), jnp.int32)

  @jax.jit
  def encrypt_chunk(messages, key):
    keys = jax.random.split(key, messages.shape[0])
    return jax.vmap(lambda m, k: rlwe.encrypt(ring, pk, m, k))(messages, keys)

  @jax.jit
  def encrypt_and_sum(total, messages, key):
    cts = encrypt_chunk(messages, key)
    return rlwe.add(ring, total, rlwe.masked_sum(ring, jnp.ones(messages.shape[0]), cts))

  zero = rlwe.Ciphertext(*(jnp.zeros((num_ct, len(params.primes), params.n), jnp.uint32),) * 2)
  t_enc = timed(encrypt_chunk, messages, jax.random.key(1)) / args.chunk
  t_sum = timed(encrypt_and_sum, zero, messages, jax.random.key(1)) / args.chunk
  smudging = he_params.smudging_bound(params, args.clients, 3, 40)
  decrypt = jax.jit(lambda c, k: rlwe.decrypt(ring, c, s_hat, k, smudging))
  t_dec = timed(decrypt, zero, jax.random.key(2))
  total_clients = -(-args.clients // args.chunk) * args.chunk
  t0 = time.perf_counter()
  total = zero
  for i in range(total_clients // args.chunk):
    total = encrypt_and_sum(total, messages, jax.random.key(10 + i))
  jax.block_until_ready(total)
  t_all = time.perf_counter() - t0
  result = {"device": str(jax.devices()[0]), "n": params.n, "log2_q": params.log_q,
            "dim": args.dim, "clients": total_clients,
            "ciphertext_bytes_per_client": he_params.ciphertext_bytes(params, args.dim),
            "expansion_vs_f32": he_params.ciphertext_bytes(params, args.dim) / (4 * args.dim),
            "encrypt_s_per_client": t_enc, "encrypt_and_add_s_per_client": t_sum,
            "all_clients_s": t_all, "decrypt_s": t_dec}
  if not args.no_peers:
    result.update(peers(args.dim, args.peer_clients))
    ours = t_all / total_clients
    for name in ("tenseal_s_per_client", "phe_s_per_client_extrapolated"):
      if name in result:
        result[name.replace("_s_per_client", "_over_ours")] = result[name] / ours
  for k, v in result.items():
    print(f"{k:36s} {v}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
