"""The character-level LSTM language model.

One call signature serves training, evaluation and export:

    logits, final_state = model(ids, initial_state)

`ids` is int32 `[batch, time]`; `logits` is float32 `[batch, time, vocab]`
whatever the precision policy; the state is a list with one `(h, c)` pair per
layer, each `[batch, units]`, in the layer's compute dtype.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import keras
import tensorflow as tf

from trainer import fast_lstm

MODEL_CONFIG_FILENAME = "model_config.json"

LSTMState = list  # [(h, c)] * num_layers, each [batch, units]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters that fix the model's variables.

    Saved beside the checkpoints so that export rebuilds the same model.
    """

    vocab_size: int
    input_encoding: str = "embedding"  # "embedding" or "one_hot"
    embedding_dim: int = 128
    num_layers: int = 1
    units: int = 512
    dropout: float = 0.0
    precision: str = "float32"  # a Keras dtype policy name
    # How the LSTM layers run: "keras" (cuDNN on a GPU), "fused" (the CPU
    # loop in trainer/fast_lstm.py) or "auto" (fused unless there is a GPU).
    # Both use the same variables, so it may change between runs.
    lstm_implementation: str = "auto"

    def __post_init__(self):
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}.")
        if self.input_encoding not in ("embedding", "one_hot"):
            raise ValueError(
                f"input_encoding must be 'embedding' or 'one_hot', got {self.input_encoding!r}.")
        for name in ("embedding_dim", "num_layers", "units"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.lstm_implementation not in fast_lstm.IMPLEMENTATIONS:
            raise ValueError(
                f"lstm_implementation must be one of {', '.join(fast_lstm.IMPLEMENTATIONS)}, "
                f"got {self.lstm_implementation!r}.")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        data = json.loads(text)
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


class CharLSTM(keras.Model):
    """Embedding or one-hot input, stacked LSTMs, dense logits.

    The LSTM layers keep Keras's defaults (tanh, sigmoid gates, no recurrent
    dropout, no unrolling), which are the conditions for Keras to run them
    with cuDNN on a GPU. Dropout is applied between layers instead of inside
    the cell for the same reason.
    """

    def __init__(self, config: ModelConfig, **kwargs):
        super().__init__(name="char_lstm", **kwargs)
        self.config = config
        policy = keras.DTypePolicy(config.precision)
        if config.input_encoding == "embedding":
            self.embedding = keras.layers.Embedding(
                config.vocab_size, config.embedding_dim, dtype=policy, name="embedding")
        else:
            self.embedding = None
        self.lstm_layers = [
            keras.layers.LSTM(config.units, return_sequences=True, return_state=True,
                              dtype=policy, name=f"lstm_{i}")
            for i in range(config.num_layers)
        ]
        self.dropout_layers = [
            keras.layers.Dropout(config.dropout, name=f"dropout_{i}")
            for i in range(config.num_layers)
        ]
        # tf.train.Checkpoint does not look inside Keras 3's tracked lists.
        # Without these attributes, a checkpoint of the model alone
        # (tf.train.Checkpoint(model=...)) lacks the LSTM weights, and the
        # trainer's checkpoint reaches them only through the optimizer.
        for index, layer in enumerate(self.lstm_layers):
            setattr(self, f"lstm_{index}", layer)
        # Logits stay float32 under mixed precision: softmax and the loss
        # lose too much in 16-bit floats.
        self.logits_layer = keras.layers.Dense(config.vocab_size, dtype="float32", name="logits")
        self.compute_dtype_name = policy.compute_dtype
        self.lstm_implementation = fast_lstm.resolve_implementation(config.lstm_implementation)

    def zero_state(self, batch_size) -> LSTMState:
        """Returns the all-zero state for `batch_size` sequences."""
        zeros = tf.zeros([batch_size, self.config.units], self.compute_dtype_name)
        return [(zeros, zeros) for _ in range(self.config.num_layers)]

    def call(self, ids, initial_state: Optional[Sequence] = None, training: bool = False):
        """Runs the model over `ids` [batch, time] from `initial_state`.

        Returns:
          (logits [batch, time, vocab] float32, final state as a list of
          (h, c) pairs [batch, units]).
        """
        ids = tf.convert_to_tensor(ids)
        if self.embedding is not None:
            features = self.embedding(ids)  # [batch, time, embedding_dim]
        else:
            # The classic recipe: a one-hot vector per character.
            features = tf.one_hot(ids, self.config.vocab_size, dtype=self.compute_dtype_name)
        if initial_state is None:
            initial_state = self.zero_state(tf.shape(ids)[0])
        if self.lstm_implementation == "fused":
            return self._call_fused(ids, initial_state, training)
        final_state = []
        for layer, dropout, (h, c) in zip(self.lstm_layers, self.dropout_layers, initial_state):
            features, h, c = layer(features, initial_state=[h, c], training=training)  # [batch, time, units]
            features = dropout(features, training=training)
            final_state.append((h, c))
        logits = self.logits_layer(features)  # [batch, time, vocab] float32
        return logits, final_state

    def _call_fused(self, ids, initial_state, training):
        """Runs the maths of `call` with `fast_lstm.lstm_sequence` in place of Keras's loop.

        Works time-major; only the logits are transposed back, because they
        are the smallest tensor ([time, batch, vocab]).
        """
        self._build_layers_for_fused()
        matmul_dtype = self.compute_dtype_name
        time_major_ids = tf.transpose(ids)  # [time, batch]
        features = None
        final_state = []
        for index, (layer, dropout, (h, c)) in enumerate(
                zip(self.lstm_layers, self.dropout_layers, initial_state)):
            cell = layer.cell
            kernel = tf.cast(cell.kernel, matmul_dtype)  # [input, 4 * units]
            bias = tf.cast(cell.bias, tf.float32)  # [4 * units]
            if index == 0:
                embeddings = (None if self.embedding is None
                              else tf.cast(self.embedding.embeddings, matmul_dtype))
                projection = fast_lstm.embedding_projection(
                    time_major_ids, embeddings, kernel, bias)  # [time, batch, 4 * units]
            else:
                flat = tf.reshape(tf.cast(features, matmul_dtype), [-1, tf.shape(features)[2]])
                projection = tf.cast(tf.matmul(flat, kernel), tf.float32) + bias  # [time * batch, 4 * units]
                projection = tf.reshape(projection, [tf.shape(features)[0], tf.shape(features)[1], -1])
            features, h, c = fast_lstm.lstm_sequence(
                projection, tf.cast(h, tf.float32), tf.cast(c, tf.float32),
                tf.cast(cell.recurrent_kernel, matmul_dtype))  # [time, batch, units] float32
            features = dropout(features, training=training)
            final_state.append((tf.cast(h, self.compute_dtype_name),
                                tf.cast(c, self.compute_dtype_name)))
        logits = self.logits_layer(features)  # [time, batch, vocab] float32
        return tf.transpose(logits, [1, 0, 2]), final_state

    def _build_layers_for_fused(self):
        """Creates the layers' variables, in the order the Keras path creates them."""
        if self.embedding is not None and not self.embedding.built:
            self.embedding.build((None, None))
        input_dim = (self.config.embedding_dim if self.embedding is not None
                     else self.config.vocab_size)
        for layer in self.lstm_layers:
            if not layer.built:
                layer.build((None, None, input_dim))
            input_dim = self.config.units


def build_model(config: ModelConfig) -> CharLSTM:
    """Creates the model and its variables (call inside the strategy scope)."""
    model = CharLSTM(config)
    model(tf.zeros([1, 1], tf.int32))
    return model


def save_model_config(config: ModelConfig, directory: str) -> None:
    from trainer.vocabulary import atomic_write_text

    atomic_write_text(tf.io.gfile.join(directory, MODEL_CONFIG_FILENAME), config.to_json())


def load_model_config(directory: str) -> ModelConfig:
    path = tf.io.gfile.join(directory, MODEL_CONFIG_FILENAME)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(
            f"Model config not found: {path}. Is {directory!r} a charlstm --model_dir?")
    with tf.io.gfile.GFile(path, "r") as f:
        return ModelConfig.from_json(f.read())
