"""Inputs of `prepare`: which files an INPUT argument names, what format each is, and its documents.

INPUT may be a file, a directory (walked in sorted order), a glob, a dataset saved with
`datasets.save_to_disk`, or `hf:NAME[:SPLIT]` for `datasets.load_dataset`. A path that does not
exist, a glob that matches nothing, or a file bmx has no reader for is an `InputError` at once,
before any work starts. Problems *inside* a readable input (broken XML, bad UTF-8, a truncated
archive, an empty article) are yielded as `Skipped` so that the run carries on and lists them.

Directories contribute the corpus formats only: `.nxml`/`.xml` (also gzipped, as PubMed's baseline
files are), `.tar.gz`/`.tgz`/`.tar`, `.jsonl`
and `.txt` files in PubTator format. README, LICENSE or plain `.txt` files beside the data are not
corpus and are ignored; name a plain `.txt` file (or a glob) to include it as one document.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from collections.abc import Iterator, Sequence

from bmx.data import jats, pubmed
from bmx.data.licenses import NOT_RECORDED, UNKNOWN, license_from_text, license_from_type, license_from_url
from bmx.data.safe_xml import BadDocument, local_name, parse_xml

XML, TAR, PUBTATOR, TEXT, JSONL, HF = "xml", "tar", "pubtator", "text", "jsonl", "hf"
_SUFFIX_FORMATS = {
    ".nxml": XML, ".xml": XML, ".nxml.gz": XML, ".xml.gz": XML,  # PubMed baseline files are .xml.gz
    ".tar.gz": TAR, ".tgz": TAR, ".tar": TAR, ".jsonl": JSONL, ".txt": TEXT,
}
_HF_PREFIX = "hf:"
_SAVED_DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")


class InputError(ValueError):
    """An INPUT that cannot be used at all; raised before any work starts."""


@dataclass(frozen=True)
class Source:
    """One readable input: a file in a known format, or a row range of a Hugging Face dataset."""

    path: str
    format: str
    size: int = 0
    rows: tuple[int, int] | None = None  # [start, stop) rows, for HF datasets only

    @property
    def name(self) -> str:
        return self.path if self.rows is None else f"{self.path}[{self.rows[0]}:{self.rows[1]}]"


@dataclass(frozen=True)
class Document:
    text: str
    license: str
    origin: str


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


def _suffix_format(path: str) -> str | None:
    lower = path.lower()
    return next((fmt for suffix, fmt in _SUFFIX_FORMATS.items() if lower.endswith(suffix)), None)


def _first_line(path: str) -> str:
    """First non-blank line (PubTator files may open with an empty line)."""
    with open(path, "rb") as handle:
        for _ in range(16):
            line = handle.readline(4096)
            if not line or line.strip():
                return line.decode("utf-8", errors="replace")
    return ""


def _file_source(path: str, *, in_directory: bool) -> Source | None:
    fmt = _suffix_format(path)
    if fmt == TEXT and pubmed.looks_like_pubtator(_first_line(path)):
        fmt = PUBTATOR
    if fmt is None or (in_directory and fmt == TEXT):
        if in_directory:
            return None
        raise InputError(
            f"cannot read {path}: expected .nxml/.xml[.gz] (JATS or PubMed XML), .tar.gz/.tgz/.tar, .jsonl or .txt"
        )
    return Source(path=path, format=fmt, size=os.path.getsize(path))


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS)


def _walk(directory: str) -> Iterator[str]:
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(root, name)


def _hf_sources(spec: str, rows_per_source: int) -> list[Source]:
    dataset = load_hf_dataset(spec)
    return [
        Source(path=spec, format=HF, rows=(start, min(start + rows_per_source, len(dataset))))
        for start in range(0, len(dataset), rows_per_source)
    ]


def discover_sources(inputs: Sequence[str], *, hf_rows_per_source: int = 2000) -> list[Source]:
    """Every readable source named by `inputs`, in a deterministic order, each file once."""
    if not inputs:
        raise InputError("no INPUT given: expected files, directories, globs or hf:NAME")
    sources: list[Source] = []
    for spec in inputs:
        if spec.startswith(_HF_PREFIX) or (os.path.isdir(spec) and _is_saved_dataset(Path(spec))):
            sources.extend(_hf_sources(spec, hf_rows_per_source))
        elif os.path.isdir(spec):
            found = [_file_source(p, in_directory=True) for p in _walk(spec)]
            sources.extend(s for s in found if s is not None)
        elif os.path.isfile(spec):
            sources.append(_file_source(spec, in_directory=False))
        elif glob.has_magic(spec):
            matches = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
            if not matches:
                raise InputError(f"glob {spec!r} matched no files")
            sources.extend(_file_source(p, in_directory=False) for p in matches)
        else:
            raise InputError(f"input {spec!r} does not exist")
    unique: dict[tuple, Source] = {}
    for source in sources:
        unique.setdefault((source.path, source.rows), source)
    return list(unique.values())


def load_hf_dataset(spec: str):
    """A `datasets.Dataset` from a `save_to_disk` directory or `hf:NAME[:SPLIT]` (split defaults to train)."""
    import datasets

    if not spec.startswith(_HF_PREFIX):
        loaded = datasets.load_from_disk(spec)
        if isinstance(loaded, datasets.DatasetDict):
            raise InputError(f"{spec} holds splits {list(loaded)}: pass one split's directory")
        return loaded
    name, _, split = spec[len(_HF_PREFIX):].partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # the datasets library raises many types; all mean "cannot load"
        raise InputError(f"cannot load Hugging Face dataset {name!r} (split {split or 'train'}): {error}") from error


def _license_label(value) -> str:
    """Normalised licence from a free-form `license` field of a JSONL line or dataset row."""
    if value is None:
        return NOT_RECORDED
    value = str(value)
    return license_from_url(value) or license_from_type(value) or license_from_text(value) or UNKNOWN


DEFAULT_MAX_DOCUMENT_BYTES = 64 << 20  # a PMC article is well under 10 MB; a decompression bomb is not


def _too_large(cap: int, size: int | None = None) -> str:
    """The skip reason of a document over the cap (`size` None: found while decompressing)."""
    found = f"{size} bytes" if size is not None else "once decompressed"
    return f"document larger than the {cap}-byte cap ({found}; --max-document-bytes raises it)"


def _read_capped(stream: BinaryIO, cap: int) -> bytes | None:
    """All of `stream` (e.g. a decompressor) read in chunks, or None as soon as it passes `cap` bytes:
    memory stays bounded by the cap however much the input inflates."""
    chunks, total = [], 0
    while chunk := stream.read(min(1 << 20, cap + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > cap:
            return None
    return b"".join(chunks)


class _HashingReader:
    """A read-only file wrapper that feeds everything read through `hasher` (one pass, no extra read)."""

    def __init__(self, handle: BinaryIO, hasher):
        self._handle, self._hasher = handle, hasher

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._hasher.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _xml_documents(data: bytes, origin: str) -> Iterator[Document | Skipped]:
    try:
        root = parse_xml(data)
        if local_name(root) in ("PubmedArticleSet", "MedlineCitationSet"):
            for citation in pubmed.citations_in(root):
                try:
                    yield Document(pubmed.citation_text(citation), NOT_RECORDED, origin)
                except BadDocument as error:
                    yield Skipped(origin, str(error))
            return
        for article in jats.articles_in(root):
            try:
                yield Document(jats.article_text(article), jats.article_license(article), origin)
            except BadDocument as error:
                yield Skipped(origin, str(error))
    except BadDocument as error:
        yield Skipped(origin, str(error))


def _tar_documents(source: Source, hasher, max_document_bytes: int) -> Iterator[Document | Skipped]:
    with open(source.path, "rb") as handle:
        reader = _HashingReader(handle, hasher)
        members_read = 0
        try:
            # "r|*": a forward-only stream, so a multi-GB PMC package is never extracted or seeked.
            with tarfile.open(fileobj=reader, mode="r|*") as archive:
                for member in archive:
                    origin = f"{source.path}::{member.name}"
                    if member.isfile() and _suffix_format(member.name) == XML:
                        if member.size > max_document_bytes:  # skipped unread: the stream moves past it
                            yield Skipped(origin, _too_large(max_document_bytes, member.size))
                        else:
                            stream = archive.extractfile(member)
                            if member.name.lower().endswith(".gz"):
                                stream = gzip.GzipFile(fileobj=stream)
                            data = _read_capped(stream, max_document_bytes)
                            if data is None:
                                yield Skipped(origin, _too_large(max_document_bytes))
                            else:
                                yield from _xml_documents(data, origin)
                    members_read += 1
        except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
            yield Skipped(source.path, f"truncated or corrupt archive after {members_read} members: {error}")
        reader.drain()


def _jsonl_documents(source: Source, hasher, text_field: str) -> Iterator[Document | Skipped]:
    with open(source.path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            hasher.update(raw)
            origin = f"{source.path}:{line_number}"
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield Skipped(origin, f"invalid UTF-8 at byte {error.start} of the line")
                continue
            except json.JSONDecodeError as error:
                yield Skipped(origin, f"invalid JSON: {error.msg}")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield Skipped(origin, f"no string field {text_field!r}")
                continue
            yield Document(text.strip(), _license_label(record.get("license")), origin)


def _hf_documents(source: Source, hasher, text_field: str) -> Iterator[Document | Skipped]:
    dataset = load_hf_dataset(source.path)
    if text_field not in dataset.column_names:
        raise InputError(f"dataset {source.path} has no column {text_field!r} (columns: {dataset.column_names})")
    hasher.update(dataset._fingerprint.encode())
    start, stop = source.rows
    columns = [text_field] + (["license"] if "license" in dataset.column_names else [])
    rows = dataset.select_columns(columns)[start:stop]
    for offset, text in enumerate(rows[text_field]):
        origin = f"{source.path}[{start + offset}]"
        if not isinstance(text, str):
            yield Skipped(origin, f"field {text_field!r} is not a string")
            continue
        license_value = rows["license"][offset] if "license" in rows else None
        yield Document(text.strip(), _license_label(license_value), origin)


def _decode_whole_file(data: bytes, path: str) -> str | Skipped:
    if not data.strip():
        return Skipped(path, "empty file (0 bytes)" if not data else "empty file (only whitespace)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        return Skipped(path, f"invalid UTF-8 at byte {error.start}")


def _gzip_document(source: Source, hasher, max_document_bytes: int) -> bytes | Skipped:
    """The decompressed bytes of a `.xml.gz`, streamed and capped; the hasher sees the compressed file."""
    with open(source.path, "rb") as handle:
        reader = _HashingReader(handle, hasher)
        try:
            data = _read_capped(gzip.GzipFile(fileobj=reader), max_document_bytes)
        except (OSError, EOFError, zlib.error) as error:
            data = Skipped(source.path, f"truncated or corrupt gzip file: {error}")
        reader.drain()
    if data is None:
        return Skipped(source.path, _too_large(max_document_bytes))
    return data


def _hash_file(path: str, hasher) -> None:
    with open(path, "rb") as handle:
        _HashingReader(handle, hasher).drain()


def read_source(source: Source, hasher, *, text_field: str = "text",
                max_document_bytes: int = DEFAULT_MAX_DOCUMENT_BYTES) -> Iterator[Document | Skipped]:
    """Documents of `source` in file order, and what had to be skipped; `hasher` sees every byte read.

    A document over `max_document_bytes` (decompressed) is skipped with that reason, having been
    held in memory at most up to the cap.
    """
    if source.format == TAR:
        if source.size == 0:
            yield Skipped(source.path, "empty file (0 bytes)")
        else:
            yield from _tar_documents(source, hasher, max_document_bytes)
        return
    if source.format == JSONL:
        yield from _jsonl_documents(source, hasher, text_field)
        return
    if source.format == HF:
        yield from _hf_documents(source, hasher, text_field)
        return
    if source.format == XML and source.path.lower().endswith(".gz"):
        data = _gzip_document(source, hasher, max_document_bytes)
        yield from [data] if isinstance(data, Skipped) else _xml_documents(data, source.path)
        return
    if source.size > max_document_bytes and source.format in (XML, TEXT):
        _hash_file(source.path, hasher)
        yield Skipped(source.path, _too_large(max_document_bytes, source.size))
        return
    data = Path(source.path).read_bytes()
    hasher.update(data)
    if source.format == XML:
        yield from _xml_documents(data, source.path)
        return
    text = _decode_whole_file(data, source.path)
    if isinstance(text, Skipped):
        yield text
    elif source.format == PUBTATOR:
        for pmid, document in pubmed.pubtator_documents(text.splitlines()):
            yield Document(document, NOT_RECORDED, f"{source.path}:{pmid}")
    else:
        yield Document(text.strip(), NOT_RECORDED, source.path)

