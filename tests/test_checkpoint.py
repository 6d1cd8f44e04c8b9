"""Tests of `fedjax_priv.checkpoint`: atomic writes, checkpoints, the metrics log."""

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv import checkpoint as ckpt


def _names(directory):
  return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------
# write_atomic / write_json.


def test_write_atomic_creates_and_replaces_without_temp_files(tmp_path):
  path = tmp_path / "sub" / "dir" / "file.bin"
  ckpt.write_atomic(path, b"old contents")
  assert path.read_bytes() == b"old contents"
  ckpt.write_atomic(path, b"new")
  assert path.read_bytes() == b"new"
  assert _names(path.parent) == ["file.bin"]  # No leftover .file.bin.*.tmp.


def test_write_atomic_failed_rename_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "file.bin"
  ckpt.write_atomic(path, b"old contents")

  def failing_replace(src, dst):
    raise OSError("disk vanished")

  monkeypatch.setattr(os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk vanished"):
    ckpt.write_atomic(path, b"new contents that never land")
  monkeypatch.undo()
  assert path.read_bytes() == b"old contents"
  assert _names(tmp_path) == ["file.bin"]  # The temporary file was removed.


def test_write_atomic_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
  path = tmp_path / "file.bin"
  ckpt.write_atomic(path, b"old contents")

  def interrupted_fsync(fd):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "fsync", interrupted_fsync)
  with pytest.raises(KeyboardInterrupt):
    ckpt.write_atomic(path, b"new contents")
  monkeypatch.undo()
  assert path.read_bytes() == b"old contents"
  assert _names(tmp_path) == ["file.bin"]


def test_write_json_round_trips(tmp_path):
  obj = {"b": [1, 2.5, "x"], "a": {"nested": None, "flag": True}}
  ckpt.write_json(tmp_path / "x.json", obj)
  text = (tmp_path / "x.json").read_text()
  assert json.loads(text) == obj
  assert text.endswith("\n")
  assert text.index('"a"') < text.index('"b"')  # Sorted keys: stable diffs.


# --------------------------------------------------------------------------
# save_checkpoint / load_checkpoint.


class _State(NamedTuple):
  params: dict
  opt_state: tuple
  round: jax.Array


def _state(seed=0):
  rng = np.random.default_rng(seed)
  return _State(
      params={
          "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                    "bias": jnp.asarray(rng.normal(size=3), jnp.float32)},
          "table": [np.arange(5, dtype=np.int64) * (seed + 1),
                    np.array([True, False, seed % 2 == 0])],
      },
      opt_state=(jnp.asarray(rng.normal(size=(2, 2)), jnp.float16),
                 np.asarray(rng.normal(size=(2,)), np.float64),
                 np.uint8(200 - seed)),
      round=jnp.int32(17 + seed),
  )


def _assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.asarray(g).dtype == np.asarray(w).dtype
    assert np.shape(g) == np.shape(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_checkpoint_round_trip_with_mixed_dtypes_and_extra(tmp_path):
  state = _state(seed=1)
  extra = {"round": 17, "totals": {"wall": 1.25, "compile": 0.5}, "tags": ["a", "b"],
           "config": {"privacy": {"delta": 1e-5, "unit": "user"}}, "none": None}
  path = tmp_path / "checkpoint.npz"
  ckpt.save_checkpoint(path, state, extra)
  assert _names(tmp_path) == ["checkpoint.npz"]
  # Another state of the same structure (different values) is a valid template.
  restored, restored_extra = ckpt.load_checkpoint(path, _state(seed=0))
  assert isinstance(restored, _State)
  _assert_trees_equal(restored, state)
  assert restored_extra == extra


def test_checkpoint_many_leaves_keep_their_order(tmp_path):
  # More than 10 leaves: names must sort numerically, not as "1, 10, 2".
  state = [np.full((i + 1,), i, np.int32) for i in range(23)]
  ckpt.save_checkpoint(tmp_path / "c.npz", state, {})
  restored, _ = ckpt.load_checkpoint(tmp_path / "c.npz", state)
  _assert_trees_equal(restored, state)


def test_checkpoint_round_trip_bfloat16(tmp_path):
  # Mixed-precision models keep bfloat16 params; they must come back as such.
  state = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3), "b": jnp.zeros(3, jnp.float32)}
  ckpt.save_checkpoint(tmp_path / "c.npz", state, {})
  restored, _ = ckpt.load_checkpoint(tmp_path / "c.npz", state)
  assert np.asarray(restored["w"]).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(restored["w"], np.float32),
                                np.arange(6, dtype=np.float32).reshape(2, 3))


