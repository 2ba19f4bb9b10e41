"""`prepare`: inputs → clean text → licence filter → Mistral tokens → packed ArrayRecord shards + manifest.

Two stages, both spread over worker processes and both resumable:

1. *Tokenize.* The sources are grouped into work units (~1 MiB of files, or one archive/dataset
   slice each). A worker reads a unit's documents, drops those the licence filter excludes, assigns
   each to train or validation by a hash of its text, tokenizes it as `<s> ... </s>` and publishes
   the unit's token streams as a part directory (see `parts.py`).
2. *Pack.* Per split, the parts are concatenated in unit order into one stream that is cut into
   `seq_len` sequences; shard `k` holds sequences `[k * R, (k + 1) * R)`, so each shard is written
   independently from the parts it overlaps.

Output depends only on the inputs and settings, never on the worker count or on interruptions:
units are numbered by input order and shards by stream position. A re-run with the same settings
skips finished parts and shards; `.prepare/settings.json` holds the settings so that a directory is
never resumed with different ones.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import concurrent.futures.process
import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from bmx.data import packing, parts, shards
from bmx.data.licenses import LICENSE_FILTERS, is_allowed
from bmx.data.manifest import FORMAT, MANIFEST, read_manifest, write_manifest
from bmx.data.sources import DEFAULT_MAX_DOCUMENT_BYTES, HF, TAR, Skipped, Source, discover_sources, read_source
from bmx.tokenizer import MISTRAL_V01, Tokenizer, load_tokenizer

UNIT_BYTES = 1 << 20
SHARD_TOKENS = 1 << 25  # ~64 MiB of uint16 tokens per shard
_STATE_DIR = ".prepare"


@dataclass(frozen=True)
class PrepareSettings:
    """Everything besides the inputs that decides what `prepare` writes."""

    seq_len: int = 2048
    tokenizer: str = MISTRAL_V01
    licenses: str = "commercial"
    val_fraction: float = 0.005
    segment_ids: bool = False
    sequences_per_shard: int | None = None  # None: about SHARD_TOKENS tokens per shard
    text_field: str = "text"
    max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES  # larger documents (decompressed) are skipped

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (a token and its target), got {self.seq_len}")
        if self.licenses not in LICENSE_FILTERS:
            raise ValueError(f"licenses must be one of {LICENSE_FILTERS}, got {self.licenses!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_document_bytes < 1:
            raise ValueError(f"max_document_bytes must be positive, got {self.max_document_bytes}")
        if self.sequences_per_shard is not None and self.sequences_per_shard < 1:
            raise ValueError(f"sequences_per_shard must be positive, got {self.sequences_per_shard}")

    @property
    def records_per_shard(self) -> int:
        return self.sequences_per_shard or max(1, SHARD_TOKENS // self.seq_len)


@dataclass(frozen=True)
class _TokenizerInfo:
    spec: str
    sha256: str
    vocab_size: int
    bos_id: int
    eos_id: int


# ---------------------------------------------------------------- stage 1: tokenize one unit

_worker_tokenizers: dict[str, Tokenizer] = {}


def _tokenizer(spec: str) -> Tokenizer:
    """One tokenizer per process, loaded on first use (workers are spawned, not forked)."""
    if spec not in _worker_tokenizers:
        _worker_tokenizers[spec] = load_tokenizer(spec)
    return _worker_tokenizers[spec]


def tokenize_unit(unit_index: int, sources: Sequence[Source], settings: PrepareSettings, parts_root: Path) -> int:
    """Read, filter, split and tokenize the documents of one unit into its part; returns input bytes."""
    tokenizer = _tokenizer(settings.tokenizer)
    dtype = shards.record_dtype(tokenizer.vocab_size, settings.seq_len)
    writer = parts.PartWriter(parts.part_dir(parts_root, unit_index), dtype)
    license_counts: dict[str, dict[str, int]] = {}
    skipped, inputs = [], []
    try:
        for source in sources:
            hasher = hashlib.sha256()
            for item in read_source(source, hasher, text_field=settings.text_field,
                                    max_document_bytes=settings.max_document_bytes):
                if isinstance(item, Skipped):
                    skipped.append(asdict(item))
                    continue
                if not item.text:
                    skipped.append({"path": item.origin, "reason": "empty document (no text)"})
                    continue
                kept = is_allowed(item.license, settings.licenses)
                counts = license_counts.setdefault(item.license, {"kept": 0, "excluded": 0})
                counts["kept" if kept else "excluded"] += 1
                if kept:
                    ids = tokenizer.encode(item.text)
                    split = packing.split_of(item.text, settings.val_fraction)
                    writer.add(split, packing.document_tokens(ids, tokenizer.bos_id, tokenizer.eos_id, dtype))
            inputs.append({"path": source.path, "format": source.format, "bytes": source.size,
                           "sha256": hasher.hexdigest()})
        writer.finish({"license_counts": license_counts, "skipped": skipped, "inputs": inputs})
    except BaseException:
        writer.abandon()
        raise
    return sum(source.size for source in sources)


def group_units(sources: Sequence[Source], unit_bytes: int) -> list[list[Source]]:
    """Consecutive sources grouped into work units of about `unit_bytes`; archives and datasets alone."""
    units: list[list[Source]] = []
    current: list[Source] = []
    current_bytes = 0
    for source in sources:
        if source.format in (TAR, HF):
            if current:
                units.append(current)
                current, current_bytes = [], 0
            units.append([source])
            continue
        current.append(source)
        current_bytes += source.size
        if current_bytes >= unit_bytes:
            units.append(current)
            current, current_bytes = [], 0
    if current:
        units.append(current)
    return units


# ---------------------------------------------------------------- stage 2: pack one shard


@dataclass(frozen=True)
class _PartSpan:
    directory: Path
    start: int  # position of the part's first token in the split's stream
    num_tokens: int


@dataclass(frozen=True)
class ShardTask:
    path: Path
    split: str
    first_sequence: int
    num_sequences: int
    seq_len: int
    segment_ids: bool
    dtype: str
    spans: tuple[_PartSpan, ...]


def _stream_slice(task: ShardTask) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [n] and document-start flags [n] of the shard's part of the split's stream."""
    begin = task.first_sequence * task.seq_len
    end = begin + task.num_sequences * task.seq_len
    token_pieces, start_flags = [], np.zeros(end - begin, dtype=bool)
    for span in task.spans:
        lo, hi = max(begin, span.start), min(end, span.start + span.num_tokens)
        if lo >= hi:
            continue
        stream = parts.tokens(span.directory, task.split, np.dtype(task.dtype))
        token_pieces.append(np.asarray(stream[lo - span.start: hi - span.start]))
        if task.segment_ids:
            lengths = parts.document_lengths(span.directory, task.split)
            starts = span.start + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            inside = starts[(starts >= begin) & (starts < end)]
            start_flags[inside - begin] = True
    return np.concatenate(token_pieces), start_flags


