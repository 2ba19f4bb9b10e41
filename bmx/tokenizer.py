"""The Mistral tokenizer, and any other SentencePiece model or local HF tokenizer directory.

BioMistral tokenized PMC with the Mistral-7B v0.1 SentencePiece model (32000 pieces, `<s>`=1,
`</s>`=2). That file ships inside the `mistral-common` package, so it is found there rather than
copied into bmx or fetched from a hub.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Sequence

from bmx.paths import is_local

MISTRAL_V01 = "mistral-v0.1"


def mistral_v01_model_path() -> Path:
    """Path of the Mistral v0.1 SentencePiece model inside the installed `mistral-common`."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is mistral-common installed completely?")
    return path


@dataclass
class Tokenizer:
    """A thin, picklable-free wrapper with the few operations bmx needs.

    `backend` is either a `sentencepiece.SentencePieceProcessor` or a transformers tokenizer.
    """

    backend: Any
    source: str
    sha256: str
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if hasattr(self.backend, "encode_as_ids"):
            ids = self.backend.encode_as_ids(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False)
        return ([self.bos_id] if add_bos else []) + list(ids) + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS (SentencePiece encodes a list in C++)."""
        if hasattr(self.backend, "encode_as_ids"):
            return self.backend.encode(list(texts))
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        if hasattr(self.backend, "decode_ids"):
            return self.backend.decode_ids(list(ids))
        return self.backend.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        if hasattr(self.backend, "id_to_piece"):
            return self.backend.id_to_piece(token_id)
        return self.backend.convert_ids_to_tokens(token_id)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dir_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            digest.update(name.encode())
            digest.update((path / name).read_bytes())
    return digest.hexdigest()


def load_tokenizer(spec: str | os.PathLike = MISTRAL_V01) -> Tokenizer:
    """Load `mistral-v0.1` (default), a SentencePiece `.model` file, or an HF tokenizer dir (local or `gs://`)."""
    import sentencepiece as spm

    if not is_local(spec):
        return _load_from_object_store(str(spec))
    if str(spec) == MISTRAL_V01:
        path = mistral_v01_model_path()
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer {spec!r} not found: expected '{MISTRAL_V01}', a SentencePiece .model file "
                "or a Hugging Face tokenizer directory"
            )
    if path.is_file():
        processor = spm.SentencePieceProcessor(model_file=str(path))
        return Tokenizer(
            backend=processor,
            source=str(spec),
            sha256=_file_sha256(path),
            bos_id=processor.bos_id(),
            eos_id=processor.eos_id(),
            vocab_size=processor.vocab_size(),
        )
    sentencepiece_file = path / "tokenizer.model"
    if sentencepiece_file.is_file() and not (path / "tokenizer.json").is_file():
        return load_tokenizer(sentencepiece_file)
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    if hf_tokenizer.bos_token_id is None or hf_tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} defines no BOS or EOS token; bmx needs both")
    return Tokenizer(
        backend=hf_tokenizer,
        source=str(spec),
        sha256=_dir_sha256(path),
        bos_id=hf_tokenizer.bos_token_id,
        eos_id=hf_tokenizer.eos_token_id,
        vocab_size=len(hf_tokenizer),
    )


def _load_from_object_store(url: str) -> Tokenizer:
    """The tokenizer at `url` (a file, or a directory's files): copied to a scratch directory, loaded, and the
    copy removed (both backends hold the whole tokenizer in memory once loaded)."""
    import dataclasses
    import tempfile

    from etils import epath

    remote = epath.Path(url)
    if not remote.exists():
        raise FileNotFoundError(f"tokenizer {url!r} not found")
    with tempfile.TemporaryDirectory(prefix="bmx-tokenizer-") as scratch:
        local = Path(scratch) / remote.name
        if remote.is_file():
            local.write_bytes(remote.read_bytes())
        else:
            local.mkdir()
            for file in remote.iterdir():
                if file.is_file():
                    (local / file.name).write_bytes(file.read_bytes())
        tokenizer = load_tokenizer(local)
    return dataclasses.replace(tokenizer, source=url)
