"""Experiment configuration: TOML files, `--set key=value` overrides, validation.

A config is a tree of frozen dataclasses, one per TOML table. Every value is
checked by `validate` before anything is built or compiled, and every error
names the offending key, e.g. "privacy.noise_multiplier must be >= 0, got -1".

Sizes are bounded before anything is allocated (`check_sizes`): an
allocation a config asks for that exceeds `MEMORY_LIMIT_BYTES` is refused
with the key and the bytes it would need. `validate` checks with one float
per example and the layers between the hidden widths (lower bounds);
`experiment.build` checks again with the data's example size and the
model's exact parameter count. Seeds and round indices must fit in uint32
(JAX folds them into keys as uint32: seed 2^32 is seed 0), and float values
must be representable in float32, the dtype they are used in.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
  """A config value or key is invalid; the message names the key."""


# 1 TiB: more than the host or accelerator memory of any machine this toolkit
# targets, so a size that needs more is a typo (rounds = 1e12, a 2-million
# entry hidden list), refused before it hangs or ends in a MemoryError.
MEMORY_LIMIT_BYTES = 1 << 40
MAX_HIDDEN_LAYERS = 1024
# Seeds become jax.random.key(seed) and rounds are folded in with
# jax.random.fold_in(key, r): both take uint32, so 2^32 aliases 0.
UINT32_LIMIT = 1 << 32
FLOAT32_MAX = float.fromhex("0x1.fffffep+127")    # 3.4028235e38
FLOAT32_TINY = float.fromhex("0x1p-149")          # smallest positive float32 (subnormal)


# sigma of a level whose noise multiplier and target epsilon are both unset.
DEFAULT_NOISE_MULTIPLIER = 1.0


@dataclass(frozen=True)
class DataConfig:
  dataset: str = "digits"           # digits (scikit-learn's, embedded) | store
  store: str = ""                   # dataset = store: a `fedjax-priv data prepare` SQLite store
  # dataset = store: read each round's cohort from the store instead of loading
  # the training clients into memory (needs simulation.data_on_device = false).
  stream: bool = False
  num_clients: int = 10
  partition: str = "dirichlet"      # dirichlet (label skew, Hsu et al. 2019) | iid
  dirichlet_alpha: float = 0.5
  test_fraction: float = 0.2
  seed: int = 0                     # seed of the split and the partition


@dataclass(frozen=True)
class ModelConfig:
  name: str = "mlp"                 # logistic_regression | mlp | cnn | tanh_cnn
  hidden: tuple[int, ...] = (64,)   # mlp widths
  conv_impl: str = "auto"           # cnn: auto | xla | patches


@dataclass(frozen=True)
class ClientConfig:
  optimizer: str = "sgd"            # sgd | momentum | adam
  learning_rate: float = 0.1
  local_steps: int = 10
  batch_size: int = 16              # expected batch b under example-level DP
  proximal_mu: float = 0.0          # FedProx (Li et al. 2020): (mu / 2) ||w - w_server||^2


@dataclass(frozen=True)
class ServerConfig:
  optimizer: str = "sgd"            # sgd (FedAvg at lr 1) | momentum | adam | yogi | adagrad
  learning_rate: float = 1.0
  schedule: str = "constant"        # constant | cosine (decays to 0 over simulation.rounds)
  adaptivity: float = 1e-3          # tau of FedAdam/FedYogi/FedAdagrad (Reddi et al. 2021)


@dataclass(frozen=True)
class PrivacyConfig:
  # none | user (DP-FedAvg) | example (DP-SGD in clients) | both (DP-SGD in
  # clients and a DP mean at the server, each level accounted and reported).
  unit: str = "none"
  clip_norm: float = 1.0            # user or example level; the user level under "both"
  # sigma; unset: DEFAULT_NOISE_MULTIPLIER, or calibrated when target_epsilon > 0
  # (setting both is refused: which one the run used would be ambiguous).
  noise_multiplier: float | None = None
  target_epsilon: float = 0.0       # > 0: calibrate noise_multiplier to reach it
  example_clip_norm: float = 1.0    # unit = both: the example level (DP-SGD) part
  example_noise_multiplier: float | None = None
  example_target_epsilon: float = 0.0
  delta: float = 1e-5
  accountant: str = "rdp"           # rdp | pld
  # User-level noise: independent (dp_mean, DP-FedAvg) | banded_mf | blt | tree
  # (correlated noise, DP-FTRL; `experiment.user_aggregator_factory` says what each runs).
  # Correlated noise needs simulation.sampling = cyclic (tree: or shuffled_epochs).
  noise: str = "independent"
  mf_bands: int = 0                 # banded_mf: bands of C; 0: b = N // K rounds (capped at rounds)
  blt_buffers: int = 4              # blt: buffers of C
  epsilon_budget: float = 0.0       # > 0: train only the rounds whose epsilon stays within it
  # Accept a delta_total (delta + the truncation term of Poisson sampling) above
  # delta: without it, the budget stops before delta_total passes delta and a
  # run planned above 10 x delta is refused (fedjax_priv/budget.py).
  allow_delta_overflow: bool = False
  # Account fixed-size cohorts as Poisson with q = K / N: an approximation,
  # not a proof, warned about at every run; off by default.
  fixed_as_poisson: bool = False
  weighting: str = "num_examples"   # non-private mean: num_examples | uniform


@dataclass(frozen=True)
class SimulationConfig:
  backend: str = "chunked"          # vmap | chunked | loop
  client_chunk_size: int = 64
  rounds: int = 100
  cohort_size: int = 10             # expected cohort size under poisson sampling
  # fixed (uniform w/o replacement) | poisson | cyclic (fixed groups of K in
  # turn, every N // K rounds) | shuffled_epochs (each client once per epoch) |
  # cyclic_poisson (b fixed groups in turn, each Poisson-sampled) |
  # balls_in_bins (each client in one random bin of b, bins in turn) |
  # min_separation (Poisson among clients absent for the last b - 1 rounds).
  sampling: str = "fixed"
  # b of cyclic_poisson, balls_in_bins and min_separation: rounds between two
  # participations of a client; 0: num_clients // cohort_size.
  min_separation: int = 0
  seed: int = 0
  eval_every: int = 10
  checkpoint_every: int = 0         # 0: only at the end (and by checkpoint_seconds)
  # Also checkpoint after the first block of rounds ending this many seconds
  # after the last checkpoint, so a killed run loses bounded work; 0: off.
  checkpoint_seconds: float = 300.0
  # Metric sinks: csv (rounds.csv, metrics.csv), tensorboard (tensorboardX),
  # wandb, mlflow (off unless named; skipped with a warning if not installed).
  log_to: tuple[str, ...] = ("csv", "tensorboard")
  data_on_device: bool = True       # population kept on the device as padded arrays
  straggler_fraction: float = 0.0   # share of each cohort that runs fewer local steps
  straggler_policy: str = "drop"    # drop (FedAvg's baseline) | partial (FedProx keeps the work)


@dataclass(frozen=True)
class Config:
  data: DataConfig = field(default_factory=DataConfig)
  model: ModelConfig = field(default_factory=ModelConfig)
  client: ClientConfig = field(default_factory=ClientConfig)
  server: ServerConfig = field(default_factory=ServerConfig)
  privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
  simulation: SimulationConfig = field(default_factory=SimulationConfig)


CHOICES = {
    "data.dataset": ("digits", "store"),
    "data.partition": ("dirichlet", "iid"),
    "model.name": ("logistic_regression", "mlp", "cnn", "tanh_cnn"),
    "model.conv_impl": ("auto", "xla", "patches"),
    "client.optimizer": ("sgd", "momentum", "adam"),
    "server.optimizer": ("sgd", "momentum", "adam", "yogi", "adagrad"),
    "server.schedule": ("constant", "cosine"),
    "privacy.unit": ("none", "user", "example", "both"),
    "privacy.accountant": ("rdp", "pld"),
    "privacy.noise": ("independent", "banded_mf", "blt", "tree"),
    "privacy.weighting": ("num_examples", "uniform"),
    "simulation.backend": ("vmap", "chunked", "loop"),
    "simulation.sampling": ("fixed", "poisson", "cyclic", "shuffled_epochs", "cyclic_poisson",
                            "balls_in_bins", "min_separation"),
    "simulation.straggler_policy": ("drop", "partial"),
}
# privacy.noise -> the simulation.sampling values whose participation can
# account it; independent noise runs with every sampling. A matrix
# factorization's event covers the whole run, with each user in at most k
# rounds any two at least b apart: only cyclic guarantees that. The tree is
# one such factorization under cyclic, and DP-FTRL's tree restarted every
# epoch under shuffled_epochs (each user at most once per tree). A new
# sampling scheme that guarantees either pattern is added here.
# Schemes that keep a client's participations >= b rounds apart (a (k, b) pattern).
SEPARATED_SAMPLING = ("cyclic", "cyclic_poisson", "balls_in_bins", "min_separation")
NOISE_SAMPLING = {"banded_mf": SEPARATED_SAMPLING, "blt": SEPARATED_SAMPLING,
                  "tree": SEPARATED_SAMPLING + ("shuffled_epochs",)}
# simulation.log_to: where per-round metrics go (`metric_writers`).
LOG_SINKS = ("csv", "tensorboard", "wandb", "mlflow")
POSITIVE = ("data.num_clients", "data.dirichlet_alpha", "client.learning_rate",
            "client.local_steps", "client.batch_size", "server.learning_rate",
            "privacy.clip_norm", "privacy.example_clip_norm", "simulation.client_chunk_size",
            "simulation.rounds", "simulation.cohort_size", "simulation.eval_every",
            "server.adaptivity", "privacy.blt_buffers")
NON_NEGATIVE = ("privacy.noise_multiplier", "privacy.target_epsilon", "client.proximal_mu",
                "privacy.example_noise_multiplier", "privacy.example_target_epsilon",
                "privacy.epsilon_budget", "privacy.mf_bands", "simulation.min_separation",
                "simulation.checkpoint_every", "simulation.checkpoint_seconds",
                "simulation.seed", "data.seed")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
  """Converts a TOML value to the field's type, or raises naming the key."""
  if isinstance(annotation, types.UnionType):
    # `float | None`: unset in TOML; None only arrives from a config's own dict.
    if value is None:
      return None
    annotation = next(arg for arg in get_args(annotation) if arg is not type(None))
  if get_origin(annotation) is tuple:
    (item_type, _) = get_args(annotation)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key} must be a list, got {value!r}")
    return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
  if annotation is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value
  if annotation is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value
  if annotation is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)
  if not isinstance(value, str):
    raise ConfigError(f"{key} must be a string, got {value!r}")
  return value


