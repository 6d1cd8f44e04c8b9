"""A federated dataset on disk: one SQLite row per client, read client by client.

Real federated populations (Shakespeare roles, FEMNIST writers, generated
populations of millions of devices) do not always fit in memory as one
``FederatedDataset``, and re-parsing their source formats on every run is slow.
The store keeps each client's examples as two raw byte blobs in a single SQLite
file, so a client is one indexed lookup and a population can be streamed
without loading everything.

Schema (``FORMAT_VERSION`` 1)::

  clients(idx INTEGER PRIMARY KEY, client_id TEXT NOT NULL UNIQUE,
          num_examples INTEGER NOT NULL, x BLOB NOT NULL, y BLOB NOT NULL)
  metadata(key TEXT PRIMARY KEY, value TEXT NOT NULL)   -- values are JSON

``x`` holds ``num_examples * prod(x_shape)`` little-endian values of
``x_dtype``, C order; ``y`` holds ``num_examples`` values of ``y_dtype``; both
optionally zlib-compressed (metadata ``compression``). ``idx`` is the client's
position (0-based, in writing order). It is the table's rowid alias rather
than an implicit rowid because SQLite may renumber implicit rowids on VACUUM,
and positions must be stable for cohort sampling by index; ``client_id`` is
UNIQUE, so it serves as the natural key with one index.

Everything read is checked before it is used, and each failure is one
``ValueError`` naming the file, the client and the field: the metadata
(format version, dtypes, shape, compression, ``num_classes``), the ``idx``
column (positions ``0 .. N-1`` with no gap), each row's types, its
``num_examples`` against the byte length of its blobs (before anything is
allocated or decompressed; a zlib blob is inflated to at most the bytes
its row declares), labels in ``[0, num_classes)`` and features finite. A
store written before ``num_classes`` was recorded is read with labels
capped at ``MAX_CLASSES``.

Training can stream from a store instead of loading it: ``source()`` is the
store as a ``fedjax_priv.data.population.ClientSource`` that holds only the
client sizes and reads each cohort with one query (``clients``), so host
memory stays the cohort's whatever the population size
(``experiments/results/million_clients.md`` measures it up to 10^6 clients).

Overhead: about 25 bytes per row plus twice the id's length (the row and the
``client_id`` index both hold it); ``tests/data/test_store.py`` measures it on
100k one-example clients.

This module is host-side and depends on numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_priv.data.federated import FederatedDataset

FORMAT_VERSION = 1
_COMPRESSIONS = ("none", "zlib")
# Label cap for stores whose metadata predates ``num_classes``: a label beyond
# it is corruption, not a class (a model with 2^20 outputs is already huge).
MAX_CLASSES = 1 << 20
# One example's features may not exceed this many bytes (1 GiB), so a bad
# ``x_shape`` fails before any row is read.
_MAX_EXAMPLE_BYTES = 1 << 30
# Deflate cannot expand a blob by more than 1032:1 (RFC 1951: a 258-byte match
# costs at least 2 bits), so a row declaring more is refused unread.
_ZLIB_MAX_RATIO = 1032
# A transaction is committed once this many rows or bytes are pending, which
# bounds the writer's memory whatever the population size.
_MAX_PENDING_ROWS = 4096
_MAX_PENDING_BYTES = 64 << 20

_SCHEMA = """
CREATE TABLE clients (
  idx INTEGER PRIMARY KEY,
  client_id TEXT NOT NULL UNIQUE,
  num_examples INTEGER NOT NULL,
  x BLOB NOT NULL,
  y BLOB NOT NULL
);
CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def _little_endian(dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
    raise ValueError(f"x_dtype must be a plain numeric dtype, got {dtype}")
  return dtype.newbyteorder("<") if dtype.byteorder not in ("|", "<") else dtype


def _feature_dtype(dtype) -> np.dtype:
  """A little-endian bool, integer or float dtype: what a store can hold and read back."""
  dtype = _little_endian(dtype)
  if dtype.kind not in "biuf":
    raise ValueError(f"x_dtype must be a bool, integer or float dtype, got {dtype}")
  return dtype


@dataclasses.dataclass(frozen=True)
class StoreInfo:
  """What a store holds, from its metadata table.

  Attributes:
    name: Dataset name, e.g. ``"shakespeare"``.
    split: ``"train"``, ``"test"`` or another split name.
    source: Where the data came from (path or URL), for provenance.
    license: The data's licence, as stated by its source.
    x_dtype: Little-endian dtype of the features.
    x_shape: Shape of one example's features.
    y_dtype: Integer dtype of the labels.
    compression: ``"none"`` or ``"zlib"``.
    extra: Further JSON-serialisable facts (partition, seed, vocabulary...).
    num_classes: Labels lie in ``[0, num_classes)``; ``None`` in stores
      written before it was recorded (labels are then capped at
      ``MAX_CLASSES``).
  """

  name: str
  split: str
  source: str
  license: str
  x_dtype: np.dtype
  x_shape: tuple[int, ...]
  y_dtype: np.dtype
  compression: str = "none"
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  num_classes: int | None = None

  @property
  def label_bound(self) -> int:
    """Labels must be below this: ``num_classes``, or ``MAX_CLASSES`` if unrecorded."""
    return MAX_CLASSES if self.num_classes is None else self.num_classes

  @property
  def example_bytes(self) -> int:
    """Bytes of one example's features."""
    return math.prod(self.x_shape) * self.x_dtype.itemsize

  def to_rows(self) -> list[tuple[str, str]]:
    values = {
        "format_version": FORMAT_VERSION,
        "name": self.name,
        "split": self.split,
        "source": self.source,
        "license": self.license,
        "x_dtype": self.x_dtype.str,
        "x_shape": list(self.x_shape),
        "y_dtype": self.y_dtype.str,
        "compression": self.compression,
        "extra": dict(self.extra),
    }
    if self.num_classes is not None:
      values["num_classes"] = self.num_classes
    return [(key, json.dumps(value)) for key, value in values.items()]

  @classmethod
  def from_rows(cls, rows: Iterable[tuple[Any, Any]], path: Path) -> StoreInfo:
    """Parses and checks the metadata rows; ValueError names the file and the key."""
    values = {}
    for key, value in rows:
      if not isinstance(key, str) or not isinstance(value, str):
        raise ValueError(f"{path}: metadata key {key!r} must map to a JSON text, got {value!r}")
      try:
        values[key] = json.loads(value)
      except ValueError:
        raise ValueError(f"{path}: metadata {key} is not valid JSON: {value[:80]!r}") from None
    version = values.get("format_version")
    if version != FORMAT_VERSION:
      raise ValueError(
          f"{path}: metadata format_version must be {FORMAT_VERSION}, got {version!r}"
      )
    optional = {"num_classes"}
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.name not in optional]
    if missing:
      raise ValueError(f"{path}: metadata lacks {', '.join(missing)}")
    for key in ("name", "split", "source", "license"):
      if not isinstance(values[key], str):
        raise ValueError(f"{path}: metadata {key} must be a string, got {values[key]!r}")
    if values["compression"] not in _COMPRESSIONS:
      raise ValueError(f"{path}: metadata compression must be one of {_COMPRESSIONS}, got "
                       f"{values['compression']!r}")
    if not isinstance(values["extra"], dict):
      raise ValueError(f"{path}: metadata extra must be an object, got {values['extra']!r}")
    x_dtype = _metadata_dtype(values, "x_dtype", path, _feature_dtype)
    y_dtype = _metadata_dtype(values, "y_dtype", path, _little_endian)
    if y_dtype.kind not in "iu":
      raise ValueError(f"{path}: metadata y_dtype must be an integer dtype, got {y_dtype}")
    shape = values["x_shape"]
    if not (isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
      raise ValueError(f"{path}: metadata x_shape must be a list of integers >= 1, got {shape!r}")
    if math.prod(shape) * x_dtype.itemsize > _MAX_EXAMPLE_BYTES:
      raise ValueError(f"{path}: metadata x_shape {shape} of {x_dtype} needs "
                       f"{math.prod(shape) * x_dtype.itemsize} bytes per example, more than "
                       f"{_MAX_EXAMPLE_BYTES}")
    num_classes = values.get("num_classes")
    label_max = min(MAX_CLASSES, int(np.iinfo(y_dtype).max) + 1)
    if num_classes is not None and not (
        isinstance(num_classes, int) and not isinstance(num_classes, bool)
        and 1 <= num_classes <= label_max):
      raise ValueError(f"{path}: metadata num_classes must be an integer in [1, {label_max}], "
                       f"got {num_classes!r}")
    return cls(
        name=values["name"],
        split=values["split"],
        source=values["source"],
        license=values["license"],
        x_dtype=x_dtype,
        x_shape=tuple(shape),
        y_dtype=y_dtype,
        compression=values["compression"],
        extra=values["extra"],
        num_classes=num_classes,
    )


def _metadata_dtype(values: Mapping[str, Any], key: str, path: Path, parse) -> np.dtype:
  try:
    return parse(values[key])
  except (TypeError, ValueError) as error:
    raise ValueError(f"{path}: metadata {key} = {values[key]!r} is not a dtype a store holds "
                     f"({error})") from None


class StoreWriter:
  """Writes clients one at a time, in bounded memory, into a new store.

  Rows go to ``PATH.partial`` in transactions of at most 4096 rows or 64 MiB;
  ``close()`` writes the metadata and renames the file to ``PATH``, so a
  store at ``PATH`` is always complete. Use as a context manager: an
  exception inside the ``with`` block deletes the partial file.

  Args:
    path: Destination file; must not exist unless ``overwrite``.
    name: Dataset name.
    split: Split name.
    source: Provenance of the data.
    license: Licence of the data.
    x_dtype: Feature dtype; defaults to the first client's.
    x_shape: Shape of one example's features; defaults to the first
      client's ``x.shape[1:]``.
    y_dtype: Integer label dtype (default int32).
    compression: ``"none"`` or ``"zlib"`` (smaller files for redundant data
      such as overlapping text windows, slower reads).
    extra: JSON-serialisable metadata stored alongside.
    num_classes: Labels must lie in ``[0, num_classes)``; default: the
      largest label written plus one, recorded at ``close()``.
    overwrite: Replace an existing ``path``.

  Raises:
    ValueError: If an argument is invalid or ``path`` exists.
  """

  def __init__(
      self,
      path: str | os.PathLike,
      *,
      name: str,
      split: str = "train",
      source: str = "",
      license: str = "",
      x_dtype=None,
      x_shape: Iterable[int] | None = None,
      y_dtype="int32",
      compression: str = "none",
      extra: Mapping[str, Any] | None = None,
      num_classes: int | None = None,
      overwrite: bool = False,
  ):
    self._path = Path(path)
    if self._path.exists() and not overwrite:
      raise ValueError(f"path {self._path} exists; pass overwrite=True to replace it")
    if compression not in _COMPRESSIONS:
      raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")
    y_dtype = _little_endian(y_dtype)
    if not np.issubdtype(y_dtype, np.integer):
      raise ValueError(f"y_dtype must be an integer dtype, got {y_dtype}")
    json.dumps(dict(extra or {}))  # Fails now, not at close(), if not serialisable.
    if num_classes is not None:
      label_max = min(MAX_CLASSES, int(np.iinfo(y_dtype).max) + 1)
      if (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
          or not 1 <= num_classes <= label_max):
        raise ValueError(f"num_classes must be an integer in [1, {label_max}], got "
                         f"{num_classes!r}")
      num_classes = int(num_classes)
    self._num_classes = num_classes
    self._max_label = -1
    self._meta = dict(name=name, split=split, source=source, license=license,
                      y_dtype=y_dtype, compression=compression, extra=dict(extra or {}))
    self._x_dtype = None if x_dtype is None else _feature_dtype(x_dtype)
    self._x_shape = None if x_shape is None else tuple(int(d) for d in x_shape)
    self._partial = self._path.with_name(self._path.name + ".partial")
    self._partial.parent.mkdir(parents=True, exist_ok=True)
    self._partial.unlink(missing_ok=True)
    self._db = sqlite3.connect(self._partial, isolation_level=None)
    # The partial file is deleted on any failure, so durability is not needed
    # while writing; this makes large writes several times faster.
    self._db.execute("PRAGMA journal_mode=OFF")
    self._db.execute("PRAGMA synchronous=OFF")
    self._db.executescript(_SCHEMA)
    self._pending: list[tuple] = []
    self._pending_bytes = 0
    self._num_clients = 0

  @property
  def num_clients(self) -> int:
    """Clients added so far."""
    return self._num_clients

  def add(self, client_id: str, x: np.ndarray, y: np.ndarray) -> None:
    """Appends one client.

    Args:
      client_id: Unique non-empty string.
      x: Features ``[n, *x_shape]``; cast to ``x_dtype`` when that is safe.
      y: Integer labels ``[n]``.

    Raises:
      ValueError: If the id is not a non-empty string, the shapes or dtypes
        disagree with the store's, a label is outside ``[0, num_classes)``
        or a feature is not finite; the message names the client.
    """
    if self._db is None:
      raise ValueError("the writer is closed")
    if not isinstance(client_id, str) or not client_id:
      raise ValueError(f"client_id must be a non-empty string, got {client_id!r}")
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim < 1:
      raise ValueError(f"client {client_id!r}: x must have an example axis, got shape {x.shape}")
    if self._x_shape is None:
      self._x_shape = tuple(x.shape[1:])
    if self._x_dtype is None:
      self._x_dtype = _feature_dtype(x.dtype)
    if tuple(x.shape[1:]) != self._x_shape:
      raise ValueError(
          f"client {client_id!r}: x must have shape [n, *{self._x_shape}], got {x.shape}"
      )
    if x.dtype != self._x_dtype and not np.can_cast(x.dtype, self._x_dtype, "safe"):
      raise ValueError(
          f"client {client_id!r}: x dtype {x.dtype} cannot be stored safely as {self._x_dtype}"
      )
    if y.shape != (len(x),):
      raise ValueError(f"client {client_id!r}: y must have shape ({len(x)},), got {y.shape}")
    y_dtype = self._meta["y_dtype"]
    if len(y):
      if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"client {client_id!r}: y must hold integers, got dtype {y.dtype}")
      bounds = np.iinfo(y_dtype)
      if y.min() < bounds.min or y.max() > bounds.max:
        raise ValueError(
            f"client {client_id!r}: y must fit in {y_dtype}, got range [{y.min()}, {y.max()}]"
        )
      limit = MAX_CLASSES if self._num_classes is None else self._num_classes
      if y.min() < 0 or y.max() >= limit:
        raise ValueError(f"client {client_id!r}: labels must lie in [0, {limit}), got range "
                         f"[{y.min()}, {y.max()}]")
      self._max_label = max(self._max_label, int(y.max()))
    if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
      raise ValueError(f"client {client_id!r}: x holds {int(np.sum(~np.isfinite(x)))} "
                       "non-finite values (NaN or inf)")
    x_blob = np.ascontiguousarray(x, dtype=self._x_dtype).tobytes()
    y_blob = np.ascontiguousarray(y, dtype=y_dtype).tobytes()
    if self._meta["compression"] == "zlib":
      x_blob, y_blob = zlib.compress(x_blob), zlib.compress(y_blob)
    self._pending.append((self._num_clients, client_id, len(x), x_blob, y_blob))
    self._pending_bytes += len(x_blob) + len(y_blob)
    self._num_clients += 1
    if len(self._pending) >= _MAX_PENDING_ROWS or self._pending_bytes >= _MAX_PENDING_BYTES:
      self._flush()

  def _flush(self) -> None:
    if not self._pending:
      return
    try:
      with self._db:  # One transaction per batch.
        self._db.execute("BEGIN")
        self._db.executemany("INSERT INTO clients VALUES (?, ?, ?, ?, ?)", self._pending)
    except sqlite3.IntegrityError:
      ids = [row[1] for row in self._pending]
      seen, repeated = set(), None
      for cid in ids:
        if cid in seen or self._db.execute(
            "SELECT 1 FROM clients WHERE client_id = ?", (cid,)).fetchone():
          repeated = cid
          break
        seen.add(cid)
      self.abort()
      raise ValueError(f"client_id {repeated!r} is repeated; client ids must be unique") from None
    self._pending, self._pending_bytes = [], 0

  def close(self) -> Path:
    """Writes the metadata and moves the finished store to ``path``.

    Returns:
      The store's path.

    Raises:
      ValueError: If no client was added and ``x_dtype``/``x_shape`` were not
        given (the store would not know its feature layout).
    """
    if self._db is None:
      raise ValueError("the writer is closed")
    if self._x_dtype is None or self._x_shape is None:
      self.abort()
      raise ValueError("an empty store needs x_dtype and x_shape")
    self._flush()
    num_classes = self._num_classes
    if num_classes is None and self._max_label >= 0:
      num_classes = self._max_label + 1
    info = StoreInfo(x_dtype=self._x_dtype, x_shape=self._x_shape, num_classes=num_classes,
                     **self._meta)
    with self._db:
      self._db.execute("BEGIN")
      self._db.executemany("INSERT INTO metadata VALUES (?, ?)", info.to_rows())
    self._db.close()
    self._db = None
    os.replace(self._partial, self._path)
    return self._path

  def abort(self) -> None:
    """Discards everything written; ``path`` is left untouched."""
    if self._db is not None:
      self._db.close()
      self._db = None
    self._partial.unlink(missing_ok=True)

  def __enter__(self) -> StoreWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


