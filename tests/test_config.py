"""Tests of `fedjax_priv.config`: TOML files, `--set` overrides, validation.

Every bad input must raise `ConfigError` (a ValueError) whose message names
the offending key, before anything is built or compiled.
"""

import dataclasses
import math
from pathlib import Path

import pytest

from fedjax_priv import config as config_lib
from fedjax_priv.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "experiments" / "demo.toml"


def _write(tmp_path, text, name="exp.toml"):
  path = tmp_path / name
  path.write_text(text)
  return path


# --------------------------------------------------------------------------
# Valid configs.


def test_defaults_validate():
  config = config_lib.load()
  assert config == config_lib.Config()
  config_lib.validate(config)  # Does not raise.
  assert config.privacy.unit == "none"
  assert config.model.hidden == (64,)
  assert config.simulation.data_on_device is True


def test_from_dict_of_to_dict_round_trips():
  config = config_lib.load(None, ["model.hidden=[8, 4]", "privacy.unit=user"])
  assert config_lib.from_dict(config_lib.to_dict(config)) == config


def test_toml_file_is_read(tmp_path):
  path = _write(tmp_path, """
[data]
num_clients = 6
partition = "iid"

[model]
name = "logistic_regression"

[privacy]
unit = "example"
noise_multiplier = 2      # an int where a float is expected is fine
delta = 1e-6

[simulation]
rounds = 4
cohort_size = 3
data_on_device = false
""")
  config = config_lib.load(path)
  assert config.data.num_clients == 6
  assert config.data.partition == "iid"
  assert config.model.name == "logistic_regression"
  assert config.privacy.unit == "example"
  assert config.privacy.noise_multiplier == 2.0
  assert isinstance(config.privacy.noise_multiplier, float)
  assert config.privacy.delta == 1e-6
  assert config.simulation.rounds == 4
  assert config.simulation.data_on_device is False
  # Keys the file does not mention keep their defaults.
  assert config.client == config_lib.ClientConfig()


def test_overrides_apply_on_top_of_file(tmp_path):
  path = _write(tmp_path, "[simulation]\nrounds = 4\ncohort_size = 3\n[data]\nnum_clients = 6\n")
  config = config_lib.load(path, [
      "simulation.rounds=12",                 # int
      "client.learning_rate=0.25",            # float
      "privacy.delta=1e-7",                   # float in exponent form
      "model.name=logistic_regression",       # bare string
      'server.optimizer="adam"',              # quoted string
      "model.hidden=[8,8]",                   # list
      "simulation.data_on_device=false",      # boolean
      " simulation.seed = 7 ",                # spaces around key and value
  ])
  assert config.simulation.rounds == 12
  assert config.simulation.cohort_size == 3  # From the file.
  assert config.data.num_clients == 6        # From the file.
  assert config.client.learning_rate == 0.25
  assert config.privacy.delta == 1e-7
  assert config.model.name == "logistic_regression"
  assert config.server.optimizer == "adam"
  assert config.model.hidden == (8, 8)
  assert isinstance(config.model.hidden, tuple)
  assert config.simulation.data_on_device is False
  assert config.simulation.seed == 7


def test_later_override_wins():
  config = config_lib.load(None, ["simulation.rounds=5", "simulation.rounds=9"])
  assert config.simulation.rounds == 9


def test_parse_override_reads_toml_values_else_strings():
  assert config_lib.parse_override("a.b=3") == ("a.b", 3)
  assert config_lib.parse_override("a.b=3.5") == ("a.b", 3.5)
  assert config_lib.parse_override("a.b=true") == ("a.b", True)
  assert config_lib.parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
  assert config_lib.parse_override('a.b="x y"') == ("a.b", "x y")
  assert config_lib.parse_override("a.b=poisson") == ("a.b", "poisson")
  # Only the first '=' splits.
  assert config_lib.parse_override("a.b=x=y") == ("a.b", "x=y")


def test_user_level_pld_is_fine_with_poisson_or_full_cohorts():
  poisson = config_lib.load(None, ["privacy.unit=user", "privacy.accountant=pld",
                                   "simulation.sampling=poisson", "data.num_clients=6",
                                   "simulation.cohort_size=3"])
  assert poisson.privacy.accountant == "pld"
  full = config_lib.load(None, ["privacy.unit=user", "privacy.accountant=pld",
                                "data.num_clients=6", "simulation.cohort_size=6"])
  assert full.simulation.sampling == "fixed"


