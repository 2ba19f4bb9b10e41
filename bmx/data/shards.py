"""ArrayRecord shards of packed sequences: the record layout, and writing a shard atomically.

Each record is one sequence: a [num_fields, seq_len] array of `dtype` in row-major little-endian
bytes, the fields being `tokens` and, when asked for, `segment_ids` (and, for fine-tuning data,
`trainable`: 1 on the tokens worth predicting, e.g. answers). ArrayRecord is written with
`group_size:1` so that grain can read any record without decompressing its neighbours (random access
is what a global shuffle needs). A shard is written as `<name>.tmp` and renamed when complete, so a
shard with its final name is always whole.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from collections.abc import Iterable

import numpy as np

ARRAY_RECORD_OPTIONS = "group_size:1"
SHARD_SUFFIX = ".array_record"
TOKENS, SEGMENT_IDS, TRAINABLE = "tokens", "segment_ids", "trainable"


def record_dtype(vocab_size: int, seq_len: int) -> np.dtype:
    """uint16 when both token ids and segment ids fit (Mistral: 32000 ids), else int32."""
    return np.dtype("<u2") if max(vocab_size, seq_len + 1) <= 1 << 16 else np.dtype("<i4")


def encode_record(fields: np.ndarray, dtype: np.dtype) -> bytes:
    """Bytes of one record from its [num_fields, seq_len] array."""
    return np.ascontiguousarray(fields, dtype=dtype).tobytes()


def decode_record(record: bytes, num_fields: int, seq_len: int, dtype: np.dtype) -> np.ndarray:
    """[num_fields, seq_len] int32 array of one record."""
    values = np.frombuffer(record, dtype=dtype)
    if values.size != num_fields * seq_len:
        raise ValueError(
            f"record of {len(record)} bytes does not hold {num_fields} x {seq_len} values of {dtype}: "
            "is the manifest from another preparation?"
        )
    return values.reshape(num_fields, seq_len).astype(np.int32)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def write_shard(path: Path, records: Iterable[bytes]) -> int:
    """Write `records` to the ArrayRecord file `path` via a temporary name; returns the record count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    temp_path = path.with_name(path.name + ".tmp")
    count = 0
    try:
        writer = ArrayRecordWriter(str(temp_path), ARRAY_RECORD_OPTIONS)
        try:
            for record in records:
                writer.write(record)
                count += 1
        finally:
            writer.close()
    except RuntimeError as error:  # the C++ writer reports I/O failures (a full disk) as RuntimeError
        temp_path.unlink(missing_ok=True)
        full = "No space left" in str(error)
        raise OSError(errno.ENOSPC if full else errno.EIO, f"writing shard {path} failed: {error}") from None
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    os.replace(temp_path, path)
    return count


def remove_temporary_shards(directory: Path) -> None:
    """Delete shards an interrupted run left half-written."""
    for path in directory.glob(f"*{SHARD_SUFFIX}.tmp"):
        path.unlink()
