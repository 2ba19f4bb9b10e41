"""Turn token sequences of any length into few, fixed-shape, padded batches.

Sequences are sorted longest first (an out-of-memory shows on the first batch, not the last) and
padded on the right to one of a few bucket lengths, each bucket with a fixed number of rows, so a
jitted model compiles once per bucket however many questions there are. Rows are a multiple of
the device count so every batch splits evenly over data-parallel devices.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

SMALLEST_BUCKET = 16


def bucket_lengths(max_length: int) -> list[int]:
    """16, 24, 32, 48, 64, 96, ... (steps of x1.5 and x4/3: at most a third of a row is padding),
    ending with `max_length`."""
    lengths, size = [], SMALLEST_BUCKET
    while size < max_length:
        lengths += [size, size * 3 // 2]
        size *= 2
    return sorted({length for length in lengths if length < max_length} | {max_length})


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if length <= bucket:
            return bucket
    raise ValueError(f"sequence of {length} tokens is longer than the largest bucket {buckets[-1]}")


@dataclass(frozen=True)
class Batch:
    indices: np.ndarray  # [real_rows] positions in the caller's list of sequences
    seq_len: int
    rows: int  # real rows + filler rows


def plan_batches(lengths: Sequence[int], max_length: int, tokens_per_batch: int,
                 row_multiple: int = 1) -> list[Batch]:
    """Group sequences of `lengths` into batches of at most `tokens_per_batch` padded tokens."""
    buckets = bucket_lengths(max_length)
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[Batch] = []
    start = 0
    while start < len(order):
        seq_len = bucket_for(int(lengths[order[start]]), buckets)
        rows = max(row_multiple, (tokens_per_batch // seq_len) // row_multiple * row_multiple)
        members = [order[start]]
        for index in order[start + 1:start + rows]:
            if bucket_for(int(lengths[index]), buckets) != seq_len:
                break
            members.append(index)
        pieces = tail_pieces(len(members), rows, row_multiple) if len(members) < rows else [(rows, rows)]
        taken = 0
        for count, piece_rows in pieces:  # a bucket's last batch may be split in two
            batches.append(Batch(np.asarray(members[taken:taken + count]), seq_len, piece_rows))
            taken += count
        start += len(members)
    return batches


def _rows_for(count: int, rows: int, row_multiple: int) -> int:
    """`count` rounded up to a power of two, then to a multiple of `row_multiple`, at most `rows`."""
    return min(rows, -(-(1 << (count - 1).bit_length()) // row_multiple) * row_multiple)


def tail_pieces(count: int, rows: int, row_multiple: int) -> list[tuple[int, int]]:
    """How a bucket's last `count` sequences are batched: `[(sequences, rows), ...]`.

    One batch rounded up to a power of two of rows wastes up to half of them on filler rows (3
    questions: a fourth row computed for nothing, a third more work). Split as the largest power of
    two plus the rest rounded up when that computes fewer rows: at most two more shapes per bucket
    (compilations), and each power of two is reused by every later bucket of that length.
    """
    whole = _rows_for(count, rows, row_multiple)
    first = 1 << (count.bit_length() - 1)
    if first == count or first < row_multiple:
        return [(count, whole)]
    first_rows, rest_rows = _rows_for(first, rows, row_multiple), _rows_for(count - first, rows, row_multiple)
    if first_rows + rest_rows >= whole:
        return [(count, whole)]
    return [(first, first_rows), (count - first, rest_rows)]


def pad_batch(sequences: Sequence[Sequence[int]], batch: Batch, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`(input_ids, attention_mask)`, both `[rows, seq_len]` int32, right-padded.

    Filler rows hold one real token so no row is entirely masked (a softmax over no keys is NaN).
    """
    input_ids = np.full((batch.rows, batch.seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((batch.rows, batch.seq_len), dtype=np.int32)
    mask[:, 0] = 1
    for row, index in enumerate(batch.indices):
        tokens = sequences[index]
        input_ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return input_ids, mask