def from_dict(raw: dict[str, Any]) -> Config:
  """Builds a validated Config from nested dicts (as read from TOML)."""
  sections = {}
  for section in dataclasses.fields(Config):
    values = raw.get(section.name, {})
    if not isinstance(values, dict):
      raise ConfigError(f"[{section.name}] must be a table, got {values!r}")
    cls = section.default_factory
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
      if name not in known:
        raise ConfigError(f"unknown config key '{section.name}.{name}' "
                          f"(keys of [{section.name}]: {', '.join(sorted(known))})")
    sections[section.name] = cls(**{
        name: _coerce(f"{section.name}.{name}", value, hints[name])
        for name, value in values.items()})
  for name in raw:
    if name not in sections:
      raise ConfigError(f"unknown config table '[{name}]' "
                        f"(tables: {', '.join(f.name for f in dataclasses.fields(Config))})")
  config = Config(**sections)
  validate(config)
  return config


def to_dict(config: Config) -> dict[str, Any]:
  return dataclasses.asdict(config)


def _toml_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, str):
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
  if isinstance(value, (tuple, list)):
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"
  return repr(value)


def to_toml(config: Config) -> str:
  """The config as TOML, every key with its value (defaults included); `load` reads it back.

  An unset noise multiplier (None) is written as a comment saying what the
  run will use, since TOML has no null.
  """
  lines = []
  for section, values in to_dict(config).items():
    lines.append(f"[{section}]")
    for name, value in values.items():
      if value is None:
        target = "target_epsilon" if name == "noise_multiplier" else "example_target_epsilon"
        use = ("calibrated to privacy." + target if getattr(config.privacy, target) > 0
               else f"{DEFAULT_NOISE_MULTIPLIER}")
        lines.append(f"# {name} unset: {use}")
      else:
        lines.append(f"{name} = {_toml_value(value)}")
    lines.append("")
  return "\n".join(lines)


