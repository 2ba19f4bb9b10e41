"""Calibration: real token sequences run through the float model one decoder layer at a time.

`layer_by_layer` walks the stacked layers like AutoAWQ does: the calibration hidden states enter
layer 0, each layer's linear inputs are recorded, and the float layer's output becomes the next
layer's input. Sequences go through in chunks, so memory holds one chunk's activations per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bmx.model.attention import AttentionMasking, rotary_cos_sin
from bmx.model.mistral import Mistral
from bmx.quant.model import LINEAR_PATHS, parent_and_name

# Linears that read the same activations as another: recorded once.
SAME_INPUT_AS = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                 "mlp.up_proj": "mlp.gate_proj"}
RECORDED_PATHS = tuple(path for path in LINEAR_PATHS if path not in SAME_INPUT_AS)

DEFAULT_SEQUENCES = 128  # AutoAWQ's calibration size: 128 sequences of 512 tokens
DEFAULT_SEQ_LEN = 512


def calibration_tokens(data_dir: str | os.PathLike, num_sequences: int = DEFAULT_SEQUENCES,
                       seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0) -> np.ndarray:
    """`[num_sequences, seq_len]` int32 tokens from the train split of a `python -m bmx.data prepare` dataset."""
    from bmx.data.loader import make_loader

    batch = next(make_loader(data_dir, split="train", global_batch_size=num_sequences, seed=seed,
                             process_index=0, process_count=1))
    inputs = batch["inputs"]
    if inputs.shape[1] < seq_len:
        raise ValueError(f"{data_dir}: sequences hold {inputs.shape[1]} tokens, calibration wants {seq_len} "
                         f"(prepare the data with --seq-len {seq_len} or more, or lower the calibration length)")
    return inputs[:, :seq_len]


class _InputRecorder(nnx.Module):
    """Wraps a linear inside a traced layer and keeps what it was called with."""

    def __init__(self, linear, path: str, seen: dict):
        self.linear = linear
        self.path = path
        self.seen = seen

    def __call__(self, x, out_dtype=None):
        self.seen[self.path] = x.reshape(*x.shape[:2], -1)  # [batch, seq, in features]
        return self.linear(x, out_dtype)


def layer_masking(model: Mistral) -> AttentionMasking:
    """Calibration sequences are unpadded and uncut: only causality and the sliding window apply."""
    return AttentionMasking(None, None, model.config.sliding_window)


def rotary_tables(model: Mistral, batch: int, seq_len: int):
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
    return rotary_cos_sin(positions, model.config.head_dim, model.config.rope_theta)


@partial(jax.jit, static_argnames=("graph", "masking"))
def _run_layer_recording(graph, state, hidden, cos, sin, masking):
    layer = nnx.merge(graph, state)
    seen: dict = {}
    for path in RECORDED_PATHS:
        parent, name = parent_and_name(layer, path)
        setattr(parent, name, _InputRecorder(getattr(parent, name), path, seen))
    return layer(hidden, cos, sin, masking), seen


@dataclass
class LayerCalibration:
    """One decoder layer, alone (`graph` + `state`, unstacked), and its calibration inputs."""

    index: int
    graph: nnx.GraphDef
    state: nnx.State
    inputs: dict[str, jax.Array]  # linear path -> [sequences, seq, in features] (concatenated chunks)

    def input_of(self, path: str) -> jax.Array:
        return self.inputs[SAME_INPUT_AS.get(path, path)]


def layer_by_layer(model: Mistral, tokens: np.ndarray, chunk: int = 8,
                   reduce=None) -> Iterator[LayerCalibration]:
    """Yield each layer with the inputs its linears saw on `tokens` (float model throughout).

    Inputs are recorded once per distinct activation (`RECORDED_PATHS`); use `input_of(path)`.

    `reduce(path, x)` maps each chunk's inputs before they are kept (e.g. to a per-feature maximum,
    so int8's outlier search holds no activations); kept chunks are concatenated, or combined with
    `jnp.maximum` when reduced.
    """
    tokens = np.asarray(tokens)
    hidden = [model.model.embed_tokens(jnp.asarray(tokens[i:i + chunk])) for i in range(0, len(tokens), chunk)]
    masking = layer_masking(model)
    layer_graph, stacked = nnx.split(model.model.layers)
    for index in range(model.config.num_hidden_layers):
        state = jax.tree.map(lambda array, index=index: array[index], stacked)
        recorded: dict[str, list] = {path: [] for path in RECORDED_PATHS}
        for position, chunk_hidden in enumerate(hidden):
            cos, sin = rotary_tables(model, *chunk_hidden.shape[:2])
            hidden[position], seen = _run_layer_recording(layer_graph, state, chunk_hidden, cos, sin, masking)
            for path, x in seen.items():
                recorded[path].append(x if reduce is None else reduce(path, x))
        if reduce is None:
            inputs = {path: jnp.concatenate(chunks) for path, chunks in recorded.items()}
        else:
            inputs = {path: jax.tree.reduce(jnp.maximum, chunks) for path, chunks in recorded.items()}
        yield LayerCalibration(index, layer_graph, state, inputs)
