"""Runs an `Experiment`: rounds, evaluation, privacy ledger, metrics, checkpoints.

Output files in the run directory:
  metrics.jsonl    one JSON line per evaluation (appended and fsynced)
  metrics.csv, rounds.csv, tensorboard/
                   the evaluations and the per-round training metrics for
                   spreadsheets and TensorBoard (`metric_writers`,
                   simulation.log_to)
  summary.json     final accuracy, loss, timing and the privacy report
  curves.png       accuracy and loss against round and epsilon (`plots`)
  checkpoint.npz   server state, round and ledger (written atomically)
  config.json      the resolved config the run used
  manifest.json    run id and hashes that tie these files together (`run_directory`)

Checkpoints are written every simulation.checkpoint_every rounds, at the end
of the first block of rounds that finishes simulation.checkpoint_seconds
after the last one (so a killed run loses bounded work), and on SIGINT or
SIGTERM, after which `Interrupted` is raised (see `interrupts`).

Times in the summary: `wall_time_s` is training (device work and its host
side, without compilation), `compile_time_s` tracing and compiling,
`eval_time_s` evaluating the test set, and `total_time_s` everything the run
took, setup and writing files included, summed over resumed sessions.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

from fedjax_priv import budget
from fedjax_priv import interrupts
from fedjax_priv import metric_writers
from fedjax_priv import plots
from fedjax_priv import tree as tree_util
from fedjax_priv.algorithms.server import ServerState, server_init
from fedjax_priv.config import Config
from fedjax_priv.data.device import gather_cohort
from fedjax_priv.data.packing import CohortData, pack_cohort, pad_population
from fedjax_priv.experiment import Experiment, PrivacyPlan, RunSettings, build
from fedjax_priv.models.model import evaluate
from fedjax_priv.privacy.accounting import PrivacyLedger
from fedjax_priv.progress import BlockPacer, Progress
from fedjax_priv.run_directory import RunDirectory
from fedjax_priv.simulation.program import cohort_to_batch, round_from_cohort, rounds_on_device

EVAL_BATCH = 512
# A device call of more rounds than fit in about this many seconds is cut
# (progress.BlockPacer): the bar moves, and signals and checkpoints wait less.
BLOCK_SECONDS = 10.0
# Above this share of a block's real clients, dropped non-finite updates are
# reported on the console: a few are noise, many mean a bad setting
# (learning rate, clip norm) and a result trained on the rest.
NONFINITE_WARNING_SHARE = 0.1
# Config fields that may change when a run is resumed: they do not change results.
RESUMABLE_CHANGES = {"eval_every", "checkpoint_every", "checkpoint_seconds", "backend",
                     "client_chunk_size", "data_on_device", "log_to"}
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


@contextlib.contextmanager
def _counted_as_compile() -> Iterator[None]:
  """Counts the whole wall time of the block as compile time, the events inside it once."""
  start, compiled = time.perf_counter(), _compile_seconds[0]
  try:
    yield
  finally:
    _compile_seconds[0] = compiled + time.perf_counter() - start


@jax.jit
def _fold_in_range(rounds_key: jax.Array, start: jax.Array, count_like: jax.Array) -> jax.Array:
  return jax.vmap(lambda r: jax.random.fold_in(rounds_key, r))(
      start + jnp.arange(count_like.shape[0], dtype=jnp.uint32))


def round_keys(rounds_key: jax.Array, start: int, end: int) -> jax.Array:
  """Round r's key, fold_in(rounds_key, r), for r in [start, end): [end - start] keys.

  Equal, key for key, to folding in each round on the host, but one device
  call: 200 eager `fold_in`s took ~40 ms on the 2-core CPU, 12 % of a
  200-round W1 block (`experiments/benchmarks/runner_vs_floor.py`). The
  count is rounded up to a power of two and the surplus sliced off, so
  blocks of any length compile at most log2(rounds) small programs.
  """
  count = end - start
  padded = 1 << max(count - 1, 0).bit_length()
  keys = _fold_in_range(rounds_key, jnp.uint32(start), np.empty(padded, np.bool_))
  return keys if padded == count else keys[:count]


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


def _block_ends(start: int, rounds: int, eval_every: int, checkpoint_every: int
                ) -> Iterator[int]:
  """Rounds after `start` that end a block (evaluations, checkpoints, the last), in order.

  Lazy: a schedule of any length costs no memory (rounds = 10^9 with
  eval_every = 1 once built a billion-entry set).
  """
  end = start
  while end < rounds:
    following = (end // eval_every + 1) * eval_every
    if checkpoint_every:
      following = min(following, (end // checkpoint_every + 1) * checkpoint_every)
    end = min(following, rounds)
    yield end


class _Trainer:
  """Advances the server state by blocks of rounds, on whichever data path fits."""

  def __init__(self, exp: Experiment):
    self.exp = exp
    self.on_device = exp.settings.data_on_device
    self.scan = exp.round_fn.traceable
    if self.on_device:
      self.population = jax.device_put(pad_population(exp.train))
      self.gather = jax.jit(gather_cohort)
    if self.scan and self.on_device:
      self.many_rounds = jax.jit(rounds_on_device(exp.round_fn, exp.batching), donate_argnums=0)
      self.compiled_lengths: set[int] = set()  # Block lengths many_rounds is compiled for.
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
      args = (state, self.population, np.stack([c.indices for c in cohorts]),
              np.stack([c.mask for c in cohorts]), keys)
      if len(cohorts) not in self.compiled_lengths:
        # Compiled ahead of its first call, all of it on the compile clock: a
        # first jit call also spends ~10 ms of host time outside JAX's compile
        # events (W1 on the 2-core CPU), 6 % of a 200-round block that
        # `wall_time_s` would otherwise count as training.
        with _counted_as_compile():
          self.many_rounds.lower(*args).compile()
        self.compiled_lengths.add(len(cohorts))
      return self.many_rounds(*args)
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


def _level_report(plan: PrivacyPlan, ledger: PrivacyLedger, settings: RunSettings
                  ) -> dict[str, Any]:
  epsilon, delta_total = ledger.epsilon(settings.delta, settings.accountant)
  return {"unit": plan.unit, "neighbouring_relation": plan.neighbouring,
          "mechanism": plan.description,
          "clip_norm": plan.clip_norm, "noise_multiplier": plan.noise_multiplier,
          "sampling": plan.sampling, "sampling_rate": plan.sampling_rate,
          "epsilon": epsilon, "delta_total": delta_total, "dp_event": repr(ledger.event)}


def _privacy_report(exp: Experiment, ledgers: dict[str, PrivacyLedger],
                    stopped_by: str | None) -> dict[str, Any]:
  """The primary level at the top (user level under unit = both); every level in `levels`.

  `stopped_by` is the side of the (epsilon, delta) budget that ended the run
  early ("epsilon" or "delta"; `budget.rounds_within_budget`), or None.
  """
  settings = exp.settings
  common = {"accountant": settings.accountant, "delta": settings.delta,
            "epsilon_budget": settings.epsilon_budget or None,
            "stopped_by_budget": stopped_by is not None, "stopped_by": stopped_by,
            "delta_limit": budget.delta_limit(settings)}
  if not exp.levels:
    return {"unit": "none", "neighbouring_relation": "no privacy", **common,
            "noise_multiplier": 0.0, "clip_norm": None, "sampling": exp.participation.name,
            "sampling_rate": exp.participation.sampling_rate, "epsilon": math.inf,
            "delta_total": None, "dp_event": None, "levels": {}}
  levels = {plan.unit: _level_report(plan, ledgers[plan.unit], settings) for plan in exp.levels}
  units = [plan.unit for plan in exp.levels]
  unit = "both" if len(units) == 2 else units[0]
  return {**levels[exp.privacy.unit], **common, "unit": unit, "levels": levels}


def rounds_within_budget(exp: Experiment, ledgers: dict[str, PrivacyLedger],
                         rounds_done: int) -> int:
  """The last round (<= simulation.rounds) the (epsilon, delta) budget allows.

  The run stops before the round that would take any level's epsilon past
  privacy.epsilon_budget or its delta_total past `budget.delta_limit`
  (`budget.rounds_within_budget`).
  """
  return budget.rounds_within_budget(exp, ledgers, rounds_done)[0]


def _json_number(value: float) -> float | str:
  return value if math.isfinite(value) else ("inf" if value > 0 else "nan")


def _json_numbers(tree: Any) -> Any:
  """Non-finite floats of nested dicts as strings, which strict JSON can hold."""
  if isinstance(tree, dict):
    return {key: _json_numbers(value) for key, value in tree.items()}
  return _json_number(tree) if isinstance(tree, float) else tree


def run(config: Config, out_dir: str | Path, resume: bool = False,
        progress: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Trains, evaluates and checkpoints as `config` says; returns the summary dict."""
  return run_experiment(build(config), out_dir, resume, progress, overwrite)