def write_shard_task(task: ShardTask) -> int:
    tokens, document_starts = _stream_slice(task)
    sequences = packing.cut(tokens, task.seq_len)  # [num_sequences, seq_len]
    fields = [sequences]
    if task.segment_ids:
        fields.append(packing.segment_ids(document_starts, task.seq_len))
    stacked = np.stack(fields, axis=1)  # [num_sequences, num_fields, seq_len]
    dtype = np.dtype(task.dtype)
    shards.write_shard(task.path, (shards.encode_record(row, dtype) for row in stacked))
    return task.num_sequences


def _shard_tasks(out_dir: Path, split: str, summaries: list[tuple[Path, dict]], settings: PrepareSettings,
                 dtype: np.dtype) -> tuple[list[ShardTask], dict]:
    spans, position = [], 0
    for directory, summary in summaries:
        count = summary["tokens"][split]
        if count:
            spans.append(_PartSpan(directory, position, count))
        position += count
    total_sequences = packing.num_sequences(position, settings.seq_len)
    per_shard = settings.records_per_shard
    num_shards = -(-total_sequences // per_shard)
    span_starts, span_ends = [s.start for s in spans], [s.start + s.num_tokens for s in spans]
    tasks = []
    for index in range(num_shards):
        first = index * per_shard
        count = min(per_shard, total_sequences - first)
        lo, hi = first * settings.seq_len, (first + count) * settings.seq_len
        # spans are in stream order: binary search instead of scanning every part for every shard
        begin = bisect.bisect_right(span_ends, lo)
        end = bisect.bisect_left(span_starts, hi, lo=begin)
        needed = tuple(spans[begin:end])
        tasks.append(ShardTask(out_dir / shards.shard_name(split, index, num_shards), split, first, count,
                               settings.seq_len, settings.segment_ids, dtype.str, needed))
    split_summary = {
        "documents": sum(s["documents"][split] for _, s in summaries),
        "tokens": position,
        "sequences": total_sequences,
        "dropped_tokens": position - total_sequences * settings.seq_len,
        "shards": [task.path.name for task in tasks],
        "shard_sequences": [task.num_sequences for task in tasks],  # checked by the loader before reading
    }
    return tasks, split_summary


# ---------------------------------------------------------------- orchestration


class WorkerDied(RuntimeError):
    """A worker process was killed (SIGKILL, the out-of-memory killer) mid-unit; a re-run resumes."""


def _run(function: Callable, jobs: list[tuple], pool: concurrent.futures.Executor | None, progress: tqdm,
         weights: list[int]) -> None:
    """Run `function(*job)` for every job, in this process or on `pool`, advancing `progress` by weight."""
    if pool is None or len(jobs) <= 1:
        for job, weight in zip(jobs, weights):
            function(*job)
            progress.update(weight)
        return
    futures = {pool.submit(function, *job): weight for job, weight in zip(jobs, weights)}
    try:
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except concurrent.futures.process.BrokenProcessPool:
                raise WorkerDied(f"a worker process died (killed, or out of memory?) during {function.__name__}; "
                                 "finished units are kept: re-run the same command to resume") from None
            progress.update(futures[future])
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def _worker_pool(workers: int) -> concurrent.futures.Executor | None:
    if workers <= 1:
        return None
    context = multiprocessing.get_context("spawn")  # forking a process that may hold JAX threads is unsafe
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)


