"""Runs an `Experiment`: rounds, evaluation, privacy ledger, metrics, checkpoints.

Output files in the run directory:
  metrics.jsonl    one JSON line per evaluation (appended and fsynced)
  summary.json     final accuracy, loss, timing and the privacy report
  checkpoint.npz   server state, round and ledger (written atomically)
  config.json      the resolved config the run used
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring
from tqdm.auto import tqdm

from fedjax_priv import checkpoint as ckpt
from fedjax_priv.algorithms.server import ServerState, server_init
from fedjax_priv.config import Config, to_dict
from fedjax_priv.data.device import gather_cohort
from fedjax_priv.data.packing import CohortData, pack_cohort, pad_population
from fedjax_priv.experiment import Experiment, build
from fedjax_priv.models.model import evaluate
from fedjax_priv.privacy.accounting import PrivacyLedger
from fedjax_priv.simulation.program import cohort_to_batch, round_from_cohort, rounds_on_device

EVAL_BATCH = 512
# Config fields that may change when a run is resumed: they do not change results.
RESUMABLE_CHANGES = {"eval_every", "checkpoint_every", "backend", "client_chunk_size",
                     "data_on_device"}
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_duration(event: str, duration: float, **_: Any) -> None:
  if event in _COMPILE_EVENTS:
    _compile_seconds[0] += duration


monitoring.register_event_duration_secs_listener(_on_duration)


@contextlib.contextmanager
def _stopwatch() -> Iterator[dict[str, float]]:
  """Wall time of the block and the part of it JAX spent tracing and compiling."""
  times = {"wall": 0.0, "compile": 0.0}
  start, compiled = time.perf_counter(), _compile_seconds[0]
  try:
    yield times
  finally:
    times["wall"] = time.perf_counter() - start
    times["compile"] = _compile_seconds[0] - compiled


def make_evaluator(exp: Experiment):
  """Jitted `params -> (accuracy, mean loss)` over the whole test set."""
  n = len(exp.y_test)
  padded = -n % EVAL_BATCH
  x = jnp.asarray(np.concatenate([exp.x_test, np.zeros((padded, *exp.x_test.shape[1:]),
                                                        exp.x_test.dtype)]))
  y = jnp.asarray(np.concatenate([exp.y_test, np.zeros(padded, exp.y_test.dtype)]))
  mask = jnp.asarray(np.arange(n + padded) < n, jnp.float32)
  batches = jax.tree.map(lambda a: a.reshape(-1, EVAL_BATCH, *a.shape[1:]), (x, y, mask))

  @jax.jit
  def evaluator(params):
    sums = jax.lax.map(lambda b: evaluate(exp.model, params, *b), batches)
    loss, correct, count = (jnp.sum(s) for s in sums)
    return correct / count, loss / count

  return evaluator


def _block_ends(start: int, rounds: int, eval_every: int, checkpoint_every: int) -> list[int]:
  ends = {rounds} | set(range(eval_every, rounds, eval_every))
  if checkpoint_every:
    ends |= set(range(checkpoint_every, rounds, checkpoint_every))
  return sorted(e for e in ends if e > start)


class _Trainer:
  """Advances the server state by blocks of rounds, on whichever data path fits."""

  def __init__(self, exp: Experiment):
    self.exp = exp
    sim = exp.config.simulation
    self.on_device = sim.data_on_device
    self.scan = sim.backend != "loop"
    if self.on_device:
      self.population = jax.device_put(pad_population(exp.train))
      self.gather = jax.jit(gather_cohort)
    if self.scan and self.on_device:
      self.many_rounds = jax.jit(rounds_on_device(exp.round_fn, exp.batching), donate_argnums=0)
    elif self.scan:
      self.one_round = jax.jit(round_from_cohort(exp.round_fn, exp.batching), donate_argnums=0)
    else:
      self.make_batch = jax.jit(cohort_to_batch(exp.batching))

  def _cohort(self, indices, mask) -> CohortData:
    if self.on_device:
      return self.gather(self.population, indices, mask)
    return jax.device_put(pack_cohort(self.exp.train, indices, mask))

  def run(self, state: ServerState, keys, cohorts) -> tuple[ServerState, dict]:
    """Runs one round per (key, cohort); returns the state and per-round metrics as [R] arrays."""
    if self.scan and self.on_device:
      indices = np.stack([c.indices for c in cohorts])
      masks = np.stack([c.mask for c in cohorts])
      return self.many_rounds(state, self.population, indices, masks, keys)
    history = []
    for key, cohort in zip(keys, cohorts):
      data = self._cohort(cohort.indices, cohort.mask)
      if self.scan:
        state, metrics = self.one_round(state, data, key)
      else:
        batch, overflow, round_key = self.make_batch(data, key)
        state, metrics = self.exp.round_fn(state, batch, round_key)
        metrics = {**metrics, "batch_overflow": overflow.astype(jnp.float32)}
      history.append(metrics)
    return state, jax.tree.map(lambda *values: jnp.stack(values), *history)


def _privacy_report(exp: Experiment, ledger: PrivacyLedger) -> dict[str, Any]:
  privacy = exp.config.privacy
  report = {
      "unit": exp.privacy.unit,
      "neighbouring_relation": exp.privacy.neighbouring,
      "accountant": privacy.accountant,
      "delta": privacy.delta,
      "noise_multiplier": exp.privacy.noise_multiplier,
      "clip_norm": privacy.clip_norm if exp.privacy.unit != "none" else None,
      "sampling": exp.privacy.sampling,
      "sampling_rate": exp.privacy.sampling_rate,
  }
  if exp.privacy.unit == "none":
    return {**report, "epsilon": math.inf, "delta_total": None, "dp_event": None}
  epsilon, delta_total = ledger.epsilon(privacy.delta, privacy.accountant)
  return {**report, "epsilon": epsilon, "delta_total": delta_total, "dp_event": repr(ledger.event)}


def _json_number(value: float) -> float | str:
  return value if math.isfinite(value) else ("inf" if value > 0 else "nan")


def run(config: Config, out_dir: str | Path, resume: bool = False,
        progress: bool = True) -> dict[str, Any]:
  """Trains, evaluates and checkpoints as `config` says; returns the summary dict."""
  exp = build(config)
  sim = config.simulation
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  log = ckpt.MetricsLog(out / "metrics.jsonl")
  checkpoint_path = out / "checkpoint.npz"

  init_key, rounds_key = jax.random.split(jax.random.key(sim.seed))
  state = server_init(exp.model.init(init_key), exp.server_optimizer, exp.aggregator)
  ledger = PrivacyLedger()
  start, totals = 0, {"wall": 0.0, "compile": 0.0, "examples": 0.0}
  if resume and checkpoint_path.exists():
    state, extra = ckpt.load_checkpoint(checkpoint_path, state)
    _check_resumable(extra["config"], to_dict(config))
    start, totals = extra["round"], extra["totals"]
    ledger = PrivacyLedger.from_state_dict(extra["ledger"])
    log.truncate_after(start)
  else:
    log.path.unlink(missing_ok=True)  # A fresh run must not inherit old lines.
  ckpt.write_json(out / "config.json", to_dict(config))

  trainer = _Trainer(exp)
  evaluator = make_evaluator(exp)
  bar = tqdm(total=sim.rounds, initial=start, disable=not progress, unit="round",
             desc=f"{exp.privacy.unit}-level {sim.backend}")
  logged = start  # The last round whose metrics line is written.

  def log_evaluation(metrics, cohorts):
    nonlocal logged
    accuracy, loss = (float(v) for v in evaluator(state.params))
    record = _eval_record(start, accuracy, loss, metrics, cohorts, exp, ledger, totals)
    log.append(record)
    logged = start
    bar.set_postfix(acc=f"{accuracy:.3f}", eps=record.get("epsilon", "inf"))

  def evaluation_due(round_index):
    return round_index > logged and (round_index % sim.eval_every == 0 or
                                     round_index == sim.rounds)

  metrics = cohorts = None
  try:
    for end in _block_ends(start, sim.rounds, sim.eval_every, sim.checkpoint_every):
      cohorts = [exp.sampler.sample(r) for r in range(start, end)]
      keys = jnp.stack([jax.random.fold_in(rounds_key, r) for r in range(start, end)])
      with _stopwatch() as times:
        new_state, metrics = trainer.run(state, keys, cohorts)
        metrics = jax.device_get(metrics)
      # The ledger is charged before `state` moves on, so no checkpoint can
      # ever hold a state that trained on rounds its ledger lacks.
      if exp.privacy.round_event is not None:
        for _ in range(start, end):
          ledger.record(exp.privacy.round_event, exp.privacy.overflow_probability_per_round)
      totals["wall"] += times["wall"] - times["compile"]
      totals["compile"] += times["compile"]
      totals["examples"] += float(np.sum(metrics.pop("examples_seen", 0.0)))
      state, start = new_state, end
      bar.update(len(cohorts))
      if evaluation_due(end):
        log_evaluation(metrics, cohorts)
      if (sim.checkpoint_every and end % sim.checkpoint_every == 0) or end == sim.rounds:
        _save(checkpoint_path, state, end, totals, ledger, config)
  except KeyboardInterrupt:
    # A block cut short had donated the state it started from; otherwise the
    # state is whole: finish its bookkeeping so nothing computed is lost.
    if not any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
      if evaluation_due(start):
        log_evaluation(metrics, cohorts)
      _save(checkpoint_path, state, start, totals, ledger, config)
    raise
  finally:
    bar.close()

  # Also right when resuming a run that had already finished.
  accuracy, loss = (float(v) for v in evaluator(state.params))
  report = _privacy_report(exp, ledger)
  summary = {
      "test_accuracy": _json_number(accuracy),
      "test_loss": _json_number(loss),
      "rounds": sim.rounds,
      "backend": sim.backend,
      "wall_time_s": totals["wall"],
      "compile_time_s": totals["compile"],
      "examples_per_s": totals["examples"] / max(totals["wall"], 1e-9),
      "num_clients": exp.train.num_clients,
      "privacy": {k: (_json_number(v) if isinstance(v, float) else v) for k, v in report.items()},
  }
  ckpt.write_json(out / "summary.json", summary)
  return summary


def _eval_record(round_index, accuracy, loss, metrics, cohorts, exp, ledger, totals):
  record = {"round": round_index, "test_accuracy": accuracy, "test_loss": loss,
            "wall_time_s": totals["wall"], "compile_time_s": totals["compile"],
            "cohort_overflow": int(sum(c.overflow for c in cohorts))}
  for name, values in metrics.items():
    summed = name in ("nonfinite_clients", "batch_overflow")
    record[name] = float(np.sum(values) if summed else np.mean(values))
  if exp.privacy.unit != "none":
    epsilon, delta_total = ledger.epsilon(exp.config.privacy.delta, exp.config.privacy.accountant)
    record.update(epsilon=_json_number(epsilon), delta_total=delta_total)
  return record


def _save(path, state, round_index, totals, ledger, config: Config) -> None:
  ckpt.save_checkpoint(path, state, {"round": round_index, "totals": totals,
                                     "ledger": ledger.state_dict(), "config": to_dict(config)})


def _check_resumable(saved: dict, current: dict) -> None:
  for section, values in current.items():
    for name, value in values.items():
      old = saved.get(section, {}).get(name)
      if isinstance(value, tuple):
        old = tuple(old) if old is not None else None
      if old != value and not (section == "simulation" and name in RESUMABLE_CHANGES):
        raise ValueError(f"cannot resume: {section}.{name} was {old!r} in the checkpoint's run, "
                         f"now {value!r}")
