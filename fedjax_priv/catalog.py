"""What `fedjax-priv list` shows: the models, privacy mechanisms and datasets there are.

Parameter counts are computed from the models themselves (`jax.eval_shape`
of their init, nothing is allocated), for the input shapes the datasets
have, so the listing cannot drift from the code.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from fedjax_priv import config as config_lib
from fedjax_priv.models import zoo


class Entry(NamedTuple):
  name: str
  description: str


# Inputs the built-in and prepared datasets have: (label, input shape, classes).
_SHAPES = (("digits 8x8, 10 classes", (8, 8), 10),
           ("28x28x1 (Fashion-MNIST, MNIST), 10 classes", (28, 28, 1), 10))


def parameter_count(model) -> int:
  """Number of parameters of a `Model`, from the shapes of its init (nothing allocated)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def models() -> list[Entry]:
  """model.name choices, with parameter counts for each dataset input shape."""
  defaults = config_lib.ModelConfig()
  makers = {
      "logistic_regression": ("multinomial logistic regression",
                              lambda shape, k: zoo.logistic_regression(shape, k)),
      "mlp": (f"ReLU MLP, model.hidden = {list(defaults.hidden)}",
              lambda shape, k: zoo.mlp(shape, k, defaults.hidden)),
      "cnn": ("conv32-conv64-pool-dense128 (Reddi et al. 2021); images only",
              lambda shape, k: zoo.cnn(shape, k)),
      "tanh_cnn": ("the tanh CNN of Papernot et al. 2021 for DP-SGD; 28x28 images only",
                   lambda shape, k: zoo.tanh_cnn(shape, k)),
  }
  entries = []
  for name in config_lib.CHOICES["model.name"]:
    text, make = makers[name]
    counts = [f"{parameter_count(make(shape, k)):,} params on {label}"
              for label, shape, k in _SHAPES
              if name not in ("cnn", "tanh_cnn") or len(shape) == 3]
    entries.append(Entry(name, f"{text}: {'; '.join(counts)}"))
  return entries


def mechanisms() -> list[Entry]:
  """privacy.unit and privacy.noise choices (the config), then the aggregators the open API
  composes."""
  return [
      Entry("none", "privacy.unit = none: FedAvg, no privacy claim"),
      Entry("user", "privacy.unit = user: DP-FedAvg, each client's update clipped to "
            "clip_norm and Gaussian noise on the sum (McMahan et al. 2018); one user's "
            "whole dataset is the unit"),
      Entry("example", "privacy.unit = example: DP-SGD inside every client, Poisson batches "
            "(Abadi et al. 2016); one example is the unit"),
      Entry("both", "privacy.unit = both: DP-SGD in clients and DP-FedAvg at the server, "
            "each level accounted and reported"),
      Entry("independent", "privacy.noise = independent (default): fresh Gaussian noise every "
            "round (dp_mean), any simulation.sampling"),
      Entry("banded_mf", "privacy.noise = banded_mf: BandMF correlated noise, privacy.mf_bands "
            "bands optimised for the run (Choquette-Choo et al. 2023); simulation.sampling = "
            "cyclic, cyclic_poisson (amplified BandMF when mf_bands <= b), balls_in_bins or "
            "min_separation"),
      Entry("blt", "privacy.noise = blt: buffered-linear-Toeplitz correlated noise, "
            "privacy.blt_buffers buffers (McMahan, Xu & Zhang 2024); simulation.sampling = "
            "cyclic, cyclic_poisson, balls_in_bins or min_separation"),
      Entry("tree", "privacy.noise = tree: DP-FTRL tree noise (Kairouz et al. 2021), one tree "
            "per run under cyclic (or another separated) sampling, one per epoch under "
            "shuffled_epochs"),
      Entry("privacy.transforms", "chain(clip_l2 | clip_l2_per_layer | clip_l1, sum_units, "
            "gaussian | laplace, mean): your own mechanism, accounted from its stages"),
      Entry("privacy.adaptive_clipping", "adaptive clip norm at a target quantile "
            "(Andrew et al. 2021)"),
      Entry("privacy.dp_ftrl", "DP-FTRL with tree aggregation (Kairouz et al. 2021)"),
      Entry("privacy.local_dp", "noise added by each client before upload (local DP)"),
      Entry("secure", "secure aggregation, distributed DP (discrete Gaussian, Skellam), "
            "homomorphic aggregation (docs/secure_aggregation.md, docs/distributed_dp.md, "
            "docs/homomorphic_encryption.md)"),
  ]


def datasets() -> list[Entry]:
  """data.dataset choices and what `fedjax-priv data prepare` writes."""
  from fedjax_priv.data.prepare import PREPARERS
  entries = [Entry("digits", "data.dataset = digits: scikit-learn's 8x8 digits, split "
                   "over data.num_clients clients (built in, no download)"),
             Entry("store", "data.dataset = store: a SQLite store written by "
                   "`fedjax-priv data prepare NAME`, one of: " + ", ".join(PREPARERS))]
  return entries


def sections() -> dict[str, list[Entry]]:
  return {"models": models(), "mechanisms": mechanisms(), "datasets": datasets()}
