"""The run-directory protocol: a run owns its `--out`, and its files are proven to belong together.

A run directory holds config.json, checkpoint.npz, metrics.jsonl and
summary.json (see `runner`), plus:

  manifest.json  the run id and, for config.json, checkpoint.npz and
                 summary.json, the SHA-256 of every version of the file the
                 run accepts (null: the file may be absent). Replacing a file
                 is two-phase: the manifest first lists the old state and the
                 new hash, then the file is replaced, then the manifest lists
                 only the new one; a kill at any moment leaves a state the
                 manifest accepts.
  .lock          the pid and host of the run that holds the directory, under
                 an exclusive `flock` that the kernel drops when the process
                 dies (kill -9 included), so a lock file left behind by a dead
                 run is recognised as stale and taken over.

metrics.jsonl is tied to the run through the checkpoint: the checkpoint
stores the line count and SHA-256 of the log up to its round
(`checkpoint.MetricsLog.digest`). The ledger in a checkpoint is checked
against the one the run's privacy plans give for its round count, and
against a hash of the run's privacy description.

The protocol: `RunDirectory.acquire` locks (a second run exits with one
line), removes temporary files of killed atomic writes, and refuses a path
that cannot be written. `restore` verifies everything a `--resume` would
use and changes nothing: a mix of runs, a corrupt file or an edited ledger is
refused with one line naming the file. `begin` is the first write, called
only after every check of the run has passed: with `overwrite` it is the
moment the old run's files go.

`flock` is advisory and local: it does not protect a directory shared over
NFS between hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, NamedTuple

from fedjax_priv import checkpoint as ckpt

MANIFEST = "manifest.json"
CONFIG = "config.json"
CHECKPOINT = "checkpoint.npz"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"
# The files of a run; a directory holding any of them holds a run.
RUN_FILES = (MANIFEST, CONFIG, CHECKPOINT, METRICS, SUMMARY)
# Files the run rewrites from those above (`metric_writers`, `plots`): not
# part of the protocol, but their temporary files are debris all the same.
DERIVED_FILES = ("metrics.csv", "rounds.csv", "curves.png")
_HASHED = (CONFIG, CHECKPOINT, SUMMARY)
_FORMAT = 1

_log = logging.getLogger(__name__)


class RunDirectoryError(ValueError):
  """A refusal about the output directory; the message is one line naming the path."""


def privacy_digest(description: dict[str, Any]) -> str:
  """SHA-256 of the privacy part of a run's description (config.json's [privacy] section)."""
  return ckpt.sha256(json.dumps(description.get("privacy"), sort_keys=True,
                                default=repr).encode())


def check_writable(path: str | Path) -> Path:
  """Creates `path` if needed and proves a file can be written in it.

  A sweep calls this before it trains, so a bad `--out` costs nothing.

  Raises:
    RunDirectoryError: the path is a file, its parent is a file, or it is
      not writable, naming the path and the reason.
  """
  path = Path(path)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise RunDirectoryError(f"output directory {path} is a file, not a directory") from None
  except OSError as error:
    raise RunDirectoryError(f"cannot create output directory {path}: "
                            f"{error.strerror or error}") from None
  if not path.is_dir():
    raise RunDirectoryError(f"output directory {path} is not a directory")
  try:
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as error:
    raise RunDirectoryError(f"output directory {path} is not writable: "
                            f"{error.strerror or error}") from None
  return path


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Restored(NamedTuple):
  """What `restore` verified: the state to continue from (None: start at round 0)."""
  run_id: str
  state: Any
  extra: dict[str, Any] | None
  config: dict[str, Any] | None  # config.json of the run, as saved
  metrics_prefix: bytes


class RunDirectory:
  """One run's output directory; see the module docstring for the protocol."""

  def __init__(self, path: str | Path):
    self.path = Path(path)
    self.metrics = ckpt.MetricsLog(self.path / METRICS)
    self._lock_fd: int | None = None
    self._manifest: dict[str, Any] | None = None

  # -- Locking. -------------------------------------------------------------

  def acquire(self) -> None:
    """Checks the path, takes the lock, and removes temporary files of killed writes.

    Raises:
      RunDirectoryError: the path cannot be written, or another live run
        holds it.
    """
    check_writable(self.path)
    lock_path = self.path / LOCK
    while True:
      try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as error:
        raise RunDirectoryError(f"cannot create the lock file {lock_path}: "
                                f"{error.strerror or error}") from None
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        owner = self._lock_owner(fd)
        os.close(fd)
        raise RunDirectoryError(
            f"{self.path} is in use by another run ({owner}; lock file {lock_path}): wait for it "
            "to finish or choose another --out") from None
      # The holder before us may have removed the file between our open and
      # our flock; then we hold a lock on a file nobody else can see.
      try:
        same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    owner = self._lock_owner(fd)
    if owner:
      _log.warning("%s: took over the stale lock of a run that is no longer running (%s)",
                   self.path, owner)
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, record, 0)
    except OSError as error:
      os.close(fd)
      raise RunDirectoryError(f"cannot write the lock file {lock_path}: "
                              f"{error.strerror or error}") from None
    self._lock_fd = fd
    self._remove_temporary_files()

  @staticmethod
  def _lock_owner(fd: int) -> str:
    """'pid P on host H' from a lock file's contents, '' when it holds none."""
    try:
      data = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
      return "unreadable lock file"
    if not isinstance(data, dict):
      return ""
    pid, host = data.get("pid"), data.get("host")
    alive = ""
    if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
      alive = ", not running"
    return f"pid {pid} on host {host}{alive}"

  def release(self) -> None:
    """Removes the lock file and drops the lock (the kernel drops it too if we die)."""
    if self._lock_fd is None:
      return
    # A directory made read-only meanwhile keeps the file: the next run sees
    # a lock nobody holds and takes it over.
    with contextlib.suppress(OSError):
      (self.path / LOCK).unlink(missing_ok=True)
    os.close(self._lock_fd)
    self._lock_fd = None

  def _remove_temporary_files(self) -> None:
    # `checkpoint.write_atomic` names them .NAME.RANDOM.tmp; under our lock no
    # writer of this directory is alive, so every one of them is debris.
    for name in RUN_FILES + DERIVED_FILES:
      for tmp in self.path.glob(f".{name}.*.tmp"):
        tmp.unlink(missing_ok=True)

  # -- Reading and verifying. ------------------------------------------------

  def holds_run(self) -> list[str]:
    """The run files present (empty: the directory holds no run)."""
    return [name for name in RUN_FILES if (self.path / name).exists()]

  def _read_manifest(self) -> dict[str, Any]:
    path = self.path / MANIFEST
    try:
      manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
      raise ckpt.CorruptStateError(f"{path}: not valid JSON ({error}); nothing was "
                                   "changed") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != _FORMAT
        or not isinstance(manifest.get("run_id"), str)
        or not all(isinstance(manifest.get(name), list) for name in _HASHED)):
      raise ckpt.CorruptStateError(f"{path}: not a manifest of format {_FORMAT}; nothing was "
                                   "changed")
    return manifest

  def _verified_bytes(self, manifest: dict[str, Any], name: str) -> bytes | None:
    """The file's bytes if its hash is one the manifest accepts; None if it is absent."""
    path = self.path / name
    if not path.exists():
      return None
    data = path.read_bytes()
    if ckpt.sha256(data) not in manifest[name]:
      raise RunDirectoryError(
          f"{path} is not the {name} that run {manifest['run_id']} wrote (its SHA-256 is not in "
          f"{self.path / MANIFEST}): corrupted, edited, or left by another run; nothing was "
          "changed (start over with --overwrite)")
    return data

  def restore(self, resume: bool, overwrite: bool, template: Any,
              expected_ledgers: Callable[[int], dict[str, dict]],
              description: dict[str, Any],
              check_description: Callable[[dict[str, Any]], None]) -> Restored | None:
    """Verifies what the run will start from; changes nothing.

    Args:
      resume: continue the run in the directory.
      overwrite: replace the run in the directory (at `begin`).
      template: a server state of the run's structure (for the checkpoint).
      expected_ledgers: round count -> {unit: ledger state_dict} the run's
        privacy plans give for that many rounds.
      description: the run's description (privacy part hashed).
      check_description: raises ValueError naming the key where a saved
        description (config.json, the checkpoint's) differs from the run's
        in a way a resume may not.

    Returns:
      None for a fresh run; else what to resume from.

    Raises:
      RunDirectoryError: refusals (a run is there without --resume or
        --overwrite, nothing to resume, files of different runs).
      checkpoint.CorruptStateError: a damaged file, named.
    """
    present = self.holds_run()
    if resume and overwrite:
      raise RunDirectoryError("--resume and --overwrite exclude each other: continue the run in "
                              f"{self.path} or replace it")
    if not resume:
      if present and not overwrite:
        raise RunDirectoryError(
            f"{self.path} already holds a run ({', '.join(present)}): pass --resume to continue "
            "it or --overwrite to replace it")
      return None
    if MANIFEST not in present:
      if present:
        raise RunDirectoryError(
            f"cannot resume: {self.path} holds {', '.join(present)} but no {MANIFEST} (written "
            "by an older version, or damaged); pass --overwrite to start over")
      raise RunDirectoryError(f"cannot resume: {self.path} holds no run (nothing to resume)")
    manifest = self._read_manifest()
    run_id = manifest["run_id"]
    summary = self._verified_bytes(manifest, SUMMARY)  # A stale summary is a mix of runs.
    config_bytes = self._verified_bytes(manifest, CONFIG)
    saved_config = None
    if config_bytes is not None:
      try:
        saved_config = json.loads(config_bytes)
      except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ckpt.CorruptStateError(f"{self.path / CONFIG}: not valid JSON ({error}); "
                                     "nothing was changed") from None
      if not isinstance(saved_config, dict):
        raise ckpt.CorruptStateError(f"{self.path / CONFIG}: not a JSON object; nothing was "
                                     "changed")
      check_description(saved_config)
    checkpoint = self._verified_bytes(manifest, CHECKPOINT)
    if checkpoint is None:
      if None not in manifest[CHECKPOINT]:
        raise RunDirectoryError(
            f"cannot resume: {self.path / CHECKPOINT} is missing, but run {run_id} wrote one; "
            "nothing was changed")
      # Killed before its first checkpoint: the run starts again at round 0.
      state = extra = None
      prefix = self.metrics.verified_prefix(0, {"lines": 0, "sha256": ckpt.sha256(b"")})
    else:
      state, extra = ckpt.load_checkpoint(self.path / CHECKPOINT, template, checkpoint)
      round_index = self._check_extra(extra, run_id, description, expected_ledgers,
                                      check_description)
      prefix = self.metrics.verified_prefix(round_index, extra["metrics"])
    # From now on the manifest accepts exactly the files that are there.
    self._manifest = {**manifest, **{
        name: [None if data is None else ckpt.sha256(data)]
        for name, data in ((SUMMARY, summary), (CONFIG, config_bytes), (CHECKPOINT, checkpoint))}}
    return Restored(run_id, state, extra, saved_config, prefix)

  def _check_extra(self, extra: dict[str, Any], run_id: str, description: dict[str, Any],
                   expected_ledgers: Callable[[int], dict[str, dict]],
                   check_description: Callable[[dict[str, Any]], None]) -> int:
    """The checkpoint's round, once its bookkeeping is proven to be this run's."""
    path = self.path / CHECKPOINT
    for key, kind in (("round", int), ("totals", dict), ("ledgers", dict), ("config", dict),
                      ("run_id", str), ("privacy_sha256", str), ("metrics", dict)):
      if not isinstance(extra.get(key), kind) or isinstance(extra.get(key), bool):
        raise ckpt.CorruptStateError(f"{path}: no valid '{key}' in its bookkeeping; nothing "
                                     "was changed")
    metrics = extra["metrics"]
    if not (isinstance(metrics.get("lines"), int) and metrics["lines"] >= 0
            and isinstance(metrics.get("sha256"), str)):
      raise ckpt.CorruptStateError(f"{path}: no valid metrics digest; nothing was changed")
    if extra["run_id"] != run_id:
      raise RunDirectoryError(
          f"{path} belongs to run {extra['run_id']}, {self.path / MANIFEST} to run {run_id}: "
          "files of two runs are mixed; nothing was changed")
    check_description(extra["config"])
    round_index = extra["round"]
    if round_index < 0:
      raise ckpt.CorruptStateError(f"{path}: round {round_index} < 0; nothing was changed")
    if extra["privacy_sha256"] != privacy_digest(description):
      raise ckpt.CorruptStateError(
          f"{path}: its ledger was written for another privacy configuration (the hash of the "
          "privacy description differs); nothing was changed")
    expected = expected_ledgers(round_index)
    saved = extra["ledgers"]
    for unit, ledger in saved.items():
      rounds = ledger.get("rounds") if isinstance(ledger, dict) else None
      if rounds != round_index:
        raise ckpt.CorruptStateError(
            f"{path}: the {unit}-level ledger holds {rounds} rounds, the checkpoint is at round "
            f"{round_index}: the ledger was edited; nothing was changed")
    # JSON round trip: the saved ledger went through json.dumps/loads.
    if json.loads(json.dumps(expected)) != saved:
      raise ckpt.CorruptStateError(
          f"{path}: the privacy ledger differs from the events of {round_index} rounds of this "
          "run's mechanism: the ledger was edited; nothing was changed")
    return round_index

  # -- Writing. --------------------------------------------------------------

  def begin(self, restored: Restored | None, description: dict[str, Any]) -> str:
    """The run's first write, after every check passed; returns the run id.

    A fresh run removes the files of any run the directory held
    (`restore` refused unless overwrite was asked for), then writes a new
    manifest and config.json. A resumed run cuts metrics.jsonl back to the
    verified lines and records its (possibly changed) config.json.
    """
    if restored is None:
      for name in RUN_FILES:  # The manifest first: a half-removed run is no run.
        (self.path / name).unlink(missing_ok=True)
      self._manifest = {"format": _FORMAT, "run_id": uuid.uuid4().hex,
                        **{name: [None] for name in _HASHED}}
      self._write_manifest()
      self.metrics.reset()
    else:
      self.metrics.reset(restored.metrics_prefix)
    self._replace(CONFIG, ckpt.json_bytes(description))
    return self._manifest["run_id"]

  def _write_manifest(self) -> None:
    ckpt.write_atomic(self.path / MANIFEST, ckpt.json_bytes(self._manifest))

  def _replace(self, name: str, data: bytes) -> None:
    """Replaces a hashed file so that a kill at any moment leaves one the manifest accepts."""
    digest = ckpt.sha256(data)
    # The list holds the state of the file now: its hash, or None if absent.
    self._manifest[name] = self._manifest[name][-1:] + [digest]
    self._write_manifest()
    ckpt.write_atomic(self.path / name, data)
    self._manifest[name] = [digest]
    self._write_manifest()

  def save_checkpoint(self, state: Any, extra: dict[str, Any], description: dict[str, Any]
                      ) -> None:
    """Writes checkpoint.npz with the run id, the metrics digest and the privacy hash."""
    extra = {**extra, "run_id": self._manifest["run_id"], "metrics": self.metrics.digest(),
             "privacy_sha256": privacy_digest(description)}
    self._replace(CHECKPOINT, ckpt.checkpoint_bytes(state, extra))

  def write_summary(self, summary: dict[str, Any]) -> None:
    self._replace(SUMMARY, ckpt.json_bytes(summary))