def _fingerprint(sources: Sequence[Source], settings: PrepareSettings, tokenizer: _TokenizerInfo) -> dict:
    return {
        "format": FORMAT,
        "settings": asdict(settings),
        "tokenizer_sha256": tokenizer.sha256,
        "unit_bytes": UNIT_BYTES,  # part numbering depends on it
        "sources": [
            [s.path, s.format, s.size, s.rows, os.stat(s.path).st_mtime_ns if os.path.isfile(s.path) else None]
            for s in sources
        ],
    }


def _claim_directory(out_dir: Path, fingerprint: dict) -> bool:
    """Record the settings in `out_dir`; True when a finished preparation with them is already there."""
    state = out_dir / _STATE_DIR / "settings.json"
    if state.is_file():
        if json.loads(state.read_text()) != fingerprint:
            raise ValueError(
                f"{out_dir} holds a preparation with other inputs or settings (see {state}); "
                "use another --out or delete it"
            )
        return (out_dir / MANIFEST).is_file()
    if (out_dir / MANIFEST).is_file():
        raise ValueError(f"{out_dir} already holds a preparation that was not made by this bmx version")
    others = sorted(entry.name for entry in out_dir.iterdir() if entry.name != _STATE_DIR)
    if others:  # stale shards would otherwise be taken for this run's (they are skipped as "already written")
        raise ValueError(f"{out_dir} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) and "
                         "was not made by prepare; use an empty or new --out")
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(fingerprint, sort_keys=True))
    return False