def test_load_with_mismatched_shape_names_the_shape(tmp_path):
  path = tmp_path / "checkpoint.npz"
  ckpt.save_checkpoint(path, {"w": np.zeros((4, 3), np.float32)}, {"round": 1})
  with pytest.raises(ValueError) as info:
    ckpt.load_checkpoint(path, {"w": np.zeros((4, 5), np.float32)})
  message = str(info.value)
  assert "(4, 3)" in message and "(4, 5)" in message


def test_load_with_another_number_of_leaves(tmp_path):
  path = tmp_path / "checkpoint.npz"
  ckpt.save_checkpoint(path, {"w": np.zeros(3), "b": np.zeros(2)}, {})
  with pytest.raises(ValueError) as info:
    ckpt.load_checkpoint(path, {"w": np.zeros(3)})
  assert "2 arrays" in str(info.value) and "expects 1" in str(info.value)


def test_save_overwrites_previous_checkpoint(tmp_path):
  path = tmp_path / "checkpoint.npz"
  ckpt.save_checkpoint(path, _state(0), {"round": 1})
  ckpt.save_checkpoint(path, _state(2), {"round": 2})
  restored, extra = ckpt.load_checkpoint(path, _state(0))
  _assert_trees_equal(restored, _state(2))
  assert extra == {"round": 2}
  assert _names(tmp_path) == ["checkpoint.npz"]


# --------------------------------------------------------------------------
# MetricsLog.


def test_metrics_log_append_and_read(tmp_path):
  log = ckpt.MetricsLog(tmp_path / "out" / "metrics.jsonl")
  assert log.read() == []  # No file yet.
  records = [{"round": r, "test_accuracy": r / 10, "epsilon": "inf"} for r in (2, 4, 6)]
  for record in records:
    log.append(record)
  assert log.read() == records
  assert len(log.path.read_text().splitlines()) == 3


def test_metrics_log_read_stops_at_torn_last_line(tmp_path):
  log = ckpt.MetricsLog(tmp_path / "metrics.jsonl")
  log.append({"round": 2, "x": 1.0})
  log.append({"round": 4, "x": 2.0})
  with open(log.path, "a") as handle:
    handle.write('{"round": 6, "x": 3.')  # A crash mid-append.
  assert log.read() == [{"round": 2, "x": 1.0}, {"round": 4, "x": 2.0}]


def _digest_after(tmp_path, rounds):
  """The digest a log holding `rounds` has (as a checkpoint at the last of them stores)."""
  log = ckpt.MetricsLog(tmp_path / "reference.jsonl")
  for r in rounds:
    log.append({"round": r})
  return log.digest()


def test_metrics_log_verified_prefix_keeps_lines_up_to_the_checkpoint(tmp_path):
  log = ckpt.MetricsLog(tmp_path / "metrics.jsonl")
  for r in (2, 4, 6, 8):
    log.append({"round": r})
  prefix = log.verified_prefix(4, _digest_after(tmp_path, (2, 4)))
  assert log.path.read_text().count("\n") == 4  # Verifying changes nothing.
  log.reset(prefix)
  assert [r["round"] for r in log.read()] == [2, 4]
  assert log.digest() == _digest_after(tmp_path, (2, 4))
  log.reset()
  assert log.read() == [] and log.path.read_text() == ""


