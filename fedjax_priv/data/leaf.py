"""LEAF's JSON format: read FEMNIST, Shakespeare, Sent140 and Synthetic clients.

LEAF's scripts write each split as one or more JSON files of the form
``{"users": [u, ...], "num_samples": [n, ...], "user_data": {u: {"x": [...],
"y": [...]}}}`` (optionally with ``"hierarchies"``), spreading the users over
several files. The reader streams a folder file by file and decodes each
user's examples:

- ``femnist``: ``x`` is 784 floats -> float32 ``[28, 28, 1]`` as stored (LEAF
  keeps ink dark on a white 1.0 background); ``y`` in ``[0, 62)``.
- ``shakespeare``: ``x`` is an 80-character string -> uint8 ids ``[80]`` by
  LEAF's ``ALL_LETTERS`` (out-of-vocabulary: 80); ``y`` is the next character's
  id.
- ``sent140``: ``x`` is a tweet record ``[id, date, query, user, text]`` ->
  int32 token ids ``[max_words]`` of the text, split by LEAF's
  ``language_utils.split_line`` rule and looked up in a vocabulary built from
  the data (id 0 pads, id 1 is unknown, then words by decreasing count; LEAF
  itself uses GloVe's vocabulary, which is not shipped here); ``y`` is 0/1.
- ``synthetic``: ``x`` is 60 floats -> float32 ``[60]``; ``y`` an integer
  class (FedProx's generator writes it as a float such as ``3.0``).

References:
  Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.shakespeare import ALL_LETTERS, encode_chars

LEAF_DATASETS = ("femnist", "sent140", "shakespeare", "synthetic")
PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[\w']+|[.,!?;]")  # LEAF's language_utils.split_line.


class LeafData(NamedTuple):
  """Decoded LEAF clients.

  Attributes:
    dataset: The clients, in file then user order.
    vocabulary: Id -> token for the text datasets (Shakespeare: the 80
      letters and an out-of-vocabulary marker; Sent140: the words); empty
      for FEMNIST and Synthetic.
  """

  dataset: FederatedDataset
  vocabulary: tuple[str, ...]


def _check_kind(kind: str) -> str:
  if kind not in LEAF_DATASETS:
    raise ValueError(f"dataset must be one of {LEAF_DATASETS}, got {kind!r}")
  return kind


def leaf_files(directory: str | os.PathLike) -> list[Path]:
  """The ``*.json`` files of a LEAF split folder, sorted by name.

  Raises:
    FileNotFoundError: If the folder has no JSON file.
  """
  files = sorted(Path(directory).glob("*.json"))
  if not files:
    raise FileNotFoundError(f"no LEAF *.json files in {directory}")
  return files


def iter_leaf_users(directory: str | os.PathLike) -> Iterator[tuple[str, Mapping[str, list]]]:
  """Yields ``(user, {"x": [...], "y": [...]})`` from every file, one file in memory.

  Raises:
    ValueError: If a file lacks ``users``/``user_data``, ``users``,
      ``num_samples`` and ``user_data`` do not list the same users, a
      user's ``x`` and ``y`` (or ``num_samples``) disagree in length, or a
      user appears twice; the message names the file and user.
  """
  seen = set()
  for path in leaf_files(directory):
    with open(path) as f:
      content = json.load(f)
    if not isinstance(content, dict) or "users" not in content or "user_data" not in content:
      raise ValueError(f"{path}: a LEAF file needs 'users' and 'user_data' keys")
    users, user_data = content["users"], content["user_data"]
    if not isinstance(users, list) or not isinstance(user_data, dict):
      raise ValueError(f"{path}: 'users' must be a list and 'user_data' an object")
    num_samples = content.get("num_samples", [None] * len(users))
    # zip would silently drop the users past the shorter list.
    if not isinstance(num_samples, list) or len(num_samples) != len(users):
      raise ValueError(f"{path}: 'num_samples' must list one count per user: "
                       f"{len(users)} users, num_samples {num_samples!r:.80}")
    unlisted = sorted(set(map(str, user_data)) - set(map(str, users)))
    if unlisted:
      raise ValueError(f"{path}: user_data holds {len(unlisted)} users missing from 'users' "
                       f"(first: {unlisted[0]!r})")
    for user, n in zip(users, num_samples):
      if user in seen:
        raise ValueError(f"{path}: user {user!r} appears in more than one place")
      seen.add(user)
      data = user_data.get(user)
      if data is None or "x" not in data or "y" not in data:
        raise ValueError(f"{path}: user {user!r} has no user_data with 'x' and 'y'")
      if len(data["x"]) != len(data["y"]) or (n is not None and n != len(data["y"])):
        raise ValueError(
            f"{path}: user {user!r} has {len(data['x'])} x, {len(data['y'])} y and "
            f"num_samples {n}"
        )
      yield str(user), data


def _tweet_text(record: Any) -> str:
  return record if isinstance(record, str) else str(record[4])


def sent140_vocabulary(directory: str | os.PathLike) -> tuple[str, ...]:
  """Builds Sent140's vocabulary from a folder's tweets.

  Returns:
    ``("<pad>", "<unk>", words...)`` with the words by decreasing count, ties
    in alphabetical order (deterministic).
  """
  counts = collections.Counter()
  for _, data in iter_leaf_users(directory):
    for record in data["x"]:
      counts.update(_WORD.findall(_tweet_text(record)))
  return (PAD, UNK, *sorted(counts, key=lambda w: (-counts[w], w)))


def _labels(values: list, where: str) -> np.ndarray:
  y = np.asarray(values)
  if len(y) == 0:
    return np.zeros(0, np.int32)
  if y.dtype.kind == "f":
    if not np.all(np.isfinite(y) & (y == np.round(y))):
      raise ValueError(f"{where}: y must hold integer classes, got {values[:3]}...")
  elif y.dtype.kind not in "iub":
    raise ValueError(f"{where}: y must hold integer classes, got {values[:3]}...")
  return y.astype(np.int32)


def decode_user(
    kind: str,
    user: str,
    data: Mapping[str, list],
    word_ids: Mapping[str, int] | None = None,
    max_words: int = 25,
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes one LEAF user's ``x`` and ``y``; see the module docstring per dataset.

  Args:
    kind: One of ``LEAF_DATASETS``.
    user: The user's name, for error messages.
    data: ``{"x": [...], "y": [...]}``.
    word_ids: Sent140 only: word -> id.
    max_words: Sent140 only: tokens kept per tweet (LEAF's default 25).

  Returns:
    ``(x, y)`` with ``y`` int32 ``[n]``.

  Raises:
    ValueError: If an example has the wrong size or a label is not an
      integer; the message names the user.
  """
  where = f"user {user!r}"
  n = len(data["y"])
  try:
    if kind == "femnist":
      x = np.asarray(data["x"], dtype=np.float32)
      if x.shape != (n, 784) and n:
        raise ValueError(f"{where}: femnist x must be 784 floats per example, got {x.shape}")
      x = x.reshape(n, 28, 28, 1)
      return x, _labels(data["y"], where)
    if kind == "synthetic":
      x = np.asarray(data["x"], dtype=np.float32)
      if n and x.ndim != 2:
        raise ValueError(f"{where}: synthetic x must be a list of equal-length vectors")
      return x.reshape(n, -1), _labels(data["y"], where)
  except ValueError as error:
    if str(error).startswith(where):
      raise
    raise ValueError(f"{where}: {error}") from None
  if kind == "shakespeare":
    lengths = {len(s) for s in data["x"]}
    if len(lengths) > 1:
      raise ValueError(f"{where}: shakespeare x must be strings of one length, got {lengths}")
    width = lengths.pop() if lengths else 80
    if any(len(c) != 1 for c in data["y"]):
      raise ValueError(f"{where}: shakespeare y must be single characters")
    x = encode_chars("".join(data["x"])).reshape(n, width)
    return x, encode_chars("".join(data["y"])).astype(np.int32)
  unk = word_ids[UNK]
  x = np.zeros((n, max_words), np.int32)
  for i, record in enumerate(data["x"]):
    ids = [word_ids.get(w, unk) for w in _WORD.findall(_tweet_text(record))[:max_words]]
    x[i, : len(ids)] = ids
  return x, _labels(data["y"], where)


