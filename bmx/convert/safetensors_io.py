"""Streaming safetensors I/O: read an HF checkpoint one tensor at a time, write sharded output.

The format (https://github.com/huggingface/safetensors#format) is an 8-byte little-endian header
length, a JSON header `{name: {dtype, shape, data_offsets}}` and the raw little-endian bytes.
Reading local files through `np.memmap` gives zero-copy, bit-exact access to any dtype (bfloat16 through
`ml_dtypes`), and writing from a plan (names, shapes and dtypes known up front) lets each tensor be
written as soon as it exists, so neither side ever holds the whole model in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np
from etils import epath

from bmx.paths import is_local

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointFormatError(ValueError):
    """The input is not a checkpoint bmx can read safely."""


def dtype_name(dtype: np.dtype) -> str:
    try:
        return _DTYPE_NAMES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointFormatError(f"dtype {dtype} has no safetensors equivalent") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook: a name listed twice would silently keep only its last entry."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise CheckpointFormatError(f"key {key!r} appears twice")
        result[key] = value
    return result


def _tensor_entry(name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry, or why it is malformed."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointFormatError(f"tensor {name!r} needs dtype, shape and data_offsets, got {entry!r}")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise CheckpointFormatError(f"tensor {name!r} has unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(type(size) is int and size >= 0 for size in shape):
        raise CheckpointFormatError(f"tensor {name!r} has shape {shape!r}, expected a list of sizes ≥ 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise CheckpointFormatError(f"tensor {name!r} has data_offsets {offsets!r}, expected [begin, end] with "
                                    "0 ≤ begin ≤ end")
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    needed = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offsets[1] - offsets[0] != needed:
        raise CheckpointFormatError(f"tensor {name!r}: byte range {offsets} holds {offsets[1] - offsets[0]} bytes, "
                                    f"its shape {tuple(shape)} of {entry['dtype']} needs {needed}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_tiling(ranges: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The byte ranges must cover the data section exactly once: no overlap, no gap, nothing past the end."""
    ordered = sorted(ranges)
    for (_, end, name), (begin, next_end, next_name) in zip(ordered, ordered[1:]):
        if begin < end:  # checked before gaps: a range moved onto another's bytes leaves a gap too
            raise CheckpointFormatError(f"tensor {next_name!r} (bytes [{begin}, {next_end})) overlaps tensor "
                                        f"{name!r} (bytes up to {end})")
    position, previous = 0, None
    for begin, end, name in ordered:
        if begin > position:
            raise CheckpointFormatError(f"bytes [{position}, {begin}) of the data section belong to no tensor "
                                        f"(gap before {name!r})")
        position, previous = end, name
    if position > data_bytes:
        raise CheckpointFormatError(f"tensor {previous!r} runs past the end of the file (truncated?): the tensors "
                                    f"need {position} data bytes, the file holds {data_bytes}")
    if position < data_bytes:
        raise CheckpointFormatError(f"the file holds {data_bytes - position} bytes after the last tensor")


