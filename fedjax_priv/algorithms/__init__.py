"""Client updates and server rules: FedAvg, FedSGD, FedProx, SCAFFOLD, personalisation."""

from fedjax_priv.algorithms.client_update import (ClientMetrics, ExampleDP, make_client_update,
                                                  make_fedsgd_client_update, make_local_training)
from fedjax_priv.algorithms.fedprox import proximal_gradient, proximal_term
from fedjax_priv.algorithms.personalization import (FinetuneResult, make_finetune_evaluation,
                                                    summarize_finetune)
from fedjax_priv.algorithms.scaffold import (ScaffoldState, init_client_controls,
                                             make_scaffold_client_update, scaffold_aggregator)
from fedjax_priv.algorithms.server import ServerState, server_init, server_update
from fedjax_priv.algorithms.stragglers import (STRAGGLER_POLICIES, apply_stragglers,
                                               straggler_steps, with_stragglers)

__all__ = [
    "ClientMetrics", "ExampleDP", "FinetuneResult", "STRAGGLER_POLICIES", "ScaffoldState",
    "ServerState", "apply_stragglers", "init_client_controls", "make_client_update",
    "make_fedsgd_client_update", "make_finetune_evaluation", "make_local_training",
    "make_scaffold_client_update", "proximal_gradient", "proximal_term", "scaffold_aggregator",
    "server_init", "server_update", "straggler_steps", "summarize_finetune", "with_stragglers",
]
