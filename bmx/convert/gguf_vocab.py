"""The SentencePiece vocabulary as llama.cpp reads it from a GGUF file (`tokenizer.ggml.*`).

llama.cpp re-implements SentencePiece's tokenizer from the pieces, their scores and their types
(normal, unknown, control, byte, user-defined, unused), so all three lists are written in full, one
entry per model row. This follows llama.cpp's `convert_hf_to_gguf.py` (`_create_vocab_sentencepiece`):
rows past the tokenizer's pieces are `[PADn]` placeholders; tokens that `added_tokens.json` or
`tokenizer_config.json`'s `added_tokens_decoder` declare override the piece (control if special).
The special token ids and the add-BOS/EOS flags come from gguf's own `SpecialVocab`, as there.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf

from bmx.convert.safetensors_io import CheckpointFormatError

SENTENCEPIECE_FILE = "tokenizer.model"
UNFILLED_SCORE = -10000.0  # a row no piece fills: llama.cpp never produces it
ADDED_TOKEN_SCORE = -1000.0


@dataclass
class GgufVocab:
    tokens: list[bytes]
    scores: list[float]
    token_types: list[int]
    unk_id: int | None


def _added_tokens(tokenizer_dir: Path | None) -> list[tuple[int, str, bool]]:
    """(id, text, special) of every token the HF tokenizer files add on top of the SentencePiece model."""
    added = []
    if tokenizer_dir is None:
        return added
    added_file = tokenizer_dir / "added_tokens.json"
    if added_file.is_file():
        added += [(int(token_id), text, False) for text, token_id in json.loads(added_file.read_text()).items()]
    config_file = tokenizer_dir / "tokenizer_config.json"
    if config_file.is_file():
        decoder = json.loads(config_file.read_text()).get("added_tokens_decoder", {})
        added += [(int(token_id), entry["content"], bool(entry.get("special"))) for token_id, entry in decoder.items()]
    return added


def sentencepiece_vocab(model_file: Path, vocab_size: int, tokenizer_dir: Path | None) -> GgufVocab:
    """Pieces, scores and token types of `model_file` plus the tokens that the HF tokenizer files in
    `tokenizer_dir` (None: there are none) add: `vocab_size` rows."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor(model_file=str(model_file))
    if processor.vocab_size() > vocab_size:
        raise CheckpointFormatError(f"{model_file}: {processor.vocab_size()} pieces do not fit the model's "
                                    f"vocab_size {vocab_size}: wrong tokenizer for this checkpoint?")
    kinds = gguf.TokenType
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [UNFILLED_SCORE] * vocab_size
    types = [int(kinds.UNUSED)] * vocab_size
    for token_id in range(processor.vocab_size()):
        kind = kinds.NORMAL
        if processor.IsUnknown(token_id):
            kind = kinds.UNKNOWN
        elif processor.IsControl(token_id):
            kind = kinds.CONTROL
        elif processor.IsUnused(token_id):
            kind = kinds.UNUSED
        elif processor.IsByte(token_id):
            kind = kinds.BYTE
        tokens[token_id] = processor.IdToPiece(token_id).encode()
        scores[token_id] = processor.GetScore(token_id)
        types[token_id] = int(kind)
    for token_id, text, special in _added_tokens(tokenizer_dir):
        if token_id >= vocab_size:
            raise CheckpointFormatError(f"{tokenizer_dir}: added token {text!r} has id {token_id}, outside the "
                                        f"model's vocab_size {vocab_size}")
        if special or (text.startswith("<|") and text.endswith("|>")):
            types[token_id] = int(kinds.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # llama.cpp pre-normalises spaces in user-defined tokens
            types[token_id] = int(kinds.USER_DEFINED)
        tokens[token_id] = text.encode()
        scores[token_id] = ADDED_TOKEN_SCORE
    unk_id = processor.unk_id()
    return GgufVocab(tokens, scores, types, unk_id if unk_id >= 0 else None)


def add_vocab(writer: gguf.GGUFWriter, tokenizer_dir: Path | None, hf_config: dict, vocab: GgufVocab) -> None:
    """Write `tokenizer.ggml.*`: the vocabulary, the special token ids, add-BOS/EOS and any chat template.

    `SpecialVocab` reads the tokenizer files and a `config.json` from one directory, so it is shown
    a scratch directory of links to the tokenizer files next to the checkpoint's HF config.
    """
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    with tempfile.TemporaryDirectory(prefix="bmx-gguf-vocab-") as scratch:
        for file in tokenizer_dir.iterdir() if tokenizer_dir is not None else ():
            if file.is_file() and file.name != "config.json":
                os.symlink(file.resolve(), Path(scratch) / file.name)
        (Path(scratch) / "config.json").write_text(json.dumps(hf_config))
        special = gguf.SpecialVocab(scratch, n_vocab=len(vocab.tokens))
    # Without tokenizer.json, SpecialVocab finds no unknown token; SentencePiece itself names it.
    if "unk" not in special.special_token_ids and vocab.unk_id is not None:
        special.special_token_ids["unk"] = vocab.unk_id
    special.add_to_gguf(writer, quiet=True)
