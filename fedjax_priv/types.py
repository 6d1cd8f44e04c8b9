"""Data types shared by every layer: what a round consumes, with its shapes.

They live here, below `data`, `algorithms` and `simulation`, so that an
algorithm can name the batch it trains on without importing the data layer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class ClientBatch(NamedTuple):
  """The local batches of one cohort.

  Attributes:
    x: [K, S, B, *feature_shape] float32 inputs (K clients, S local steps, B slots).
    y: [K, S, B] int32 labels.
    example_mask: [K, S, B] float32, 1.0 for a real example, 0.0 for padding.
    num_examples: [K] int32, size of each client's local dataset.
    client_mask: [K] float32, 1.0 for a real client, 0.0 for a padded slot.
  """
  x: jax.Array
  y: jax.Array
  example_mask: jax.Array
  num_examples: jax.Array
  client_mask: jax.Array
