"""Atomic files: checkpoints of the server state and line-appended metrics.

Every write goes to a temporary file in the same directory, is fsynced, and is
renamed over the target, so an interruption leaves either the old file or the
new one, never a torn one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np


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
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, file_mode())
    with os.fdopen(fd, "wb") as handle:
      handle.write(data)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise


def write_json(path: str | Path, obj: Any) -> None:
  write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_checkpoint(path: str | Path, state: Any, extra: dict[str, Any]) -> None:
  """Saves a pytree of arrays plus JSON-serialisable `extra` as one .npz file."""
  leaves = jax.tree.leaves(state)
  arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  arrays["extra_json"] = np.frombuffer(json.dumps(extra).encode(), dtype=np.uint8)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_atomic(path, buffer.getvalue())


def load_checkpoint(path: str | Path, template: Any) -> tuple[Any, dict[str, Any]]:
  """Restores a pytree with the structure of `template` and the saved `extra`.

  Raises:
    ValueError: the file does not match the template (e.g. another model).
  """
  with np.load(path) as data:
    leaves_t, treedef = jax.tree.flatten(template)
    names = sorted(name for name in data.files if name.startswith("leaf_"))
    if len(names) != len(leaves_t):
      raise ValueError(f"checkpoint {path} holds {len(names)} arrays, the run expects "
                       f"{len(leaves_t)}: was it written by another config?")
    leaves = []
    for name, expected in zip(names, leaves_t):
      leaf = data[name]
      dtype = expected.dtype if hasattr(expected, "dtype") else np.result_type(expected)
      if leaf.dtype.kind == "V" and leaf.dtype.itemsize == np.dtype(dtype).itemsize:
        # npz keeps extension dtypes such as bfloat16 only as raw bytes.
        leaf = leaf.view(dtype)
      if leaf.shape != np.shape(expected) or leaf.dtype != dtype:
        raise ValueError(f"checkpoint {path}: {name} has shape {leaf.shape} and dtype "
                         f"{leaf.dtype}, the run expects shape {np.shape(expected)} and dtype "
                         f"{np.dtype(dtype)}: was it written by another config?")
      leaves.append(leaf)
    extra = json.loads(data["extra_json"].tobytes().decode())
  return jax.tree.unflatten(treedef, leaves), extra


class MetricsLog:
  """`metrics.jsonl`: one JSON object per line, each line appended and fsynced.

  On resume, `truncate_after(round)` atomically drops lines from rounds the
  checkpoint does not include, so the log never holds rounds twice.
  """

  def __init__(self, path: str | Path):
    self.path = Path(path)

  def append(self, record: dict[str, Any]) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a") as handle:
      handle.write(json.dumps(record, sort_keys=True) + "\n")
      handle.flush()
      os.fsync(handle.fileno())

  def read(self) -> list[dict[str, Any]]:
    if not self.path.exists():
      return []
    records = []
    for line in self.path.read_text().splitlines():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break  # A line torn by a crash mid-append ends the valid log.
    return records

  def truncate_after(self, round_index: int) -> None:
    kept = [r for r in self.read() if r["round"] <= round_index]
    write_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept).encode())
