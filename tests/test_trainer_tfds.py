"""Corpora from tensorflow-datasets, offline through tfds.testing.mock_data."""

from __future__ import annotations

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer import corpus as corpus_lib
from trainer import train_lib

SHAKESPEARE = "First Citizen:\r\nBefore we proceed any further, hear me speak.\r\n\r\nAll:\r\nSpeak."


def fixed_text_dataset(texts: list[str], key: str = "text"):
    """Returns an `as_dataset_fn` for mock_data that yields `texts` under `key`."""

    def as_dataset(self, *args, **kwargs):
        return tf.data.Dataset.from_tensor_slices({key: tf.constant(texts)})

    return as_dataset


def test_mock_tiny_shakespeare_loads():
    with tfds.testing.mock_data(num_examples=3):
        corpus = corpus_lib.load_corpus(None, "tiny_shakespeare", "utf-8")
    assert corpus.name == "tfds:tiny_shakespeare/train"
    assert corpus.sources == ("tiny_shakespeare",)
    assert len(corpus.text) > 0


def test_examples_join_and_normalize():
    texts = ["\ufeff" + SHAKESPEARE, "Ещё один пример 🙂\rконец"]
    with tfds.testing.mock_data(as_dataset_fn=fixed_text_dataset(texts)):
        corpus = corpus_lib.read_tfds("tiny_shakespeare", "validation")
    expected = SHAKESPEARE.replace("\r\n", "\n") + "\n" + "Ещё один пример 🙂\nконец"
    assert corpus.text == expected
    assert corpus.name == "tfds:tiny_shakespeare/validation"


def test_missing_text_key_names_features():
    with tfds.testing.mock_data(as_dataset_fn=fixed_text_dataset(["abc"], key="content")):
        with pytest.raises(corpus_lib.CorpusError,
                           match=r"--tfds_text_key='text' is not a feature of "
                                 r"'tiny_shakespeare'; its features are \['content'\]"):
            corpus_lib.read_tfds("tiny_shakespeare")


def test_custom_text_key():
    with tfds.testing.mock_data(as_dataset_fn=fixed_text_dataset(["abc"], key="content")):
        assert corpus_lib.read_tfds("tiny_shakespeare", text_key="content").text == "abc"


def test_unknown_dataset_fails_clearly(tiny_config, no_model_build):
    with pytest.raises(train_lib.SetupError,
                       match=r"--tfds_name='tiny_shakespear' is not a dataset known to "
                             r"tensorflow-datasets [\d.]+\. Did you mean 'tiny_shakespeare'\?"):
        train_lib.run(tiny_config(text_files=(), tfds_name="tiny_shakespear"))


def test_training_on_tfds(tiny_config):
    text = "To be, or not to be, that is the question. " * 60
    with tfds.testing.mock_data(as_dataset_fn=fixed_text_dataset([text])):
        result = train_lib.run(tiny_config(text_files=(), tfds_name="tiny_shakespeare",
                                           train_steps=3))
    assert result.summary["corpus"] == "tfds:tiny_shakespeare/train"
    assert result.summary["steps"] == 3
    assert result.vocabulary.characters == sorted(set(text))