def _merge_counts(summaries: list[dict]) -> dict[str, dict[str, int]]:
    merged: dict[str, dict[str, int]] = {}
    for summary in summaries:
        for license_id, counts in summary["license_counts"].items():
            target = merged.setdefault(license_id, {"kept": 0, "excluded": 0})
            for key, value in counts.items():
                target[key] += value
    return dict(sorted(merged.items()))


def prepare(inputs: Sequence[str], out_dir: str | os.PathLike, settings: PrepareSettings = PrepareSettings(),
            *, workers: int = 1, progress: bool = True) -> dict:
    """Prepare `inputs` into shards and a manifest in `out_dir`; returns the manifest.

    Raises `InputError` at once for a missing input or an unreadable format, and ValueError for
    settings that make no sense or an `out_dir` prepared with other settings.
    """
    settings.validate()
    sources = discover_sources(list(inputs))
    loaded = load_tokenizer(settings.tokenizer)
    tokenizer = _TokenizerInfo(str(settings.tokenizer), loaded.sha256, loaded.vocab_size, loaded.bos_id, loaded.eos_id)
    dtype = shards.record_dtype(tokenizer.vocab_size, settings.seq_len)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts_root = out_dir / _STATE_DIR / "parts"
    if _claim_directory(out_dir, _fingerprint(sources, settings, tokenizer)):
        shutil.rmtree(parts_root, ignore_errors=True)  # in case the last run stopped while cleaning up
        return read_manifest(out_dir)

    parts_root.mkdir(parents=True, exist_ok=True)
    parts.remove_incomplete(parts_root)
    shards.remove_temporary_shards(out_dir)

    units = group_units(sources, UNIT_BYTES)
    pending = [i for i in range(len(units)) if not parts.is_complete(parts.part_dir(parts_root, i))]
    unit_bytes = [sum(s.size for s in unit) for unit in units]
    pool = _worker_pool(workers)
    try:
        with tqdm(total=sum(unit_bytes), initial=sum(unit_bytes) - sum(unit_bytes[i] for i in pending),
                  unit="B", unit_scale=True, desc="tokenize", disable=not progress) as bar:
            _run(tokenize_unit, [(i, units[i], settings, parts_root) for i in pending], pool, bar,
                 [unit_bytes[i] for i in pending])

        summaries = [(parts.part_dir(parts_root, i), parts.read_summary(parts.part_dir(parts_root, i)))
                     for i in range(len(units))]
        tasks, split_summaries = [], {}
        for split in packing.SPLITS:
            split_tasks, split_summaries[split] = _shard_tasks(out_dir, split, summaries, settings, dtype)
            tasks.extend(t for t in split_tasks if not t.path.is_file())
        with tqdm(total=len(tasks), unit="shard", desc="write shards", disable=not progress) as bar:
            _run(write_shard_task, [(t,) for t in tasks], pool, bar, [1] * len(tasks))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    manifest = _manifest(settings, tokenizer, dtype, split_summaries, [s for _, s in summaries])
    write_manifest(out_dir, manifest)
    shutil.rmtree(parts_root)
    return manifest


def _manifest(settings: PrepareSettings, tokenizer: _TokenizerInfo, dtype: np.dtype, splits: dict,
              summaries: list[dict]) -> dict:
    license_counts = _merge_counts(summaries)
    inputs: dict[str, dict] = {}
    for summary in summaries:
        for record in summary["inputs"]:
            inputs.setdefault(record["path"], record)  # a dataset read in row ranges is listed once
    return {
        "format": FORMAT,
        "seq_len": settings.seq_len,
        "record_fields": [shards.TOKENS] + ([shards.SEGMENT_IDS] if settings.segment_ids else []),
        "record_dtype": dtype.str,
        "tokenizer": asdict(tokenizer),
        "licenses": settings.licenses,
        "val_fraction": settings.val_fraction,
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "sequences": sum(s["sequences"] for s in splits.values()),
        "splits": splits,
        "license_counts": license_counts,
        "excluded_by_license": sum(c["excluded"] for c in license_counts.values()),
        "inputs": list(inputs.values()),
        "skipped": [item for summary in summaries for item in summary["skipped"]],
    }
