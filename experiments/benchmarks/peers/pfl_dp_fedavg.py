"""User-level DP-FedAvg in Apple's pfl 0.6 (PyTorch backend), on a workload exported by vs_pfl.py.

Runs in its own virtual environment (pfl pins dp-accounting < 0.6, so it cannot
share the project's); `vs_pfl.py` creates it and calls this script with the
workload file it wrote. Everything that defines the experiment comes from that
file: the clients' examples, the test set, the cohort of every round, the
initial parameters and the hyper-parameters. pfl supplies the rest with its
own components: `FederatedAveraging`, `SimulatedBackend`, `PyTorchModel`, the
`GaussianMechanism` wrapped in `CentrallyAppliedPrivacyMechanism` (clip each
user's model difference to C, add N(0, sigma^2 C^2) to the cohort's sum, then
FedAvg divides by the cohort size) and its RDP and PLD accountants.

Privacy relation: pfl's accountants account each round as a Poisson-sampled
Gaussian with q = cohort / population under add/remove one user, whether or
not the simulated cohorts are Poisson; here the cohorts are fixed-size (the
exported ones), as in pfl's own benchmarks.

Prints one JSON object (the measurements) on its last line of stdout.

References:
  McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
  Recurrent Language Models" (DP-FedAvg). Granqvist et al. 2024, "pfl-research:
  simulation framework for accelerating research in Private Federated Learning".
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Weighted
from pfl.model.pytorch import PyTorchModel
from pfl.privacy import (CentrallyAppliedPrivacyMechanism, GaussianMechanism,
                         PLDPrivacyAccountant, RDPPrivacyAccountant)


class MLP(torch.nn.Module):
  """ReLU MLP with the exported widths; `loss` and `metrics` are what pfl's PyTorchModel calls."""

  def __init__(self, widths: list[int]):
    super().__init__()
    self.layers = torch.nn.ModuleList(
        torch.nn.Linear(fan_in, fan_out) for fan_in, fan_out in zip(widths[:-1], widths[1:]))

  def forward(self, x):
    for layer in self.layers[:-1]:
      x = torch.relu(layer(x))
    return self.layers[-1](x)

  def loss(self, x, y, eval=False):  # noqa: A002 (pfl's keyword)
    self.eval() if eval else self.train()
    # pfl's to_tensor turns every numpy array into float32, labels included.
    return torch.nn.functional.cross_entropy(self(x), y.long())

  def metrics(self, x, y, eval=True):  # noqa: A002
    self.eval() if eval else self.train()
    logits, y = self(x), y.long()
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    correct = (logits.argmax(-1) == y).sum().item()
    return {"loss": Weighted(loss, len(y)), "accuracy": Weighted(correct, len(y))}


def load_mlp(workload) -> MLP:
  """The exported flax Dense kernels are [in, out]; torch's Linear holds [out, in]."""
  kernels = [workload[f"kernel_{i}"] for i in range(int(workload["num_layers"]))]
  model = MLP([kernels[0].shape[0]] + [k.shape[1] for k in kernels])
  with torch.no_grad():
    for i, layer in enumerate(model.layers):
      layer.weight.copy_(torch.from_numpy(kernels[i].T.copy()))
      layer.bias.copy_(torch.from_numpy(workload[f"bias_{i}"]))
  return model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workload", help=".npz written by vs_pfl.py")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--torch-threads", type=int, default=1,
                      help="intra-op threads; on a shared 2-core CPU, 2 threads ran a batch-8 "
                           "MLP step 47x slower than 1 (0.48 vs 22.7 ms), so 1 is pfl's best")
  args = parser.parse_args()
  torch.set_num_threads(args.torch_threads)
  w = np.load(args.workload)
  torch.manual_seed(args.seed)
  np.random.seed(args.seed)

  x, y, offsets = w["x"], w["y"].astype(np.int64), w["offsets"]
  cohorts = w["cohorts"]  # [R, K] client indices, the same rounds as every contender.
  rounds, cohort_size = cohorts.shape
  steps, batch = int(w["local_steps"]), int(w["batch_size"])
  clip, sigma, delta = float(w["clip_norm"]), float(w["noise_multiplier"]), float(w["delta"])
  rng = np.random.default_rng(args.seed)

  def make_dataset(client: int) -> Dataset:
    # The toolkit's "shuffle" batching: cycle through a fresh permutation of
    # the client's examples until S*B are drawn; one pfl epoch of batch B over
    # them is then exactly S local steps.
    n = int(offsets[client + 1] - offsets[client])
    order = offsets[client] + rng.permutation(n)[np.arange(steps * batch) % n]
    return Dataset((x[order], y[order]), user_id=str(client))

  schedule = iter(cohorts.reshape(-1).tolist())
  train = FederatedDataset(make_dataset, lambda: next(schedule))

  # Poisson-sampled Gaussian, q = K / N, composed over the rounds (pfl's model of DP-FedAvg).
  rate = cohort_size / int(w["num_clients"])
  rdp = RDPPrivacyAccountant(num_compositions=rounds, sampling_probability=rate,
                             mechanism="gaussian", noise_parameter=sigma, delta=delta)
  pld = PLDPrivacyAccountant(num_compositions=rounds, sampling_probability=rate,
                             mechanism="gaussian", noise_parameter=sigma, delta=delta)
  mechanism = CentrallyAppliedPrivacyMechanism(
      GaussianMechanism.from_privacy_accountant(accountant=rdp, clipping_bound=clip))

  module = load_mlp(w)
  model = PyTorchModel(model=module,
                       local_optimizer_create=torch.optim.SGD,
                       central_optimizer=torch.optim.SGD(module.parameters(),
                                                         lr=float(w["server_learning_rate"])))
  backend = SimulatedBackend(training_data=train, val_data=None, postprocessors=[mechanism])
  algorithm_params = NNAlgorithmParams(central_num_iterations=rounds,
                                       evaluation_frequency=rounds + 1,
                                       train_cohort_size=cohort_size, val_cohort_size=0)
  train_params = NNTrainHyperParams(local_num_epochs=1,
                                    local_learning_rate=float(w["client_learning_rate"]),
                                    local_batch_size=batch)

  start = time.perf_counter()
  FederatedAveraging().run(algorithm_params=algorithm_params, backend=backend, model=model,
                           model_train_params=train_params,
                           model_eval_params=NNEvalHyperParams(local_batch_size=batch))
  wall = time.perf_counter() - start
  unused = sum(1 for _ in schedule)

  with torch.no_grad():
    logits = module(torch.from_numpy(w["x_test"]))
    accuracy = float((logits.argmax(-1).numpy() == w["y_test"]).mean())
  print(json.dumps({
      "wall_time_s": wall, "rounds": rounds, "rounds_per_s": rounds / wall,
      "test_accuracy": accuracy, "epsilon_rdp": float(rdp.epsilon),
      "epsilon_pld": float(pld.epsilon), "unused_cohort_slots": unused,
      "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
  }))


if __name__ == "__main__":
  main()