def test_config_is_frozen():
  config = config_lib.load()
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.simulation.rounds = 3  # type: ignore[misc]


# --------------------------------------------------------------------------
# Bad input: ConfigError naming the key.


@pytest.mark.parametrize("override, key", [
    # Unknown keys and tables.
    ("privacy.nosie=1", "privacy.nosie"),
    ("simulation.round=4", "simulation.round"),
    ("optim.lr=0.1", "optim"),
    # Wrong types.
    ("simulation.rounds=1.5", "simulation.rounds"),
    ('simulation.rounds="ten"', "simulation.rounds"),
    ("simulation.rounds=ten", "simulation.rounds"),
    ("simulation.rounds=true", "simulation.rounds"),
    ("privacy.noise_multiplier=true", "privacy.noise_multiplier"),
    ("privacy.noise_multiplier=lots", "privacy.noise_multiplier"),
    ("simulation.data_on_device=1", "simulation.data_on_device"),
    ("simulation.data_on_device=yes", "simulation.data_on_device"),
    ("model.name=3", "model.name"),
    ("model.hidden=8", "model.hidden"),
    ("model.hidden=[8, 1.5]", "model.hidden[1]"),
    ("simulation.rounds=", "simulation.rounds"),
    # Out of range.
    ("privacy.noise_multiplier=-1", "privacy.noise_multiplier"),
    ("privacy.noise_multiplier=nan", "privacy.noise_multiplier"),
    ("privacy.noise_multiplier=inf", "privacy.noise_multiplier"),
    ("privacy.target_epsilon=-2", "privacy.target_epsilon"),
    ("privacy.delta=1", "privacy.delta"),
    ("privacy.delta=0", "privacy.delta"),
    ("privacy.delta=nan", "privacy.delta"),
    ("privacy.clip_norm=0", "privacy.clip_norm"),
    ("privacy.clip_norm=inf", "privacy.clip_norm"),
    ("data.test_fraction=0", "data.test_fraction"),
    ("data.test_fraction=1", "data.test_fraction"),
    ("data.num_clients=0", "data.num_clients"),
    ("data.dirichlet_alpha=nan", "data.dirichlet_alpha"),
    ("data.seed=-1", "data.seed"),
    ("simulation.rounds=0", "simulation.rounds"),
    ("simulation.eval_every=0", "simulation.eval_every"),
    ("simulation.checkpoint_every=-1", "simulation.checkpoint_every"),
    ("simulation.client_chunk_size=0", "simulation.client_chunk_size"),
    ("client.local_steps=0", "client.local_steps"),
    ("client.batch_size=-8", "client.batch_size"),
    ("client.learning_rate=0", "client.learning_rate"),
    ("model.hidden=[8, 0]", "model.hidden"),
    # Bad choices.
    ("simulation.backend=gpu", "simulation.backend"),
    ("simulation.sampling=shuffle", "simulation.sampling"),
    ("privacy.unit=group", "privacy.unit"),
    ("privacy.accountant=moments", "privacy.accountant"),
    ("model.name=resnet", "model.name"),
    ("server.optimizer=lamb", "server.optimizer"),
    ("data.partition=shards", "data.partition"),
])
def test_bad_override_names_the_key(override, key):
  with pytest.raises(ConfigError) as info:
    config_lib.load(None, [override])
  assert key in str(info.value)


def test_config_error_is_a_value_error():
  assert issubclass(ConfigError, ValueError)


def test_cohort_larger_than_population_names_both_keys():
  with pytest.raises(ConfigError) as info:
    config_lib.load(None, ["data.num_clients=6", "simulation.cohort_size=7"])
  message = str(info.value)
  assert "simulation.cohort_size" in message and "data.num_clients" in message


def test_cohort_equal_to_population_is_fine():
  config = config_lib.load(None, ["data.num_clients=6", "simulation.cohort_size=6"])
  assert config.simulation.cohort_size == 6


