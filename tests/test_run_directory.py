"""Tests of the run-directory protocol (`fedjax_priv.run_directory`) and the (ε, δ) budget.

The critical cases of issue 15, each of which lost data or misreported on the
code before the protocol: a refused run deleted the previous run's metrics
(1), files of two runs were mixed on resume (2), one bad byte truncated
metrics.jsonl (3), two runs wrote one directory (4), the budget checked ε
only (5). Then: kill -9 at random moments and resume; corruption of every
state file; output paths that cannot be written. Runs are tiny (logistic
regression, <= 60 clients, <= 8 rounds).
"""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from fedjax_priv import budget
from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv import run_directory
from fedjax_priv import runner
from fedjax_priv.experiment import build
from fedjax_priv.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.usefixtures("module_compilation_cache")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("fedjax-priv")
# User level, Poisson cohorts of 4 out of 8, 6 rounds, evaluated and checkpointed every 2.
BASE = [
    "model.name=logistic_regression", "client.learning_rate=0.5", "client.local_steps=2",
    "client.batch_size=8", "data.num_clients=8", "simulation.cohort_size=4",
    "simulation.sampling=poisson", "privacy.unit=user", "privacy.noise_multiplier=0.5",
    "simulation.rounds=6", "simulation.eval_every=2", "simulation.checkpoint_every=2",
]
TOML = "\n".join(["[model]", 'name = "logistic_regression"', "[client]", "learning_rate = 0.5",
                  "local_steps = 2", "batch_size = 8", "[data]", "num_clients = 8",
                  "[privacy]", 'unit = "user"', "noise_multiplier = 0.5", "[simulation]",
                  "cohort_size = 4", 'sampling = "poisson"', "rounds = 6", "eval_every = 2",
                  "checkpoint_every = 2"]) + "\n"
# Truncated Poisson cohorts (capacity < 60 clients): every round adds to delta_total.
POISSON_60 = [
    "model.name=logistic_regression", "client.local_steps=1", "client.batch_size=8",
    "data.num_clients=60", "simulation.cohort_size=6", "simulation.sampling=poisson",
    "privacy.unit=user", "simulation.eval_every=1",
]
TIMING = ("wall_time_s", "compile_time_s", "eval_time_s")


def _config(*overrides):
  return config_lib.load(None, [*BASE, *overrides])


def _snapshot(directory):
  """Every file of a directory (names and bytes), the lock file aside."""
  return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())
          if p.is_file() and p.name != run_directory.LOCK}


def _lines(directory):
  return (Path(directory) / "metrics.jsonl").read_text().splitlines()


