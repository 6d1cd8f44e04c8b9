"""Tests for fedjax_priv.data.leaf: reading LEAF JSON folders of each dataset."""

import json

import numpy as np
import pytest

from fedjax_priv.data import iter_leaf, read_leaf, write_leaf
from fedjax_priv.data.leaf import sent140_vocabulary
from fedjax_priv.data.shakespeare import ALL_LETTERS


def test_femnist_users_spread_over_files_are_read_in_file_order(tmp_path):
  rng = np.random.default_rng(0)
  images = {u: rng.random((n, 784)).round(3) for u, n in (("w2", 2), ("w0", 3), ("w1", 1))}
  labels = {"w2": [61, 0], "w0": [5, 6, 7], "w1": [9]}
  write_leaf(tmp_path / "b.json", {u: {"x": images[u].tolist(), "y": labels[u]} for u in ["w1"]})
  write_leaf(tmp_path / "a.json",
             {u: {"x": images[u].tolist(), "y": labels[u]} for u in ["w2", "w0"]})
  data = read_leaf(tmp_path, "femnist")
  assert data.vocabulary == ()
  ds = data.dataset
  assert ds.client_ids == ("w2", "w0", "w1")
  assert ds.feature_shape == (28, 28, 1) and ds.x.dtype == np.float32
  for i, user in enumerate(ds.client_ids):
    x, y = ds.client(i)
    np.testing.assert_allclose(x.reshape(len(y), 784), images[user], rtol=1e-6)
    np.testing.assert_array_equal(y, labels[user])


def test_shakespeare_strings_become_leaf_letter_ids(tmp_path):
  x = ["To be, or not to be" + " " * 61, "é" * 80]
  write_leaf(tmp_path / "all.json", {"HAMLET_HAM": {"x": x, "y": ["!", "A"]}},
             hierarchies=["HAMLET"])
  data = read_leaf(tmp_path, "shakespeare")
  ds = data.dataset
  assert ds.feature_shape == (80,) and ds.x.dtype == np.uint8
  np.testing.assert_array_equal(ds.x[0, :3], [ALL_LETTERS.index(c) for c in "To "])
  np.testing.assert_array_equal(ds.x[1], np.full(80, 80))  # Out of LEAF's vocabulary.
  np.testing.assert_array_equal(ds.y, [ALL_LETTERS.index("!"), ALL_LETTERS.index("A")])
  assert len(data.vocabulary) == 81 and data.vocabulary[ALL_LETTERS.index("A")] == "A"


def _tweet(text):
  return ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "someone", text]


def test_sent140_builds_a_vocabulary_and_pads(tmp_path):
  train, test = tmp_path / "train", tmp_path / "test"
  train.mkdir()
  test.mkdir()
  write_leaf(train / "t.json", {
      "u1": {"x": [_tweet("good good day!"), _tweet("bad day")], "y": [1, 0]},
      "u2": {"x": [_tweet("day")], "y": [1]},
  })
  write_leaf(test / "t.json", {"u1": {"x": [_tweet("unseen good day")], "y": [1]}})
  vocabulary = sent140_vocabulary(train)
  # Words by decreasing count, ties alphabetical; LEAF's split keeps "!" as a token.
  assert vocabulary == ("<pad>", "<unk>", "day", "good", "!", "bad")
  data = read_leaf(train, "sent140", max_words=3)
  np.testing.assert_array_equal(data.dataset.x, [[3, 3, 2], [5, 2, 0], [2, 0, 0]])
  np.testing.assert_array_equal(data.dataset.y, [1, 0, 1])
  (_, x, y), = iter_leaf(test, "sent140", vocabulary=data.vocabulary, max_words=4)
  np.testing.assert_array_equal(x, [[1, 3, 2, 0]])


def test_synthetic_float_labels_are_integers(tmp_path):
  write_leaf(tmp_path / "s.json", {"f_00000": {"x": [[0.5] * 60, [1.0] * 60], "y": [3.0, 9.0]}})
  ds = read_leaf(tmp_path, "synthetic").dataset
  assert ds.feature_shape == (60,)
  np.testing.assert_array_equal(ds.y, [3, 9])
  write_leaf(tmp_path / "s.json", {"f_00000": {"x": [[0.5] * 60], "y": [2.5]}})
  with pytest.raises(ValueError, match="'f_00000'.*integer classes"):
    read_leaf(tmp_path, "synthetic")


def test_inconsistent_folders_are_rejected_naming_the_user(tmp_path):
  with pytest.raises(FileNotFoundError, match="no LEAF"):
    read_leaf(tmp_path, "femnist")
  write_leaf(tmp_path / "a.json", {"u": {"x": [[0.0] * 60], "y": [1]}})
  write_leaf(tmp_path / "b.json", {"u": {"x": [[0.0] * 60], "y": [1]}})
  with pytest.raises(ValueError, match="b.json: user 'u' appears in more than one place"):
    read_leaf(tmp_path, "synthetic")
  (tmp_path / "b.json").write_text(json.dumps(
      {"users": ["v"], "num_samples": [2], "user_data": {"v": {"x": [[0.0] * 60], "y": [1]}}}))
  with pytest.raises(ValueError, match="user 'v' has 1 x, 1 y and num_samples 2"):
    read_leaf(tmp_path, "synthetic")
  with pytest.raises(ValueError, match="dataset must be one of"):
    read_leaf(tmp_path, "cifar")
  (tmp_path / "femnist").mkdir()
  write_leaf(tmp_path / "femnist" / "b.json", {"v": {"x": [[0.0] * 783], "y": [1]}})
  with pytest.raises(ValueError, match=r"user 'v': femnist x must be 784 floats"):
    read_leaf(tmp_path / "femnist", "femnist")


@pytest.mark.parametrize("content, match", [
    ({"users": ["u", "v", "w", "z"], "num_samples": [1],
      "user_data": {u: {"x": [[0.0] * 60], "y": [1]} for u in "uvwz"}},
     r"'num_samples' must list one count per user: 4 users"),
    ({"users": ["u"], "num_samples": [1, 1],
      "user_data": {"u": {"x": [[0.0] * 60], "y": [1]}}}, "one count per user: 1 users"),
    ({"users": ["u"], "num_samples": [1],
      "user_data": {u: {"x": [[0.0] * 60], "y": [1]} for u in "uv"}},
     r"user_data holds 1 users missing from 'users' \(first: 'v'\)"),
    ({"users": "u", "num_samples": [1], "user_data": {}}, "'users' must be a list"),
    ({"users": ["u"], "num_samples": 1, "user_data": {"u": {"x": [[0.0] * 60], "y": [1]}}},
     "'num_samples' must list"),
])
def test_users_num_samples_and_user_data_must_agree(tmp_path, content, match):
  """No silent zip truncation: every listed user is read or the file is refused."""
  (tmp_path / "a.json").write_text(json.dumps(content))
  with pytest.raises(ValueError, match=match):
    read_leaf(tmp_path, "synthetic")
