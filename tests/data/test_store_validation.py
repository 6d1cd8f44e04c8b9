"""Bad stores are refused when read, naming the file, the client and the field.

One case per field of the store (every metadata key, every column of
``clients``) and per way a row can lie (sizes, compression flag, labels,
non-finite features, position gaps). Each case edits a valid store with SQL,
as a corrupted or hand-edited file would be, and must be refused by every
read path the training code uses, before any large allocation.
"""

import json
import shutil
import sqlite3
import zlib

import numpy as np
import pytest

from fedjax_priv.data import FederatedDataset, FederatedStore, StoreWriter, write_store
from fedjax_priv.data.store import MAX_CLASSES


def _dataset():
  rng = np.random.default_rng(1)
  sizes = [3, 2, 4]
  x = rng.normal(size=(sum(sizes), 2)).astype(np.float32)
  y = rng.integers(0, 5, sum(sizes))
  return FederatedDataset(x=x, y=y, offsets=np.concatenate([[0], np.cumsum(sizes)]),
                          client_ids=("a", "b", "c"))


def _meta(key, value):
  return [("UPDATE metadata SET value = ? WHERE key = ?", (json.dumps(value), key))]


def _row(sql, *args):
  return [(sql, args)]


# (name, compression, SQL edits, regex the error must match). Errors about a
# row must name client 'b' (the edited one) and the field.
CASES = [
    ("format_version", "none", _meta("format_version", 2), "format_version"),
    ("missing key", "none", _row("DELETE FROM metadata WHERE key = 'license'"), "lacks license"),
    ("name", "none", _meta("name", 3), "metadata name must be a string"),
    ("split", "none", _meta("split", None), "metadata split must be a string"),
    ("source", "none", _meta("source", []), "metadata source must be a string"),
    ("license", "none", _meta("license", {}), "metadata license must be a string"),
    ("x_dtype garbage", "none", _meta("x_dtype", "no-such-type"), "metadata x_dtype"),
    ("x_dtype text", "none", _meta("x_dtype", "<U4"), "metadata x_dtype"),
    ("x_dtype number", "none", _meta("x_dtype", 7), "metadata x_dtype"),
    ("x_shape zero", "none", _meta("x_shape", [0]), "metadata x_shape"),
    ("x_shape negative", "none", _meta("x_shape", [-2]), "metadata x_shape"),
    ("x_shape not a list", "none", _meta("x_shape", "2"), "metadata x_shape"),
    ("x_shape huge", "none", _meta("x_shape", [1 << 20, 1 << 20]), "bytes per example"),
    ("x_shape wrong", "none", _meta("x_shape", [3]), r"client 'a': x holds 24 bytes"),
    ("y_dtype float", "none", _meta("y_dtype", "<f4"), "metadata y_dtype must be an integer"),
    ("y_dtype wrong width", "none", _meta("y_dtype", "<i8"), r"client 'a': y holds 12 bytes"),
    ("compression unknown", "none", _meta("compression", "lz4"), "metadata compression"),
    ("false zlib flag", "none", _meta("compression", "zlib"), r"client 'a': [xy] is not zlib data"),
    ("false none flag", "zlib", _meta("compression", "none"), r"client 'a': x holds \d+ bytes"),
    ("extra", "none", _meta("extra", [1]), "metadata extra must be an object"),
    ("num_classes zero", "none", _meta("num_classes", 0), "metadata num_classes"),
    ("num_classes float", "none", _meta("num_classes", 2.5), "metadata num_classes"),
    ("num_classes huge", "none", _meta("num_classes", 1 << 40), "metadata num_classes"),
    ("metadata not json", "none", _row("UPDATE metadata SET value = '{' WHERE key = 'name'"),
     "metadata name is not valid JSON"),
    ("metadata blob", "none", _row("UPDATE metadata SET value = x'00' WHERE key = 'name'"),
     "metadata key 'name'"),
    ("idx gap", "none", _row("UPDATE clients SET idx = 7 WHERE idx = 2"), r"idx.*without gaps"),
    ("idx offset", "none", _row("UPDATE clients SET idx = idx + 10"), r"idx.*without gaps"),
    ("client_id empty", "none", _row("UPDATE clients SET client_id = '' WHERE idx = 1"),
     "client '': client_id must be a non-empty string"),
    ("client_id blob", "none", _row("UPDATE clients SET client_id = x'00' WHERE idx = 1"),
     r"client b'\\x00': client_id"),
    ("num_examples negative", "none",
     _row("UPDATE clients SET num_examples = -1 WHERE idx = 1"), "'b': num_examples"),
    ("num_examples text", "none",
     _row("UPDATE clients SET num_examples = 'two' WHERE idx = 1"), "'b': num_examples"),
    ("num_examples 1e10", "none",
     _row("UPDATE clients SET num_examples = 10000000000 WHERE idx = 1"), "'b': x holds 16 bytes"),
    ("num_examples 1e10 zlib", "zlib",
     _row("UPDATE clients SET num_examples = 10000000000 WHERE idx = 1"),
     "'b': x is a .*zlib blob"),
    ("num_examples short", "none", _row("UPDATE clients SET num_examples = 1 WHERE idx = 1"),
     "'b': x holds 16 bytes, but num_examples = 1 needs 8"),
    ("num_examples short zlib", "zlib",
     _row("UPDATE clients SET num_examples = 1 WHERE idx = 1"), "'b': [xy] does not inflate"),
    ("x truncated", "none", _row("UPDATE clients SET x = substr(x, 1, 5) WHERE idx = 1"),
     "'b': x holds 5 bytes"),
    ("x text", "none", _row("UPDATE clients SET x = 'abc' WHERE idx = 1"), "'b': x must be a blob"),
    ("y real", "none", _row("UPDATE clients SET y = 1.5 WHERE idx = 1"), "'b': y must be a blob"),
    ("y truncated", "none", _row("UPDATE clients SET y = substr(y, 1, 3) WHERE idx = 1"),
     "'b': y holds 3 bytes"),
    ("y corrupt zlib", "zlib", _row("UPDATE clients SET y = x'789c0000' WHERE idx = 1"),
     "'b': y"),
    ("x zlib bomb", "zlib",
     _row("UPDATE clients SET x = ? WHERE idx = 1", zlib.compress(bytes(1 << 20))),
     "'b': x does not inflate to the 16 bytes"),
]


