"""Tests of `fedjax_priv.runner`: backends agree, checkpoints resume exactly.

All runs are tiny (logistic regression, <= 8 clients, <= 6 rounds, noise on).
"""

import json
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_priv import checkpoint as ckpt
from fedjax_priv import config as config_lib
from fedjax_priv import runner
from fedjax_priv.algorithms.server import server_init
from fedjax_priv.experiment import build

TINY = [
    "model.name=logistic_regression",
    "client.learning_rate=0.5",
    "client.local_steps=2",
    "client.batch_size=8",
    "simulation.eval_every=2",
]
# User level, Poisson cohorts of expected size 4 out of 8: the cohort has
# padded slots, and chunks of 3 do not divide it. 6 rounds, evaluated and
# checkpointed every 2 (also the config of the resume tests).
RESUME = TINY + [
    "data.num_clients=8",
    "simulation.cohort_size=4",
    "simulation.sampling=poisson",
    "privacy.unit=user",
    "privacy.noise_multiplier=0.5",
    "simulation.rounds=6",
    "simulation.client_chunk_size=3",
    "simulation.checkpoint_every=2",
    "simulation.backend=chunked",
]
# Example level (noise inside every client), fixed cohorts of 3 out of 6.
EXAMPLE = TINY + [
    "data.num_clients=6",
    "simulation.cohort_size=3",
    "privacy.unit=example",
    "privacy.noise_multiplier=0.8",
    "simulation.rounds=4",
    "simulation.client_chunk_size=2",
]


# The runs and resumes compile the same programs several times.
pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def _config(base, *overrides):
  return config_lib.load(None, list(base) + list(overrides))


def _template(config):
  exp = build(config)
  return server_init(exp.model.init(jax.random.key(0)), exp.server_optimizer, exp.aggregator)


def _load(config, out):
  state, extra = ckpt.load_checkpoint(out / "checkpoint.npz", _template(config))
  return state, extra


def _leaves(tree):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _assert_close(got, want, atol):
  got, want = _leaves(got), _leaves(want)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=atol, rtol=0)


def _metrics(out):
  return ckpt.MetricsLog(out / "metrics.jsonl").read()


def _summary(out):
  return json.loads((out / "summary.json").read_text())


# --------------------------------------------------------------------------
# Backends give the same model.


def _run_backends(tmp_path, base, variants):
  results = {}
  for name, overrides in variants.items():
    config = _config(base, *overrides)
    out = tmp_path / name
    summary = runner.run(config, out, progress=False)
    state, extra = _load(config, out)
    assert extra["round"] == config.simulation.rounds
    assert int(state.round) == config.simulation.rounds
    assert summary["backend"] == config.simulation.backend
    assert summary["privacy"]["noise_multiplier"] > 0
    results[name] = (config, summary, state)
  return results


def _check_same(results, reference):
  ref_config, ref_summary, ref_state = results[reference]
  # The model trained: a comparison of untouched params would prove nothing.
  init_key, _ = jax.random.split(jax.random.key(ref_config.simulation.seed))  # As the runner.
  init = build(ref_config).model.init(init_key)
  moved = max(np.max(np.abs(a - b)) for a, b in zip(_leaves(ref_state.params), _leaves(init)))
  assert moved > 1e-2
  for name, (_, summary, state) in results.items():
    _assert_close(state.params, ref_state.params, atol=1e-5)
    assert summary["test_accuracy"] == pytest.approx(ref_summary["test_accuracy"], abs=1e-6)
    assert summary["privacy"]["epsilon"] == ref_summary["privacy"]["epsilon"], name


def test_backends_agree_user_level(run_a, tmp_path):
  # run_a is the chunked backend with the population on the device.
  config, _, summary, state, _ = run_a
  assert config.simulation.backend == "chunked" and config.simulation.data_on_device
  results = _run_backends(tmp_path, RESUME, {
      "loop": ["simulation.backend=loop"],
      "vmap": ["simulation.backend=vmap"],
      "chunked_host": ["simulation.data_on_device=false"],
  })
  results["chunked"] = (config, summary, state)
  _check_same(results, "loop")


def test_backends_agree_example_level(tmp_path):
  results = _run_backends(tmp_path, EXAMPLE, {
      "loop": ["simulation.backend=loop"],
      "vmap": ["simulation.backend=vmap"],
      "chunked": ["simulation.backend=chunked"],
  })
  _check_same(results, "loop")


# --------------------------------------------------------------------------
# Checkpoint resume == uninterrupted run.


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  """Six rounds straight through."""
  config = _config(RESUME)
  out = tmp_path_factory.mktemp("run_a")
  summary = runner.run(config, out, progress=False)
  state, extra = _load(config, out)
  return config, out, summary, state, extra


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, fail_trainer_at_block):
  """Rounds 0-4 of the same run, then Ctrl-C as the block of rounds 5-6 starts."""
  config = _config(RESUME)
  out = tmp_path_factory.mktemp("interrupted")
  with pytest.MonkeyPatch.context() as monkeypatch:
    fail_trainer_at_block(monkeypatch, 3)  # Blocks end at rounds 2, 4, 6.
    with pytest.raises(KeyboardInterrupt):
      runner.run(config, out, progress=False)
  return out


