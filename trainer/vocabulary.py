"""Character vocabulary over Unicode code points.

Id 0 is reserved for unknown characters: characters rarer than the minimum
count when the vocabulary was built, and characters never seen in training.
The remaining ids follow the code point order of the known characters, so the
same text always gives the same vocabulary.
"""

from __future__ import annotations

import collections
import hashlib
import json
import uuid
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

UNKNOWN_ID = 0
# Decoding an unknown id gives U+FFFD, the Unicode replacement character.
UNKNOWN_CHARACTER = "\ufffd"
VOCABULARY_FILENAME = "vocabulary.json"
_FORMAT_VERSION = 1


class VocabularyError(ValueError):
    """Raised for a vocabulary file that is missing, invalid or does not match."""


def fingerprint_text(text: str) -> str:
    """Returns the SHA-256 hex digest of the UTF-8 encoding of `text`."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class Vocabulary:
    """Maps characters (code points) to integer ids and back.

    Attributes:
      characters: known characters; character `characters[i]` has id `i + 1`.
      corpus_name: human-readable name of the training corpus.
      corpus_fingerprint: SHA-256 of the training text the vocabulary came from.
      min_char_count: the count threshold used when building.
    """

    def __init__(
        self,
        characters: Sequence[str],
        corpus_name: str = "",
        corpus_fingerprint: str = "",
        min_char_count: int = 1,
    ):
        for character in characters:
            if len(character) != 1:
                raise VocabularyError(
                    f"Vocabulary entry {character!r} is not a single code point.")
        if len(set(characters)) != len(characters):
            raise VocabularyError("Vocabulary contains duplicate characters.")
        self.characters = list(characters)
        self.corpus_name = corpus_name
        self.corpus_fingerprint = corpus_fingerprint
        self.min_char_count = min_char_count
        self._ids = {c: i + 1 for i, c in enumerate(self.characters)}

    @classmethod
    def build(cls, text: str, min_char_count: int = 1, corpus_name: str = "") -> "Vocabulary":
        """Builds a vocabulary from the characters of `text`.

        Args:
          text: training text.
          min_char_count: characters seen fewer times than this map to the
            unknown id.
          corpus_name: name stored with the vocabulary.

        Returns:
          A `Vocabulary` whose known characters are sorted by code point.
        """
        counts = collections.Counter(text)
        known = sorted(c for c, n in counts.items() if n >= min_char_count)
        return cls(known, corpus_name, fingerprint_text(text), min_char_count)

    @property
    def size(self) -> int:
        """Number of ids, the unknown id included."""
        return len(self.characters) + 1

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as an int32 array; unknown characters get id 0."""
        ids = self._ids
        return np.fromiter((ids.get(c, UNKNOWN_ID) for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text for `ids`; the unknown id decodes to U+FFFD."""
        table = [UNKNOWN_CHARACTER] + self.characters
        return "".join(table[int(i)] if 0 <= int(i) < len(table) else UNKNOWN_CHARACTER for i in ids)

    def unknown_characters(self, text: str) -> list[str]:
        """Returns the distinct characters of `text` that are not in the vocabulary."""
        return sorted({c for c in text if c not in self._ids})

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": _FORMAT_VERSION,
                "unknown_id": UNKNOWN_ID,
                "characters": self.characters,
                "corpus_name": self.corpus_name,
                "corpus_fingerprint": self.corpus_fingerprint,
                "min_char_count": self.min_char_count,
            },
            ensure_ascii=True,
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "Vocabulary":
        try:
            data = json.loads(text)
            characters = data["characters"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise VocabularyError(
                f"Invalid vocabulary file {source}: {error}. Delete it only if you also "
                "delete the checkpoints next to it, or point --model_dir elsewhere.") from error
        if data.get("format_version") != _FORMAT_VERSION:
            raise VocabularyError(
                f"Vocabulary file {source} has format_version {data.get('format_version')!r}, "
                f"expected {_FORMAT_VERSION}.")
        return cls(characters, data.get("corpus_name", ""), data.get("corpus_fingerprint", ""),
                   data.get("min_char_count", 1))

    def save(self, directory: str) -> str:
        """Writes the vocabulary to `directory/vocabulary.json` atomically; returns the path."""
        path = tf.io.gfile.join(directory, VOCABULARY_FILENAME)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, directory: str) -> "Vocabulary":
        path = tf.io.gfile.join(directory, VOCABULARY_FILENAME)
        if not tf.io.gfile.exists(path):
            raise VocabularyError(f"Vocabulary file not found: {path}.")
        with tf.io.gfile.GFile(path, "r") as f:
            return cls.from_json(f.read(), path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.characters == other.characters

    def __repr__(self) -> str:
        return f"Vocabulary(size={self.size}, corpus_name={self.corpus_name!r})"


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename.

    Readers see the old file or the new one, never a partial write, on
    filesystems where rename is atomic (local disks; object stores such as
    GCS copy on rename, so there it is only as safe as the copy).
    """
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    with tf.io.gfile.GFile(temporary, "w") as f:
        f.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)
