"""The CLI's tools around runs: --version, list, run --dry-run, data prepare --help."""

import tomllib

import pytest

from fedjax_priv import __version__, catalog, cli
from fedjax_priv import config as config_lib
from fedjax_priv.models import zoo


def test_version(capsys):
  with pytest.raises(SystemExit) as info:
    cli.main(["--version"])
  assert info.value.code == 0
  assert capsys.readouterr().out.strip() == f"fedjax-priv {__version__}"


def test_list_names_every_choice_with_parameter_counts(capsys):
  assert cli.main(["list"]) == 0
  printed = capsys.readouterr().out
  for key in ("model.name", "privacy.unit", "privacy.noise", "data.dataset"):
    for choice in config_lib.CHOICES[key]:
      assert f"  {choice} " in printed, choice
  cnn = catalog.parameter_count(zoo.cnn((28, 28, 1), 10))
  assert cnn == 1_199_882 and f"{cnn:,} params" in printed
  assert f"{catalog.parameter_count(zoo.logistic_regression((8, 8), 10)):,} params" in printed


def test_dry_run_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
  config = tmp_path / "c.toml"
  config.write_text('[privacy]\nunit = "user"\ntarget_epsilon = 2.0\n')
  out = tmp_path / "out"
  assert cli.main(["run", str(config), "--dry-run", "--set", "simulation.rounds=7",
                   "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert not out.exists()
  parsed = tomllib.loads(printed)
  resolved = config_lib.to_dict(config_lib.load(config, ["simulation.rounds=7"]))
  # Every key of every table is printed; the unset sigma is a comment naming its target.
  for section, values in resolved.items():
    for name, value in values.items():
      if value is None:
        assert f"# {name} unset:" in printed
        continue
      got = parsed[section][name]
      assert (tuple(got) if isinstance(got, list) else got) == value, (section, name)
  assert "# noise_multiplier unset: calibrated to privacy.target_epsilon" in printed
  assert config_lib.from_dict(parsed) == config_lib.load(config, ["simulation.rounds=7"])


def test_data_prepare_help_gives_meanings_and_defaults(capsys):
  with pytest.raises(SystemExit):
    cli.main(["data", "prepare", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  for phrase in ("number of clients; default: fashion_mnist 100, mnist5k 50, synthetic 30",
                 "--dirichlet-alpha", "label skew", "default: mnist5k 0.2, shakespeare 0.2",
                 "default data/NAME.sqlite", "replace existing stores"):
    assert phrase in text, phrase