class FederatedStore:
  """Read-only access to a store, client by client.

  Args:
    path: A file written by ``StoreWriter``.

  Raises:
    FileNotFoundError: If ``path`` does not exist.
    ValueError: If the file is not a store of a known format version, its
      metadata is invalid, or its positions (``idx``) are not ``0 .. N-1``.
      Rows are checked when they are read (``client_sizes``, ``client``,
      ``clients``, ``get``, iteration): each error names the client and field.
  """

  def __init__(self, path: str | os.PathLike):
    self._path = Path(path)
    if not self._path.is_file():
      raise FileNotFoundError(f"no store at {self._path}")
    self._db = sqlite3.connect(f"{self._path.resolve().as_uri()}?mode=ro", uri=True)
    try:
      rows = self._db.execute("SELECT key, value FROM metadata").fetchall()
      self.info = StoreInfo.from_rows(rows, self._path)
      count, first, last = self._db.execute(
          "SELECT COUNT(*), MIN(idx), MAX(idx) FROM clients").fetchone()
    except sqlite3.DatabaseError as error:
      self._db.close()
      raise ValueError(f"{self._path} is not a federated store: {error}") from None
    except ValueError:
      self._db.close()
      raise
    # Positions are sampled by index; a gap would be a KeyError mid-run.
    if count and (first != 0 or last != count - 1):
      self._db.close()
      raise ValueError(f"{self._path}: client positions (idx) must be 0 .. {count - 1} without "
                       f"gaps, got {count} rows spanning [{first}, {last}]")
    self._row_size = math.prod(self.info.x_shape)
    self._num_clients = count

  @property
  def num_clients(self) -> int:
    return self._num_clients

  def __len__(self) -> int:
    return self._num_clients

  def __contains__(self, client_id: str) -> bool:
    query = "SELECT 1 FROM clients WHERE client_id = ?"
    return self._db.execute(query, (client_id,)).fetchone() is not None

  def client_ids(self) -> list[str]:
    """All ids in position order."""
    return [r[0] for r in self._db.execute("SELECT client_id FROM clients ORDER BY idx")]

  def client_sizes(self) -> np.ndarray:
    """Examples per client, int64 ``[num_clients]``, in position order.

    Each row's ``num_examples`` is checked against its blobs' byte lengths
    (SQLite reads lengths without the blobs), so a size that would ask
    for an allocation the row cannot fill is refused here.
    """
    rows = self._db.execute("SELECT client_id, num_examples, typeof(x), length(x), typeof(y), "
                            "length(y) FROM clients ORDER BY idx")
    return np.fromiter((self._checked_size(*row) for row in rows), dtype=np.int64,
                       count=self._num_clients)

  def _fail(self, client_id: Any, field: str, problem: str):
    raise ValueError(f"{self._path}: client {client_id!r}: {field} {problem}")

  def _checked_size(self, client_id, n, x_type, x_len, y_type, y_len) -> int:
    """``n`` after checking the row's id, size and blob lengths."""
    if not isinstance(client_id, str) or not client_id:
      self._fail(client_id, "client_id", "must be a non-empty string")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
      self._fail(client_id, "num_examples", f"must be an integer >= 0, got {n!r}")
    for field, kind, length, need in (("x", x_type, x_len, n * self.info.example_bytes),
                                      ("y", y_type, y_len, n * self.info.y_dtype.itemsize)):
      if kind != "blob":
        self._fail(client_id, field, f"must be a blob, got {kind}")
      if self.info.compression == "none" and length != need:
        self._fail(client_id, field, f"holds {length} bytes, but num_examples = {n} needs {need}")
      if self.info.compression == "zlib" and need > length * _ZLIB_MAX_RATIO:
        self._fail(client_id, field, f"is a {length}-byte zlib blob, which cannot inflate to "
                   f"the {need} bytes num_examples = {n} needs")
    return n

  def _inflate(self, client_id: str, field: str, blob: bytes, need: int) -> bytes:
    """``blob`` decompressed to exactly ``need`` bytes, never more in memory."""
    inflater = zlib.decompressobj()
    try:
      data = inflater.decompress(blob, need + 1)
    except zlib.error as error:
      self._fail(client_id, field, f"is not zlib data although metadata compression = zlib "
                 f"({error})")
    if len(data) != need or not inflater.eof or inflater.unused_data:
      self._fail(client_id, field, f"does not inflate to the {need} bytes num_examples needs")
    return data

  def _decode(self, client_id: str, n: int, x_blob: bytes, y_blob: bytes):
    """Checks one row and returns its ``(x [n, *x_shape], y [n])``."""
    info = self.info
    self._checked_size(client_id, n, *_blob_facts(x_blob), *_blob_facts(y_blob))
    if info.compression == "zlib":
      x_blob = self._inflate(client_id, "x", x_blob, n * info.example_bytes)
      y_blob = self._inflate(client_id, "y", y_blob, n * info.y_dtype.itemsize)
    x = np.frombuffer(x_blob, dtype=info.x_dtype).reshape(n, *info.x_shape)
    y = self._checked_labels(client_id, np.frombuffer(y_blob, dtype=info.y_dtype))
    if info.x_dtype.kind == "f" and n and not np.all(np.isfinite(x)):
      self._fail(client_id, "x", f"holds {int(np.sum(~np.isfinite(x)))} non-finite values "
                 "(NaN or inf)")
    return x, y

  def _checked_labels(self, client_id: str, y: np.ndarray) -> np.ndarray:
    if len(y) and (y.min() < 0 or y.max() >= self.info.label_bound):
      bad = y[(y < 0) | (y >= self.info.label_bound)]
      recorded = ("metadata num_classes" if self.info.num_classes is not None
                  else "MAX_CLASSES, as metadata records no num_classes")
      self._fail(client_id, "y", f"must lie in [0, {self.info.label_bound}) ({recorded}), got "
                 f"{len(bad)} labels outside, e.g. {int(bad[0])}")
    return y

  def get(self, client_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(x [n, *x_shape], y [n])`` of one client (read-only arrays).

    Raises:
      KeyError: If there is no such client.
    """
    row = self._db.execute(
        "SELECT num_examples, x, y FROM clients WHERE client_id = ?", (client_id,)).fetchone()
    if row is None:
      raise KeyError(f"no client {client_id!r} in {self._path}")
    return self._decode(client_id, *row)

  def client(self, i: int) -> tuple[str, np.ndarray, np.ndarray]:
    """Returns ``(client_id, x, y)`` of the client at position ``i``.

    Raises:
      IndexError: If ``i`` is not in ``[0, num_clients)``.
    """
    if not 0 <= i < self._num_clients:
      raise IndexError(f"client position must be in [0, {self._num_clients}), got {i}")
    client_id, n, x, y = self._db.execute(
        "SELECT client_id, num_examples, x, y FROM clients WHERE idx = ?", (int(i),)).fetchone()
    return (client_id, *self._decode(client_id, n, x, y))

  def clients(self, positions: Iterable[int] | np.ndarray
              ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Returns ``client(i)`` for every ``i`` of ``positions``, read with ONE query.

    The positions travel as one JSON array parameter, so a cohort of any
    size is a single indexed lookup per row, with no limit on the number of
    SQL variables.

    Args:
      positions: Integer positions ``[k]`` in ``[0, num_clients)``; repeats
        are allowed.

    Returns:
      ``k`` triples ``(client_id, x, y)``, in the order of ``positions``.

    Raises:
      IndexError: If a position is not in ``[0, num_clients)``.
      ValueError: If ``positions`` is not a 1-D integer array.
    """
    positions = np.asarray(positions)
    if positions.ndim != 1:
      raise ValueError(f"positions must be 1-D [k], got shape {positions.shape}")
    if not len(positions):
      return []
    if not np.issubdtype(positions.dtype, np.integer):
      raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
    if positions.min() < 0 or positions.max() >= self._num_clients:
      raise IndexError(f"client positions must be in [0, {self._num_clients}), got range "
                       f"[{positions.min()}, {positions.max()}]")
    query = ("SELECT idx, client_id, num_examples, x, y FROM clients "
             "WHERE idx IN (SELECT value FROM json_each(?))")
    wanted = json.dumps(np.unique(positions).tolist())
    rows = {row[0]: row[1:] for row in self._db.execute(query, (wanted,))}
    return [(rows[i][0], *self._decode(*rows[i])) for i in positions.tolist()]

  def max_label(self) -> int:
    """The largest label of any client, or -1 if the store holds no example.

    Reads only the label blobs, one row at a time (bounded memory, one pass).
    """
    largest = -1
    rows = self._db.execute(
        "SELECT client_id, num_examples, typeof(x), length(x), y FROM clients")
    for client_id, n, x_type, x_len, y_blob in rows:
      self._checked_size(client_id, n, x_type, x_len, *_blob_facts(y_blob))
      if self.info.compression == "zlib":
        y_blob = self._inflate(client_id, "y", y_blob, n * self.info.y_dtype.itemsize)
      y = self._checked_labels(client_id, np.frombuffer(y_blob, dtype=self.info.y_dtype))
      if n:
        largest = max(largest, int(y.max()))
    return largest

  def source(self) -> StoreSource:
    """This store as a ``ClientSource`` that ``pack_cohort`` streams cohorts from."""
    return StoreSource(self)

  def __iter__(self) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yields ``(client_id, x, y)`` in position order, one row in memory at a time."""
    cursor = self._db.execute("SELECT client_id, num_examples, x, y FROM clients ORDER BY idx")
    for client_id, n, x, y in cursor:
      yield (client_id, *self._decode(client_id, n, x, y))

  def to_federated(self) -> FederatedDataset:
    """Loads every client into one ``FederatedDataset`` (ids and order kept).

    Raises:
      ValueError: If a row is invalid (before the arrays are allocated when
        the sizes are wrong).
    """
    sizes = self.client_sizes()
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    x = np.empty((offsets[-1], *self.info.x_shape), dtype=self.info.x_dtype.newbyteorder("="))
    y = np.empty(offsets[-1], dtype=self.info.y_dtype.newbyteorder("="))
    ids = []
    for i, (client_id, xi, yi) in enumerate(self):
      x[offsets[i]:offsets[i + 1]] = xi
      y[offsets[i]:offsets[i + 1]] = yi
      ids.append(client_id)
    return FederatedDataset(x=x, y=y, offsets=offsets, client_ids=tuple(ids))

  def close(self) -> None:
    self._db.close()

  def __enter__(self) -> FederatedStore:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _blob_facts(value: Any) -> tuple[str, int | None]:
  """(SQLite type name, byte length) of a value read from a blob column."""
  if isinstance(value, bytes):
    return "blob", len(value)
  return {str: "text", int: "integer", float: "real"}.get(type(value), "null"), None


class StoreSource:
  """A store as a ``fedjax_priv.data.population.ClientSource``: cohorts are read, not loaded.

  Holds the store's client sizes (int64, 8 bytes per client: 8 MB at 10^6
  clients) and nothing else of the population; each cohort is one query
  (``FederatedStore.clients``). The store must stay open while the source
  is used.

  Args:
    store: An open store.
  """

  def __init__(self, store: FederatedStore):
    self.store = store
    self._sizes = store.client_sizes()
    self._sizes.flags.writeable = False

  @property
  def num_clients(self) -> int:
    return self.store.num_clients

  @property
  def client_sizes(self) -> np.ndarray:
    """Examples per client, read-only int64 ``[N]``."""
    return self._sizes

  @property
  def feature_shape(self) -> tuple[int, ...]:
    return self.store.info.x_shape

  @property
  def x_dtype(self) -> np.dtype:
    return self.store.info.x_dtype.newbyteorder("=")

  def client(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the client at position ``i`` (read-only arrays)."""
    return self.store.client(i)[1:]

  def clients(self, positions: Iterable[int] | np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(x, y)`` of every client of ``positions``, in order, read with one query."""
    return [(x, y) for _, x, y in self.store.clients(positions)]

  def max_label(self) -> int:
    """The store's largest label (-1 without examples), from one pass over the labels."""
    return self.store.max_label()


def write_store(
    path: str | os.PathLike, dataset: FederatedDataset, **metadata
) -> Path:
  """Writes a ``FederatedDataset`` to a new store.

  Args:
    path: Destination file.
    dataset: The clients to write, in order.
    **metadata: ``StoreWriter`` keywords (``name`` is required).

  Returns:
    The store's path.
  """
  metadata.setdefault("x_dtype", dataset.x.dtype)
  metadata.setdefault("x_shape", dataset.feature_shape)
  with StoreWriter(path, **metadata) as writer:
    for i, client_id in enumerate(dataset.client_ids):
      writer.add(client_id, *dataset.client(i))
  return Path(path)