def get(config: Config, key: str) -> Any:
  section, name = key.split(".")
  return getattr(getattr(config, section), name)


def validate(config: Config, population_known: bool | None = None) -> None:
  """Raises ConfigError naming the first invalid key.

  Args:
    config: the config.
    population_known: whether data.num_clients is the real population size.
      Default: unless data.dataset = store, whose size only the store knows;
      `experiment.build` validates again with the store's size, so the checks
      that compare against the population run then.
  """
  if population_known is None:
    population_known = config.data.dataset != "store"
  for key, allowed in CHOICES.items():
    if get(config, key) not in allowed:
      raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {get(config, key)!r}")
  for key in POSITIVE:
    value = get(config, key)
    if not (value > 0 and math.isfinite(value)):
      raise ConfigError(f"{key} must be > 0, got {value!r}")
  for key in NON_NEGATIVE:
    value = get(config, key)
    if value is None:
      continue
    if not (value >= 0 and math.isfinite(value)):
      raise ConfigError(f"{key} must be >= 0, got {value!r}")
  for section in dataclasses.fields(config):
    table = getattr(config, section.name)
    for name, annotation in get_type_hints(type(table)).items():
      if "float" in str(annotation):
        _check_float32(f"{section.name}.{name}", getattr(table, name))
  for key in ("simulation.seed", "data.seed"):
    if get(config, key) >= UINT32_LIMIT:
      raise ConfigError(f"{key} must be < 2^32 = {UINT32_LIMIT} (JAX keys hold uint32: "
                        f"{get(config, key)} would alias {get(config, key) % UINT32_LIMIT}), "
                        f"got {get(config, key)}")
  if config.simulation.rounds > UINT32_LIMIT:
    raise ConfigError(f"simulation.rounds must be <= 2^32 (rounds are folded into JAX keys as "
                      f"uint32), got {config.simulation.rounds}")
  if len(config.model.hidden) > MAX_HIDDEN_LAYERS:
    raise ConfigError(f"model.hidden lists {len(config.model.hidden)} layers; at most "
                      f"{MAX_HIDDEN_LAYERS} are allowed")
  for sink in config.simulation.log_to:
    if sink not in LOG_SINKS:
      raise ConfigError(f"simulation.log_to: unknown sink {sink!r}; choose from "
                        f"{', '.join(LOG_SINKS)}")
  if any(width < 1 for width in config.model.hidden):
    raise ConfigError(f"model.hidden widths must be >= 1, got {list(config.model.hidden)}")
  check_sizes(config)
  if not 0 < config.data.test_fraction < 1:
    raise ConfigError(f"data.test_fraction must be in (0, 1), got {config.data.test_fraction!r}")
  if not 0 < config.privacy.delta < 1:
    raise ConfigError(f"privacy.delta must be in (0, 1), got {config.privacy.delta!r}")
  if population_known and config.simulation.cohort_size > config.data.num_clients:
    raise ConfigError(f"simulation.cohort_size ({config.simulation.cohort_size}) must be <= "
                      f"data.num_clients ({config.data.num_clients})")
  privacy, sim = config.privacy, config.simulation
  _check_min_separation(config, population_known)
  if not 0 <= sim.straggler_fraction < 1:
    raise ConfigError(f"simulation.straggler_fraction must be in [0, 1), got "
                      f"{sim.straggler_fraction!r}")
  if (config.data.dataset == "store") != bool(config.data.store):
    raise ConfigError("data.store names the SQLite store to train on and needs data.dataset = "
                      f"store (got dataset = {config.data.dataset!r}, "
                      f"store = {config.data.store!r})")
  if config.data.stream and config.data.dataset != "store":
    raise ConfigError("data.stream reads the training clients from data.store and needs "
                      f"data.dataset = store, got {config.data.dataset!r}")
  if config.data.stream and sim.data_on_device:
    raise ConfigError("data.stream = true packs each cohort on the host and cannot keep the "
                      "population on the device: set simulation.data_on_device = false")
  if privacy.unit == "none":
    for key in ("target_epsilon", "epsilon_budget"):
      if getattr(privacy, key) > 0:
        raise ConfigError(f"privacy.{key} needs privacy.unit = user, example or both, got none")
  for sigma, target in (("noise_multiplier", "target_epsilon"),
                        ("example_noise_multiplier", "example_target_epsilon")):
    if getattr(privacy, sigma) is not None and getattr(privacy, target) > 0:
      raise ConfigError(f"privacy.{sigma} = {getattr(privacy, sigma)} and privacy.{target} = "
                        f"{getattr(privacy, target)} are both set; set one: {target} calibrates "
                        f"{sigma} (`fedjax-priv calibrate` prints it)")
  if privacy.unit != "both" and privacy.example_target_epsilon > 0:
    raise ConfigError("privacy.example_target_epsilon is the example level of privacy.unit = "
                      f"both, got unit = {privacy.unit}")
  _check_noise(config)
  # Before a store's size is known, a fixed cohort is taken to be partial.
  partial_fixed = sim.sampling == "fixed" and (not population_known
                                               or sim.cohort_size < config.data.num_clients)
  if privacy.fixed_as_poisson and (privacy.unit not in ("user", "both") or not partial_fixed):
    raise ConfigError("privacy.fixed_as_poisson applies to user-level privacy with fixed-size "
                      "cohorts smaller than the population (simulation.sampling = fixed)")


