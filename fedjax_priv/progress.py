"""What a run shows while it trains: a progress bar on a terminal, plain lines elsewhere.

The bar (tqdm) advances after every block of rounds, not only at
evaluations, and shows the last test accuracy and epsilon. Where a bar would
fill a log file with carriage-return frames (`--no-progress`, or stderr not a
terminal), the run prints one plain line per evaluation instead:

  round 20/100  test_acc 0.8125  test_loss 0.5312  eps 1.234 (delta 1e-05)  train 12.3 s  eval 0.4 s
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm.auto import tqdm


def _epsilon_text(record: dict[str, Any]) -> str:
  epsilon = record.get("epsilon")
  if epsilon is None:
    return ""
  epsilon = f"{epsilon:.4g}" if isinstance(epsilon, float) else str(epsilon)
  delta = record.get("delta_total")
  return f"  eps {epsilon}" + (f" (delta {delta:.3g})" if delta is not None else "")


def evaluation_line(record: dict[str, Any], total_rounds: int) -> str:
  """One plain line describing an evaluation record (a metrics.jsonl line)."""
  return (f"round {record['round']}/{total_rounds}  test_acc {record['test_accuracy']:.4f}  "
          f"test_loss {record['test_loss']:.4f}{_epsilon_text(record)}  "
          f"train {record['wall_time_s']:.1f} s  eval {record.get('eval_time_s', 0.0):.1f} s")


class Progress:
  """A run's progress display.

  Args:
    total: the rounds the run will reach.
    initial: rounds already done (resume).
    bar: True draws a tqdm bar, advanced per block; False prints
      `evaluation_line` per evaluation. None picks the bar only when `stream`
      is a terminal.
    description: the bar's label.
    stream: where it writes (stderr by default).
  """

  def __init__(self, total: int, initial: int = 0, bar: bool | None = None,
               description: str = "", stream: TextIO | None = None):
    self.stream = stream or sys.stderr
    if bar is None:
      bar = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.total = total
    self.bar = tqdm(total=total, initial=initial, unit="round", desc=description,
                    file=self.stream) if bar else None

  def advance(self, rounds: int) -> None:
    """`rounds` more rounds trained (called after every block)."""
    if self.bar is not None:
      self.bar.update(rounds)

  def evaluation(self, record: dict[str, Any]) -> None:
    if self.bar is not None:
      self.bar.set_postfix(acc=f"{record['test_accuracy']:.3f}", eps=record.get("epsilon", "inf"))
    else:
      self.message(evaluation_line(record, self.total))

  def message(self, text: str) -> None:
    """A line that does not break the bar."""
    if self.bar is not None:
      self.bar.write(text, file=self.stream)
    else:
      print(text, file=self.stream, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class BlockPacer:
  """Cuts blocks of rounds so one device call lasts about `seconds`.

  A block of `eval_every` rounds scanned in one device call can take minutes
  (Fashion-MNIST CNN): the bar would not move, a signal would wait for it,
  and `checkpoint_seconds` could not be kept. Once a block has been timed
  (training time without compilation), later blocks are cut into pieces of
  `cap = max(1, seconds / seconds_per_round)` rounds, fixed from then on, so
  at most two new block lengths (cap and a remainder) are compiled. Blocks
  that already take less than twice `seconds` are never cut, so short runs
  compile exactly as before. Results do not depend on the cut: every round's
  cohort and key are functions of (seed, round).
  """

  def __init__(self, seconds: float):
    self.seconds = seconds
    self.cap: int | None = None

  def ends(self, block_ends, current):
    """Yields block ends: each of `block_ends`, reached in steps of at most `cap` rounds.

    Args:
      block_ends: increasing round numbers (evaluations, checkpoints, the last).
      current: `() -> int`, the rounds done so far (read after each block).
    """
    for target in block_ends:
      while current() < target:
        yield target if self.cap is None else min(target, current() + self.cap)

  def observe(self, rounds: int, train_seconds: float) -> None:
    """Records that a block of `rounds` rounds trained in `train_seconds` (no compile)."""
    if self.cap is None and rounds > 1 and train_seconds > 2 * self.seconds:
      self.cap = max(1, int(self.seconds * rounds / train_seconds))