def iter_leaf(
    directory: str | os.PathLike,
    kind: str,
    vocabulary: Sequence[str] | None = None,
    max_words: int = 25,
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
  """Yields decoded ``(user, x, y)`` one user at a time (one file in memory).

  Args:
    directory: Folder of LEAF JSON files of one split.
    kind: One of ``LEAF_DATASETS``.
    vocabulary: Sent140 only: the id -> word table (e.g. the training
      split's, to decode its test split); built from ``directory`` if None.
    max_words: Sent140 only: tokens kept per tweet.
  """
  _check_kind(kind)
  word_ids = None
  if kind == "sent140":
    vocabulary = sent140_vocabulary(directory) if vocabulary is None else vocabulary
    word_ids = {w: i for i, w in enumerate(vocabulary)}
  for user, data in iter_leaf_users(directory):
    yield (user, *decode_user(kind, user, data, word_ids, max_words))


def vocabulary_of(kind: str, directory: str | os.PathLike | None = None) -> tuple[str, ...]:
  """The id -> token table of a LEAF dataset (Sent140's is built from ``directory``)."""
  _check_kind(kind)
  if kind == "shakespeare":
    return (*ALL_LETTERS, "<oov>")  # "<oov>" has id OOV_ID.
  if kind == "sent140":
    return sent140_vocabulary(directory)
  return ()


def read_leaf(
    directory: str | os.PathLike,
    kind: str,
    vocabulary: Sequence[str] | None = None,
    max_words: int = 25,
) -> LeafData:
  """Reads every JSON file of a LEAF split folder into one dataset.

  Args:
    directory: Folder of LEAF JSON files (e.g. ``femnist/data/train``).
    kind: One of ``LEAF_DATASETS``.
    vocabulary: Sent140 only, see ``iter_leaf``.
    max_words: Sent140 only: tokens kept per tweet.

  Returns:
    A ``LeafData``.

  Raises:
    FileNotFoundError: If the folder has no JSON file.
    ValueError: If ``kind`` is unknown or the files are inconsistent.
  """
  _check_kind(kind)
  if kind == "sent140" and vocabulary is None:
    vocabulary = sent140_vocabulary(directory)
  users, xs, ys = [], [], []
  for user, x, y in iter_leaf(directory, kind, vocabulary, max_words):
    users.append(user)
    xs.append(x)
    ys.append(y)
  if not users:
    raise ValueError(f"the LEAF files in {directory} list no users")
  sizes = [len(y) for y in ys]
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  dataset = FederatedDataset(
      x=np.concatenate(xs), y=np.concatenate(ys), offsets=offsets, client_ids=tuple(users)
  )
  table = tuple(vocabulary) if kind == "sent140" else vocabulary_of(kind)
  return LeafData(dataset=dataset, vocabulary=table)


def write_leaf(
    path: str | os.PathLike,
    user_data: Mapping[str, Mapping[str, Sequence]],
    hierarchies: Sequence[str] | None = None,
) -> Path:
  """Writes users in LEAF's JSON layout (used to build fixtures and exports).

  Args:
    path: Destination ``.json`` file.
    user_data: user -> ``{"x": [...], "y": [...]}`` of JSON-serialisable
      values, in the order the users are listed.
    hierarchies: Optional group of each user (LEAF's ``hierarchies``, e.g.
      the play of a Shakespeare role).

  Returns:
    ``path``.

  Raises:
    ValueError: If a user's ``x`` and ``y`` differ in length.
  """
  users = list(user_data)
  for user in users:
    if len(user_data[user]["x"]) != len(user_data[user]["y"]):
      raise ValueError(f"user {user!r}: x and y must have the same length")
  content: dict[str, Any] = {
      "users": users,
      "num_samples": [len(user_data[u]["y"]) for u in users],
      "user_data": {u: {"x": list(user_data[u]["x"]), "y": list(user_data[u]["y"])}
                    for u in users},
  }
  if hierarchies is not None:
    content["hierarchies"] = list(hierarchies)
  path = Path(path)
  path.write_text(json.dumps(content))
  return path
