"""Pairwise-masked secure aggregation (SecAgg and SecAgg+), simulated and vectorised.

Protocol (Bonawitz et al. 2017), over Z_{2^b} for a cohort of K slots:

  * client i holds a self-mask seed b_i and a key-agreement secret sk_i, and
    advertises pk_i = g^sk_i; it Shamir-shares b_i and sk_i t-of-h among its
    share holders (itself and its neighbours in the masking graph);
  * for each neighbour j it agrees on s_ij = pk_j^sk_i = g^(sk_i sk_j) and
    sends y_i = x_i + PRG(b_i) + sum_j sign(i, j) PRG(s_ij)  (mod 2^b), with
    sign(i, j) = +1 if i < j else -1, so pair masks cancel in the sum;
  * the server sums the y_i it received (the survivors S), then, from t
    shares held by survivors, reconstructs b_i for i in S and sk_j for the
    clients j that dropped after masking, subtracts the survivors' self masks
    and adds back, for each dropped j, sum_{i in N(j) & S} sign(j, i) PRG(s_ji):
    the pair masks that no longer have a partner in the sum.

SecAgg masks over the complete graph (K - 1 neighbours, O(K d) work per
client); SecAgg+ (Bell et al. 2020) over a random Harary graph of even degree
k = O(log K): the clients sit on a ring in a random order drawn from the round
key and each is joined to its k/2 nearest ring neighbours on each side.

What is simulated, and how (docs/secure_aggregation.md has the full list):
  * key agreement: Diffie-Hellman in the multiplicative group of GF(65521)
    with generator 17. It is insecure (16-bit), but it keeps the data flow of
    the protocol: the server must reconstruct a dropped client's sk from
    Shamir shares to recompute that client's pair seeds.
  * the clients' secrets are drawn from the round key (so every simulated
    client can compute its neighbours' public keys inside a vmap);
  * seeds: per-purpose 64-bit seeds come from the round key through JAX's
    threefry; pair and self-mask seeds are derived from them with an integer
    hash (`derive`) standing in for a KDF;
  * the PRG: `prg="hash"` expands a seed with a keyed counter-mode integer
    hash, ~8x faster than `prg="threefry"` (`jax.random.bits`) on CPU.
    Neither is a vetted cryptographic PRG; both give masks that test as
    uniform.
  * only the shares the server uses are computed (shares at other holders
    are evaluations of the same polynomials and change nothing).
  * each pair's mask stream is expanded once (`add_pair_masks`, edge by edge),
    where the two clients of a pair each expand it; the survivors' sum is the
    same integers as the sum of the per-client messages (`mask_client`).

A round fails when some client whose secret must be recovered has fewer
than t surviving share holders: `unmask` returns ok = False, and
`fedjax_priv.secure.aggregators.secure_sum` turns that into an error.

Neighbouring relations: masking is exact (the server learns the sum of the
survivors' quantised inputs and nothing it could not compute from it, in the
honest-but-curious model), so it adds no privacy beyond what the sum itself
reveals; the DP guarantee, if any, comes from noise added before masking.

References:
  Bonawitz, Ivanov, Kreuter, Marcedone, McMahan, Patel, Ramage, Segal &
  Seth 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
  Learning" (CCS).
  Bell, Bonawitz, Gascón, Lepoint & Raykova 2020, "Secure Single-Server
  Aggregation with (Poly)Logarithmic Overhead" (CCS): SecAgg+.
  Harary 1962, "The maximum connectivity of a graph" (PNAS).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_priv.secure import shamir
from fedjax_priv.secure.quantization import modular_sum, modulus_mask

GENERATOR = 17  # A primitive root modulo shamir.PRIME = 65521.
PRGS = ("hash", "threefry")

# Domain-separation tags folded into the round key.
_SECRETS, _SELF_MASK, _PAIR_MASK, _SHARES = 1, 2, 3, 4

# Cost-model constants (bytes), for 128-bit security as in Bonawitz et al. 2017, Sec. 7:
KEY_BYTES = 32      # an X25519 public key
SHARE_BYTES = 32    # a share of a 256-bit secret
ID_BYTES = 4        # a client identifier
AEAD_BYTES = 28     # AES-GCM nonce (12) + tag (16) around each encrypted share pair


class Graph(NamedTuple):
  """The masking graph of a cohort, as a static-width neighbour table.

  Attributes:
    neighbours: int32[K, k] slot ids.
    valid: bool[K, k]; False for entries that are not edges (padded slots,
      duplicates when the cohort has k or fewer real clients).
  """
  neighbours: jax.Array
  valid: jax.Array


def complete_graph(cohort_mask: jax.Array) -> Graph:
  """SecAgg's graph: every real client is joined to every other real client."""
  k = cohort_mask.shape[0]
  slots = jnp.arange(k)
  neighbours = (slots[:, None] + 1 + jnp.arange(k - 1)[None, :]) % k
  real = cohort_mask > 0
  return Graph(neighbours.astype(jnp.int32), real[:, None] & real[neighbours])


