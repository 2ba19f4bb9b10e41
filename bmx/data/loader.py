"""Grain loader over prepared shards: shuffled, repeated, per-process slices of global batches.

The global stream is every sequence of the split in a seeded permutation, a new permutation per
epoch (grain's `shuffle` reseeds with `seed + epoch`), epochs back to back. Global batch `k` is
stream elements `[k * B, (k + 1) * B)`; process `p` of `P` reads only rows `[p * b, (p + 1) * b)` of
it, `b = B // P`. A final global batch that the last epoch cannot fill is dropped.

Every process therefore takes exactly one local batch per global step, and grain's iterator state
is `{"next_index": steps_taken}` on every process: JSON, equal on all processes, and valid for
any process count that divides the global batch. Save it with the trainer's orbax checkpoint
(`grain.checkpoint.CheckpointSave(iterator)` / `CheckpointRestore`, or `get_state()` in any JSON
field) and `set_state` it after a restore: the next batch is the one an uninterrupted run would
have produced.

Each batch is a dict of numpy arrays for this process's rows:
- `inputs`, `targets` int32 [b, seq_len]: `targets[:, i] = inputs[:, i + 1]`, last position 0.
- `loss_mask` float32 [b, seq_len]: 1 where the target is a real next token, so 0 at the last
  position (the paper's `run_clm` recipe: labels are the inputs shifted inside the model, every
  other token is trained). With segment ids the mask is also 0 where the next token belongs to
  another document, as Levanter does (`LmExample.causal` drops positions whose next token is in
  another segment): with attention masked per document that token is unpredictable from the
  context, here always the next document's `<s>`.
- with segment ids: `segment_ids` int32 [b, seq_len] (1, 2, ... per document within a sequence)
  and `positions` int32 [b, seq_len] (position within the document's piece, restarting at 0),
  for attention masking and RoPE. This is the numbering of grain's own concat-then-split packing
  (`*_segment_ids` from 1, `*_positions` restarting at 0 for a document continued from the
  previous sequence); 0 is left free to mean padding.
- with a `trainable` field (`bmx.data prepare-sft`): `loss_mask` is also 0 where the next token is
  not trainable, so only answers (or whatever the preparation marked) are learned.
"""

from __future__ import annotations

import os

import grain
import numpy as np

from bmx.data.manifest import count_sequences, read_manifest, record_layout, shard_paths
from bmx.data.shards import SEGMENT_IDS, TRAINABLE, decode_record

__all__ = ["make_loader", "count_sequences", "read_manifest", "batch_features"]


def positions_in_segment(segment_ids: np.ndarray) -> np.ndarray:
    """[b, L] index of each token within its segment, from [b, L] segment ids (0 on padding, segment 0)."""
    batch, length = segment_ids.shape
    index = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    starts = np.ones((batch, length), dtype=bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return np.where(segment_ids != 0, index - segment_start, 0).astype(np.int32)


def batch_features(records: np.ndarray, fields: list[str]) -> dict[str, np.ndarray]:
    """Model inputs from decoded records [b, num_fields, seq_len] (see the module docstring)."""
    tokens = records[:, 0].astype(np.int32)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    loss_mask = np.ones(tokens.shape, dtype=np.float32)
    loss_mask[:, -1] = 0.0
    features = {"inputs": tokens, "targets": targets, "loss_mask": loss_mask}
    if SEGMENT_IDS in fields:
        segment_ids = records[:, fields.index(SEGMENT_IDS)].astype(np.int32)
        loss_mask[:, :-1] *= segment_ids[:, 1:] == segment_ids[:, :-1]
        features["segment_ids"] = segment_ids
        features["positions"] = positions_in_segment(segment_ids)
    if TRAINABLE in fields:  # fine-tuning data: only the marked next tokens (e.g. answers) count
        loss_mask[:, :-1] *= records[:, fields.index(TRAINABLE), 1:] != 0
    return features


def _process_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def make_loader(
    data_dir: str | os.PathLike,
    *,
    split: str = "train",
    global_batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    read_threads: int = 4,
    prefetch_batches: int = 4,
) -> grain.DatasetIterator:
    """Iterator over this process's slices of global batches (see the module docstring).

    `num_epochs=None` repeats forever; `process_index`/`process_count` default to JAX's.
    The result is a grain `DatasetIterator` with JSON-serialisable `get_state()`/`set_state()`.
    """
    process_index, process_count = _process_slice(process_index, process_count)
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                         f"the process count {process_count}")
    manifest = read_manifest(data_dir)
    fields, seq_len, dtype = record_layout(manifest)
    num_sequences = count_sequences(data_dir, split)
    if num_sequences == 0:
        raise ValueError(f"split {split!r} of {data_dir} holds no sequences (too few tokens for seq_len {seq_len})")
    local_batch = global_batch_size // process_count

    dataset = (
        grain.MapDataset.source(grain.sources.ArrayRecordDataSource(shard_paths(data_dir, split)))
        .shuffle(seed=seed)
        .repeat(num_epochs)
        .map(lambda record: decode_record(record, len(fields), seq_len, dtype))
        # Blocks of `local_batch` consecutive stream elements; global batch k is blocks
        # k*P .. k*P+P-1, and this process takes block k*P + process_index.
        .batch(local_batch, drop_remainder=True)
    )
    if num_epochs is not None:
        global_batches = num_sequences * num_epochs // global_batch_size
        dataset = dataset[: global_batches * process_count]
    dataset = dataset[process_index::process_count].map(lambda records: batch_features(records, fields))
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_batches)
    return iter(dataset.to_iter_dataset(options))