def test_truncate_drops_torn_line_so_appends_stay_readable(tmp_path):
  log = ckpt.MetricsLog(tmp_path / "metrics.jsonl")
  log.append({"round": 2})
  with open(log.path, "a") as handle:
    handle.write('{"round": 4')
  log.reset(log.verified_prefix(2, _digest_after(tmp_path, (2,))))
  log.append({"round": 4})
  assert [r["round"] for r in log.read()] == [2, 4]


@pytest.mark.parametrize("bad, problem", [
    (b"\xff\xfe not utf-8\n", "not valid JSON"),
    (b'{"round": 4, "x": 1\n', "not valid JSON"),   # A complete line, damaged.
    (b"[4]\n", "not a JSON object"),
    (b'{"x": 1}\n', "no integer 'round'"),
    (b'{"round": "4"}\n', "no integer 'round'"),
])
def test_a_bad_line_in_the_middle_is_an_error_not_a_truncation(tmp_path, bad, problem):
  log = ckpt.MetricsLog(tmp_path / "metrics.jsonl")
  log.append({"round": 2})
  with open(log.path, "ab") as handle:
    handle.write(bad)
  log.append({"round": 6})
  before = log.path.read_bytes()
  with pytest.raises(ckpt.CorruptStateError, match=f"line 2: {problem}"):
    log.verified_prefix(2, _digest_after(tmp_path, (2,)))
  with pytest.raises(ckpt.CorruptStateError, match="line 2"):
    log.read()
  assert log.path.read_bytes() == before


def test_verified_prefix_refuses_edited_or_missing_lines(tmp_path):
  log = ckpt.MetricsLog(tmp_path / "metrics.jsonl")
  for record in ({"round": 2, "acc": 0.5}, {"round": 4, "acc": 0.6}):
    log.append(record)
  digest = log.digest()
  log.path.write_text(log.path.read_text().replace("0.6", "0.9"))
  with pytest.raises(ckpt.CorruptStateError, match="differ from those the checkpoint recorded"):
    log.verified_prefix(4, digest)
  log.path.write_text('{"round": 2, "acc": 0.5}\n')
  with pytest.raises(ckpt.CorruptStateError, match="lines are missing"):
    log.verified_prefix(4, digest)


def test_damaged_checkpoint_is_refused_naming_the_file(tmp_path):
  path = tmp_path / "checkpoint.npz"
  ckpt.save_checkpoint(path, _state(0), {"round": 1})
  data = path.read_bytes()
  damaged = {"truncated": data[: len(data) // 2], "empty": b"",
             "flipped": data[:200] + bytes([data[200] ^ 0xFF]) + data[201:],
             "not a zip": b"hello" * 100}
  for name, bytes_ in damaged.items():
    path.write_bytes(bytes_)
    with pytest.raises(ckpt.CorruptStateError, match="checkpoint.npz: corrupted checkpoint"):
      ckpt.load_checkpoint(path, _state(0))
    assert path.read_bytes() == bytes_, name  # Nothing rewritten or deleted.


def test_write_error_is_one_line_naming_the_path(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(ckpt.WriteError) as info:
    ckpt.write_atomic(tmp_path / "file" / "sub" / "out.json", b"{}")
  message = str(info.value)
  assert "\n" not in message and str(tmp_path / "file") in message
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_every_output_file_gets_the_umask_mode(tmp_path, umask):
  from fedjax_priv import metric_writers
  old = os.umask(umask)
  try:
    ckpt.write_atomic(tmp_path / "a.bin", b"x")
    ckpt.write_json(tmp_path / "b.json", {"a": 1})
    ckpt.save_checkpoint(tmp_path / "c.npz", {"w": np.zeros(2)}, {"round": 1})
    ckpt.MetricsLog(tmp_path / "metrics.jsonl").append({"round": 1})
    writer = metric_writers.CsvWriter(tmp_path, 0, [])
    writer.write_rounds(0, {"train_loss": np.ones(2)})
    writer.write_evaluation({"round": 1, "test_accuracy": 0.5})
  finally:
    os.umask(old)
  modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
  assert len(modes) == 6
  assert set(modes.values()) == {0o666 & ~umask}, modes
