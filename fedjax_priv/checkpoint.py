"""Atomic files: checkpoints of the server state and line-appended metrics.

Every write goes to a temporary file in the same directory, is fsynced, and is
renamed over the target, so an interruption leaves either the old file or the
new one, never a torn one. Reads verify what they read: a damaged checkpoint
or metrics file raises `CorruptStateError` naming the file and the damage,
and nothing is rewritten on the way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import jax
import numpy as np


class CorruptStateError(ValueError):
  """A checkpoint or metrics file that cannot be trusted; the message is one line naming it."""


class WriteError(OSError):
  """An output file could not be written (read-only, disk full, ...); one line naming it."""

  def __init__(self, path: str | Path, error: OSError):
    super().__init__(error.errno, f"cannot write {path}: {error.strerror or error}")
    self.filename = str(path)

  def __str__(self) -> str:
    return self.strerror


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()
def file_mode() -> int:
  """The mode `open()` gives a new file: 0o666 less the process's umask.

  Every output file gets it, so a run directory does not mix the 0600 of
  `tempfile.mkstemp` with the umask's mode of appended files.
  """
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def write_atomic(path: str | Path, data: bytes) -> None:
  """Writes `data` to `path` so that readers see the old or the new file, whole.

  The file gets `file_mode()`, as if created with open().

  Raises:
    WriteError: the directory or the disk refused (the old file is kept).
  """
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  except OSError as error:
    raise WriteError(path, error) from None
  try:
    os.fchmod(fd, file_mode())
    with os.fdopen(fd, "wb") as handle:
      handle.write(data)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
  except OSError as error:
    Path(tmp).unlink(missing_ok=True)
    raise WriteError(path, error) from None
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_json(path: str | Path, obj: Any) -> None:
  write_atomic(path, json_bytes(obj))


def json_bytes(obj: Any) -> bytes:
  """The bytes `write_json` writes for `obj` (sorted keys, so equal objects hash equal)."""
  return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def checkpoint_bytes(state: Any, extra: dict[str, Any]) -> bytes:
  """A pytree of arrays plus JSON-serialisable `extra` as the bytes of one .npz file."""
  leaves = jax.tree.leaves(state)
  arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  arrays["extra_json"] = np.frombuffer(json.dumps(extra).encode(), dtype=np.uint8)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def save_checkpoint(path: str | Path, state: Any, extra: dict[str, Any]) -> None:
  """Saves a pytree of arrays plus JSON-serialisable `extra` as one .npz file."""
  write_atomic(path, checkpoint_bytes(state, extra))


def _decode_npz(path: Path, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Every array of the archive and its `extra`, each member's CRC checked as it is read."""
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
      arrays = {name: npz[name] for name in npz.files}
    extra = json.loads(arrays.pop("extra_json").tobytes().decode())
  except KeyError:
    raise CorruptStateError(f"{path}: corrupted checkpoint (no extra_json member); the file "
                            "is kept") from None
  except (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError,
          UnicodeDecodeError) as error:
    problem = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise CorruptStateError(f"{path}: corrupted checkpoint ({type(error).__name__}: "
                            f"{problem}); the file is kept") from None
  if not isinstance(extra, dict):
    raise CorruptStateError(f"{path}: corrupted checkpoint (extra_json is not an object); "
                            "the file is kept")
  return arrays, extra


def load_checkpoint(path: str | Path, template: Any, data: bytes | None = None
                    ) -> tuple[Any, dict[str, Any]]:
  """Restores a pytree with the structure of `template` and the saved `extra`.

  Args:
    path: the checkpoint file (named in errors).
    template: a pytree of the expected structure, shapes and dtypes.
    data: the file's bytes when the caller has already read (and hashed) them.

  Raises:
    CorruptStateError: the file is truncated, byte-flipped or not an archive.
    ValueError: the file does not match the template (e.g. another model).
  """
  path = Path(path)
  if data is None:
    data = path.read_bytes()
  arrays, extra = _decode_npz(path, data)
  leaves_t, treedef = jax.tree.flatten(template)
  names = sorted(name for name in arrays if name.startswith("leaf_"))
  if len(names) != len(leaves_t):
    raise ValueError(f"checkpoint {path} holds {len(names)} arrays, the run expects "
                     f"{len(leaves_t)}: was it written by another config?")
  leaves = []
  for name, expected in zip(names, leaves_t):
    leaf = arrays[name]
    dtype = expected.dtype if hasattr(expected, "dtype") else np.result_type(expected)
    if leaf.dtype.kind == "V" and leaf.dtype.itemsize == np.dtype(dtype).itemsize:
      # npz keeps extension dtypes such as bfloat16 only as raw bytes.
      leaf = leaf.view(dtype)
    if leaf.shape != np.shape(expected) or leaf.dtype != dtype:
      raise ValueError(f"checkpoint {path}: {name} has shape {leaf.shape} and dtype "
                       f"{leaf.dtype}, the run expects shape {np.shape(expected)} and dtype "
                       f"{np.dtype(dtype)}: was it written by another config?")
    leaves.append(leaf)
  return jax.tree.unflatten(treedef, leaves), extra