def min_separation(config: Config, num_clients: int) -> int:
  """b of the separated samplings: simulation.min_separation, or num_clients // cohort_size."""
  return config.simulation.min_separation or num_clients // config.simulation.cohort_size


def _check_min_separation(config: Config, population_known: bool) -> None:
  sim = config.simulation
  uses_b = ("cyclic_poisson", "balls_in_bins", "min_separation")
  if sim.min_separation and sim.sampling not in uses_b:
    raise ConfigError(f"simulation.min_separation applies to simulation.sampling = "
                      f"{' | '.join(uses_b)}, got sampling = {sim.sampling}")
  if not population_known or sim.sampling not in uses_b:
    return
  n, m = config.data.num_clients, sim.cohort_size
  b = min_separation(config, n)
  if not 1 <= b <= n:
    raise ConfigError(f"simulation.min_separation = {b} must be in [1, data.num_clients = {n}]")
  # cyclic_poisson samples an expected m of each group of N // b; min_separation's rate
  # p = 1 / (N / m - b + 1) must be <= 1.
  if sim.sampling in ("cyclic_poisson", "min_separation") and b * m > n:
    raise ConfigError(f"simulation.min_separation ({b}) x simulation.cohort_size ({m}) must be "
                      f"<= data.num_clients ({n}): {sim.sampling} cannot fill cohorts of {m} "
                      f"when a client takes part at most once in {b} rounds")


