"""Every example on the docs pages this file covers runs, as written.

docs/tutorial.md: in a fresh directory, in order, the `toml` block is saved
as tutorial.toml, every line of an `sh` block is run as a `fedjax-priv`
command (in process) and must exit 0, and the `python` block is executed.
docs/secure_aggregation.md: the calling example is executed. Every other page
runs its python blocks tagged `<!-- doc-test -->`, in order, in one namespace.
"""

import re
import shlex
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from fedjax_priv import cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def in_tmp_dir(tmp_path, monkeypatch):
  """cwd = tmp_path; the CLI's XLA cache there; JAX's cache config restored afterwards."""
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("FEDJAX_PRIV_CACHE", str(tmp_path / "xla"))
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {name: getattr(jax.config, name) for name in names}
  yield tmp_path
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _blocks(page):
  return re.findall(r"```(\w+)\n(.*?)```", (DOCS / page).read_text(), re.S)


def _command(line, capsys):
  argv = shlex.split(line)
  assert argv[0] == "fedjax-priv", line
  try:
    status = cli.main(argv[1:])
  except SystemExit as stop:  # --version exits through argparse.
    status = stop.code
  assert status == 0, (line, capsys.readouterr())
  return capsys.readouterr().out


def test_tutorial_runs_as_written(in_tmp_dir, capsys):
  blocks = _blocks("tutorial.md")
  assert [kind for kind, _ in blocks].count("toml") == 1
  printed = {}
  for kind, text in blocks:
    if kind == "toml":
      Path("tutorial.toml").write_text(text)
    elif kind == "sh":
      for line in text.strip().splitlines():
        printed[line] = _command(line, capsys)
    else:
      assert kind == "python", kind
      exec(text, {})
      printed["python"] = capsys.readouterr().out
  # What the prose promises about each step.
  assert "1,199,882 params" in printed["fedjax-priv list"]
  calibrated = printed["fedjax-priv calibrate tutorial.toml --set privacy.target_epsilon=8"]
  assert "target 8" in calibrated and "delta_total" in calibrated
  run = Path("runs/tutorial")
  for name in ("metrics.jsonl", "metrics.csv", "rounds.csv", "summary.json", "checkpoint.npz",
               "config.json", "curves.png"):
    assert (run / name).exists(), name
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  sweep = Path("runs/tutorial-sweep")
  assert (sweep / "curves.json").exists() and Path("runs/sweep.png").exists()
  lines = printed["python"].splitlines()
  assert len(lines) == 2 and all("seeds (0, 1) delta 1e-05" in line for line in lines)


def test_secure_aggregation_calling_example_runs(in_tmp_dir, capsys):
  text = (DOCS / "secure_aggregation.md").read_text()
  block = re.search(r"<!-- doc-test: calling-example -->\s*```python\n(.*?)```", text, re.S)
  assert block
  exec(block.group(1), {})
  printed = capsys.readouterr().out
  assert re.search(r"accuracy 0\.\d+, \d+ bytes per client \(\d+\.\dx the float32 update\), "
                   r"failed 0", printed), printed


# Pages whose examples are fragments of a larger program (tutorial.md and
# secure_aggregation.md run above) must still show one complete calling example.
TAGGED_PAGES = ("privacy.md", "distributed_dp.md", "homomorphic_encryption.md",
                "matrix_factorization.md", "scaling.md")


def _tagged_blocks(page):
  return re.findall(r"<!-- doc-test(?:: [\w-]+)? -->\s*```python\n(.*?)```",
                    (DOCS / page).read_text(), re.S)


def test_every_docs_page_has_a_tested_calling_example():
  pages = {path.name for path in DOCS.glob("*.md")}
  untested = pages - set(TAGGED_PAGES) - {"tutorial.md", "secure_aggregation.md"}
  assert not untested, f"docs pages without a tested example: {sorted(untested)}"
  assert all(_tagged_blocks(page) for page in TAGGED_PAGES)


@pytest.mark.parametrize("page", TAGGED_PAGES)
def test_tagged_examples_run_as_written(page, in_tmp_dir):
  """Every python block tagged `<!-- doc-test -->` (or `<!-- doc-test: name -->`, which other
  tests also run), in order, in one namespace."""
  namespace = {}
  for i, block in enumerate(_tagged_blocks(page)):
    exec(compile(block, f"docs/{page} example {i}", "exec"), namespace)