def _without_timing(lines):
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _cli(args, cache, timeout=300):
  env = {**os.environ, "FEDJAX_PRIV_CACHE": str(cache)}
  return subprocess.run([str(SCRIPT), *map(str, args)], env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished run of BASE: checkpoint at round 6, metrics for rounds 2, 4, 6."""
  out = tmp_path_factory.mktemp("finished")
  runner.run(_config(), out, progress=False)
  return out


@pytest.fixture(scope="module")
def exp():
  return build(_config())


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


# --------------------------------------------------------------------------
# Critical case 1: a refused run deletes the previous run's metrics.


def test_case1_refused_run_leaves_the_previous_run_whole(finished, tmp_path):
  out = _copy(finished, tmp_path / "out")
  before = _snapshot(out)
  with pytest.raises(run_directory.RunDirectoryError, match="already holds a run"):
    runner.run(_config("privacy.epsilon_budget=0.01"), out, progress=False)
  assert _snapshot(out) == before
  # With --overwrite the old files go only once every check has passed: the
  # budget check refuses first, so they stay.
  with pytest.raises(ValueError, match="epsilon_budget"):
    runner.run(_config("privacy.epsilon_budget=0.01"), out, progress=False, overwrite=True)
  assert _snapshot(out) == before
  summary = runner.run(_config(), out, resume=True, progress=False)
  assert [json.loads(line)["round"] for line in _lines(out)] == [2, 4, 6]
  assert summary["rounds"] == 6


def test_overwrite_replaces_the_run_once_checks_pass(finished, tmp_path):
  out = _copy(finished, tmp_path / "out")
  old_id = json.loads((out / "manifest.json").read_text())["run_id"]
  summary = runner.run(_config("simulation.rounds=2"), out, progress=False, overwrite=True)
  assert summary["rounds"] == 2 and summary["run_id"] != old_id
  assert [json.loads(line)["round"] for line in _lines(out)] == [2]


def test_resume_with_nothing_to_resume_and_both_flags_are_refused(exp, tmp_path):
  with pytest.raises(run_directory.RunDirectoryError, match="nothing to resume"):
    runner.run_experiment(exp, tmp_path / "empty", resume=True, progress=False)
  with pytest.raises(run_directory.RunDirectoryError, match="exclude each other"):
    runner.run_experiment(exp, tmp_path / "empty", resume=True, overwrite=True, progress=False)
  assert _snapshot(tmp_path / "empty") == {}


# --------------------------------------------------------------------------
# Critical case 2: a stale summary and another run's files get mixed.


@pytest.fixture(scope="module")
def killed_before_checkpoint(tmp_path_factory, fail_trainer_at_block):
  """Run B (seed 1), crashed in its second block before any checkpoint: metrics for round 2."""
  out = tmp_path_factory.mktemp("killed")
  with pytest.MonkeyPatch.context() as monkeypatch:
    fail_trainer_at_block(monkeypatch, 2, RuntimeError("killed"))
    with pytest.raises(RuntimeError):
      runner.run(_config("simulation.seed=1", "simulation.checkpoint_every=0"), out,
                 progress=False)
  assert not (out / "checkpoint.npz").exists() and len(_lines(out)) == 1
  return out


@pytest.mark.parametrize("name", ["summary.json", "config.json", "checkpoint.npz"])
def test_case2_a_file_of_another_run_is_refused_on_resume(finished, killed_before_checkpoint,
                                                          tmp_path, name):
  out = _copy(killed_before_checkpoint, tmp_path / "b")
  shutil.copy(finished / name, out / name)
  before = _snapshot(out)
  config = _config("simulation.seed=1", "simulation.checkpoint_every=0")
  with pytest.raises(ValueError, match=name):
    runner.run(config, out, resume=True, progress=False)
  assert _snapshot(out) == before


def test_case2_overwrite_killed_before_its_first_checkpoint_then_resume(finished, tmp_path,
                                                                        monkeypatch):
  # The same config as the finished run: the old checkpoint must not be
  # resumed under the new run's (empty) metrics.
  out = _copy(finished, tmp_path / "out")

  def killed(self, state, keys, cohorts):
    raise RuntimeError("killed")

  monkeypatch.setattr(runner._Trainer, "run", killed)
  with pytest.raises(RuntimeError):
    runner.run(_config(), out, progress=False, overwrite=True)
  monkeypatch.undo()
  assert not (out / "summary.json").exists() and not (out / "checkpoint.npz").exists()
  runner.run(_config(), out, resume=True, progress=False)
  assert _without_timing(_lines(out)) == _without_timing(_lines(finished))
  got, want = (json.loads((d / "summary.json").read_text()) for d in (out, finished))
  assert got["privacy"] == want["privacy"] and got["run_id"] != want["run_id"]


def test_resume_before_first_checkpoint_starts_over_in_the_same_run(killed_before_checkpoint,
                                                                    tmp_path):
  out = _copy(killed_before_checkpoint, tmp_path / "b")
  run_id = json.loads((out / "manifest.json").read_text())["run_id"]
  summary = runner.run(_config("simulation.seed=1", "simulation.checkpoint_every=0"), out,
                       resume=True, progress=False)
  assert summary["run_id"] == run_id and summary["rounds"] == 6
  assert [json.loads(line)["round"] for line in _lines(out)] == [2, 4, 6]


# --------------------------------------------------------------------------
# Critical case 3: one bad byte silently deletes the rest of metrics.jsonl.


def test_case3_a_bad_byte_in_the_middle_of_metrics_is_refused(finished, tmp_path):
  out = _copy(finished, tmp_path / "out")
  data = bytearray((out / "metrics.jsonl").read_bytes())
  data[data.index(b"\n") + 1] = 0xFF  # The first byte of line 2.
  (out / "metrics.jsonl").write_bytes(bytes(data))
  before = _snapshot(out)
  with pytest.raises(ckpt.CorruptStateError, match=r"metrics.jsonl line 2: not valid JSON"):
    runner.run(_config(), out, resume=True, progress=False)
  assert _snapshot(out) == before


# --------------------------------------------------------------------------
# Critical case 4: two runs in one --out interleave.

_HOLD_LOCK = """
import sys, time
from fedjax_priv.run_directory import RunDirectory
RunDirectory(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_case4_a_second_run_into_a_locked_directory_exits_2(tmp_path, caplog):
  out = tmp_path / "out"
  (tmp_path / "tiny.toml").write_text(TOML)
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  try:
    assert holder.stdout.readline().strip() == "locked"
    proc = _cli(["run", tmp_path / "tiny.toml", "--out", out, "--no-progress"],
                tmp_path / "cache")
    assert proc.returncode == 2
    error = proc.stderr.strip()
    assert "\n" not in error and "in use by another run" in error
    assert f"pid {holder.pid}" in error
    assert not (out / "metrics.jsonl").exists()
  finally:
    holder.kill()
    holder.wait()
  # The holder died by SIGKILL: its lock file is stale and is taken over.
  assert json.loads((out / ".lock").read_text())["pid"] == holder.pid
  with caplog.at_level(logging.WARNING, logger="fedjax_priv.run_directory"):
    summary = runner.run(_config(), out, progress=False)
  assert summary["rounds"] == 6
  assert any("stale lock" in r.getMessage() and str(holder.pid) in r.getMessage()
             for r in caplog.records)
  assert not (out / ".lock").exists()  # Removed on exit.


def test_lock_refuses_a_second_holder_in_process(tmp_path):
  first = run_directory.RunDirectory(tmp_path)
  first.acquire()
  try:
    with pytest.raises(run_directory.RunDirectoryError, match=f"pid {os.getpid()}"):
      run_directory.RunDirectory(tmp_path).acquire()
  finally:
    first.release()
  second = run_directory.RunDirectory(tmp_path)
  second.acquire()
  second.release()


# --------------------------------------------------------------------------
# Critical case 5: the budget checks epsilon only.


def _reference_rounds(exp, epsilon_budget, limit):
  """The most rounds with eps <= budget and delta_total <= limit, from a plain ledger."""
  plan, delta = exp.privacy, exp.settings.delta
  ledger, rounds = PrivacyLedger(), 0
  for r in range(exp.settings.rounds):
    ledger.record(plan.event_at(r), plan.overflow_probability_per_round)
    epsilon, delta_total = ledger.epsilon(delta)
    if epsilon > epsilon_budget or delta_total > limit:
      break
    rounds = r + 1
  return rounds


def test_case5_budget_stops_before_delta_total_passes_delta(tmp_path):
  config = config_lib.load(None, [*POISSON_60, "privacy.noise_multiplier=0.4",
                                  "simulation.rounds=8", "privacy.epsilon_budget=20"])
  exp = build(config)
  assert exp.privacy.overflow_probability_per_round > 0
  limit = budget.delta_limit(exp.settings)
  expected = _reference_rounds(exp, 20.0, limit)
  # The epsilon side alone would allow more rounds (the old behaviour).
  assert _reference_rounds(exp, 20.0, 1.0) > expected >= 1
  summary = runner.run_experiment(exp, tmp_path, progress=False)
  privacy = summary["privacy"]
  assert summary["rounds"] == expected
  assert privacy["stopped_by_budget"] is True and privacy["stopped_by"] == "delta"
  assert privacy["delta_total"] <= limit < 2 * config.privacy.delta
  assert privacy["epsilon"] <= 20
  last = json.loads(_lines(tmp_path)[-1])
  assert last["delta_total"] == pytest.approx(privacy["delta_total"])


def test_planned_delta_overflow_is_refused_warned_or_opted_into(tmp_path, caplog):
  over = [*POISSON_60, "privacy.noise_multiplier=0.4", "simulation.rounds=5"]
  with pytest.raises(ValueError, match="allow_delta_overflow") as info:
    runner.run(config_lib.load(None, over), tmp_path / "refused", progress=False)
  assert "delta_total" in str(info.value) and "\n" not in str(info.value)
  assert _snapshot(tmp_path / "refused") == {}  # Refused before anything was written.
  with caplog.at_level(logging.WARNING, logger="fedjax_priv.budget"):
    summary = runner.run(config_lib.load(None, [*over, "privacy.allow_delta_overflow=true"]),
                         tmp_path / "allowed", progress=False)
  assert summary["rounds"] == 5
  assert summary["privacy"]["delta_total"] > budget.DELTA_REFUSE_FACTOR * 1e-5
  assert any("WARNING" in r.getMessage() and "delta_total" in r.getMessage()
             for r in caplog.records)


# --------------------------------------------------------------------------
# Fault injection: kill -9 at random moments, then --resume.

# Runs the CLI and kills itself (SIGKILL) at the FAULT_AT-th fsync or rename
# of a file in the run directory whose name contains FAULT_MATCH: inside
# atomic writes (temporary file written and fsynced, not yet renamed:
# checkpoint, manifest, config, summary) or right after a metrics line is
# written. Before dying it notes where in FAULT_LOG.
_FAULTY_RUN = """
import os, signal, sys
fault_at, match = int(os.environ["FAULT_AT"]), os.environ["FAULT_MATCH"]
log_path, out = os.environ["FAULT_LOG"], os.path.realpath(sys.argv[1])
calls = [0]
fsync, replace = os.fsync, os.replace

def maybe_die(where):
  if match in where:
    calls[0] += 1
    if calls[0] == fault_at:
      with open(log_path, "a") as log:
        log.write(where + "\\n")
      os.kill(os.getpid(), signal.SIGKILL)

def patched_fsync(fd):
  fsync(fd)
  path = os.readlink(f"/proc/self/fd/{fd}")
  if os.path.dirname(path) == out:
    maybe_die("fsync " + os.path.basename(path))

def patched_replace(src, dst):
  if os.path.dirname(os.path.realpath(dst)) == out:
    maybe_die("rename to " + os.path.basename(dst))
  replace(src, dst)

os.fsync, os.replace = patched_fsync, patched_replace
from fedjax_priv import cli
sys.exit(cli.main(sys.argv[2:]))
"""


def test_kill_9_at_random_moments_then_resume_gives_the_same_metrics(tmp_path):
  rng = random.Random(15)
  overrides = ["simulation.rounds=8", "simulation.checkpoint_every=1", "simulation.eval_every=1"]
  (tmp_path / "tiny.toml").write_text(TOML)
  reference = tmp_path / "reference"
  runner.run(config_lib.load(tmp_path / "tiny.toml", overrides), reference, progress=False)
  out, log = tmp_path / "faulty", tmp_path / "faults.log"
  # The module's compilation cache, which the reference run has just filled.
  env = {**os.environ, "FEDJAX_PRIV_CACHE": jax.config.jax_compilation_cache_dir,
         "FAULT_LOG": str(log), "PYTHONPATH": str(REPO)}
  # (what the event names contain, the how-manyth such event kills); None: a
  # kill from outside at a random moment once training has begun; last: no fault.
  # Each process costs a JAX import (seconds on a loaded 2-core machine), so
  # three faults: anywhere, inside a checkpoint write, and from outside.
  plan = [("", rng.randint(1, 40)), ("checkpoint", rng.randint(1, 6)), None, ("", 0)]
  faults = 0
  for fault in plan:
    resume = ["--resume"] if run_directory.RunDirectory(out).holds_run() else []
    argv = [sys.executable, "-c", _FAULTY_RUN, str(out), "run", str(tmp_path / "tiny.toml"),
            "--out", str(out), "--no-progress", *[f"--set={o}" for o in overrides], *resume]
    match, at = fault or ("", 0)
    proc = subprocess.Popen(argv, env={**env, "FAULT_AT": str(at), "FAULT_MATCH": match},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if fault is None:
      lines = len(_lines(out)) if (out / "metrics.jsonl").exists() else 0
      while proc.poll() is None and not (
          (out / "metrics.jsonl").exists() and len(_lines(out)) > lines):
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 0.5))
      proc.send_signal(signal.SIGKILL)
      with open(log, "a") as handle:
        handle.write("external\n")
    _, stderr = proc.communicate(timeout=300)
    if proc.returncode == -signal.SIGKILL:
      faults += 1
    else:
      assert proc.returncode == 0, stderr
  assert proc.returncode == 0  # The last attempt finishes the run.
  where = log.read_text().splitlines()
  assert faults == len(plan) - 1 == len(where), where
  assert any("checkpoint" in w for w in where)
  assert _without_timing(_lines(out)) == _without_timing(_lines(reference))
  got, want = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
  assert got["privacy"] == want["privacy"] and got["test_accuracy"] == want["test_accuracy"]
  assert not list(out.glob(".*.tmp")) and not (out / ".lock").exists()
  print(f"faults injected: {faults} at {where}")


# --------------------------------------------------------------------------
# Corruption: every state file, each damage refused with nothing lost.


def _flip(data, offset):
  data = bytearray(data)
  data[offset % len(data)] ^= 0x5A
  return bytes(data)


def _edited_checkpoint(data, edit):
  """The checkpoint with its bookkeeping edited (`edit(extra)`), as a valid archive."""
  arrays, extra = ckpt._decode_npz(Path("checkpoint.npz"), data)
  edit(extra)
  state = [arrays[name] for name in sorted(arrays)]
  return ckpt.checkpoint_bytes(state, extra)


def _with_manifest_accepting(out, name):
  """Makes manifest.json accept the file as it now is: tests the checks behind the hash."""
  manifest = json.loads((out / "manifest.json").read_text())
  manifest[name] = [ckpt.sha256((out / name).read_bytes())]
  ckpt.write_json(out / "manifest.json", manifest)


def _set_ledger_count(extra, count):
  extra["ledgers"]["user"]["runs"][0]["count"] = count


def _corruptions():
  """(file, damage, fn(out)) for every state file: truncate, flip, edit."""
  def rewrite(name, fn):
    return lambda out: (out / name).write_bytes(fn((out / name).read_bytes()))

  def edit_checkpoint(edit, accepted):
    def apply(out):
      rewrite("checkpoint.npz", lambda d: _edited_checkpoint(d, edit))(out)
      if accepted:
        _with_manifest_accepting(out, "checkpoint.npz")
    return apply

  cases = [("checkpoint.npz", "missing", lambda out: (out / "checkpoint.npz").unlink()),
           ("checkpoint.npz", "truncated to 0", rewrite("checkpoint.npz", lambda d: b""))]
  for fraction in (0.1, 0.5, 0.99):
    cases.append(("checkpoint.npz", f"truncated to {fraction}",
                  rewrite("checkpoint.npz", lambda d, f=fraction: d[:int(len(d) * f)])))
  for offset in (0, 40, 300, -30, -100):
    cases.append(("checkpoint.npz", f"byte flipped at {offset}",
                  rewrite("checkpoint.npz", lambda d, o=offset: _flip(d, o))))
    cases.append(("checkpoint.npz", f"byte flipped at {offset}, manifest made to accept it",
                  lambda out, o=offset: (rewrite("checkpoint.npz", lambda d: _flip(d, o))(out),
                                         _with_manifest_accepting(out, "checkpoint.npz"))))
  cases += [
      ("checkpoint.npz", "ledger count set to 1",
       edit_checkpoint(lambda e: _set_ledger_count(e, 1), accepted=False)),
      ("checkpoint.npz", "ledger count set to 1, manifest accepts it",
       edit_checkpoint(lambda e: _set_ledger_count(e, 1), accepted=True)),
      ("checkpoint.npz", "ledger count and rounds set to 1, manifest accepts it",
       edit_checkpoint(lambda e: (_set_ledger_count(e, 1),
                                  e["ledgers"]["user"].update(rounds=1)), accepted=True)),
      ("checkpoint.npz", "round set to 2, manifest accepts it",
       edit_checkpoint(lambda e: e.update(round=2), accepted=True)),
      ("checkpoint.npz", "privacy hash edited, manifest accepts it",
       edit_checkpoint(lambda e: e.update(privacy_sha256="0" * 64), accepted=True)),
      ("checkpoint.npz", "run id of another run, manifest accepts it",
       edit_checkpoint(lambda e: e.update(run_id="another"), accepted=True)),
      ("checkpoint.npz", "bookkeeping without totals, manifest accepts it",
       edit_checkpoint(lambda e: e.pop("totals"), accepted=True)),
  ]
  def metrics(fn):
    return rewrite("metrics.jsonl", fn)

  def lines(fn):
    return metrics(lambda d: "".join(fn(d.decode().splitlines(keepends=True))).encode())

  cases += [
      ("metrics.jsonl", "truncated inside line 2", metrics(lambda d: d[:len(d) // 2])),
      ("metrics.jsonl", "truncated to 0", metrics(lambda d: b"")),
      ("metrics.jsonl", "missing", lambda out: (out / "metrics.jsonl").unlink()),
      ("metrics.jsonl", "byte flipped in line 1", metrics(lambda d: _flip(d, 5))),
      ("metrics.jsonl", "byte flipped in line 3", metrics(lambda d: _flip(d, -20))),
      ("metrics.jsonl", "a value edited", lambda out: (out / "metrics.jsonl").write_text(
          (out / "metrics.jsonl").read_text().replace('"round": 4', '"round": 5'))),
      ("metrics.jsonl", "line 1 deleted", lines(lambda ls: ls[1:])),
      ("metrics.jsonl", "lines swapped", lines(lambda ls: [ls[1], ls[0], *ls[2:]])),
      ("metrics.jsonl", "a list inserted", lines(lambda ls: [ls[0], "[1, 2]\n", *ls[1:]])),
      ("metrics.jsonl", "a line without round", lines(lambda ls: [ls[0], '{"x": 1}\n', *ls[1:]])),
      ("metrics.jsonl", "a line repeated", lines(lambda ls: [*ls, ls[-1]])),
      ("manifest.json", "truncated", rewrite("manifest.json", lambda d: d[:len(d) // 2])),
      ("manifest.json", "missing", lambda out: (out / "manifest.json").unlink()),
      ("summary.json", "byte flipped", rewrite("summary.json", lambda d: _flip(d, len(d) // 2))),
      ("config.json", "a value edited", lambda out: (out / "config.json").write_text(
          (out / "config.json").read_text().replace('"noise_multiplier": 0.5',
                                                    '"noise_multiplier": 5.0'))),
  ]
  return cases


def test_every_corruption_is_refused_naming_the_file_and_nothing_is_lost(finished, exp,
                                                                         tmp_path):
  refused = []
  for i, (name, damage, apply) in enumerate(_corruptions()):
    out = _copy(finished, tmp_path / f"c{i}")
    apply(out)
    assert _snapshot(out) != _snapshot(finished), damage  # The damage is real.
    before = _snapshot(out)
    with pytest.raises(ValueError) as info:
      runner.run_experiment(exp, out, resume=True, progress=False)
    message = str(info.value)
    assert "\n" not in message, (damage, message)
    assert name in message or (name == "manifest.json" and "manifest" in message), (
        damage, message)
    assert _snapshot(out) == before, damage  # Nothing deleted, nothing rewritten.
    refused.append(damage)
  print(f"corruptions tried and refused: {len(refused)}")
  assert len(refused) == len(_corruptions()) >= 30


# --------------------------------------------------------------------------
# Output paths that cannot be written.


def test_an_output_path_under_a_file_is_one_line_exit_2_for_run_and_sweep(tmp_path):
  (tmp_path / "tiny.toml").write_text(TOML)
  (tmp_path / "afile").write_text("x")
  bad = tmp_path / "afile" / "out"
  for args in (["run", tmp_path / "tiny.toml", "--out", bad, "--no-progress"],
               ["sweep", tmp_path / "tiny.toml", "--grid", "privacy.noise_multiplier=0.5,1",
                "--out", bad]):
    proc = _cli(args, tmp_path / "cache")
    error = proc.stderr.strip()
    assert proc.returncode == 2, (args[0], proc.stderr)
    assert "\n" not in error and str(bad) in error and "Traceback" not in error
    assert "noise_mult" not in proc.stdout  # The sweep refused before it trained.


def test_a_read_only_output_directory_is_one_line(tmp_path, monkeypatch):
  # Root ignores permission bits, so the file system's refusal is simulated.
  def read_only(*args, **kwargs):
    raise OSError(30, "Read-only file system")

  monkeypatch.setattr(run_directory.tempfile, "TemporaryFile", read_only)
  with pytest.raises(run_directory.RunDirectoryError) as info:
    run_directory.check_writable(tmp_path / "out")
  assert str(info.value) == (f"output directory {tmp_path / 'out'} is not writable: "
                             "Read-only file system")


def test_disk_full_mid_run_is_one_line_and_the_run_resumes(finished, tmp_path, monkeypatch):
  out = tmp_path / "out"
  calls, fsync = [0], os.fsync

  def full_disk(fd):
    calls[0] += 1
    if calls[0] == 9:  # A few writes into the run: after its first checkpoint.
      raise OSError(28, "No space left on device")
    fsync(fd)

  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(ckpt.WriteError) as info:
    runner.run(_config(), out, progress=False)
  monkeypatch.undo()
  message = str(info.value)
  assert "\n" not in message and str(out) in message and "No space left" in message
  runner.run(_config(), out, resume=True, progress=False)
  assert _without_timing(_lines(out)) == _without_timing(_lines(finished))


def test_leftover_temporary_files_are_removed_on_start(finished, tmp_path):
  out = _copy(finished, tmp_path / "out")
  for name in (".checkpoint.npz.abc123.tmp", ".metrics.jsonl.x.tmp", ".summary.json.y.tmp"):
    (out / name).write_bytes(b"debris")
  (out / "notes.txt").write_text("mine")  # Not the run's: kept.
  runner.run(_config(), out, resume=True, progress=False)
  assert not list(out.glob(".*.tmp")) and (out / "notes.txt").read_text() == "mine"
