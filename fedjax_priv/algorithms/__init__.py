"""Client updates and server rules."""

from fedjax_priv.algorithms.client_update import ClientMetrics, ExampleDP, make_client_update
from fedjax_priv.algorithms.server import ServerState, server_init, server_update

__all__ = [
    "ClientMetrics", "ExampleDP", "ServerState", "make_client_update", "server_init",
    "server_update",
]
