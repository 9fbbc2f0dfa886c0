"""A CPU implementation of the Keras LSTM layer's maths, with a hand-written gradient.

The model keeps its Keras `LSTM` layers, so the variables, their names and the
checkpoint layout are the same on both paths. The variables are `kernel`
[input, 4 * units], `recurrent_kernel` [units, 4 * units] and `bias`
[4 * units], with gates in the order i, f, c, o, sigmoid gates and tanh
activations. On a GPU Keras runs
these layers with cuDNN. On a CPU, Keras's generic loop costs several small
matmuls per timestep and accumulates the weight gradients one timestep at a
time; `lstm_sequence` does the same maths with less work:

* the input projection of all timesteps is computed before the loop, by the
  caller, as one matmul, or for the first layer as a row gather from
  `embedding_table @ kernel` (an embedding lookup followed by a matmul equals
  a lookup in the projected table);
* each timestep does one recurrent matmul, [batch, units] @ [units, 4 * units],
  plus elementwise ops;
* the weights are cast to the compute dtype once per call, not per timestep;
* the backward loop only carries the state gradients, and the recurrent
  kernel's gradient is one large matmul over all timesteps after that loop:
  h[0:T]^T @ dz[0:T], [units, T * batch] @ [T * batch, 4 * units];
* the elementwise ops of each backward timestep run as one XLA-compiled
  function, so XLA fuses them into one pass. The matmuls stay outside XLA,
  on TensorFlow's oneDNN kernels. The forward pass uses no XLA, so exported
  models and sampling do not depend on it.

Under bfloat16 the matmuls run in bfloat16 (oneDNN uses AVX512-BF16 or AMX
where the CPU has them). The cell state and the gate arithmetic stay float32,
which is at least as accurate as Keras's all-bfloat16 cell.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

IMPLEMENTATIONS = ("auto", "keras", "fused")


def resolve_implementation(name: str) -> str:
    """Turns `auto` into `keras` when TensorFlow lists a GPU (for cuDNN), else `fused`.

    Raises:
      ValueError: for a name outside IMPLEMENTATIONS.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"lstm_implementation={name!r} is not one of {', '.join(IMPLEMENTATIONS)}.")
    if name != "auto":
        return name
    return "keras" if tf.config.list_logical_devices("GPU") else "fused"


def embedding_projection(ids: tf.Tensor, embeddings: tf.Tensor, kernel: tf.Tensor,
                         bias: tf.Tensor) -> tf.Tensor:
    """Returns `embeddings[ids] @ kernel + bias` in float32, [*ids.shape, 4 * units].

    An embedding lookup followed by `@ kernel` equals a lookup in the
    projected table `embeddings @ kernel`, [vocab, 4 * units]. The table costs
    vocab matmul rows and the direct way one row per id, so the table is
    used when there are at least as many ids as vocabulary entries (training
    batches), and the direct way otherwise (sampling steps).

    Args:
      ids: int32 ids of any shape.
      embeddings: [vocab, input] in the matmul dtype. For one-hot input pass
        None: then the kernel itself is the table.
      kernel: [input, 4 * units] in the matmul dtype.
      bias: float32 [4 * units].
    """
    if embeddings is None:
        return tf.gather(tf.cast(kernel, tf.float32) + bias, ids)

    def via_table():
        table = tf.cast(tf.matmul(embeddings, kernel), tf.float32) + bias  # [vocab, 4 * units]
        return tf.gather(table, ids)

    def via_rows():
        rows = tf.gather(embeddings, tf.reshape(ids, [-1]))  # [ids, input]
        projection = tf.cast(tf.matmul(rows, kernel), tf.float32) + bias  # [ids, 4 * units]
        return tf.reshape(projection, tf.concat([tf.shape(ids), tf.shape(bias)], axis=0))

    use_table = tf.size(ids) >= tf.shape(embeddings)[0]
    static_use_table = tf.get_static_value(use_table)
    if static_use_table is not None:
        return via_table() if static_use_table else via_rows()
    return tf.cond(use_table, via_table, via_rows)