def _check_noise(config: Config) -> None:
  """privacy.noise needs the user level, a sampling that accounts it (`NOISE_SAMPLING`), an
  accountant that handles its event, and strategy parameters that fit the run."""
  privacy, sim = config.privacy, config.simulation
  if privacy.mf_bands > sim.rounds:
    raise ConfigError(f"privacy.mf_bands ({privacy.mf_bands}) must be <= simulation.rounds "
                      f"({sim.rounds}): a strategy has at most one band per round")
  if privacy.noise == "independent":
    return
  if privacy.unit not in ("user", "both"):
    raise ConfigError(f"privacy.noise = {privacy.noise} is user-level noise and needs "
                      f"privacy.unit = user or both, got {privacy.unit}")
  allowed = NOISE_SAMPLING[privacy.noise]
  if sim.sampling not in allowed:
    needs = ("each user in a fixed pattern of rounds, or at most once per tree"
             if privacy.noise == "tree" else
             "each user in at most k of the run's rounds, any two at least b apart")
    raise ConfigError(
        f"privacy.noise = {privacy.noise} cannot be accounted with simulation.sampling = "
        f"{sim.sampling} (its event needs {needs}): use simulation.sampling = "
        f"{' or '.join(allowed)}")
  if privacy.noise == "tree" and sim.sampling == "shuffled_epochs" and privacy.accountant == "pld":
    raise ConfigError("privacy.noise = tree with simulation.sampling = shuffled_epochs is "
                      "DP-FTRL's tree restarted every epoch, whose event only "
                      "privacy.accountant = rdp can account: set it, or use "
                      "simulation.sampling = cyclic")