def _check_equals_run_a(run_a, config, out, atol):
  _, a_out, a_summary, a_state, a_extra = run_a
  summary = _summary(out)
  state, extra = _load(config, out)
  _assert_close(state.params, a_state.params, atol=atol)
  assert int(state.round) == 6 and extra["round"] == 6
  metrics, a_metrics = _metrics(out), _metrics(a_out)
  rounds = [m["round"] for m in metrics]
  assert rounds == [2, 4, 6]  # Each evaluated round exactly once.
  assert rounds == [m["round"] for m in a_metrics]
  for m, a in zip(metrics, a_metrics):
    assert m["test_accuracy"] == pytest.approx(a["test_accuracy"], abs=1e-6)
    assert m["epsilon"] == pytest.approx(a["epsilon"], rel=1e-9)
  assert extra["ledgers"] == a_extra["ledgers"]
  assert summary["privacy"]["epsilon"] == pytest.approx(a_summary["privacy"]["epsilon"],
                                                        rel=1e-12)
  assert summary["privacy"]["dp_event"] == a_summary["privacy"]["dp_event"]
  assert summary["test_accuracy"] == pytest.approx(a_summary["test_accuracy"], abs=1e-6)


def test_interrupt_saves_a_checkpoint_at_the_last_whole_block(interrupted):
  config = _config(RESUME)
  state, extra = _load(config, interrupted)
  assert extra["round"] == 4
  assert int(state.round) == 4
  assert [m["round"] for m in _metrics(interrupted)] == [2, 4]
  assert not (interrupted / "summary.json").exists()


def test_resume_equals_uninterrupted(run_a, interrupted, tmp_path):
  config = _config(RESUME)
  out = tmp_path / "b"
  shutil.copytree(interrupted, out)
  runner.run(config, out, resume=True, progress=False)
  _check_equals_run_a(run_a, config, out, atol=1e-6)


def test_interrupt_during_evaluation_then_resume_equals_uninterrupted(run_a, tmp_path,
                                                                       monkeypatch):
  # Ctrl-C while round 4 is being evaluated: rounds 3-4 have trained, but
  # their evaluation has not been logged yet.
  config = _config(RESUME)
  out = tmp_path / "b"
  original = runner._eval_record

  def eval_record(round_index, *args):
    if round_index == 4:
      raise KeyboardInterrupt
    return original(round_index, *args)

  monkeypatch.setattr(runner, "_eval_record", eval_record)
  with pytest.raises(KeyboardInterrupt):
    runner.run(config, out, progress=False)
  monkeypatch.undo()
  runner.run(config, out, resume=True, progress=False)
  _check_equals_run_a(run_a, config, out, atol=1e-6)


def test_resume_after_crash_before_first_checkpoint(run_a, tmp_path, monkeypatch,
                                                   fail_trainer_at_block):
  # A crash (not Ctrl-C: no checkpoint is written) in the second block, with
  # only the final checkpoint configured: metrics.jsonl already holds round 2.
  config = _config(RESUME, "simulation.checkpoint_every=0")
  out = tmp_path / "b"
  fail_trainer_at_block(monkeypatch, 2, RuntimeError("device lost"))
  with pytest.raises(RuntimeError):
    runner.run(config, out, progress=False)
  monkeypatch.undo()
  assert not (out / "checkpoint.npz").exists()
  assert [m["round"] for m in _metrics(out)] == [2]
  # --resume with no checkpoint starts over; the log must not hold round 2 twice.
  runner.run(config, out, resume=True, progress=False)
  _check_equals_run_a(run_a, config, out, atol=1e-6)


def _files(directory):
  return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.parametrize("override, key", [
    ("privacy.noise_multiplier=0.7", "privacy.noise_multiplier"),
    ("privacy.clip_norm=2.0", "privacy.clip_norm"),
    ("simulation.seed=1", "simulation.seed"),
    ("client.learning_rate=0.25", "client.learning_rate"),
])
def test_resume_with_changed_key_is_refused(interrupted, tmp_path, override, key):
  out = tmp_path / "b"
  shutil.copytree(interrupted, out)
  before = _files(out)
  with pytest.raises(ValueError) as info:
    runner.run(_config(RESUME, override), out, resume=True, progress=False)
  assert key in str(info.value)
  # Nothing in the run directory changed.
  assert _files(out) == before


def test_resume_with_only_backend_changed(run_a, interrupted, tmp_path):
  config = _config(RESUME, "simulation.backend=loop")
  out = tmp_path / "b"
  shutil.copytree(interrupted, out)
  summary = runner.run(config, out, resume=True, progress=False)
  assert summary["backend"] == "loop"
  _check_equals_run_a(run_a, config, out, atol=1e-5)