def test_pld_with_fixed_cohorts_is_accepted():
  # Fixed-size cohorts get their tight pair under PLD (docs/privacy.md).
  config = config_lib.load(None, ["privacy.unit=user", "privacy.accountant=pld",
                                  "simulation.sampling=fixed", "data.num_clients=6",
                                  "simulation.cohort_size=3"])
  assert config.privacy.accountant == "pld"


def test_target_epsilon_needs_a_privacy_unit():
  with pytest.raises(ConfigError) as info:
    config_lib.load(None, ["privacy.unit=none", "privacy.target_epsilon=3"])
  assert "privacy.target_epsilon" in str(info.value)
  # With a unit it is accepted.
  config = config_lib.load(None, ["privacy.unit=user", "privacy.target_epsilon=3"])
  assert config.privacy.target_epsilon == 3.0


@pytest.mark.parametrize("text", ["privacy.noise_multiplier", "privacy.noise_multiplier 1", ""])
def test_override_without_equals_sign(text):
  with pytest.raises(ConfigError) as info:
    config_lib.load(None, [text])
  assert "key=value" in str(info.value)
  assert repr(text) in str(info.value)


@pytest.mark.parametrize("text", ["rounds=4", "simulation.rounds.x=4", "=4"])
def test_override_key_must_be_section_dot_name(text):
  with pytest.raises(ConfigError) as info:
    config_lib.load(None, [text])
  assert "section.name" in str(info.value)


def test_missing_file(tmp_path):
  path = tmp_path / "nope.toml"
  with pytest.raises(ConfigError) as info:
    config_lib.load(path)
  assert "not found" in str(info.value)
  assert str(path) in str(info.value)


def test_invalid_toml(tmp_path):
  path = _write(tmp_path, "[simulation]\nrounds = = 4\n")
  with pytest.raises(ConfigError) as info:
    config_lib.load(path)
  assert "not valid TOML" in str(info.value)
  assert str(path) in str(info.value)


def test_unknown_key_in_file_names_it_and_lists_known_keys(tmp_path):
  path = _write(tmp_path, "[privacy]\nnosie = 1.0\n")
  with pytest.raises(ConfigError) as info:
    config_lib.load(path)
  message = str(info.value)
  assert "privacy.nosie" in message
  assert "noise_multiplier" in message  # The known keys help spot the typo.


def test_unknown_table_in_file(tmp_path):
  path = _write(tmp_path, "[optimiser]\nlr = 0.1\n")
  with pytest.raises(ConfigError) as info:
    config_lib.load(path)
  assert "optimiser" in str(info.value)


def test_section_that_is_not_a_table(tmp_path):
  path = _write(tmp_path, "data = 3\n")
  with pytest.raises(ConfigError) as info:
    config_lib.load(path)
  assert "[data]" in str(info.value)
  with pytest.raises(ConfigError) as info:
    config_lib.load(path, ["data.num_clients=4"])
  assert "[data]" in str(info.value)


def test_wrong_type_in_file_names_the_key(tmp_path):
  path = _write(tmp_path, '[simulation]\nrounds = "ten"\n')
  with pytest.raises(ConfigError) as info:
    config_lib.load(path)
  assert "simulation.rounds" in str(info.value)


def test_override_fixes_a_bad_file_value(tmp_path):
  path = _write(tmp_path, "[simulation]\nrounds = 0\n")
  with pytest.raises(ConfigError):
    config_lib.load(path)
  assert config_lib.load(path, ["simulation.rounds=3"]).simulation.rounds == 3


# --------------------------------------------------------------------------
# The demo config.


def test_demo_config_validates():
  config = config_lib.load(DEMO)
  assert config.privacy.unit == "example"
  assert config.privacy.delta == 1e-5
  assert 0 < config.privacy.target_epsilon <= 5
  assert math.isfinite(config.privacy.target_epsilon)
  # Every hospital takes part in every round, as the file's comments claim.
  assert config.simulation.cohort_size == config.data.num_clients
  assert config.simulation.rounds % config.simulation.eval_every == 0