def harary_graph(cohort_mask: jax.Array, degree: int, key: jax.Array) -> Graph:
  """SecAgg+'s graph: a Harary graph H(degree, m) on the m real clients, randomly labelled.

  Args:
    cohort_mask: [K] float, 1.0 for real clients.
    degree: even k >= 2; each client gets k neighbours (fewer when m <= k,
      where the graph is complete).
    key: PRNG key of the random ring order (shared by the cohort).

  Returns:
    Graph with neighbours int32[K, k].
  """
  if not (isinstance(degree, int) and degree >= 2 and degree % 2 == 0):
    raise ValueError(f"neighbours (the SecAgg+ degree) must be an even int >= 2, got {degree!r}")
  real = cohort_mask > 0
  # Real clients first, in random order: order[p] is the slot at ring position p.
  order = jnp.argsort(jnp.where(real, jax.random.uniform(key, real.shape), 2.0))
  position = jnp.argsort(order)
  m = jnp.maximum(jnp.sum(real), 1)
  steps = jnp.arange(1, degree // 2 + 1)
  offsets = jnp.concatenate([steps, -steps])
  neighbours = order[(position[:, None] + offsets[None, :]) % m]
  # On a ring of m, offsets +s and -s are distinct neighbours up to s <= (m - 1) / 2;
  # for even m, s = m / 2 reaches the opposite client once, taken on the + side.
  half = (m - 1) // 2
  plus_ok = (steps <= half) | ((m % 2 == 0) & (steps == m // 2))
  ok = jnp.concatenate([plus_ok, steps <= half])
  valid = ok[None, :] & real[:, None] & real[neighbours]
  return Graph(neighbours.astype(jnp.int32), valid)


def default_degree(num_clients: int) -> int:
  """SecAgg+ degree 2 ceil(log2 K): even and O(log K), as Bell et al. 2020 require."""
  return max(2, 2 * math.ceil(math.log2(max(num_clients, 2))))


def masking_graph(cohort_mask: jax.Array, round_key: jax.Array, degree: int | None) -> Graph:
  """Complete graph for degree None (SecAgg), else a random Harary graph (SecAgg+)."""
  if degree is None:
    return complete_graph(cohort_mask)
  return harary_graph(cohort_mask, degree, jax.random.fold_in(round_key, _PAIR_MASK))


class Secrets(NamedTuple):
  """Every client's secrets and public key (uint32[K], elements of GF(65521))."""
  self_seed: jax.Array
  secret_key: jax.Array
  public_key: jax.Array


def client_secrets(round_key: jax.Array, num_slots: int) -> Secrets:
  """Draws b_i in [0, p) and sk_i in [1, p - 1) per slot; pk_i = g^sk_i mod p."""
  b_key, sk_key = jax.random.split(jax.random.fold_in(round_key, _SECRETS))
  self_seed = jax.random.randint(b_key, (num_slots,), 0, shamir.PRIME).astype(jnp.uint32)
  secret_key = jax.random.randint(sk_key, (num_slots,), 1, shamir.PRIME - 1).astype(jnp.uint32)
  public_key = shamir.powmod(jnp.full((num_slots,), GENERATOR, jnp.uint32), secret_key)
  return Secrets(self_seed, secret_key, public_key)


def agree(secret_key: jax.Array, public_key: jax.Array) -> jax.Array:
  """Toy Diffie-Hellman: pk_j^sk_i mod p, symmetric in i and j."""
  return shamir.powmod(public_key, secret_key)


def _lowbias32(x: jax.Array) -> jax.Array:
  # An invertible 32-bit mixer with low avalanche bias (C. Wellons, "hash prospector").
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def round_seed(round_key: jax.Array, tag: int) -> jax.Array:
  """A uint32[2] seed for one purpose (tag) of the round, from JAX's threefry."""
  return jax.random.bits(jax.random.fold_in(round_key, tag), (2,), jnp.uint32)


def derive(seed: jax.Array, *words: jax.Array) -> jax.Array:
  """Mixes 32-bit words into a uint32[2] seed (a stand-in for the protocol's KDF).

  Integer hashing instead of a chain of `jax.random.fold_in` calls: each
  threefry call inside the per-neighbour scan multiplied the compile time.
  """
  s0, s1 = seed[0], seed[1]
  for word in words:
    word = jnp.asarray(word).astype(jnp.uint32)
    s0 = _lowbias32(s0 ^ (word * jnp.uint32(0x9E3779B9) + s1))
    s1 = _lowbias32(s1 + (s0 ^ word))
  return jnp.stack([s0, s1])


def prg(seed: jax.Array, dim: int, bits: int, kind: str = "hash") -> jax.Array:
  """A mask stream: uint32[dim] uniform on [0, 2^bits), determined by a uint32[2] seed.

  "threefry" is `jax.random.bits` keyed by the seed; "hash" hashes a counter
  with the seed (two rounds of a keyed 32-bit mixer), ~8x faster on CPU.
  """
  mask = modulus_mask(bits)
  if kind == "threefry":
    key = jax.random.wrap_key_data(seed, impl="threefry2x32")
    return jax.random.bits(key, (dim,), jnp.uint32) & mask
  if kind != "hash":
    raise ValueError(f"prg must be one of {PRGS}, got {kind!r}")
  x = jnp.arange(dim, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9) + seed[0]
  x = _lowbias32(x ^ seed[1])
  return _lowbias32((x + seed[1]) * jnp.uint32(0x9E3779B1)) & mask


def self_mask_seed(round_key: jax.Array, slot: jax.Array, self_seed: jax.Array) -> jax.Array:
  return derive(round_seed(round_key, _SELF_MASK), slot, self_seed)


def pair_mask_seed(round_key: jax.Array, slot_i: jax.Array, slot_j: jax.Array,
                   agreed: jax.Array) -> jax.Array:
  """The seed of pair {i, j}'s mask: symmetric in i, j and dependent on the agreed secret."""
  return derive(round_seed(round_key, _PAIR_MASK), jnp.minimum(slot_i, slot_j),
                jnp.maximum(slot_i, slot_j), agreed)


def add_signed(acc: jax.Array, mask: jax.Array, sign: jax.Array, bits: int) -> jax.Array:
  """(acc + sign * mask) mod 2^bits for sign in {-1, 0, +1}; uint32 negation wraps."""
  term = jnp.where(sign > 0, mask, jnp.where(sign < 0, jnp.uint32(0) - mask, jnp.uint32(0)))
  return (acc + term) & modulus_mask(bits)


def mask_input(x: jax.Array, self_mask: jax.Array, pair_masks: jax.Array, signs: jax.Array,
               bits: int) -> jax.Array:
  """y = x + self_mask + sum_j signs[j] pair_masks[j]  (mod 2^bits), from given mask streams.

  Args:
    x: uint32[d], the wrapped quantised input.
    self_mask: uint32[d].
    pair_masks: uint32[k, d], one stream per neighbour.
    signs: int32[k] in {-1, 0, +1} (+1 when this client's id is the smaller).
    bits: modulus exponent.
  """
  acc = (x + self_mask) & modulus_mask(bits)
  acc, _ = jax.lax.scan(lambda acc, ms: (add_signed(acc, ms[0], ms[1], bits), None), acc,
                        (pair_masks, signs))
  return acc


def pair_mask_sum(slot: jax.Array, secret_key: jax.Array, graph: Graph, public_key: jax.Array,
                  round_key: jax.Array, dim: int, bits: int, kind: str = "hash",
                  alive: jax.Array | None = None) -> jax.Array:
  """sum_{j in N(slot)} sign(slot, j) PRG(s_slot,j) mod 2^bits, one neighbour at a time.

  Args:
    slot: int32 scalar, the client.
    secret_key: its sk (the client's own, or the server's reconstruction).
    graph, public_key, round_key: the cohort's graph, pks and shared key.
    dim, bits, kind: the stream length, modulus exponent and PRG.
    alive: optional bool[K]; only neighbours with alive[j] count (the
      server's correction for a dropped client).

  Returns:
    uint32[dim]. A scan over the k neighbours keeps memory at one stream.
  """
  def body(acc, m):
    j = graph.neighbours[slot, m]
    use = graph.valid[slot, m] if alive is None else graph.valid[slot, m] & alive[j]
    sign = jnp.where(use, jnp.where(slot < j, 1, -1), 0)
    seed = pair_mask_seed(round_key, slot, j, agree(secret_key, public_key[j]))
    return add_signed(acc, prg(seed, dim, bits, kind), sign, bits), None

  acc, _ = jax.lax.scan(body, jnp.zeros(dim, jnp.uint32), jnp.arange(graph.neighbours.shape[1]))
  return acc


def self_mask_client(x: jax.Array, slot: jax.Array, secrets: Secrets, round_key: jax.Array,
                     bits: int, kind: str = "hash") -> jax.Array:
  """x + PRG(b_slot) mod 2^bits: client `slot`'s input under its self mask only; vmappable."""
  self_mask = prg(self_mask_seed(round_key, slot, secrets.self_seed[slot]), x.shape[-1], bits,
                  kind)
  return (x + self_mask) & modulus_mask(bits)


def mask_client(x: jax.Array, slot: jax.Array, graph: Graph, secrets: Secrets,
                round_key: jax.Array, bits: int, kind: str = "hash") -> jax.Array:
  """Client `slot`'s masked input y = x + PRG(b) + sum_j sign PRG(s_j) mod 2^bits; vmappable.

  This is one client's message as the protocol defines it; it expands one
  stream per neighbour, so a cohort built from it expands every pair's mask
  twice. `add_pair_masks` produces the survivors' sum with each pair once.
  """
  pairs = pair_mask_sum(slot, secrets.secret_key[slot], graph, secrets.public_key, round_key,
                        x.shape[-1], bits, kind)
  return (self_mask_client(x, slot, secrets, round_key, bits, kind) + pairs) & modulus_mask(bits)


def sum_rows(active: jax.Array, row_fn: Callable[[jax.Array], jax.Array], dim: int, bits: int,
             chunk: int = 16) -> jax.Array:
  """sum_{i : active[i]} row_fn(i) mod 2^bits, in vmapped chunks of the active rows only.

  A while loop over ceil(#active / chunk) chunks, so the work follows the
  number of active rows (e.g. the few dropped clients, or the real edges of
  a padded graph), not the length of `active`.
  """
  num_slots = active.shape[0]
  chunk = min(chunk, num_slots)
  ids = jnp.nonzero(active, size=num_slots, fill_value=0)[0]
  ids = jnp.pad(ids, (0, -num_slots % chunk))
  count = jnp.sum(active)

  def body(carry):
    start, acc = carry
    rows = jax.vmap(row_fn)(jax.lax.dynamic_slice(ids, (start,), (chunk,)))
    live = (start + jnp.arange(chunk) < count).astype(jnp.float32)
    return start + chunk, (acc + modular_sum(live, rows, bits)) & modulus_mask(bits)

  _, acc = jax.lax.while_loop(lambda carry: carry[0] < count, body,
                              (jnp.int32(0), jnp.zeros(dim, jnp.uint32)))
  return acc


def add_pair_masks(self_masked_sum: jax.Array, alive: jax.Array, graph: Graph, secrets: Secrets,
                   round_key: jax.Array, bits: int, kind: str = "hash", chunk: int = 16
                   ) -> jax.Array:
  """The survivors' sum of masked inputs, with each pair's mask stream expanded once.

  For an edge {i, j}, i < j, client i adds +PRG(s_ij) and client j adds
  -PRG(s_ij), so the sum over the survivors S of the `mask_client` messages is

      sum_{i in S} (x_i + PRG(b_i)) + sum_{edges i<j} (1[i in S] - 1[j in S]) PRG(s_ij)

  (mod 2^bits). This function computes the second term edge by edge: every
  pair of neighbours expands its stream once, vectorised in chunks of edges,
  where the per-client form expands it at both endpoints. Edges between two
  survivors (coefficient 0) are expanded too, as the protocol's clients do:
  the simulation pays for every mask the clients generate, once per pair.

  Args:
    self_masked_sum: uint32[d], sum over S of x_i + PRG(b_i) (`self_mask_client`).
    alive: bool[K], the survivors S.
    graph, secrets, round_key: the cohort's masking graph, secrets and key.
    bits, kind: modulus exponent and PRG.
    chunk: edges per vmapped chunk.

  Returns:
    uint32[d], equal to the modular sum over S of `mask_client`'s messages.
  """
  num_slots, width = graph.neighbours.shape
  first = jnp.repeat(jnp.arange(num_slots, dtype=jnp.int32), width)
  second = graph.neighbours.reshape(-1)
  # Each edge sits in both endpoints' rows; the row of its smaller endpoint owns it.
  owned = graph.valid.reshape(-1) & (first < second)
  coefficient = alive.astype(jnp.int32)

  def edge_stream(e):
    i, j = first[e], second[e]
    seed = pair_mask_seed(round_key, i, j, agree(secrets.secret_key[i], secrets.public_key[j]))
    # A uint32 product wraps mod 2^32, so the cast of -1 negates the stream.
    sign = (coefficient[i] - coefficient[j]).astype(jnp.uint32)
    return prg(seed, self_masked_sum.shape[-1], bits, kind) * sign

  pairs = sum_rows(owned, edge_stream, self_masked_sum.shape[-1], bits, chunk)
  return (self_masked_sum + pairs) & modulus_mask(bits)


def default_threshold(graph: Graph) -> int:
  """t = floor(h / 2) + 1 of the h share holders per client (itself and its neighbours)."""
  return (graph.neighbours.shape[1] + 1) // 2 + 1


def round_threshold(cohort_mask: jax.Array, graph: Graph | None = None) -> jax.Array:
  """The default t of a round: the smallest majority of each client's share holders in it.

  A client's holders are itself and its real neighbours. SecAgg (`graph`
  None, the complete graph): all R real clients, so one int32 scalar,
  floor(R / 2) + 1. SecAgg+ (its `graph`): h = 1 + the client's real
  neighbours, min(k + 1, R); int32 [K], floor(h / 2) + 1 (1 for padded
  slots, which hold nothing).
  """
  if graph is None:
    return jnp.sum(jnp.asarray(cohort_mask) > 0).astype(jnp.int32) // 2 + 1
  return (1 + jnp.sum(graph.valid, axis=1).astype(jnp.int32)) // 2 + 1


def _recover(needed: jax.Array, graph: Graph, alive: jax.Array, threshold: int,
             key: jax.Array, complete: bool, active: jax.Array | None = None
             ) -> tuple[jax.Array, jax.Array]:
  """Shares every client's needed secret and reconstructs it from t surviving holders.

  `active`: a traced t' <= threshold used instead of it (a scalar for the
  complete graph, one per client [K] for SecAgg+).
  Returns (reconstructed uint32[K], enough bool[K]: at least t holders survived).
  """
  num_slots = alive.shape[0]
  used = threshold if active is None else active
  if complete:
    # All clients hold shares of every secret: the first t survivors serve
    # every owner, so the Lagrange weights are computed once.
    holders = jnp.argsort(~alive, stable=True)[:threshold]
    xs = (holders + 1).astype(jnp.uint32)
    enough = jnp.broadcast_to(jnp.sum(alive) >= used, (num_slots,))
  else:
    slots = jnp.arange(num_slots)
    holders = jnp.concatenate([slots[:, None], graph.neighbours], axis=1)
    ok = alive[holders] & jnp.concatenate([jnp.ones((num_slots, 1), bool), graph.valid], 1)
    pick = jnp.argsort(~ok, axis=1, stable=True)[:, :threshold]
    xs = (jnp.take_along_axis(holders, pick, 1) + 1).astype(jnp.uint32)
    enough = jnp.sum(ok, axis=1) >= used
  shares = shamir.share(key, needed, xs, threshold, active)
  return shamir.reconstruct(xs, shares, active), enough


def unmask(total: jax.Array, graph: Graph, secrets: Secrets, round_key: jax.Array,
           cohort_mask: jax.Array, included: jax.Array, bits: int, threshold: int | None,
           complete: bool, kind: str = "hash", chunk: int = 16
           ) -> tuple[jax.Array, jax.Array, dict]:
  """The survivors' plain sum from the sum of their masked inputs.

  Args:
    total: uint32[d], sum mod 2^bits of the masked inputs of the survivors.
    graph, secrets, round_key: as used for masking.
    cohort_mask: [K], 1.0 for real clients.
    included: [K], 1.0 for the clients whose masked input is in `total`.
    bits: modulus exponent.
    threshold: t, shares needed per secret; None: a majority of each
      client's share holders in this round, as the server would set it once
      the round's R clients have advertised their keys: floor(R / 2) + 1 for
      the complete graph; for SecAgg+, floor(h / 2) + 1 of the client and its
      h - 1 real neighbours (k + 1 holders unless R <= k).
    complete: True for the complete graph (SecAgg), False for SecAgg+.
    kind: the PRG used for masking.
    chunk: clients per vmapped chunk when regenerating masks.

  Returns:
    (sum uint32[d], ok bool scalar, stats). ok is False when some client's
    secret had fewer than t surviving holders; the sum is then meaningless.
    stats: survivors, dropouts, threshold (float32).
  """
  num_slots, dim = cohort_mask.shape[0], total.shape[-1]
  holders = num_slots if complete else graph.neighbours.shape[1] + 1
  real = cohort_mask > 0
  active = None
  if threshold is None:
    # The static bound (a majority of every slot a client could have as a
    # holder) sizes the shares; the round's own majority, at most that, is
    # the degree actually used.
    threshold = default_threshold(graph)
    active = round_threshold(cohort_mask, None if complete else graph)
  if not (isinstance(threshold, int) and 1 <= threshold <= holders):
    raise ValueError(f"threshold must be an int in [1, {holders}] (share holders per client), "
                     f"got {threshold!r}")
  alive = real & (included > 0)
  dropped = real & ~alive
  # The server asks for b_i of survivors and sk_j of dropped clients, never both.
  needed = jnp.where(alive, secrets.self_seed, secrets.secret_key)
  recovered, enough = _recover(needed, graph, alive, threshold,
                               jax.random.fold_in(round_key, _SHARES), complete, active)
  ok = jnp.all(enough | ~real)
  self_masks = sum_rows(alive, lambda i: prg(
      self_mask_seed(round_key, i, recovered[i]), dim, bits, kind), dim, bits, chunk)
  orphans = sum_rows(dropped, lambda j: pair_mask_sum(
      j, recovered[j], graph, secrets.public_key, round_key, dim, bits, kind, alive),
      dim, bits, chunk)
  plain = (total - self_masks + orphans) & modulus_mask(bits)
  stats = {"secagg_survivors": jnp.sum(alive).astype(jnp.float32),
           "secagg_dropouts": jnp.sum(dropped).astype(jnp.float32),
           "secagg_threshold": (jnp.float32(threshold) if active is None else
                                jnp.max(jnp.where(real, active, 0)).astype(jnp.float32))}
  return plain, ok, stats


def communication_cost(dim: int, bits: int, num_neighbours: jax.Array | float,
                       plain_dim: int | None = None) -> dict:
  """Bytes one client sends in one round (Bonawitz et al. 2017, Sec. 7 round structure).

  Round 0 advertises two public keys; round 1 sends each neighbour an
  encrypted pair of shares (of b and sk, with both ids); round 2 sends the
  masked vector, dim * bits / 8 bytes; round 4 sends one share per
  neighbour. The (active-security) consistency round 3 is not counted.

  Args:
    dim: length of the masked vector (d_pad when rotating).
    bits: bits per coordinate.
    num_neighbours: neighbours per client (K - 1 for SecAgg, k for SecAgg+);
      may be a traced scalar.
    plain_dim: coordinates of the unquantised float32 update (default dim).

  Returns:
    float32 scalars: bytes_sent per client, and expansion = bytes_sent / the
    4 * plain_dim bytes of sending the float32 update in the clear.
  """
  k = jnp.asarray(num_neighbours, jnp.float32)
  per_neighbour = (2 * SHARE_BYTES + 2 * ID_BYTES + AEAD_BYTES) + SHARE_BYTES
  sent = 2 * KEY_BYTES + k * per_neighbour + math.ceil(dim * bits / 8)
  plain = 4.0 * (dim if plain_dim is None else plain_dim)
  return {"secagg_bytes_per_client": sent, "secagg_expansion": sent / plain}
