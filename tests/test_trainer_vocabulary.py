"""The code-point vocabulary: round trips, the unknown id, files, text normalization."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer import corpus as corpus_lib
from trainer.vocabulary import (UNKNOWN_CHARACTER, UNKNOWN_ID, Vocabulary, VocabularyError,
                                VOCABULARY_FILENAME)

MIXED_TEXT = (
    "Plain ASCII text.\n"
    "Кириллица: съешь же ещё этих мягких французских булок.\n"
    "Accents: café, naïve, Ångström, façade.\n"
    "Emoji: 🙂🚀 and a flag 🇫🇷.\n"
)


def test_round_trip_mixed_scripts():
    vocabulary = Vocabulary.build(MIXED_TEXT)
    ids = vocabulary.encode(MIXED_TEXT)
    assert ids.dtype == np.int32
    assert len(ids) == len(MIXED_TEXT)
    assert UNKNOWN_ID not in ids
    assert vocabulary.decode(ids) == MIXED_TEXT


def test_emoji_is_one_code_point_per_id():
    vocabulary = Vocabulary.build("a🙂")
    assert vocabulary.size == 3
    assert vocabulary.decode(vocabulary.encode("🙂a")) == "🙂a"


def test_ids_follow_code_point_order():
    vocabulary = Vocabulary.build("ба a")
    assert vocabulary.characters == [" ", "a", "а", "б"]
    np.testing.assert_array_equal(vocabulary.encode(" aаб"), [1, 2, 3, 4])


def test_unseen_character_maps_to_unknown():
    vocabulary = Vocabulary.build("abc")
    np.testing.assert_array_equal(vocabulary.encode("aЖc"), [1, UNKNOWN_ID, 3])
    assert vocabulary.decode([1, UNKNOWN_ID, 3]) == f"a{UNKNOWN_CHARACTER}c"
    assert vocabulary.unknown_characters("aЖc🙂") == ["Ж", "🙂"]


def test_out_of_range_id_decodes_to_replacement():
    vocabulary = Vocabulary.build("ab")
    assert vocabulary.decode([1, 99, -1]) == f"a{UNKNOWN_CHARACTER}{UNKNOWN_CHARACTER}"


def test_min_char_count_drops_rare_characters():
    vocabulary = Vocabulary.build("aaabbc🙂", min_char_count=2)
    assert vocabulary.characters == ["a", "b"]
    np.testing.assert_array_equal(vocabulary.encode("abc🙂"), [1, 2, UNKNOWN_ID, UNKNOWN_ID])


def test_save_load_round_trip(tmp_path):
    vocabulary = Vocabulary.build(MIXED_TEXT, corpus_name="mixed")
    path = vocabulary.save(str(tmp_path))
    assert path.endswith(VOCABULARY_FILENAME)
    loaded = Vocabulary.load(str(tmp_path))
    assert loaded == vocabulary
    assert loaded.corpus_name == "mixed"
    assert loaded.corpus_fingerprint == vocabulary.corpus_fingerprint
    assert loaded.decode(loaded.encode(MIXED_TEXT)) == MIXED_TEXT


def test_saved_file_is_json_with_unknown_id(tmp_path):
    Vocabulary.build("xyz").save(str(tmp_path))
    saved = json.loads((tmp_path / VOCABULARY_FILENAME).read_text(encoding="ascii"))
    assert saved["unknown_id"] == 0
    assert saved["characters"] == ["x", "y", "z"]
    assert not list(tmp_path.glob("*.tmp-*")), "temporary file left behind"


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(VocabularyError, match=r"Vocabulary file not found: .*vocabulary\.json"):
        Vocabulary.load(str(tmp_path))


def test_load_invalid_file_raises(tmp_path):
    (tmp_path / VOCABULARY_FILENAME).write_text("{not json", encoding="utf-8")
    with pytest.raises(VocabularyError, match=r"Invalid vocabulary file .*vocabulary\.json"):
        Vocabulary.load(str(tmp_path))


def test_multi_code_point_entry_is_rejected():
    with pytest.raises(VocabularyError, match=r"'ab' is not a single code point"):
        Vocabulary(["ab"])


def test_normalize_drops_bom():
    assert corpus_lib.normalize_text("\ufeffabc") == "abc"


def test_normalize_keeps_inner_bom_like_character():
    assert corpus_lib.normalize_text("a\ufeffb") == "a\ufeffb"


@pytest.mark.parametrize("raw", ["a\r\nb\r\nc", "a\rb\rc", "a\nb\rc", "a\r\nb\nc"])
def test_normalize_line_ends_to_lf(raw):
    assert corpus_lib.normalize_text(raw) == "a\nb\nc"


def test_file_with_bom_and_crlf_reads_clean(tmp_path):
    path = tmp_path / "windows.txt"
    path.write_bytes("\ufeffПривет\r\nмир\rcafé 🙂".encode("utf-8"))
    corpus = corpus_lib.read_text_files([str(path)], "utf-8")
    assert corpus.text == "Привет\nмир\ncafé 🙂"
    vocabulary = Vocabulary.build(corpus.text)
    assert "\r" not in vocabulary.characters
    assert "\ufeff" not in vocabulary.characters


def test_utf16_file_drops_bom(tmp_path):
    path = tmp_path / "utf16.txt"
    path.write_bytes("Ёлка\r\n🙂".encode("utf-16"))  # Python writes a BOM first.
    assert corpus_lib.read_text_files([str(path)], "utf-16").text == "Ёлка\n🙂"