def _labels_case(labels, compression):
  y = np.asarray(labels, np.int32).tobytes()
  blob = zlib.compress(y) if compression == "zlib" else y
  return _row("UPDATE clients SET y = ? WHERE idx = 1", blob)


def _x_case(values, compression):
  x = np.asarray(values, np.float32).tobytes()
  blob = zlib.compress(x) if compression == "zlib" else x
  return _row("UPDATE clients SET x = ? WHERE idx = 1", blob)


for _compression in ("none", "zlib"):
  CASES += [
      (f"label -1 {_compression}", _compression, _labels_case([0, -1], _compression),
       r"'b': y must lie in \[0, 5\).*e\.g\. -1"),
      (f"label 1000 {_compression}", _compression, _labels_case([1000, 1], _compression),
       r"'b': y must lie in \[0, 5\) \(metadata num_classes\)"),
      (f"label 1e9 {_compression}", _compression, _labels_case([0, 10**9], _compression),
       r"'b': y must lie in \[0, 5\)"),
      (f"x NaN {_compression}", _compression, _x_case([[0, np.nan], [1, 1]], _compression),
       "'b': x holds 1 non-finite"),
      (f"x inf {_compression}", _compression, _x_case([[0, 1], [-np.inf, np.inf]], _compression),
       "'b': x holds 2 non-finite"),
  ]
