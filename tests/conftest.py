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
