"""The package's dependencies point one way (DESIGN.md): a test that reads every import.

Each module's imports of `fedjax_priv` are parsed from its source (top level
and inside functions, so a lazy import cannot hide a cycle) and checked
against the layer it belongs to.
"""

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fedjax_priv"

# The application layer: it builds and runs experiments from objects or config.
APP = {"cli", "config", "experiment", "runner", "sweep", "canary_audit", "checkpoint"}
# What each lower layer may import from fedjax_priv (besides itself).
ALLOWED = {
    "simulation": {"algorithms", "secure", "privacy", "data", "models", "tree", "checks", "types"},
    "algorithms": {"privacy", "data", "models", "tree", "checks", "types"},
    "secure": {"privacy", "tree", "checks", "types"},
    "privacy": {"tree", "checks", "types"},
    "data": {"tree", "checks", "types"},
    "models": {"tree", "checks", "types"},
}


def _imported_packages(path: pathlib.Path) -> set[str]:
  """The first component under fedjax_priv of every module `path` imports."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      parts = node.module.split(".")
      if parts[0] == "fedjax_priv":
        # `from fedjax_priv import tree` names the module in `names`.
        found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
    elif isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "fedjax_priv" and len(parts) > 1:
          found.add(parts[1])
  return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_lower_layers_never_import_above_themselves(layer):
  violations = []
  for path in sorted((PACKAGE / layer).rglob("*.py")):
    for name in _imported_packages(path) - ALLOWED[layer] - {layer}:
      violations.append(f"{path.relative_to(PACKAGE)} imports fedjax_priv.{name}")
  assert not violations, "\n".join(violations)


def test_nothing_below_the_app_layer_imports_it():
  below = [p for layer in ALLOWED for p in (PACKAGE / layer).rglob("*.py")]
  below += [PACKAGE / "tree.py", PACKAGE / "checks.py", PACKAGE / "types.py"]
  offenders = [f"{p.relative_to(PACKAGE)} imports {sorted(_imported_packages(p) & APP)}"
               for p in below if _imported_packages(p) & APP]
  assert not offenders, "\n".join(offenders)


def test_the_checker_sees_lazy_imports(tmp_path):
  module = tmp_path / "m.py"
  module.write_text("def f():\n  from fedjax_priv.runner import run\n  import fedjax_priv.sweep\n")
  assert _imported_packages(module) == {"runner", "sweep"}


def test_importing_every_module_leaves_jax_unconfigured():
  """No module computes with JAX at import: a user can still configure JAX afterwards.

  A module-level `jnp` constant starts JAX's backend on `import fedjax_priv`,
  after which JAX settings such as the CPU device count are refused or ignored.
  """
  script = textwrap.dedent("""
      import importlib, pkgutil
      import jax
      import fedjax_priv
      for module in pkgutil.walk_packages(fedjax_priv.__path__, "fedjax_priv."):
        importlib.import_module(module.name)
      jax.config.update("jax_num_cpu_devices", 3)
      print(len(jax.devices("cpu")))
      """)
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[-1] == "3"
