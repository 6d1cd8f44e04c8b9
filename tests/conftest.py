"""Fixtures shared by several test modules."""

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache


@pytest.fixture(scope="module")
def module_compilation_cache(tmp_path_factory):
  """JAX's persistent compilation cache, as the CLI uses it, for one module only.

  Modules whose tests compile the same programs several times (runner runs,
  resumes) opt in with `pytestmark = pytest.mark.usefixtures(...)`.
  Afterwards JAX's cache config and state are restored.
  """
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope="session")
def fail_trainer_at_block():
  """A function `(monkeypatch, block, error=KeyboardInterrupt)`: the runner's `block`-th
  device call (1-based) raises `error`, as a Ctrl-C or a crash there would."""
  from fedjax_priv import runner

  def patch(monkeypatch, block, error=KeyboardInterrupt):
    original, calls = runner._Trainer.run, [0]

    def run(self, state, keys, cohorts):
      calls[0] += 1
      if calls[0] == block:
        raise error
      return original(self, state, keys, cohorts)

    monkeypatch.setattr(runner._Trainer, "run", run)

  return patch