def test_resume_of_a_finished_run_keeps_its_results(run_a, tmp_path):
  config, a_out, a_summary, a_state, _ = run_a
  out = tmp_path / "c"
  shutil.copytree(a_out, out)
  summary = runner.run(config, out, resume=True, progress=False)
  state, extra = _load(config, out)
  assert extra["round"] == 6
  _assert_close(state.params, a_state.params, atol=0)
  assert [m["round"] for m in _metrics(out)] == [2, 4, 6]
  assert summary["privacy"]["epsilon"] == a_summary["privacy"]["epsilon"]
  # Nothing left to train, but the summary must still report the model's accuracy.
  assert summary["test_accuracy"] == pytest.approx(a_summary["test_accuracy"], abs=1e-6)
  assert summary["test_loss"] == pytest.approx(a_summary["test_loss"], abs=1e-6)


def test_block_schedule_is_lazy_and_matches_the_set_it_replaced():
  """Blocks end at evaluations, checkpoints and the last round; rounds = 2^32 costs nothing."""
  from fedjax_priv.runner import _block_ends
  for start, rounds, every, checkpoint in [(0, 10, 3, 0), (4, 23, 5, 7), (0, 7, 10, 2),
                                           (6, 6, 1, 0), (1, 12, 4, 6)]:
    expected = {rounds} | set(range(every, rounds, every))
    if checkpoint:
      expected |= set(range(checkpoint, rounds, checkpoint))
    assert list(_block_ends(start, rounds, every, checkpoint)) == sorted(
        e for e in expected if e > start)
  ends = _block_ends(0, 2**32, 1, 0)
  assert [next(ends) for _ in range(3)] == [1, 2, 3]


@pytest.mark.parametrize("nonfinite, kept, warned", [
    ([0.0, 1.0], [9.0, 10.0], False),   # 1 of 20: 5%, below the 10% share.
    ([1.0, 1.0], [9.0, 9.0], False),    # 2 of 20: exactly 10%, not above.
    ([3.0, 0.0], [7.0, 10.0], True),    # 3 of 20: 15%.
    ([0.0, 0.0], [0.0, 0.0], False),    # No real client at all.
])
def test_nonfinite_share_above_ten_percent_prints_one_line(nonfinite, kept, warned):
  metrics = {"nonfinite_clients": np.array(nonfinite), "clients": np.array(kept)}
  lines = []
  runner._warn_if_nonfinite(metrics, 4, 6, lines.append)
  if warned:
    assert lines == [f"warning: rounds 5-6: {sum(nonfinite):.0f} of "
                     f"{sum(nonfinite) + sum(kept):.0f} client updates were NaN, inf or too "
                     "large (L2 norm above 1.8e19) and were left out of the aggregate"]
  else:
    assert lines == []


def test_a_run_whose_client_updates_overflow_leaves_them_out_and_warns(tmp_path, capsys):
  """client lr = 1e37: every update is inf or too large to square; all are left out, warned about."""
  config = _config(TINY, "client.learning_rate=1e37", "client.local_steps=3",
                   "simulation.rounds=2", "data.num_clients=8", "simulation.cohort_size=4",
                   "simulation.backend=vmap")
  runner.run(config, tmp_path, progress=False)
  err = capsys.readouterr().err
  assert re.search(r"warning: rounds 1-2: 8 of 8 client updates were NaN, inf or too large", err)
  last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert last["nonfinite_clients"] == 8.0 and last["clients"] == 0.0  # Over the block.
  state, _ = _load(config, tmp_path)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state.params))
  assert (tmp_path / "summary.json").exists()


def test_a_run_whose_server_step_overflows_stops_naming_the_rounds(tmp_path):
  """Updates of norm ~1e6 are left in; a server step of lr 1e38 overflows the model."""
  config = _config(TINY, "client.learning_rate=1e6", "server.learning_rate=1e38",
                   "simulation.rounds=2",
                   "data.num_clients=8", "simulation.cohort_size=4", "simulation.backend=vmap")
  with pytest.raises(ValueError, match=r"rounds 1-2: the server model became NaN or inf"):
    runner.run(config, tmp_path, progress=False)
  assert not (tmp_path / "summary.json").exists()


def test_time_counted_as_compile_is_not_training_time():
  """A block on the compile clock (the trainer's ahead-of-time compile) moves its whole
  wall time, JAX's compile events inside it included once, out of training time."""
  with runner._stopwatch() as times:
    with runner._counted_as_compile():
      jax.jit(lambda x: x * 3 + 1).lower(jnp.ones(7)).compile()  # Emits compile events.
      time.sleep(0.05)  # Host time outside any event.
    time.sleep(0.02)  # Training.
  assert times["compile"] >= 0.05
  assert times["compile"] <= times["wall"] - 0.02
