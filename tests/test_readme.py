"""The README's open-API example runs as written, and keeps what it promises.

The example trains a user's chain on a Flax NNX model with Poisson cohorts
through `assemble` / `run_experiment`, sweeps sigma, and runs `secure_sum`.
This test executes it, then checks its claims: the epsilon is the chain's,
each sweep row equals its own run, and a run interrupted and resumed equals
the uninterrupted one.
"""

import json
import pathlib
import re
import shutil

import dp_accounting
import pytest

from fedjax_priv.privacy import accounting

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.usefixtures("module_compilation_cache")


def _doc_block(tag: str) -> str:
  match = re.search(rf"<!-- doc-test: {tag} -->\s*```python\n(.*?)```", README.read_text(),
                    re.DOTALL)
  assert match, f"README.md has no doc-test block {tag!r}"
  return match.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  """The README block, run in a fresh directory; its namespace."""
  cwd = tmp_path_factory.mktemp("readme")
  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.chdir(cwd)
    namespace = {}
    exec(compile(_doc_block("open-api"), "README.md", "exec"), namespace)
  return cwd, namespace


def _lines(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_epsilon_is_the_chains(example):
  """Under PLD, the chain's Gaussian on Poisson cohorts of q = 0.2 truncated to the capacity
  (52 for 101 clients, the larger add/remove neighbour), with nothing charged to delta."""
  _, ns = example
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.TruncatedSubsampledGaussianDpEvent(
      101, 0.2, 52, 1.0), 40)
  assert ns["cohorts"].sampler(0).capacity == 52
  privacy = ns["summary"]["privacy"]
  assert privacy["epsilon"] == pytest.approx(
      accounting.compute_epsilon(event, 1e-5, "pld"), rel=1e-9)
  assert privacy["delta_total"] == privacy["delta"] == 1e-5
  assert ns["summary"]["test_accuracy"] > 0.5
  # SecAgg adds no noise: no epsilon is claimed for it.
  assert ns["masked"]["privacy"]["unit"] == "none"


def test_sweep_rows_are_their_own_runs(example, tmp_path):
  _, ns = example
  rows = ns["sweep"].rows
  assert [row["sigma"] for row in rows] == [0.7, 1.0, 1.5]
  epsilons = [row["epsilon"] for row in rows]
  assert epsilons == sorted(epsilons, reverse=True)
  middle = rows[1]
  assert middle["epsilon"] == pytest.approx(ns["summary"]["privacy"]["epsilon"], rel=1e-12)
  assert middle["test_accuracy"] == pytest.approx(ns["summary"]["test_accuracy"], abs=2e-3)


def test_interrupted_and_resumed_equals_uninterrupted(example, tmp_path, monkeypatch,
                                                      fail_trainer_at_block):
  cwd, ns = example
  out = tmp_path / "interrupted"
  with monkeypatch.context() as patch:
    # Blocks end at rounds 20 and 40: Ctrl-C as the second starts.
    fail_trainer_at_block(patch, 2)
    with pytest.raises(KeyboardInterrupt):
      ns["fp"].run_experiment(ns["experiment"](1.0), out, progress=False)
  assert [line["round"] for line in _lines(out / "metrics.jsonl")] == [20]
  resumed = ns["fp"].run_experiment(ns["experiment"](1.0), out, resume=True, progress=False)
  straight = cwd / "runs" / "readme"
  timing = ("wall_time_s", "compile_time_s", "eval_time_s")
  for a, b in zip(_lines(out / "metrics.jsonl"), _lines(straight / "metrics.jsonl"),
                  strict=True):
    assert {k: v for k, v in a.items() if k not in timing} == pytest.approx(
        {k: v for k, v in b.items() if k not in timing}, rel=1e-6, abs=1e-6)
  assert resumed["test_accuracy"] == pytest.approx(ns["summary"]["test_accuracy"], abs=1e-6)
  assert resumed["privacy"]["epsilon"] == ns["summary"]["privacy"]["epsilon"]
  shutil.rmtree(out)
