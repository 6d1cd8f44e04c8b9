"""Models as pure `init`/`apply` pairs, and adapters from Flax."""

from fedjax_priv.models.model import Model, evaluate, example_losses, from_linen, from_nnx
from fedjax_priv.models.recurrent import next_char_lstm
from fedjax_priv.models.zoo import cnn, logistic_regression, mlp, tanh_cnn

__all__ = [
    "Model", "cnn", "evaluate", "example_losses", "from_linen", "from_nnx",
    "logistic_regression", "mlp", "next_char_lstm", "tanh_cnn",
]
