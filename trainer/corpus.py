"""Reading training text: the bundled novel, files or globs, or a TFDS dataset.

All file access goes through `tf.io.gfile`, so `gs://` and any other
filesystem TensorFlow has a plugin for work like local paths.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import os
from typing import Sequence

import tensorflow as tf

BUNDLED_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "frankenstein.txt")
BUNDLED_CORPUS_NAME = "frankenstein"


class CorpusError(ValueError):
    """Raised for a corpus that cannot be used: missing, empty, undecodable."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Normalized training text and where it came from."""

    text: str
    name: str
    sources: tuple[str, ...]


def normalize_text(text: str) -> str:
    """Drops a leading byte-order mark and turns CRLF and CR line ends into LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def decode_bytes(data: bytes, encoding: str, source: str) -> str:
    """Decodes `data` strictly, naming the byte offset of the first invalid byte.

    Raises:
      CorpusError: if `data` is not valid in `encoding`.
    """
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        bad = data[error.start:error.end]
        raise CorpusError(
            f"{source}: byte {bad!r} at offset {error.start} is not valid {encoding} "
            f"({error.reason}). Set --encoding to the file's real encoding "
            "(for example latin-1 or cp1252) or fix the file.") from error


def check_encoding(encoding: str) -> str:
    """Returns the canonical codec name for `encoding`, or raises CorpusError."""
    try:
        return codecs.lookup(encoding).name
    except LookupError as error:
        raise CorpusError(
            f"--encoding={encoding!r} is not a known text encoding. "
            "Use a Python codec name such as utf-8, utf-16 or latin-1.") from error


def expand_patterns(patterns: Sequence[str]) -> list[str]:
    """Expands each path or glob in `patterns` into sorted file paths.

    Raises:
      CorpusError: if a pattern matches no file or names a directory.
    """
    paths = []
    for pattern in patterns:
        matches = sorted(tf.io.gfile.glob(pattern))
        if not matches:
            raise CorpusError(
                f"--text_files: {pattern!r} matches no file. Check the path or glob "
                "(quote globs so the shell does not expand them).")
        for path in matches:
            if tf.io.gfile.isdir(path):
                raise CorpusError(
                    f"--text_files: {path!r} is a directory. Name the files inside it, "
                    f"for example {tf.io.gfile.join(path, '*.txt')!r}.")
        paths.extend(matches)
    return paths


def read_text_files(patterns: Sequence[str], encoding: str = "utf-8") -> Corpus:
    """Reads, decodes and joins text files; a newline separates files."""
    encoding = check_encoding(encoding)
    paths = expand_patterns(patterns)
    pieces = []
    for path in paths:
        with tf.io.gfile.GFile(path, "rb") as f:
            data = f.read()
        pieces.append(normalize_text(decode_bytes(data, encoding, path)))
    text = "\n".join(piece for piece in pieces if piece)
    if len(paths) == 1:
        name = os.path.basename(paths[0])
    else:
        name = f"{os.path.basename(paths[0])} and {len(paths) - 1} more files"
    return Corpus(text=text, name=name, sources=tuple(paths))


def read_tfds(name: str, split: str = "train", text_key: str = "text",
              data_dir: str | None = None, download: bool = True) -> Corpus:
    """Loads a TFDS text dataset and joins the `text_key` feature of every example.

    Raises:
      CorpusError: for an unknown dataset, a split that is not there or a
        missing text feature.
    """
    import tensorflow_datasets as tfds  # Imported here: it is slow to import.

    try:
        dataset = tfds.load(name, split=split, data_dir=data_dir, download=download)
    except tfds.core.registered.DatasetNotFoundError as error:
        # TFDS's own message lists every registered dataset, hundreds of
        # lines, so only close matches are shown. Community datasets are left out of
        # the list because listing them reads from Google Cloud Storage.
        known = sorted(set(tfds.list_builders(with_community_datasets=False)))
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(repr(match) for match in close)}?" if close else ""
        raise CorpusError(
            f"--tfds_name={name!r} is not a dataset known to tensorflow-datasets "
            f"{tfds.__version__}.{hint} Check the spelling, or for a dataset of your own "
            "import the module that defines its builder.") from error
    except Exception as error:  # TFDS raises many types for one cause.
        raise CorpusError(
            f"--tfds_name={name!r} --tfds_split={split!r}: loading failed: {error}. "
            "On a machine without network access, prepare the dataset elsewhere, "
            "copy its data directory over and pass --tfds_data_dir.") from error
    pieces = []
    for example in dataset.as_numpy_iterator():
        if text_key not in example:
            raise CorpusError(
                f"--tfds_text_key={text_key!r} is not a feature of {name!r}; "
                f"its features are {sorted(example)}.")
        value = example[text_key]
        pieces.append(normalize_text(value.decode("utf-8") if isinstance(value, bytes) else str(value)))
    return Corpus(text="\n".join(pieces), name=f"tfds:{name}/{split}", sources=(name,))


def load_corpus(text_files: Sequence[str] | None, tfds_name: str | None, encoding: str,
                tfds_split: str = "train", tfds_text_key: str = "text",
                tfds_data_dir: str | None = None) -> Corpus:
    """Reads the corpus chosen by the flags; with neither source set, the bundled novel.

    Raises:
      CorpusError: for a missing, unreadable or empty corpus.
    """
    if text_files and tfds_name:
        raise CorpusError("Set either --text_files or --tfds_name, not both.")
    # Checked for every source, so a misspelled --encoding fails even where
    # the bundled novel or TFDS makes it unused.
    check_encoding(encoding)
    if tfds_name:
        corpus = read_tfds(tfds_name, tfds_split, tfds_text_key, tfds_data_dir)
    elif text_files:
        corpus = read_text_files(text_files, encoding)
    else:
        corpus = read_text_files([BUNDLED_CORPUS], "utf-8")
        corpus = dataclasses.replace(corpus, name=BUNDLED_CORPUS_NAME)
    if not corpus.text:
        raise CorpusError(
            f"Corpus {corpus.name!r} ({', '.join(corpus.sources)}) is empty. "
            "Point --text_files at a file with text in it.")
    return corpus