def _cell(projection, h, c, recurrent_kernel):
    """Advances the state one timestep.

    Args:
      projection: float32 [batch, 4 * units], x_t @ kernel + bias.
      h, c: float32 [batch, units].
      recurrent_kernel: [units, 4 * units] in the matmul dtype.

    Returns:
      (h, c float32 [batch, units], the activated gates i, f, g, o as float32
      [batch, 4 * units]).
    """
    recurrent = tf.matmul(tf.cast(h, recurrent_kernel.dtype), recurrent_kernel)  # [batch, 4 * units]
    z = projection + tf.cast(recurrent, tf.float32)
    z_i, z_f, z_g, z_o = tf.split(z, 4, axis=1)
    i = tf.sigmoid(z_i)
    f = tf.sigmoid(z_f)
    g = tf.tanh(z_g)
    o = tf.sigmoid(z_o)
    c = f * c + i * g
    h = o * tf.tanh(c)
    return h, c, tf.concat([i, f, g, o], axis=1)


def _forward(inputs_projection, h0, c0, recurrent_kernel):
    """Runs the recurrence and returns what the backward pass needs.

    Args:
      inputs_projection: float32 [time, batch, 4 * units], x_t @ kernel + bias.
      h0, c0: float32 [batch, units].
      recurrent_kernel: [units, 4 * units] in the matmul dtype.

    Returns:
      hs float32 [time + 1, batch, units] (h_0 .. h_T), cs float32
      [time + 1, batch, units] and gates float32 [time, batch, 4 * units],
      the activated i, f, g, o.
    """
    num_steps = tf.shape(inputs_projection)[0]
    # The batch size of the state and of the projection may be known in one
    # and unknown in the other, so the loop leaves it unknown.
    state_shape = tf.TensorShape([None, h0.shape[1]])
    hs = tf.TensorArray(tf.float32, size=num_steps + 1, element_shape=state_shape).write(0, h0)
    cs = tf.TensorArray(tf.float32, size=num_steps + 1, element_shape=state_shape).write(0, c0)
    gates_array = tf.TensorArray(tf.float32, size=num_steps)

    def body(t, h, c, hs, cs, gates_array):
        h, c, gates = _cell(inputs_projection[t], h, c, recurrent_kernel)
        return (t + 1, h, c, hs.write(t + 1, h), cs.write(t + 1, c), gates_array.write(t, gates))

    _, _, _, hs, cs, gates_array = tf.while_loop(
        lambda t, *_: t < num_steps, body,
        (tf.constant(0), h0, c0, hs, cs, gates_array),
        shape_invariants=(tf.TensorShape([]), state_shape, state_shape, None, None, None),
        maximum_iterations=num_steps)
    return hs.stack(), cs.stack(), gates_array.stack()


@tf.function(jit_compile=True)
def _backward_cell(d_output, dh_next, dc_next, gates, c, c_prev, matmul_dtype):
    """Computes one backward timestep's elementwise part.

    Returns dz float32 [batch, 4 * units], dz in `matmul_dtype` for the
    dh_prev matmul, and dc_{t-1} float32 [batch, units]. XLA fuses its 25 or so
    ops into one pass, which made the float32 training step about 10%
    faster and the bfloat16 one about 15% (scripts/benchmark.py --mode=train,
    units 1024, batch 64, on a 2-core Zen 4 CPU with TF 2.21).
    """
    i, f, g, o = tf.split(gates, 4, axis=1)
    tanh_c = tf.tanh(c)
    dh = d_output + dh_next
    # The chain rule through h = o * tanh(c) and c = f * c_prev + i * g,
    # with sigmoid' = s (1 - s) and tanh' = 1 - tanh^2.
    dc = dc_next + dh * o * (1.0 - tanh_c * tanh_c)
    dz_i = dc * g * i * (1.0 - i)
    dz_f = dc * c_prev * f * (1.0 - f)
    dz_g = dc * i * (1.0 - g * g)
    dz_o = dh * tanh_c * o * (1.0 - o)
    dz = tf.concat([dz_i, dz_f, dz_g, dz_o], axis=1)  # [batch, 4 * units]
    if matmul_dtype == tf.float32:
        return dz, dz, dc * f
    return dz, tf.cast(dz, matmul_dtype), dc * f