def run_experiment(exp: Experiment, out_dir: str | Path, resume: bool = False,
                   progress: bool | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Runs an `Experiment` (from `experiment.assemble` or `build`); returns the summary dict.

  Rounds run in blocks (many rounds per device call where the backend is
  traceable and the population lives on the device); each level's ledger
  records the events the running mechanism reports; evaluation, metrics
  lines, checkpoints and the budget stop follow `exp.settings`.
  `progress`: True a bar, False one plain line per evaluation, None a bar
  only on a terminal.

  The run holds `out_dir` under the run-directory protocol
  (`run_directory`): one run at a time, and a directory that already holds
  a run is refused unless `resume` (continue it from its verified
  checkpoint) or `overwrite` (replace it, once every check has passed).

  Raises:
    ValueError: a refusal (locked or occupied directory, a mix of runs,
      corrupt state, a budget the first round exceeds), one line; nothing
      in `out_dir` is changed.
    checkpoint.WriteError: an output file could not be written.
    interrupts.Interrupted: SIGINT or SIGTERM arrived; the rounds trained
      are checkpointed first (resume with `resume=True`).
  """
  session_start = time.perf_counter()
  directory = RunDirectory(out_dir)
  directory.acquire()
  try:
    return _run_in(directory, exp, resume, progress, overwrite, session_start)
  finally:
    directory.release()


def _expected_ledgers(exp: Experiment, rounds: int) -> dict[str, dict]:
  """Each level's ledger state after `rounds` rounds of the run's plans."""
  ledgers = {plan.unit: PrivacyLedger() for plan in exp.levels}
  for plan in exp.levels:
    plan.charge(ledgers[plan.unit], 0, rounds)
  return {unit: ledger.state_dict() for unit, ledger in ledgers.items()}


def _run_in(directory: RunDirectory, exp: Experiment, resume: bool, progress: bool | None,
            overwrite: bool, session_start: float) -> dict[str, Any]:
  sim = exp.settings
  description = sim.description
  log = directory.metrics
  out = directory.path

  init_key, rounds_key = jax.random.split(jax.random.key(sim.seed))
  state = server_init(exp.model.init(init_key), exp.server_optimizer, exp.aggregator)
  ledgers = {plan.unit: PrivacyLedger() for plan in exp.levels}
  start, totals = 0, {"wall": 0.0, "compile": 0.0, "examples": 0.0, "eval": 0.0, "total": 0.0}
  # Everything is checked before anything in the directory changes (`begin`).
  restored = directory.restore(resume, overwrite, state,
                               lambda rounds: _expected_ledgers(exp, rounds), description,
                               lambda saved: _check_resumable(saved, description))
  if restored is not None and restored.extra is not None:
    state, extra = restored.state, restored.extra
    start, totals = extra["round"], {**totals, **extra["totals"]}
    ledgers = {unit: PrivacyLedger.from_state_dict(saved)
               for unit, saved in extra["ledgers"].items()}
  earlier_sessions = totals["total"]
  last_round, limit = budget.rounds_within_budget(exp, ledgers, start)
  if last_round == 0 and limit == "delta":
    raise ValueError(f"the first round alone takes delta_total past privacy.delta = {sim.delta} "
                     f"(+{budget.DELTA_SLACK:.0%}; truncated Poisson sampling adds to delta); "
                     "raise the noise multiplier, or set privacy.allow_delta_overflow = true to "
                     "accept it")
  if last_round == 0:
    raise ValueError(f"privacy.epsilon_budget = {sim.epsilon_budget} is exceeded by "
                     "the first round alone; raise the budget or the noise multiplier")
  budget.check_planned_delta(exp, ledgers, start, last_round)
  run_id = directory.begin(restored, description)

  trainer = _Trainer(exp)
  evaluator = make_evaluator(exp)
  unit = "+".join(plan.unit for plan in exp.levels) or "non-private"
  bar = Progress(last_round, start, progress, f"{unit} {sim.backend}")
  writers = metric_writers.open_writers(sim.log_to, out, start, start > 0, log.read(),
                                        description, warn=bar.message)
  logged = start  # The last round whose metrics line is written.
  last_saved = time.monotonic()
  saved_round = start if start else None  # The round checkpoint.npz holds.
  checkpoint_path = out / "checkpoint.npz"

  def log_evaluation():
    nonlocal logged
    # Every block since the last evaluation: blocks may be cut (BlockPacer).
    metrics = {name: np.concatenate([np.atleast_1d(m[name]) for m, _ in unlogged])
               for name in unlogged[-1][0]}
    cohorts = [c for _, block in unlogged for c in block]
    with _stopwatch() as times:
      accuracy, loss = (float(v) for v in evaluator(state.params))
    totals["eval"] += times["wall"] - times["compile"]
    totals["compile"] += times["compile"]
    record = _eval_record(start, accuracy, loss, metrics, cohorts, exp, ledgers, totals)
    log.append(record)
    logged = start
    unlogged.clear()
    writers.write_evaluation(record)
    bar.evaluation(record)

  def save():
    nonlocal last_saved, saved_round
    totals["total"] = earlier_sessions + time.perf_counter() - session_start
    _save(directory, state, start, totals, ledgers, description)
    last_saved, saved_round = time.monotonic(), start

  def checkpoint_due(round_index):
    return (round_index == last_round
            or (sim.checkpoint_every and round_index % sim.checkpoint_every == 0)
            or (sim.checkpoint_seconds and
                time.monotonic() - last_saved >= sim.checkpoint_seconds))

  def evaluation_due(round_index):
    return round_index > logged and (round_index % sim.eval_every == 0 or
                                     round_index == last_round)

  unlogged = []  # (metrics, cohorts) of the blocks trained since the last evaluation.
  stop = interrupts.StopFlag()
  try:
    with interrupts.stop_on_signals(announce=bar.message) as stop:
      pacer = BlockPacer(BLOCK_SECONDS)
      for end in pacer.ends(_block_ends(start, last_round, sim.eval_every, sim.checkpoint_every),
                            lambda: start):
        with _stopwatch() as times:
          # The host's share of training (cohorts, keys) counts in wall_time_s.
          cohorts = [exp.sampler.sample(r) for r in range(start, end)]
          keys = round_keys(rounds_key, start, end)
          new_state, metrics = trainer.run(state, keys, cohorts)
          metrics = jax.device_get(metrics)
        _warn_if_nonfinite(metrics, start, end, bar.message)
        _check_finite_model(new_state, metrics, start, end)
        # The ledger is charged before `state` moves on, so no checkpoint can
        # ever hold a state that trained on rounds its ledger lacks.
        for plan in exp.levels:
          plan.charge(ledgers[plan.unit], start, end)
        totals["wall"] += times["wall"] - times["compile"]
        totals["compile"] += times["compile"]
        pacer.observe(end - start, times["wall"] - times["compile"])
        totals["examples"] += float(np.sum(metrics.pop("examples_seen", 0.0)))
        writers.write_rounds(start, metrics)
        unlogged.append((metrics, cohorts))
        state, start = new_state, end
        bar.advance(len(cohorts))
        if evaluation_due(end):
          log_evaluation()
        if checkpoint_due(end) or stop:
          save()
        if stop:
          raise interrupts.Interrupted(stop.signum, start, str(checkpoint_path))
  except interrupts.Interrupted:
    raise
  except KeyboardInterrupt:
    # A block cut short had donated the state it started from; otherwise the
    # state is whole: finish its bookkeeping so nothing computed is lost.
    if not any(leaf.is_deleted() for leaf in jax.tree.leaves(state)):
      if evaluation_due(start) and unlogged:
        log_evaluation()
      save()
    raise interrupts.Interrupted(stop.signum or signal.SIGINT, saved_round or 0,
                                 None if saved_round is None else str(checkpoint_path)) from None
  finally:
    bar.close()
    writers.close()

  # Also right when resuming a run that had already finished.
  with _stopwatch() as times:
    accuracy, loss = (float(v) for v in evaluator(state.params))
  totals["eval"] += times["wall"] - times["compile"]
  totals["compile"] += times["compile"]
  report = _privacy_report(exp, ledgers, stopped_by=limit if start < sim.rounds else None)
  summary = {
      "test_accuracy": _json_number(accuracy),
      "test_loss": _json_number(loss),
      "rounds": start,
      "rounds_planned": sim.rounds,
      "backend": sim.backend,
      "wall_time_s": totals["wall"],
      "compile_time_s": totals["compile"],
      "eval_time_s": totals["eval"],
      "total_time_s": earlier_sessions + time.perf_counter() - session_start,
      "examples_per_s": totals["examples"] / max(totals["wall"], 1e-9),
      "num_clients": exp.train.num_clients,
      "privacy": _json_numbers(report),
      "run_id": run_id,
  }
  directory.write_summary(summary)
  plots.plot([out], out / "curves.png", title=f"{out.name}: {unit} {sim.backend}")
  return summary


def _warn_if_nonfinite(metrics: dict, start: int, end: int, warn) -> None:
  """One line (through `warn`) when non-finite updates exceed NONFINITE_WARNING_SHARE of the block's clients.

  Those updates were already left out of the sums (the round builder zeroes
  them and counts them in `nonfinite_clients`); the line says how many.
  """
  dropped = float(np.sum(metrics.get("nonfinite_clients", 0.0)))
  real = dropped + float(np.sum(metrics.get("clients", 0.0)))
  if real and dropped > NONFINITE_WARNING_SHARE * real:
    warn(f"warning: {_rounds_text(start, end)}: {dropped:.0f} of {real:.0f} client updates were "
         "NaN, inf or too large (L2 norm above 1.8e19) and were left out of the aggregate")


def _rounds_text(start: int, end: int) -> str:
  """The rounds of a block, 1-based as the console counts them."""
  return f"round {end}" if end == start + 1 else f"rounds {start + 1}-{end}"


def _check_finite_model(state: ServerState, metrics: dict, start: int, end: int) -> None:
  """Refuses to go on (ValueError) when the block left the server model NaN or inf.

  Client updates that are non-finite or too large to square in float32 are
  left out of the sums, so those sums stay finite, but the server step can
  still overflow (a server learning rate of 1e38); every later round and
  evaluation would then be nan.
  """
  if bool(tree_util.all_finite(state.params)):
    return
  norms = np.asarray(metrics.get("update_norm", [math.nan]))
  raise ValueError(
      f"{_rounds_text(start, end)}: the server model became NaN or inf (largest update_norm "
      f"{float(np.max(norms)):.3g}): the aggregated update or the server step overflowed float32. "
      "Lower client.learning_rate or server.learning_rate, or clip the updates "
      "(privacy.unit = user bounds each by privacy.clip_norm)")


def _eval_record(round_index, accuracy, loss, metrics, cohorts, exp, ledgers, totals):
  record = {"round": round_index, "test_accuracy": accuracy, "test_loss": loss,
            "wall_time_s": totals["wall"], "compile_time_s": totals["compile"],
            "eval_time_s": totals["eval"],
            "cohort_overflow": int(sum(c.overflow for c in cohorts))}
  for name, values in metrics.items():
    summed = name in ("nonfinite_clients", "batch_overflow")
    record[name] = float(np.sum(values) if summed else np.mean(values))
  settings = exp.settings
  for plan in exp.levels:
    epsilon, delta_total = ledgers[plan.unit].epsilon(settings.delta, settings.accountant)
    # The primary level keeps the plain names; the example level under unit = both is prefixed.
    prefix = "" if plan.unit == exp.privacy.unit else f"{plan.unit}_"
    record.update({f"{prefix}epsilon": _json_number(epsilon), f"{prefix}delta_total": delta_total})
  return record


def _save(directory, state, round_index, totals, ledgers, description: dict) -> None:
  directory.save_checkpoint(state, {
      "round": round_index, "totals": totals, "config": description,
      "ledgers": {unit: ledger.state_dict() for unit, ledger in ledgers.items()}}, description)


def _check_resumable(saved: dict, current: dict) -> None:
  for section, values in current.items():
    for name, value in values.items():
      old = saved.get(section, {}).get(name)
      if isinstance(value, tuple):
        old = tuple(old) if old is not None else None
      if old != value and not (section == "simulation" and name in RESUMABLE_CHANGES):
        raise ValueError(f"cannot resume: {section}.{name} was {old!r} in the checkpoint's run, "
                         f"now {value!r}")
