"""`manifest.json`: what a prepared directory holds, and the few questions the trainer asks of it.

The manifest is written last (under a temporary name, then renamed), so a directory with a
manifest is a complete preparation. It holds no timestamps or machine details: the same inputs and
settings give the same bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from bmx.data.packing import SPLITS

MANIFEST = "manifest.json"
FORMAT = "bmx.data/1"


def write_manifest(data_dir: Path, manifest: dict) -> None:
    temp = data_dir / (MANIFEST + ".tmp")
    temp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(temp, data_dir / MANIFEST)


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """The manifest of a prepared directory; a clear error if there is none or it is not bmx's."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m bmx.data prepare ... --out {data_dir}` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest (format {manifest.get('format')!r})")
    return manifest


def _split_entry(manifest: dict, split: str) -> dict:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return manifest["splits"][split]


def count_sequences(data_dir: str | os.PathLike, split: str = "train") -> int:
    """Number of `seq_len` sequences in a split: one epoch of the loader, before batching."""
    return _split_entry(read_manifest(data_dir), split)["sequences"]


def shard_paths(data_dir: str | os.PathLike, split: str) -> list[str]:
    """The split's ArrayRecord shards, in order, each checked against the manifest before any is read.

    A missing shard, one that is not ArrayRecord, or one whose record count or record size differs
    from what the manifest says (a stale shard from another preparation) is an error naming it.
    """
    manifest = read_manifest(data_dir)
    entry = _split_entry(manifest, split)
    paths = [str(Path(data_dir) / name) for name in entry["shards"]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"shards listed in {Path(data_dir) / MANIFEST} are missing: {missing[:3]}")
    fields, seq_len, dtype = record_layout(manifest)
    record_bytes = len(fields) * seq_len * dtype.itemsize
    expected = entry.get("shard_sequences")  # older manifests give only the split's total
    counts = []
    for index, path in enumerate(paths):
        count, first_record_bytes = _shard_contents(path)
        if expected is not None and count != expected[index]:
            raise ValueError(f"{path} holds {count} records, {Path(data_dir) / MANIFEST} says {expected[index]}: "
                             "the shard is not from this preparation; prepare again")
        if count and first_record_bytes != record_bytes:
            raise ValueError(f"{path} holds records of {first_record_bytes} bytes, the manifest's layout "
                             f"({len(fields)} x {seq_len} x {dtype}) needs {record_bytes}; prepare again")
        counts.append(count)
    if sum(counts) != entry["sequences"]:
        raise ValueError(f"the {split} shards in {data_dir} hold {sum(counts)} records, {Path(data_dir) / MANIFEST} "
                         f"says {entry['sequences']}: the shards are not from this preparation; prepare again")
    return paths


def _shard_contents(path: str) -> tuple[int, int]:
    """(record count, bytes of the first record) of an ArrayRecord file, read from its index."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(path)
        try:
            if not reader.ok():
                raise RuntimeError("bad header")
            count = reader.num_records()
            return count, (len(reader.read([0])[0]) if count else 0)
        finally:
            reader.close()
    except RuntimeError as error:  # the C++ reader's way of saying "not ArrayRecord"
        raise ValueError(f"{path} is not a readable ArrayRecord file ({error})") from None


def record_layout(manifest: dict) -> tuple[list[str], int, np.dtype]:
    """(fields, seq_len, dtype) of the records, as `shards.decode_record` needs them."""
    return manifest["record_fields"], manifest["seq_len"], np.dtype(manifest["record_dtype"])