def _backward(d_outputs, d_h_last, d_c_last, hs, cs, gates, recurrent_kernel):
    """Back-propagates through the recurrence.

    Returns:
      dz float32 [time, batch, 4 * units] (the gradient of the gate
      pre-activations, which is also the gradient of `inputs_projection`),
      dh0 and dc0 [batch, units] float32.
    """
    num_steps = tf.shape(gates)[0]
    matmul_dtype = recurrent_kernel.dtype
    state_shape = tf.TensorShape([None, d_h_last.shape[1]])
    dz_array = tf.TensorArray(tf.float32, size=num_steps)

    def body(t, dh_next, dc_next, dz_array):
        dz, dz_in_matmul_dtype, dc_prev = _backward_cell(
            d_outputs[t], dh_next, dc_next, gates[t], cs[t + 1], cs[t], matmul_dtype)
        # dh_prev = dz @ recurrent_kernel^T, [batch, 4 * units] @ [4 * units, units].
        # NOTE: tf.einsum, not tf.matmul(transpose_b=True): with TF 2.21 on a
        # 2-core Zen 4 CPU, float32 MatMul of this shape ran at ~65 GFLOP/s
        # (also with the kernel transposed once before the loop) and Einsum
        # at ~165 (scripts/benchmark.py --mode=train, units 1024, batch 64).
        # Both ran at the same speed in bfloat16.
        dh_prev = tf.einsum("bj,ij->bi", dz_in_matmul_dtype, recurrent_kernel)
        return t - 1, tf.cast(dh_prev, tf.float32), dc_prev, dz_array.write(t, dz)

    _, dh0, dc0, dz_array = tf.while_loop(
        lambda t, *_: t >= 0, body,
        (num_steps - 1, d_h_last, d_c_last, dz_array),
        shape_invariants=(tf.TensorShape([]), state_shape, state_shape, None),
        maximum_iterations=num_steps)
    return dz_array.stack(), dh0, dc0


def lstm_sequence(inputs_projection: tf.Tensor, h0: tf.Tensor, c0: tf.Tensor,
                  recurrent_kernel: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Runs an LSTM over time-major input projections.

    Args:
      inputs_projection: float32 [time, batch, 4 * units], x_t @ kernel + bias
        for every timestep.
      h0, c0: float32 [batch, units], the initial state.
      recurrent_kernel: [units, 4 * units]; its dtype is the matmul dtype
        (float32 or bfloat16).

    Returns:
      (outputs float32 [time, batch, units], h_T, c_T float32 [batch, units]).
      Gradients flow to all four arguments.
    """
    if inputs_projection.shape[0] == 1:
        # One timestep (a sampling step): no loop, and TensorFlow's own
        # gradients suffice.
        h, c, _ = _cell(inputs_projection[0], h0, c0, recurrent_kernel)
        return h[None], h, c


    @tf.custom_gradient
    def run(inputs_projection, h0, c0, recurrent_kernel):
        hs, cs, gates = _forward(inputs_projection, h0, c0, recurrent_kernel)

        def grad(d_outputs, d_h_last, d_c_last):
            d_outputs = _zeros_if_none(d_outputs, hs[1:])
            d_h_last = _zeros_if_none(d_h_last, h0)
            d_c_last = _zeros_if_none(d_c_last, c0)
            dz, dh0, dc0 = _backward(d_outputs, d_h_last, d_c_last, hs, cs, gates,
                                     recurrent_kernel)
            # All timesteps' recurrent-kernel gradients as one matmul:
            # [units, time * batch] @ [time * batch, 4 * units].
            units = tf.shape(h0)[1]
            previous_h = tf.reshape(hs[:-1], [-1, units])
            flat_dz = tf.reshape(dz, [-1, 4 * units])
            matmul_dtype = recurrent_kernel.dtype
            d_recurrent = tf.matmul(tf.cast(previous_h, matmul_dtype),
                                    tf.cast(flat_dz, matmul_dtype), transpose_a=True)
            return dz, dh0, dc0, tf.cast(d_recurrent, recurrent_kernel.dtype)

        return (hs[1:], hs[-1], cs[-1]), grad

    return run(inputs_projection, h0, c0, recurrent_kernel)


def _zeros_if_none(gradient: Optional[tf.Tensor], like: tf.Tensor) -> tf.Tensor:
    return tf.zeros_like(like) if gradient is None else tf.convert_to_tensor(gradient, tf.float32)
