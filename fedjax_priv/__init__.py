"""fedjax_priv: vectorised simulation of private federated learning in JAX.

The client is an array axis: one jitted call trains a whole cohort, with
per-example clipping, user-level clipping, noise, secure and homomorphic
aggregation and accounting composed as pure functions on pytrees. See
README.md for a tour.
"""

from fedjax_priv import algorithms, data, models, privacy, secure, simulation
from fedjax_priv.algorithms import ExampleDP, ServerState, make_client_update, server_init
from fedjax_priv.data.device import gather_cohort, sample_client_batches
from fedjax_priv.types import ClientBatch
from fedjax_priv.models import Model
from fedjax_priv.privacy import dp_mean, weighted_mean
from fedjax_priv.simulation import build_round
from fedjax_priv.simulation.participation import (BallsInBins, Cyclic, CyclicPoisson, FixedSize, Full,
                                                  MinSeparation, Poisson, ShuffledEpochs)
from fedjax_priv.experiment import Experiment, RunSettings, assemble
from fedjax_priv.runner import run_experiment
from fedjax_priv.sweep import sweep_experiment

__version__ = "0.1.0"

__all__ = [
    "BallsInBins", "ClientBatch", "Cyclic", "CyclicPoisson", "ExampleDP", "Experiment", "FixedSize", "Full", "MinSeparation", "Model", "Poisson",
    "RunSettings", "ServerState", "ShuffledEpochs", "algorithms", "assemble", "build_round",
    "data", "dp_mean", "gather_cohort", "make_client_update", "models", "privacy",
    "run_experiment", "sample_client_batches", "secure", "server_init", "simulation",
    "sweep_experiment",
    "weighted_mean",
]