def test_config_path_that_is_a_directory(tmp_path):
  # A bad path is bad input like a missing file: a ConfigError naming it, so
  # the CLI exits 2 with a message instead of a traceback.
  with pytest.raises(ConfigError) as info:
    config_lib.load(tmp_path)
  assert str(tmp_path) in str(info.value)


def test_config_file_that_is_not_utf8(tmp_path):
  path = tmp_path / "binary.toml"
  path.write_bytes(b"[data]\nnum_clients = \xff\n")
  with pytest.raises(ConfigError) as info:
    config_lib.load(path)
  assert str(path) in str(info.value)


# --- Sizes, seeds and float32 range: refused before anything is allocated ------------

@pytest.mark.parametrize("override, key, match", [
    ("simulation.rounds=1_000_000_000_000", "simulation.rounds", r"<= 2\^32"),
    ("simulation.rounds=4294967297", "simulation.rounds", r"<= 2\^32"),
    ("client.local_steps=1_000_000_000_000", "client.local_steps", "TiB"),
    ("client.batch_size=1_000_000_000_000", "client.batch_size", "TiB"),
    ("data.num_clients=100_000_000_000", "data.num_clients", "TiB"),
    ("model.hidden=[1_000_000_000, 1_000_000_000]", "model.hidden", "EiB"),
    ("simulation.seed=4294967296", "simulation.seed", r"alias 0"),
    ("data.seed=18446744073709551615", "data.seed", r"< 2\^32"),
    ("privacy.clip_norm=1e39", "privacy.clip_norm", "overflows float32"),
    ("privacy.example_clip_norm=1e39", "privacy.example_clip_norm", "overflows float32"),
    ("client.learning_rate=1e300", "client.learning_rate", "overflows float32"),
    ("server.learning_rate=4e38", "server.learning_rate", "overflows float32"),
    ("privacy.noise_multiplier=1e40", "privacy.noise_multiplier", "overflows float32"),
    ("server.adaptivity=1e-50", "server.adaptivity", "underflows float32"),
    ("privacy.clip_norm=1e-46", "privacy.clip_norm", "underflows float32"),
    ("data.dirichlet_alpha=1e39", "data.dirichlet_alpha", "overflows float32"),
])
def test_sizes_seeds_and_float32_range_are_refused_naming_the_key(override, key, match):
  with pytest.raises(ConfigError, match=match) as error:
    config_lib.load(None, [override])
  assert str(error.value).startswith(key)


def test_size_errors_say_how_many_bytes_they_would_need():
  with pytest.raises(ConfigError) as error:
    config_lib.load(None, ["client.local_steps=1_000_000_000_000"])
  # 10 clients x 1e12 steps x 16 examples x (4 + 8) bytes = 1.92e15 bytes = 1.71 PiB.
  assert "would need 1.71 PiB" in str(error.value)


def test_hidden_list_of_two_million_layers_is_refused_at_once():
  with pytest.raises(ConfigError, match="model.hidden lists 2000000 layers"):
    config_lib.from_dict({"model": {"hidden": [8] * 2_000_000}})


def test_limits_themselves_pass():
  config = config_lib.load(None, ["simulation.seed=4294967295", "data.seed=4294967295",
                                  "privacy.clip_norm=3.4e38", "simulation.rounds=4294967296"])
  assert config.simulation.seed == 2**32 - 1


def test_build_checks_sizes_with_the_real_model(monkeypatch):
  """A width that passes the config-level bound fails once the input layer is known."""
  from fedjax_priv.experiment import build
  monkeypatch.setattr(config_lib, "MEMORY_LIMIT_BYTES", 1 << 20)
  config = config_lib.load(None, ["model.hidden=[8000]", "simulation.backend=loop"])
  with pytest.raises(ConfigError, match=r"model.hidden = \(8000,\) would need .* MiB"):
    build(config)


def test_deeply_nested_toml_is_a_config_error(tmp_path):
  path = tmp_path / "deep.toml"
  path.write_text("[model]\nhidden = " + "[" * 100_000 + "]" * 100_000 + "\n")
  with pytest.raises(ConfigError, match="nests .* too deeply"):
    config_lib.load(path)
  with pytest.raises(ConfigError, match="too deeply"):
    config_lib.load(None, ["model.hidden=" + "[" * 100_000 + "]" * 100_000])