def _read_header(path: Path) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int]:
    """The validated tensor entries of one file, `{name: (dtype, shape, begin, end)}`, and where data starts.

    Everything is checked before any tensor is read, as the safetensors library does (and a little
    more: a name listed twice): a file that lies about its layout is refused, never half-converted.
    Errors name the file.
    """
    try:
        size = _file_size(path)
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise CheckpointFormatError("truncated safetensors file (no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointFormatError(f"implausible header length {header_len}")
            if 8 + header_len > size:
                raise CheckpointFormatError(f"truncated safetensors header ({header_len} bytes announced, "
                                            f"{size - 8} in the file)")
            raw = handle.read(header_len)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise CheckpointFormatError(f"unreadable safetensors header (not UTF-8 at byte {error.start})") from None
        if not text.startswith("{"):
            raise CheckpointFormatError("unreadable safetensors header (not a JSON object)")
        try:
            header = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as error:
            raise CheckpointFormatError(f"unreadable safetensors header ({error})") from None
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointFormatError("__metadata__ must map names to strings")
        entries = {name: _tensor_entry(name, entry) for name, entry in header.items()}
        _check_tiling([(begin, end, name) for name, (_, _, begin, end) in entries.items()], size - 8 - header_len)
    except CheckpointFormatError as error:
        raise CheckpointFormatError(f"{path}: {error}") from None
    return entries, 8 + header_len


def _file_size(path) -> int:
    return path.stat().st_size if isinstance(path, Path) else path.stat().length


def _shard_path(directory: Path, index: Path, name) -> Path:
    """The shard an index entry names, refused unless it is a file name inside the model directory."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointFormatError(f"{index} maps a tensor to {name!r}, which is not a file inside {directory}")
    return directory / name


class SafetensorsReader:
    """All tensors of an HF checkpoint directory (one file or a sharded index), read lazily.

    Every header is validated when the reader opens; with an index, each tensor must be in exactly
    the shard the index maps it to.
    """

    def __init__(self, directory: str | os.PathLike):
        # Local files are memory-mapped; on an object store (gs://…) each tensor is one ranged read.
        self.directory = Path(directory) if is_local(directory) else epath.Path(directory)
        self._locations: dict[str, tuple[Path, int, tuple]] = {}
        weight_map = self._weight_map()
        files = sorted(set(weight_map.values())) if weight_map is not None else self._single_file()
        for file in files:
            entries, data_start = _read_header(file)
            for name, entry in entries.items():
                if name in self._locations:
                    raise CheckpointFormatError(f"tensor {name!r} is stored twice: in {self._locations[name][0]} "
                                                f"and in {file}")
                self._locations[name] = (file, data_start, entry)
        if weight_map is not None:
            for name, (file, _, _) in self._locations.items():
                if weight_map.get(name) != file:
                    mapped = weight_map.get(name)
                    raise CheckpointFormatError(f"tensor {name!r} is in {file} but {self.directory / INDEX_FILE} "
                                                f"maps it {f'to {mapped}' if mapped else 'nowhere'}")
            absent = sorted(set(weight_map) - set(self._locations))
            if absent:
                raise CheckpointFormatError(f"{self.directory / INDEX_FILE} maps tensor {absent[0]!r} to "
                                            f"{weight_map[absent[0]]}, which does not hold it")

    def _weight_map(self) -> dict[str, Path] | None:
        """{tensor: shard file} from the index, or None for a single-file checkpoint."""
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: not a directory")
        index = self.directory / INDEX_FILE
        if not index.is_file():
            return None
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise CheckpointFormatError(f"{index}: not a safetensors index with a weight_map ({error!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f"{index}: weight_map must map tensor names to shard files")
        mapped = {name: _shard_path(self.directory, index, file) for name, file in weight_map.items()}
        missing = sorted({str(f) for f in mapped.values() if not f.is_file()})
        if missing:
            raise CheckpointFormatError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return mapped

    def _single_file(self) -> list[Path]:
        if (self.directory / SINGLE_FILE).is_file():
            return [self.directory / SINGLE_FILE]
        pickled = [name for name in PICKLED_WEIGHT_FILES if (self.directory / name).exists()]
        if pickled:
            raise CheckpointFormatError(
                f"{self.directory / pickled[0]}: pickled PyTorch checkpoints are refused (unpickling can run "
                "arbitrary code); convert it to safetensors first, e.g. with transformers' save_pretrained("
                "safe_serialization=True) in a sandbox you trust"
            )
        raise CheckpointFormatError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def file_of(self, name: str) -> Path:
        return self._locations[name][0]

    def names(self) -> list[str]:
        return list(self._locations)

    def spec(self, name: str) -> TensorSpec:
        _, _, (dtype, shape, _, _) = self._locations[name]
        return TensorSpec(name, shape, dtype)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (bytes exactly as stored)."""
        try:
            file, data_start, entry = self._locations[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} not found in {self.directory}") from None
        dtype, shape, begin, end = entry  # validated when the reader opened
        if end == begin:
            return np.zeros(shape, dtype)
        if isinstance(file, Path):
            return np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
        with file.open("rb") as handle:
            handle.seek(data_start + begin)
            data = handle.read(end - begin)
        if len(data) != end - begin:
            raise CheckpointFormatError(f"{file}: tensor {name!r} ends early (truncated while reading?)")
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __contains__(self, name: str) -> bool:
        return name in self._locations


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as transformers' max_shard_size), '500MiB', 1234."""
    if isinstance(size, int):
        return size
    text = size.strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving split into shards of at most `max_shard_bytes` (one oversized tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    filled = 0
    for spec in specs:
        if shards[-1] and filled + spec.nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(spec)
        filled += spec.nbytes
    return [shard for shard in shards if shard]


class ShardedSafetensorsWriter:
    """Writes tensors, in the planned order, into HF-style shards inside `staging_dir`.

    Each shard's header is written first from the plan; each tensor's bytes are appended as it
    arrives. `finish()` checks every planned tensor arrived and writes the index. The caller
    publishes `staging_dir` by renaming it (see `atomic_output_dir`).

    The bytes go to disk on a background thread while the caller prepares the next tensor (the
    disk writes ~10x slower than it reads here, so a conversion or a merge would otherwise wait on
    it and compute in turn). At most one tensor is in flight: memory holds two at a time. The
    writer keeps a reference to each array until the next `write`: do not modify it in place.
    """

    def __init__(self, staging_dir: Path, specs: list[TensorSpec], max_shard_bytes: int, metadata: dict | None = None):
        self.staging_dir = Path(staging_dir)
        self.shards = plan_shards(specs, max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        total = len(self.shards)
        self.file_names = [SINGLE_FILE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self._order = [(shard_index, spec) for shard_index, shard in enumerate(self.shards) for spec in shard]
        self._position = 0
        self._handle = None
        self._open_shard = -1
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        self._in_flight: Future | None = None

    def _start_shard(self, shard_index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for spec in self.shards[shard_index]:
            header[spec.name] = {"dtype": dtype_name(spec.dtype), "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the spec aligns the data start to 8 bytes
        self._handle = open(self.staging_dir / self.file_names[shard_index], "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._open_shard = shard_index

    def write(self, name: str, array: np.ndarray) -> None:
        if self._position >= len(self._order):
            raise ValueError(f"tensor {name!r} was not planned (all planned tensors are written)")
        shard_index, spec = self._order[self._position]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name!r} next, got {name!r}")
        array = np.asarray(array)
        if tuple(array.shape) != spec.shape or array.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r}: planned {spec.shape} {spec.dtype}, got {tuple(array.shape)} {array.dtype}")
        little_endian = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        self._wait_for_disk()
        self._in_flight = self._disk.submit(self._append, shard_index, little_endian)
        self._position += 1

    def _append(self, shard_index: int, array: np.ndarray) -> None:
        """On the writer thread, in order: open the shard if it is the next one, append the bytes."""
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        self._handle.write(array.reshape(-1).view(np.uint8).data)  # the array's own bytes, no copy

    def _wait_for_disk(self) -> None:
        """Let the previous tensor's write finish; its error (a full disk) is raised here."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def finish(self) -> None:
        try:
            self._wait_for_disk()
        finally:
            self._disk.shutdown(wait=True)
            if self._handle is not None:
                self._handle.close()
                self._handle = None
        if self._position != len(self._order):
            missing = [spec.name for _, spec in self._order[self._position :]]
            raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[0]!r}")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(spec.nbytes for shard in self.shards for spec in shard)},
                "weight_map": {spec.name: self.file_names[i] for i, shard in enumerate(self.shards) for spec in shard},
            }
            (self.staging_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_dead_staging_dirs(final: Path) -> list[Path]:
    """Remove `.NAME.partial-PID` siblings of `final` whose process no longer runs (SIGKILL, a crash)."""
    removed = []
    prefix = f".{final.name}.partial-"
    if not final.parent.is_dir():
        return removed
    for staging in final.parent.iterdir():
        pid = staging.name[len(prefix):] if staging.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


class atomic_output_dir:
    """Context manager: build an output directory under a temporary sibling name, publish it by rename.

    If anything fails, the staging directory is removed and `final` is untouched, so an
    interrupted run never leaves a directory that looks complete. `final` must not exist or be empty.
    SIGTERM is turned into KeyboardInterrupt while inside, so a terminated conversion cleans up as a
    Ctrl-C does; staging directories of processes that died without cleaning up (SIGKILL) are
    removed on entry. On failure `stop()` (if given) tells background writers to stop, and threads
    started inside the block are joined before the staging directory is removed: removing it under a
    live writer would leave debris, and exiting under one aborts the interpreter.
    """

    THREAD_JOIN_SECONDS = 30.0

    def __init__(self, final: str | os.PathLike, stop: Callable[[], None] | None = None):
        self.final = Path(final)
        self.staging = self.final.with_name(f".{self.final.name}.partial-{os.getpid()}")
        self.stop = stop
        self._previous_sigterm = None
        self._threads_before: set[threading.Thread] = set()

    def __enter__(self) -> Path:
        if self.final.exists() and (not self.final.is_dir() or any(self.final.iterdir())):
            raise FileExistsError(f"{self.final} already exists and is not empty; choose a new output directory")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_staging_dirs(self.final)
        if self.staging.exists():
            shutil.rmtree(self.staging)
        self.staging.mkdir()
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        self._threads_before = set(threading.enumerate())
        return self.staging

    def _stop_writers(self) -> None:
        if self.stop is not None:
            self.stop()
        deadline = time.monotonic() + self.THREAD_JOIN_SECONDS
        for thread in set(threading.enumerate()) - self._threads_before:
            # A thread-pool worker idles until its pool shuts down (its owner's `stop` cancels its task):
            # joining it would only wait out the deadline.
            pool_worker = getattr(getattr(thread, "_target", None), "__module__", "") == "concurrent.futures.thread"
            if not thread.daemon and not pool_worker and thread is not threading.current_thread():
                try:
                    thread.join(max(0.0, deadline - time.monotonic()))
                except Exception:  # noqa: BLE001 - orbax's threads re-raise their (expected) failure on join
                    pass

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        if exc_type is not None:
            self._stop_writers()
            # A writer past the deadline may still be finishing a file: remove until it stays gone.
            for _ in range(20):
                shutil.rmtree(self.staging, ignore_errors=True)
                time.sleep(0.1)
                if not self.staging.exists():
                    break
            return
        if self.final.exists():
            self.final.rmdir()
        os.rename(self.staging, self.final)
