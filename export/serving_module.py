"""The `tf.Module` that the SavedModel exports: the model, its vocabulary and the signatures.

Every signature takes inputs whose first dimension is the batch and returns a
dict whose tensors also start with the batch dimension. TF Serving's
server-side batching needs both: it concatenates the inputs of several
requests along dimension 0 and splits every output along dimension 0.

The recurrent state travels as two float32 tensors `h` and `c`, each
`[batch, num_layers, units]`, whatever the training precision. The model's
compute dtype is used only inside.

Prompt and input characters that are not in the vocabulary map to the
unknown id 0, as `trainer.vocabulary.Vocabulary.encode` does, and id 0
decodes to U+FFFD. Bytes that are not valid UTF-8 decode to U+FFFD first, so
they also map to id 0 unless U+FFFD itself is in the vocabulary. An empty
prompt is primed as "\\n", as `trainer.sampling.generate_text` does.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from trainer import fast_lstm
from trainer.model import CharLSTM
from trainer.sampling import sample_ids, step_seeds
from trainer.vocabulary import UNKNOWN_CHARACTER, UNKNOWN_ID, Vocabulary

# Generated `ids` past a row's `num_chars` contain this value, never a real id.
GENERATE_PADDING_ID = -1
EMPTY_PROMPT_REPLACEMENT = "\n"
UNKNOWN_CHARACTER_POLICY = (
    "Characters not in the vocabulary (and bytes that are not valid UTF-8) map to the "
    "unknown id 0, which decodes to U+FFFD. An empty prompt is primed as '\\n'.")


class _NotTracked:
    """A holder that `tf.Module` attribute tracking does not look into."""

    def __init__(self, value):
        self.value = value


@dataclasses.dataclass(frozen=True)
class ExportMetadata:
    """Facts about the training run that the `metadata` signature returns."""

    training_step: int
    corpus_name: str
    precision: str


class CharLSTMServing(tf.Module):
    """Sampling signatures over a restored `CharLSTM` and its vocabulary.

    The signature functions are the methods without a leading underscore.
    `signatures()` returns them under their serving names.
    """

    def __init__(self, model: CharLSTM, vocabulary: Vocabulary, metadata: ExportMetadata,
                 max_generate_chars: int):
        super().__init__(name="charlstm_serving")
        if vocabulary.size != model.config.vocab_size:
            raise ValueError(
                f"Vocabulary has {vocabulary.size} ids but the model has vocab_size "
                f"{model.config.vocab_size}.")
        if max_generate_chars < 1:
            raise ValueError(f"max_generate_chars must be positive, got {max_generate_chars}.")
        # The Keras model itself stays out of the SavedModel's object graph:
        # saving it as a child would also trace Keras's own default serving
        # function, which feeds float inputs to the model. Only its weights
        # are tracked, so they are saved and the signatures can capture them.
        self._model = _NotTracked(model)
        self.model_weights = [weight.value for weight in model.weights]
        self.num_layers = model.config.num_layers
        self.units = model.config.units
        self.vocab_size = model.config.vocab_size
        self.max_generate_chars = max_generate_chars
        self.compute_dtype = model.compute_dtype_name
        # `embedding @ kernel + bias` of the first LSTM layer, float32
        # [vocab, 4 * units], saved with the weights. A step then looks up one
        # row per id instead of running an [ids, input] @ [input, 4 * units]
        # matmul, which at units 1024 reads 4 MiB of kernel (float32) per step.
        # The SavedModel grows by vocab * 4 * units * 4 bytes.
        self.input_projection_table = tf.Variable(
            _input_projection_table(model), trainable=False, name="input_projection_table")

        # The lookup table lives in the SavedModel, and the SavedModel's init
        # op (which TF Serving runs on load) fills it from these constants.
        characters = tf.constant(vocabulary.characters, tf.string)
        known_ids = tf.range(1, vocabulary.size, dtype=tf.int32)
        self.char_to_id = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(characters, known_ids),
            default_value=UNKNOWN_ID, name="char_to_id")
        # Index i is the character of id i, and id 0 is U+FFFD.
        self.id_to_char = tf.constant([UNKNOWN_CHARACTER] + list(vocabulary.characters),
                                      tf.string)  # [vocab]
        self.metadata_values = metadata

    # ----------------------------------------------------------------- core

    def _step_weights(self):
        """Returns the weights of one step, cast to their matmul dtype.

        Call it once per signature call, outside any loop, so a bfloat16
        model casts its kernels once per call and not once per character.

        Returns:
          (a list of (kernel, bias, recurrent_kernel) per LSTM layer, where
          layer 0 has None for kernel and bias because its input projection
          comes from `input_projection_table`; the logits kernel and bias in
          float32).
        """
        model = self._model.value
        layers = []
        for index, layer in enumerate(model.lstm_layers):
            cell = layer.cell
            recurrent_kernel = tf.cast(cell.recurrent_kernel, self.compute_dtype)  # [units, 4 * units]
            if index == 0:
                layers.append((None, None, recurrent_kernel))
            else:
                layers.append((tf.cast(cell.kernel, self.compute_dtype),
                               tf.cast(cell.bias, tf.float32), recurrent_kernel))
        logits_layer = model.logits_layer
        return layers, (tf.cast(logits_layer.kernel, tf.float32),
                        tf.cast(logits_layer.bias, tf.float32))

    def _run_cell(self, ids, h, c, weights):
        """Advances the model one character.

        The same maths as `CharLSTM` with the fused LSTM (gates i, f, c, o;
        dropout off), written out for a single step: the first layer's input
        projection is a row of `input_projection_table`, and every other
        matmul runs in the model's compute dtype with float32 gate
        arithmetic. The state goes through the compute dtype on the way in
        and out, as it does between calls of the Keras model.

        Args:
          ids: int32 [batch], ids already checked to be in range.
          h, c: float32 [batch, num_layers, units].
          weights: the result of `_step_weights()`.

        Returns:
          (logits float32 [batch, vocab], h, c float32 [batch, num_layers, units]).
        """
        layers, (logits_kernel, logits_bias) = weights
        projection = tf.gather(self.input_projection_table, ids)  # [batch, 4 * units]
        new_h, new_c = [], []
        features = None
        for index, (kernel, bias, recurrent_kernel) in enumerate(layers):
            if index > 0:
                projection = tf.cast(tf.matmul(tf.cast(features, self.compute_dtype), kernel),
                                     tf.float32) + bias  # [batch, 4 * units]
            layer_h = tf.cast(tf.cast(h[:, index], self.compute_dtype), tf.float32)
            layer_c = tf.cast(tf.cast(c[:, index], self.compute_dtype), tf.float32)
            # One timestep: lstm_sequence runs its cell once, without a loop.
            _, features, layer_c = fast_lstm.lstm_sequence(
                projection[None], layer_h, layer_c, recurrent_kernel)  # [batch, units]
            new_h.append(tf.cast(tf.cast(features, self.compute_dtype), tf.float32))
            new_c.append(tf.cast(tf.cast(layer_c, self.compute_dtype), tf.float32))
        logits = tf.matmul(features, logits_kernel) + logits_bias  # [batch, vocab]
        return logits, tf.stack(new_h, axis=1), tf.stack(new_c, axis=1)

    # Only the model maths is compiled. Sampling runs outside XLA in every
    # signature: its Gumbel noise takes logarithms, which XLA and the regular
    # kernels may round differently, and streamed and generated texts must be
    # equal. (The uniforms under it are integer hashes, identical in both.)
    @tf.function(jit_compile=True, autograph=False)
    def _run_cell_xla(self, ids, h, c):
        return self._run_cell(ids, h, c, self._step_weights())

    @tf.function(autograph=False)
    def _run_cell_plain(self, ids, h, c):
        return self._run_cell(ids, h, c, self._step_weights())

    # ----------------------------------------------------------- validation

    def _check_batch(self, batch_size, name: str, tensor):
        return tf.debugging.assert_equal(
            tf.shape(tensor)[0], batch_size,
            message=f"Input `{name}` must have the same batch size (dimension 0) as the other "
                    "inputs of this signature")

    def _check_state(self, batch_size, name: str, state):
        expected = tf.stack([batch_size, self.num_layers, self.units])
        return tf.debugging.assert_equal(
            tf.shape(state), expected,
            message=f"Input `{name}` must have shape [batch, num_layers={self.num_layers}, "
                    f"units={self.units}] with the batch size of the other inputs; use the "
                    "initial_state signature for a zero state")

    def _check_seed(self, batch_size, seed):
        return tf.debugging.assert_equal(
            tf.shape(seed), tf.stack([batch_size, 2]),
            message="Input `seed` must have shape [batch, 2]: one pair of int32 seed words per row")

    def _check_temperature(self, batch_size, temperature):
        return [
            self._check_batch(batch_size, "temperature", temperature),
            # `>=` is false for NaN, so this rejects NaN as well.
            tf.debugging.Assert(
                tf.reduce_all(temperature >= 0.0),
                ["Input `temperature` must be >= 0 (0 means greedy) and not NaN; got",
                 temperature], summarize=16),
        ]

    def _check_ids(self, ids):
        in_range = tf.logical_and(ids >= 0, ids < self.vocab_size)
        return tf.debugging.Assert(
            tf.reduce_all(in_range),
            [f"Input `ids` must be in [0, {self.vocab_size}), the vocabulary ids; got", ids],
            summarize=16)

    def _check_step_inputs(self, ids, h, c, temperature, seed):
        batch_size = tf.shape(ids)[0]
        return [
            self._check_ids(ids),
            self._check_state(batch_size, "h", h),
            self._check_state(batch_size, "c", c),
            *self._check_temperature(batch_size, temperature),
            self._check_seed(batch_size, seed),
        ]

    # ---------------------------------------------------------- text <-> ids

    def _chars_to_ids(self, chars):
        """Maps `chars` string [batch], one character per row, to int32 [batch] ids."""
        lengths = tf.strings.length(chars, unit="UTF8_CHAR")  # [batch]
        one_char = tf.debugging.Assert(
            tf.reduce_all(tf.equal(lengths, 1)),
            ["Input `chars` must hold exactly one character (Unicode code point) per row; "
             "got these lengths in code points:", lengths], summarize=16)
        with tf.control_dependencies([one_char]):
            return self.char_to_id.lookup(tf.identity(chars))

    def _decode(self, ids):
        """Maps int32 ids of any shape to their characters; ids outside the vocabulary give U+FFFD."""
        valid = tf.logical_and(ids >= 0, ids < self.vocab_size)
        return tf.gather(self.id_to_char, tf.where(valid, ids, UNKNOWN_ID))

    def _encode_prompts(self, prompts):
        """Splits prompts into ids.

        Returns:
          (ids int32 [batch, max_length] padded with 0, lengths int32 [batch]
          after the empty-prompt replacement).
        """
        prompts = tf.where(tf.equal(prompts, ""), EMPTY_PROMPT_REPLACEMENT, prompts)
        characters = tf.strings.unicode_split(prompts, "UTF-8", errors="replace")  # ragged [batch, (n)]
        ids = tf.ragged.map_flat_values(self.char_to_id.lookup, characters)
        lengths = tf.cast(ids.row_lengths(), tf.int32)  # [batch]
        return ids.to_tensor(default_value=UNKNOWN_ID), lengths  # [batch, max_length]

    # -------------------------------------------------------------- priming

    def _prime(self, prompts):
        """Runs every prompt but its last character through the model, one step at a time.

        Padded rows stop updating their state after their own length, so a
        row's state equals that of its prompt primed alone.

        Returns:
          (h, c float32 [batch, num_layers, units], last ids int32 [batch],
          lengths int32 [batch] of the prompts as given, 0 for an empty one).
        """
        ids, lengths = self._encode_prompts(prompts)
        batch_size = tf.shape(ids)[0]
        h = tf.zeros(tf.stack([batch_size, self.num_layers, self.units]), tf.float32)
        c = tf.zeros_like(h)
        steps = tf.maximum(tf.shape(ids)[1] - 1, 0)
        state_length = lengths - 1  # characters that go into the state

        weights = self._step_weights()

        def body(t, h, c):
            _, new_h, new_c = self._run_cell(ids[:, t], h, c, weights)
            active = (t < state_length)[:, None, None]  # [batch, 1, 1]
            return t + 1, tf.where(active, new_h, h), tf.where(active, new_c, c)

        _, h, c = tf.while_loop(lambda t, h, c: t < steps, body, (tf.constant(0), h, c))
        last_ids = tf.gather(ids, state_length, batch_dims=1)  # [batch]
        given_lengths = tf.strings.length(prompts, unit="UTF8_CHAR")
        return h, c, last_ids, given_lengths

    # ----------------------------------------------------------- signatures

    def _step_outputs(self, compiled: bool, ids, h, c, temperature, seed):
        checks = self._check_step_inputs(ids, h, c, temperature, seed)
        with tf.control_dependencies(checks):
            ids, h, c = tf.identity(ids), tf.identity(h), tf.identity(c)
        run_cell = self._run_cell_xla if compiled else self._run_cell_plain
        logits, new_h, new_c = run_cell(ids, h, c)
        next_ids = sample_ids(logits, temperature, seed)
        return {"ids": next_ids, "chars": self._decode(next_ids), "h": new_h, "c": new_c,
                "logits": logits}

    @tf.function
    def step(self, ids, h, c, temperature, seed):
        """Samples the next character from `ids`, with the model maths compiled by XLA (`serving_default`)."""
        return self._step_outputs(True, ids, h, c, temperature, seed)

    @tf.function
    def step_no_xla(self, ids, h, c, temperature, seed):
        """Samples the next character like `step`, without XLA."""
        return self._step_outputs(False, ids, h, c, temperature, seed)

    @tf.function
    def step_chars(self, chars, h, c, temperature, seed):
        """Samples the next character from `chars`, with the model maths compiled by XLA."""
        return self._step_outputs(True, self._chars_to_ids(chars), h, c, temperature, seed)

    @tf.function
    def step_chars_no_xla(self, chars, h, c, temperature, seed):
        """Samples the next character like `step_chars`, without XLA."""
        return self._step_outputs(False, self._chars_to_ids(chars), h, c, temperature, seed)

    @tf.function
    def initial_state(self, batch):
        """Returns the zero state for `len(batch)` rows. The values of `batch` are ignored."""
        shape = tf.stack([tf.shape(batch)[0], self.num_layers, self.units])
        zeros = tf.zeros(shape, tf.float32)  # [batch, num_layers, units]
        return {"h": zeros, "c": zeros}

    @tf.function
    def prime(self, prompts):
        """Returns the state after each prompt but its last character, and that character's id."""
        h, c, last_ids, lengths = self._prime(prompts)
        return {"h": h, "c": c, "ids": last_ids, "lengths": lengths}

    @tf.function
    def generate(self, prompts, num_chars, temperature, top_k, seed):
        """Primes with `prompts` and samples `num_chars` characters per row in one call.

        Step t samples with `step_seeds(seed, t)` and feeds the sampled id
        back, exactly as a client streaming through the step signatures does.
        Rows that reach their `num_chars` keep running until the longest row
        is done (their extra samples are dropped), so the cost of a call is
        batch * max(num_chars) steps.
        """
        batch_size = tf.shape(prompts)[0]
        checks = [
            self._check_batch(batch_size, "num_chars", num_chars),
            tf.debugging.Assert(
                tf.reduce_all(tf.logical_and(num_chars >= 0, num_chars <= self.max_generate_chars)),
                [f"Input `num_chars` must be in [0, {self.max_generate_chars}] (the export's "
                 "--max_generate_chars); stream longer texts through the step signatures. Got",
                 num_chars], summarize=16),
            *self._check_temperature(batch_size, temperature),
            self._check_batch(batch_size, "top_k", top_k),
            tf.debugging.Assert(tf.reduce_all(top_k >= 0),
                                ["Input `top_k` must be >= 0 (0 keeps all characters); got", top_k],
                                summarize=16),
            self._check_seed(batch_size, seed),
        ]
        with tf.control_dependencies(checks):
            prompts = tf.identity(prompts)
        h, c, last_ids, _ = self._prime(prompts)
        max_steps = tf.maximum(tf.reduce_max(tf.concat([num_chars, [0]], axis=0)), 0)

        weights = self._step_weights()

        def body(t, last_ids, h, c, sampled):
            logits, h, c = self._run_cell(last_ids, h, c, weights)
            last_ids = sample_ids(logits, temperature, step_seeds(seed, t), top_k)
            return t + 1, last_ids, h, c, sampled.write(t, last_ids)

        sampled = tf.TensorArray(tf.int32, size=max_steps, element_shape=tf.TensorShape([None]))
        _, _, _, _, sampled = tf.while_loop(
            lambda t, *_: t < max_steps, body, (tf.constant(0), last_ids, h, c, sampled))
        # An empty TensorArray cannot be stacked with an unknown batch size.
        ids = tf.cond(max_steps > 0,
                      lambda: tf.transpose(sampled.stack()),
                      lambda: tf.zeros(tf.stack([batch_size, 0]), tf.int32))  # [batch, max_steps]
        in_row = tf.range(max_steps)[None, :] < num_chars[:, None]  # [batch, max_steps]
        ids = tf.where(in_row, ids, GENERATE_PADDING_ID)
        chars = tf.where(in_row, self._decode(ids), "")
        return {"text": tf.strings.reduce_join(chars, axis=1), "ids": ids}

    @tf.function
    def metadata(self, batch):
        """Returns model facts, repeated once per row of `batch` so server-side batching can split them."""
        batch_size = tf.shape(batch)[0]

        def repeat(value, dtype):
            value = tf.constant(value, dtype)
            multiples = tf.concat([[batch_size], tf.ones([tf.rank(value)], tf.int32)], axis=0)
            return tf.tile(value[None], multiples)

        info = self.metadata_values
        return {
            "vocabulary": tf.tile(self.id_to_char[None], tf.stack([batch_size, 1])),  # [batch, vocab]
            "vocab_size": repeat(self.vocab_size, tf.int32),
            "num_layers": repeat(self.num_layers, tf.int32),
            "units": repeat(self.units, tf.int32),
            "training_step": repeat(info.training_step, tf.int64),
            "corpus_name": repeat(info.corpus_name, tf.string),
            "precision": repeat(info.precision, tf.string),
            "unknown_id": repeat(UNKNOWN_ID, tf.int32),
            "unknown_character_policy": repeat(UNKNOWN_CHARACTER_POLICY, tf.string),
            "max_generate_chars": repeat(self.max_generate_chars, tf.int32),
        }

    def signatures(self) -> dict:
        """Traces the signature functions and returns them keyed by signature name."""
        state = tf.TensorSpec([None, self.num_layers, self.units], tf.float32)
        step_specs = dict(h=state, c=state, temperature=tf.TensorSpec([None], tf.float32),
                          seed=tf.TensorSpec([None, 2], tf.int32))
        ids = tf.TensorSpec([None], tf.int32)
        strings = tf.TensorSpec([None], tf.string)
        return {
            "serving_default": self.step.get_concrete_function(ids=ids, **step_specs),
            "step_no_xla": self.step_no_xla.get_concrete_function(ids=ids, **step_specs),
            "step_chars": self.step_chars.get_concrete_function(chars=strings, **step_specs),
            "step_chars_no_xla": self.step_chars_no_xla.get_concrete_function(
                chars=strings, **step_specs),
            "initial_state": self.initial_state.get_concrete_function(batch=ids),
            "prime": self.prime.get_concrete_function(prompts=strings),
            "generate": self.generate.get_concrete_function(
                prompts=strings, num_chars=ids, temperature=tf.TensorSpec([None], tf.float32),
                top_k=ids, seed=tf.TensorSpec([None, 2], tf.int32)),
            "metadata": self.metadata.get_concrete_function(batch=ids),
        }


def _input_projection_table(model: CharLSTM) -> tf.Tensor:
    """Returns the first LSTM layer's `input @ kernel + bias` for every id, float32 [vocab, 4 * units].

    The rows are what `fast_lstm.embedding_projection` computes: the matmul
    runs in the model's compute dtype and the bias is added in float32. For
    one-hot input the kernel itself is the table.
    """
    cell = model.lstm_layers[0].cell
    dtype = model.compute_dtype_name
    bias = tf.cast(cell.bias, tf.float32)
    if model.embedding is None:
        return tf.cast(tf.cast(cell.kernel, dtype), tf.float32) + bias
    table = tf.matmul(tf.cast(model.embedding.embeddings, dtype), tf.cast(cell.kernel, dtype))
    return tf.cast(table, tf.float32) + bias  # [vocab, 4 * units]
