"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM.

A signal does not cut a block of rounds short: the first SIGINT or SIGTERM
only sets a flag, and the runner stops at the end of the block in progress,
after charging the ledger, logging the evaluation that is due and writing a
checkpoint, so nothing computed is lost and the run resumes bit-identically
(`fedjax-priv run ... --resume`). The runner then raises `Interrupted`, which
the CLI turns into one line naming the resume command and the conventional
exit status 128 + signal number (130 for SIGINT, 143 for SIGTERM).

A second signal while waiting (a block on the device can take minutes)
raises `KeyboardInterrupt` at once; the runner still saves the state of the
last whole block when the device has not consumed it (see `runner`).

Handlers are only installed from the main thread (Python delivers signals
there); elsewhere `stop_on_signals` watches nothing and the default
behaviour stays.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
  """A run stopped by a signal after saving its checkpoint.

  A KeyboardInterrupt (so a BaseException): `except Exception` in user code
  does not swallow a request to stop, and code that handles Ctrl-C handles it.

  Attributes:
    signum: the signal that stopped the run.
    rounds_done: rounds trained and recorded in the checkpoint.
    checkpoint: path of the checkpoint written, or None if none could be.
  """

  def __init__(self, signum: int, rounds_done: int, checkpoint: str | None):
    super().__init__(f"{signal.Signals(signum).name} after round {rounds_done}")
    self.signum = signum
    self.rounds_done = rounds_done
    self.checkpoint = checkpoint

  @property
  def exit_status(self) -> int:
    """128 + signal number: 130 for SIGINT, 143 for SIGTERM (shell convention)."""
    return 128 + self.signum


class StopFlag:
  """Set by the first signal; `signum` says which (None while unset)."""

  def __init__(self):
    self.signum: int | None = None

  def __bool__(self) -> bool:
    return self.signum is not None


@contextlib.contextmanager
def stop_on_signals(announce=None) -> Iterator[StopFlag]:
  """Within the block, SIGINT/SIGTERM set the yielded flag instead of killing the process.

  Args:
    announce: optional `str -> None` told once, at the first signal, that the
      run will stop after the current block (e.g. the progress bar's write).

  Yields:
    A `StopFlag`: true once a signal arrived. A second signal raises
    KeyboardInterrupt in the main thread.
  """
  flag = StopFlag()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del frame
    if flag:
      raise KeyboardInterrupt
    flag.signum = signum
    if announce is not None:
      announce(f"{signal.Signals(signum).name}: stopping after the current block of rounds "
               "(send it again to stop now)")

  previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
  try:
    yield flag
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)