CASES.append(("label above MAX_CLASSES, unrecorded num_classes", "none",
              _row("DELETE FROM metadata WHERE key = 'num_classes'")
              + _labels_case([0, MAX_CLASSES], "none"),
              r"'b': y must lie in \[0, 1048576\) \(MAX_CLASSES"))


def _read_everything(path):
  """Every read path training uses: sizes, rows by id/position/cohort, iteration, labels."""
  with FederatedStore(path) as store:
    store.client_sizes()
    store.source().max_label()
    for client_id in store.client_ids():
      store.get(client_id)
    for i in range(store.num_clients):
      store.client(i)
    store.clients(np.arange(store.num_clients))
    list(store)
    store.to_federated()


@pytest.fixture(scope="module")
def clean_stores(tmp_path_factory):
  root = tmp_path_factory.mktemp("clean")
  return {c: write_store(root / f"{c}.sqlite", _dataset(), name="toy", compression=c)
          for c in ("none", "zlib")}


def test_clean_stores_read_and_record_their_class_count(clean_stores):
  for path in clean_stores.values():
    _read_everything(path)
    with FederatedStore(path) as store:
      assert store.info.num_classes == int(_dataset().y.max()) + 1


@pytest.mark.parametrize("name, compression, edits, match", CASES, ids=[c[0] for c in CASES])
def test_bad_store_is_refused_naming_the_field(tmp_path, clean_stores, name, compression, edits,
                                               match):
  path = tmp_path / "bad.sqlite"
  shutil.copy(clean_stores[compression], path)
  with sqlite3.connect(path) as db:
    # The label cases need 5 classes whatever the random labels were.
    db.execute("UPDATE metadata SET value = '5' WHERE key = 'num_classes'")
    for sql, args in edits:
      db.execute(sql, args)
  db.close()
  with pytest.raises(ValueError, match=match) as error:
    _read_everything(path)
  assert str(path) in str(error.value)


def test_every_store_field_has_a_case():
  """The cases cover every metadata key the writer records and every column."""
  text = " ".join(f"{name} {match}" for name, _, _, match in CASES)
  keys = ["format_version", "name", "split", "source", "license", "x_dtype", "x_shape",
          "y_dtype", "compression", "extra", "num_classes"]
  columns = ["idx", "client_id", "num_examples", "x ", "y "]
  assert [k for k in keys + columns if k not in text] == []


def test_writer_refuses_labels_outside_num_classes_and_non_finite_features(tmp_path):
  with StoreWriter(tmp_path / "s.sqlite", name="toy", num_classes=3) as writer:
    with pytest.raises(ValueError, match=r"'neg': labels must lie in \[0, 3\)"):
      writer.add("neg", np.zeros((1, 2), np.float32), [-1])
    with pytest.raises(ValueError, match=r"'big': labels must lie in \[0, 3\)"):
      writer.add("big", np.zeros((1, 2), np.float32), [3])
    with pytest.raises(ValueError, match="'nan': x holds 1 non-finite"):
      writer.add("nan", np.array([[0.0, np.nan]], np.float32), [0])
    writer.add("ok", np.zeros((1, 2), np.float32), [2])
  with FederatedStore(tmp_path / "s.sqlite") as store:
    assert store.info.num_classes == 3
  with pytest.raises(ValueError, match="num_classes must be an integer"):
    StoreWriter(tmp_path / "t.sqlite", name="toy", num_classes=0)


def test_writer_refuses_a_feature_dtype_it_could_not_read_back(tmp_path):
  with pytest.raises(ValueError, match="x_dtype must be a bool, integer or float dtype"):
    StoreWriter(tmp_path / "s.sqlite", name="toy", x_dtype="complex64")
  with StoreWriter(tmp_path / "t.sqlite", name="toy") as writer:
    with pytest.raises(ValueError, match="x_dtype must be a bool, integer or float dtype"):
      writer.add("a", np.zeros((1, 2), np.complex64), [0])
    writer.add("a", np.zeros((1, 2), np.float32), [0])
