"""What every results page says about its run: the command that regenerates it, and the hardware.

Imported by the scripts in this folder (run as `python experiments/NAME.py`,
which puts this folder on sys.path).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]


def command() -> str:
  """The command line of this run, from the repository root."""
  script = Path(sys.argv[0]).resolve().relative_to(ROOT)
  return "JAX_PLATFORMS=cpu .venv/bin/python " + shlex.join([str(script)] + sys.argv[1:])


def hardware() -> str:
  """JAX backend and device, CPU cores and the load they carried, Python version."""
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  return (f"jax {jax.__version__} on {jax.default_backend()} ({device.device_kind}); "
          f"{os.cpu_count()} CPU cores ({cpu}), shared with other jobs: load average "
          f"{os.getloadavg()[0]:.1f} at the end of the run; python {platform.python_version()}")


def command_and_hardware() -> list[str]:
  """A results page's lines naming the command that regenerates it and the hardware it ran on."""
  return [f"Command: `{command()}`", "", f"Hardware: {hardware()}.", ""]