def _check_float32(key: str, value: float | None) -> None:
  """Refuses a float that float32 turns into inf (or a positive one it turns into 0)."""
  if value is None or not math.isfinite(value):
    return  # Non-finite values are refused with the key's own rule.
  if abs(value) > FLOAT32_MAX:
    raise ConfigError(f"{key} = {value!r} overflows float32 (largest {FLOAT32_MAX:.7g}); "
                      "it would become inf on the device")
  if 0 < abs(value) < FLOAT32_TINY:
    raise ConfigError(f"{key} = {value!r} underflows float32 (smallest positive "
                      f"{FLOAT32_TINY:.3g}); it would become 0 on the device")


def _format_bytes(num: float) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
    if num < 1024 or unit == "EiB":
      return f"{num:.3g} {unit}" if unit != "bytes" else f"{int(num)} bytes"
    num /= 1024
  raise AssertionError("unreachable")


def check_sizes(config: Config, example_bytes: int = 4, param_bytes: int | None = None,
                batch_size: int | None = None) -> None:
  """Raises ConfigError when a size in `config` asks for more than `MEMORY_LIMIT_BYTES`.

  Every estimate is a lower bound on what the run allocates, so a config
  that passes may still run out of memory, but one that fails cannot run:

  * one round's padded cohort on the device: x, y and masks of
    [cohort_size, local_steps, batch_size] examples;
  * the model and one update per client vmapped together (a chunk under
    the chunked backend, the cohort under vmap, one client under loop);
  * the population's per-client sizes and offsets (`data.num_clients`);
  * under privacy.noise = tree with cyclic sampling, the dense strategy
    matrix (simulation.rounds squared) and its inverse.

  Args:
    config: the config.
    example_bytes: bytes of one example's features (default: one float32,
      before the data is known).
    param_bytes: bytes of the model's parameters; default: the weights
      between consecutive `model.hidden` widths (the input and output
      layers are unknown before the data is).
    batch_size: the physical batch (under DP-SGD the Poisson batch's cap);
      default `client.batch_size`.
  """
  sim, client = config.simulation, config.client
  batch_size = client.batch_size if batch_size is None else batch_size
  cohort = sim.cohort_size * client.local_steps * batch_size * (example_bytes + 8)
  if param_bytes is None:
    widths = config.model.hidden if config.model.name == "mlp" else ()
    param_bytes = 4 * sum(a * b + b for a, b in zip(widths, widths[1:]))
  together = {"vmap": sim.cohort_size, "chunked": min(sim.cohort_size, sim.client_chunk_size),
              "loop": 1}[sim.backend]
  needs = [
      (_largest_key(config, ("client.local_steps", "client.batch_size",
                             "simulation.cohort_size")), cohort,
       f"for one round's padded cohort of {sim.cohort_size} clients x {client.local_steps} "
       f"local steps x {batch_size} examples of {example_bytes} bytes"),
      ("model.hidden", param_bytes * (together + 1),
       f"for {_format_bytes(param_bytes)} of parameters and {together} client updates "
       f"vmapped together"),
      ("data.num_clients", config.data.num_clients * 24,
       "for the population's client sizes, offsets and ids"),
  ]
  if config.privacy.noise == "tree" and sim.sampling in SEPARATED_SAMPLING:
    needs.append(("simulation.rounds", 16 * sim.rounds ** 2,
                  "for the tree strategy's dense rounds x rounds matrix and its inverse "
                  "(float64)"))
  for key, need, what in needs:
    if need > MEMORY_LIMIT_BYTES:
      raise ConfigError(f"{key} = {get(config, key)!r:.60} would need {_format_bytes(need)} "
                        f"{what}, more than the {_format_bytes(MEMORY_LIMIT_BYTES)} limit")


