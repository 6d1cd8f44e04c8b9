"""Populations served client by client: the interface, and one generated on request.

A population of millions of clients need not be held in memory: a round only
touches its cohort. ``ClientSource`` is what ``pack_cohort`` needs from a
population that is read (or made) one cohort at a time: the number of clients,
every client's size (one int64 per client, 8 MB at 10^6 clients: the only
O(N) array kept, because samplers, DP-SGD batching and the accountant need the
sizes up front), the feature layout, and the clients themselves.
``FederatedStore.source()`` (SQLite, one query per cohort) and
``GeneratedPopulation`` (no storage at all) provide it; an in-memory
``FederatedDataset`` is packed directly by ``pack_cohort``.

``GeneratedPopulation`` draws client ``i`` from a generator seeded by
``(seed, i)`` alone, so a client's data does not depend on the population
size or on which other clients were asked for, and 10^6 clients cost
nothing until they are sampled. Its clients follow FedProx's
Synthetic(alpha, beta) (see ``fedjax_priv.data.synthetic``), with client
sizes drawn from a truncated log-normal so that padding stays bounded.

This module is host-side and depends on numpy only.

References:
  Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in
  Heterogeneous Networks", MLSys 2020, Section 5.1 and Appendix C.1
  (Synthetic(alpha, beta)).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from fedjax_priv.data import synthetic
from fedjax_priv.checks import check_int, check_non_negative


@runtime_checkable
class ClientSource(Protocol):
  """A population that hands out clients on request (host side, numpy).

  Attributes:
    num_clients: Number of clients ``N``.
    client_sizes: Examples per client, int64 ``[N]``.
    feature_shape: Shape of one example's features.
    x_dtype: Dtype of the features ``client(i)`` returns.
  """

  @property
  def num_clients(self) -> int: ...

  @property
  def client_sizes(self) -> np.ndarray: ...

  @property
  def feature_shape(self) -> tuple[int, ...]: ...

  @property
  def x_dtype(self) -> np.dtype: ...

  def client(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x [n_i, *feature_shape], y [n_i])`` of client ``i``."""
    ...

  def clients(self, indices: Sequence[int] | np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``client(i)`` for every ``i`` of ``indices``, in order, fetched together."""
    ...


class GeneratedPopulation:
  """``num_clients`` FedProx Synthetic(alpha, beta) clients, each drawn when asked for.

  Client ``i`` holds ``n_i = min(max_examples, min_examples +
  floor(LogNormal(log(min_examples), 1)))`` examples (median about
  ``2 * min_examples``, a heavy tail cut at ``max_examples``), the ``i``-th
  draw of a generator seeded by ``(seed, 0)``. Its model and inputs come
  from a Philox generator keyed by ``(i, seed)``: ``u ~ N(0, alpha^2)``,
  ``W[j, c], b[c] ~ N(u, 1)``, ``v[j] ~ N(B, 1)`` with ``B ~ N(0, beta^2)``,
  ``x ~ N(v, diag(j^-1.2))`` and ``y = argmax(x W + b)``. Clients at
  positions ``>= num_clients`` of a larger population with the same seed are
  new users of the same distribution, which makes a held-out test set.
  With ``iid`` every client shares one ``W, b ~ N(0, 1)`` (drawn from
  ``(seed, 2)``) and ``v = 0``: FedProx's Synthetic-IID.

  Args:
    num_clients: ``N >= 1``.
    seed: Non-negative seed.
    alpha: Model heterogeneity between clients, >= 0.
    beta: Input heterogeneity between clients, >= 0.
    iid: Synthetic-IID (``alpha`` and ``beta`` are then ignored).
    dimension: Features per example (60 in FedProx).
    num_classes: Number of classes (10 in FedProx).
    min_examples: Smallest client, >= 1.
    max_examples: Largest client, >= ``min_examples``.

  Raises:
    ValueError: If an argument is out of range; the message names it.
  """

  def __init__(self, num_clients: int, seed: int = 0, alpha: float = 1.0, beta: float = 1.0,
               iid: bool = False, dimension: int = synthetic.DIMENSION,
               num_classes: int = synthetic.NUM_CLASSES, min_examples: int = 10,
               max_examples: int = 64):
    self._num_clients = check_int("num_clients", num_clients, 1)
    self.seed = check_int("seed", seed, 0)
    self.alpha = check_non_negative("alpha", alpha)
    self.beta = check_non_negative("beta", beta)
    self.dimension = check_int("dimension", dimension, 1)
    self.num_classes = check_int("num_classes", num_classes, 1)
    min_examples = check_int("min_examples", min_examples, 1)
    max_examples = check_int("max_examples", max_examples, min_examples)
    # A generator's first N draws do not depend on how many follow, so
    # client i's size is the same in every population with this seed.
    spread = np.random.default_rng([self.seed, 0]).lognormal(math.log(min_examples), 1.0,
                                                            self._num_clients)
    self._sizes = np.minimum(min_examples + np.floor(spread), max_examples).astype(np.int64)
    self._sizes.flags.writeable = False
    self._std_x = np.arange(1, self.dimension + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
    self.iid = bool(iid)
    if self.iid:
      shared = np.random.default_rng([self.seed, 2])
      self._shared_model = (shared.standard_normal((self.dimension, self.num_classes)),
                            shared.standard_normal(self.num_classes))

  @property
  def num_clients(self) -> int:
    return self._num_clients

  @property
  def client_sizes(self) -> np.ndarray:
    """Examples per client, read-only int64 ``[N]``."""
    return self._sizes

  @property
  def feature_shape(self) -> tuple[int, ...]:
    return (self.dimension,)

  @property
  def x_dtype(self) -> np.dtype:
    return np.dtype(np.float32)

  def client(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws client ``i``.

    Args:
      i: Client index in ``[0, num_clients)``.

    Returns:
      ``(x, y)``: float32 ``[n_i, dimension]`` and int32 ``[n_i]`` labels in
      ``[0, num_classes)``.

    Raises:
      ValueError: If ``i`` is not an integer in ``[0, num_clients)``.
    """
    if not isinstance(i, numbers.Integral) or isinstance(i, bool):
      raise ValueError(f"i must be an integer client index, got {i!r}")
    if not 0 <= i < self._num_clients:
      raise ValueError(f"i must be in [0, {self._num_clients}), got {i}")
    return self.clients([i])[0]

  def clients(self, indices: Sequence[int] | np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Draws the clients ``indices``, each independently of the others.

    Each client has its own random stream, but the arithmetic runs once for
    all of them: per-call overheads, not arithmetic, dominate the cost of
    small clients. Memory: a few copies of the clients' examples and, for
    non-IID clients, every example's client model (``dimension *
    num_classes`` float64), so draw a large range in blocks.

    Args:
      indices: Integer client indices ``[k]`` in ``[0, num_clients)``.

    Returns:
      ``[client(i) for i in indices]``.

    Raises:
      ValueError: If an index is out of range.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not len(indices):
      return []
    if indices.min() < 0 or indices.max() >= self._num_clients:
      raise ValueError(f"indices must be in [0, {self._num_clients}), got range "
                       f"[{indices.min()}, {indices.max()}]")
    d, c = self.dimension, self.num_classes
    head = 2 + d + d * c + c  # The client's means, v, W and b, then its n * d inputs.
    sizes = self._sizes[indices]
    # Philox is counter-based: keying it by (i, seed) gives client i its own
    # stream, and re-keying one generator costs a fraction of seeding a new one.
    bit_generator = np.random.Philox(key=np.array([0, self.seed], np.uint64))
    generator = np.random.Generator(bit_generator)
    state = bit_generator.state
    draws = []
    for i, n in zip(indices.tolist(), sizes.tolist()):
      state["state"] = {"counter": np.zeros(4, np.uint64),
                        "key": np.array([i, self.seed], np.uint64)}
      state["buffer_pos"] = 4  # Nothing buffered from the previous client.
      bit_generator.state = state
      draws.append(generator.standard_normal(head + n * d))
    heads = np.stack([z[:head] for z in draws])
    noise = np.concatenate([z[head:] for z in draws]).reshape(-1, d)
    model_mean, input_mean = self.alpha * heads[:, :1], self.beta * heads[:, 1:2]
    v = input_mean + heads[:, 2:2 + d]
    w = (model_mean + heads[:, 2 + d:2 + d + d * c]).reshape(-1, d, c)
    b = model_mean + heads[:, 2 + d + d * c:]
    if self.iid:
      w, b = self._shared_model
      x = noise * self._std_x
      logits = x @ w + b
    else:
      x = np.repeat(v, sizes, axis=0) + noise * self._std_x
      logits = (np.einsum("nd,ndc->nc", x, np.repeat(w, sizes, axis=0))
                + np.repeat(b, sizes, axis=0))
    y = np.argmax(logits, axis=1).astype(np.int32)
    cuts = np.cumsum(sizes)[:-1]
    return list(zip(np.split(x.astype(np.float32), cuts), np.split(y, cuts)))

  def __repr__(self) -> str:
    return (f"GeneratedPopulation(num_clients={self._num_clients}, seed={self.seed}, "
            f"alpha={self.alpha}, beta={self.beta}, iid={self.iid}, "
            f"dimension={self.dimension})")
