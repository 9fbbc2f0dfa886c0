"""Reading the corpus: the bundled novel, files, globs, other filesystems, encodings."""

from __future__ import annotations

import tensorflow as tf

from trainer import corpus as corpus_lib


def write(path, text: str, encoding: str = "utf-8") -> str:
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_default_is_bundled_frankenstein():
    corpus = corpus_lib.load_corpus(None, None, "utf-8")
    assert corpus.name == "frankenstein"
    assert corpus.sources == (corpus_lib.BUNDLED_CORPUS,)
    assert "Frankenstein" in corpus.text
    assert len(corpus.text) > 100_000
    assert "\r" not in corpus.text
    assert not corpus.text.startswith("\ufeff")


def test_several_files_join_with_newline(tmp_path):
    first = write(tmp_path / "a.txt", "first")
    second = write(tmp_path / "b.txt", "second")
    corpus = corpus_lib.load_corpus([second, first], None, "utf-8")
    assert corpus.text == "second\nfirst"
    assert corpus.sources == (second, first)
    assert corpus.name == "b.txt and 1 more files"


def test_glob_expands_sorted(tmp_path):
    for name in ("c.txt", "a.txt", "b.txt"):
        write(tmp_path / name, name[0])
    write(tmp_path / "skip.md", "not matched")
    corpus = corpus_lib.load_corpus([str(tmp_path / "*.txt")], None, "utf-8")
    assert corpus.text == "a\nb\nc"
    assert len(corpus.sources) == 3


def test_non_local_filesystem_through_gfile():
    # TensorFlow's in-memory filesystem replaces gs:// here: both go
    # through tf.io.gfile, and this one needs no network.
    tf.io.gfile.makedirs("ram://corpus_test/")
    for name in ("x.txt", "y.txt"):
        with tf.io.gfile.GFile(f"ram://corpus_test/{name}", "wb") as f:
            f.write(f"ёж {name}".encode("utf-8"))
    corpus = corpus_lib.load_corpus(["ram://corpus_test/*.txt"], None, "utf-8")
    assert corpus.text == "ёж x.txt\nёж y.txt"


def test_comma_separated_flag_value(tmp_path, parse_trainer_flags):
    first = write(tmp_path / "a.txt", "a")
    second = write(tmp_path / "b.txt", "b")
    third = write(tmp_path / "c.txt", "c")
    config = parse_trainer_flags(f"--text_files={first},{second}", f"--text_files={third}",
                                 f"--model_dir={tmp_path / 'model'}")
    assert config.text_files == (first, second, third)
    corpus = corpus_lib.load_corpus(config.text_files, None, config.encoding)
    assert corpus.text == "a\nb\nc"


def test_latin1_encoding(tmp_path):
    path = write(tmp_path / "latin1.txt", "café über", encoding="latin-1")
    assert corpus_lib.load_corpus([path], None, "latin-1").text == "café über"


def test_cp1251_cyrillic(tmp_path):
    path = write(tmp_path / "cp1251.txt", "Привет\r\nмир", encoding="cp1251")
    assert corpus_lib.load_corpus([path], None, "cp1251").text == "Привет\nмир"


def test_empty_file_between_others_is_skipped(tmp_path):
    first = write(tmp_path / "a.txt", "a")
    empty = write(tmp_path / "b.txt", "")
    last = write(tmp_path / "c.txt", "c")
    assert corpus_lib.load_corpus([first, empty, last], None, "utf-8").text == "a\nc"