def _largest_key(config: Config, keys: Sequence[str]) -> str:
  return max(keys, key=lambda key: get(config, key))


def parse_override(text: str) -> tuple[str, Any]:
  """Parses 'section.key=value'; the value is read as TOML, else as a string."""
  if "=" not in text:
    raise ConfigError(f"--set expects key=value, got {text!r}")
  key, value = (part.strip() for part in text.split("=", 1))
  if key.count(".") != 1:
    raise ConfigError(f"--set key must look like section.name, got {key!r}")
  try:
    parsed = tomllib.loads(f"v = {value}")["v"]
  except tomllib.TOMLDecodeError:
    parsed = value
  except RecursionError:
    raise ConfigError(f"--set {key}: the value nests arrays or tables too deeply") from None
  return key, parsed


def load(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
  """Reads a TOML config (or the defaults), applies overrides, validates."""
  raw: dict[str, Any] = {}
  if path is not None:
    try:
      raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
      raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
      raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    except RecursionError:
      raise ConfigError(f"config file {path} nests tables or arrays too deeply to parse") from None
    except OSError as error:
      raise ConfigError(f"config file {path} cannot be read: {error}") from None
  values: dict[str, Any] = {}
  for text in overrides:
    key, value = parse_override(text)
    values[key] = value
  return from_dict(with_values(raw, values))


# A noise multiplier and the target that calibrates it are one choice: an
# override of either replaces the other where it was set beneath it.
_CALIBRATED_PAIRS = (("privacy.noise_multiplier", "privacy.target_epsilon"),
                     ("privacy.example_noise_multiplier", "privacy.example_target_epsilon"))


def with_values(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
  """`raw` (a config as nested dicts) with `values` ({'section.name': value}) set.

  Setting a noise multiplier clears the target epsilon of the same level that
  `raw` held, and setting a target clears the multiplier, unless `values` sets
  both (which validation then refuses). So `--set privacy.target_epsilon=3`
  on a file with a noise multiplier calibrates, and a sweep over
  privacy.noise_multiplier runs the multipliers it names.
  """
  raw = {section: dict(table) if isinstance(table, dict) else table
         for section, table in raw.items()}
  for key, value in values.items():
    if key.count(".") != 1:
      raise ConfigError(f"key must look like section.name, got {key!r}")
    section, name = key.split(".")
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
      raise ConfigError(f"[{section}] must be a table")
    raw[section][name] = value
  for pair in _CALIBRATED_PAIRS:
    for key, partner in (pair, pair[::-1]):
      if key in values and partner not in values:
        section, name = partner.split(".")
        raw.get(section, {}).pop(name, None)
  return raw