def _line_bytes(record: dict[str, Any]) -> bytes:
  return (json.dumps(record, sort_keys=True) + "\n").encode()


class MetricsLog:
  """`metrics.jsonl`: one JSON object with an integer `round` per line, appended and fsynced.

  The log keeps a running digest (line count and SHA-256 of its bytes) of
  what it holds; a checkpoint stores it, so a resume can prove that the
  lines up to the checkpoint's round are the ones that run wrote
  (`verified_prefix`). Only a torn last line (a crash mid-append, no
  newline) is ever dropped silently; any complete line that is not a
  record is an error, never a truncation.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self._hash = hashlib.sha256()
    self._lines = 0

  def digest(self) -> dict[str, Any]:
    """{"lines": n, "sha256": hex} of the lines this log has written or been reset to."""
    return {"lines": self._lines, "sha256": self._hash.hexdigest()}

  def append(self, record: dict[str, Any]) -> None:
    line = _line_bytes(record)
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with open(self.path, "ab") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as error:
      raise WriteError(self.path, error) from None
    self._hash.update(line)
    self._lines += 1

  def _complete_lines(self) -> list[bytes]:
    """The file's complete lines (newline kept), each checked to be a record.

    Raises:
      CorruptStateError: a complete line is not JSON, not an object, or has
        no integer `round`, naming the line.
    """
    if not self.path.exists():
      return []
    data = self.path.read_bytes()
    lines = data.splitlines(keepends=True)
    if lines and not lines[-1].endswith(b"\n"):
      lines.pop()  # Torn by a crash mid-append: never fsynced whole, so never counted.
    for number, line in enumerate(lines, 1):
      try:
        record = json.loads(line)
      except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptStateError(f"{self.path} line {number}: not valid JSON ({error}); the file "
                                "is kept as it is") from None
      if not isinstance(record, dict):
        raise CorruptStateError(f"{self.path} line {number}: not a JSON object; the file is "
                                "kept as it is")
      round_index = record.get("round")
      if isinstance(round_index, bool) or not isinstance(round_index, int):
        raise CorruptStateError(f"{self.path} line {number}: no integer 'round' "
                                f"(got {round_index!r}); the file is kept as it is")
    return lines

  def read(self) -> list[dict[str, Any]]:
    """Every complete record (a torn last line is left out).

    Raises:
      CorruptStateError: a complete line is not a record (see `verified_prefix`).
    """
    return [json.loads(line) for line in self._complete_lines()]

  def verified_prefix(self, round_index: int, digest: dict[str, Any]) -> bytes:
    """The lines up to `round_index`, checked against the `digest` a checkpoint stored.

    Lines after them must all be of later rounds (written after the
    checkpoint; the resumed run writes them again). Nothing is written.

    Raises:
      CorruptStateError: a bad line anywhere, lines missing or edited before
        the checkpoint's round, or rounds out of order.
    """
    lines = self._complete_lines()
    count = digest["lines"]
    if len(lines) < count:
      raise CorruptStateError(
          f"{self.path}: holds {len(lines)} complete lines, the checkpoint at round "
          f"{round_index} recorded {count}: lines are missing; the file is kept as it is")
    prefix = b"".join(lines[:count])
    if sha256(prefix) != digest["sha256"]:
      raise CorruptStateError(
          f"{self.path}: the {count} lines up to round {round_index} differ from those the "
          "checkpoint recorded (edited, or from another run); the file is kept as it is")
    previous = json.loads(lines[count - 1])["round"] if count else 0
    for number, line in enumerate(lines[count:], count + 1):
      later = json.loads(line)["round"]
      if later <= max(previous, round_index):
        raise CorruptStateError(
            f"{self.path} line {number}: round {later} after round {previous} (the checkpoint "
            f"is at round {round_index}): the log is out of order; the file is kept as it is")
      previous = later
    return prefix

  def reset(self, prefix: bytes = b"") -> None:
    """Makes the file hold exactly `prefix` (whole lines), atomically; the digest follows."""
    if not self.path.exists() or self.path.read_bytes() != prefix:
      write_atomic(self.path, prefix)
    self._hash = hashlib.sha256(prefix)
    self._lines = prefix.count(b"\n")
