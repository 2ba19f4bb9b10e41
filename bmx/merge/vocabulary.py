"""`tokenizer_source` / `tokenizer:`: build the output tokenizer and re-index each model's embeddings to it.

mergekit 0.1.5's algorithm (`mergekit/tokenizer/build.py`, `embed.py`), step by step:
1. The base tokenizer (the base model's, else the first model's) loses tokens whose id is past its
   model's `vocab_size`; every other model's tokenizer is read as it is.
2. The output vocabulary is the base's (`base`), another model's (a model name) or the union of all
   (`union`: the base's tokens, then every other model's tokens it lacks, then their added tokens),
   plus the `tokenizer.tokens` keys not already in it.
3. Each model gets a permutation: output id -> its own row, or -1 when it lacks the token.
4. For each vocabulary-indexed tensor (embeddings, LM head), a token some model lacks gets a default
   row: the configured source, else the only model that has it, else the base's, else the mean of
   the models that have it (zero when none). `force` uses the configured source for every model.
   With `pad_to_multiple_of` the extra rows are the mean of the real ones.
The merge method then sees tensors of one shape. Unlike mergekit, models are visited in config order
(mergekit iterates a set, so its union's order can change between runs when several models add tokens).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from collections.abc import Mapping

import numpy as np

from bmx.merge.config import MergeConfig, TokenSource
from bmx.merge.models import IncompatibleModelsError, InputModel

LOG = logging.getLogger("bmx.merge")


def _load_tokenizer(model: InputModel):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model.tokenizer_dir), use_fast=True)
    except Exception as error:  # transformers raises many kinds; the user needs the model and the reason
        raise IncompatibleModelsError(f"model `{model.reference}`: cannot read its tokenizer in {model.tokenizer_dir} ({error})") from None


def stripped_tokenizer(model: InputModel):
    """The model's tokenizer without tokens whose id is >= its vocab_size (mergekit's `get_stripped_tokenizer`)."""
    import tokenizers

    tokenizer = _load_tokenizer(model)
    vocab_size = model.hf_config.get("vocab_size") or len(tokenizer.get_vocab())
    unused = {token for token, index in tokenizer.get_vocab().items() if index >= vocab_size}
    if not unused:
        return tokenizer
    serialized = json.loads(tokenizer._tokenizer.to_str())
    if serialized["model"]["type"] != "BPE":
        raise IncompatibleModelsError(f"model `{model.reference}`: its {serialized['model']['type']} tokenizer has tokens past "
                                      f"vocab_size {vocab_size}; only BPE tokenizers can be stripped for a tokenizer merge")
    serialized["added_tokens"] = [entry for entry in serialized["added_tokens"] if entry["id"] < vocab_size]
    for token in unused:
        serialized["model"]["vocab"].pop(token, None)
    serialized["model"]["merges"] = [m for m in serialized["model"]["merges"]
                                     if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(serialized))
    return tokenizer


def union_tokenizer(base_tokenizer, tokenizers: Mapping[str, object], models: Mapping[str, InputModel]):
    """The base tokenizer plus every token of the others it lacks (mergekit's `build_union_tokenizer`)."""
    from transformers import AutoTokenizer

    vocabulary, added = {}, {}
    for reference, tokenizer in tokenizers.items():
        vocab_size = models[reference].hf_config.get("vocab_size") or tokenizer.vocab_size
        for token, index in tokenizer.get_vocab().items():
            if index < vocab_size and token not in vocabulary:
                vocabulary[token] = len(vocabulary)
        for index, info in tokenizer.added_tokens_decoder.items():
            if index < vocab_size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as copy:  # a fresh copy, so the base tokenizer is not modified
        base_tokenizer.save_pretrained(copy)
        result = AutoTokenizer.from_pretrained(copy, use_fast=True)
    base_vocabulary = base_tokenizer.get_vocab()
    for token in vocabulary:
        if token not in added and token not in base_vocabulary:
            result.add_tokens(token)
    for info in added.values():
        result.add_tokens(info)
    return result


@dataclass
class OutputVocabulary:
    tokenizer: object  # a transformers tokenizer, saved into the output
    vocab: dict[str, int]  # output token -> id
    rows: int  # output vocab_size (padded to pad_to_multiple_of)
    permutations: dict[str, np.ndarray]  # model -> [len(vocab)] its row for each output id, or -1
    original_vocabs: dict[str, dict[str, int]]
    base_model: str | None
    tokens: Mapping[str, TokenSource]

    def align(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each model's [its vocab, ...] rows re-indexed to [self.rows, ...] (mergekit's `PermutedVocabulary`)."""
        models = list(tensors)
        dtype = np.result_type(*(t.dtype for t in tensors.values()))
        row_shape = next(iter(tensors.values())).shape[1:]
        configs = dict(self.tokens)
        averaged = self._assign_sources(models, configs)
        defaults = {}
        for token, token_id in self.vocab.items():
            config = configs.get(token)
            if not (config and config.force) and all(self.permutations[m][token_id] >= 0 for m in models):
                continue
            if token in averaged:
                having = [m for m in models if self.permutations[m][token_id] >= 0]
                row = np.zeros(row_shape, dtype)
                for model in having:
                    row = row + tensors[model][self.permutations[model][token_id]]
                defaults[token] = (row / np.asarray(len(having), dtype)).astype(dtype)
            elif config is not None:
                defaults[token] = self._configured_row(token, token_id, config, tensors, row_shape, dtype)
        aligned = {}
        for model in models:
            permutation = self.permutations[model]
            rows = np.zeros((self.rows, *row_shape), dtype)
            for token, token_id in self.vocab.items():
                force = token in configs and configs[token].force
                if permutation[token_id] >= 0 and not force:
                    rows[token_id] = tensors[model][permutation[token_id]]
                elif token in defaults:
                    rows[token_id] = defaults[token]
                else:
                    LOG.error("no embedding for token %r in model %s", token, model)
            if self.rows > len(self.vocab):  # padding rows: the mean embedding
                rows[len(self.vocab):] = np.mean(rows[:len(self.vocab)], axis=0, dtype=np.float64 if dtype == np.float64 else np.float32).astype(dtype)
            aligned[model] = rows
        return aligned

    def _assign_sources(self, models: list[str], configs: dict[str, TokenSource]) -> set[str]:
        """Fill `configs` for tokens some models lack; return the tokens to average over the models that have them."""
        averaged = set()
        for token, token_id in self.vocab.items():
            if token in configs:
                continue
            having = [m for m in models if self.permutations[m][token_id] >= 0]
            if len(having) == 1:
                configs[token] = TokenSource(kind="model", model=having[0])
            elif not having:
                configs[token] = TokenSource(kind="zero")
                LOG.warning("token %r is in no model; its embedding is zero", token)
            elif self.base_model in models and self.permutations[self.base_model][token_id] >= 0:
                configs[token] = TokenSource(kind="model", model=self.base_model)
            else:
                averaged.add(token)
        return averaged

    def _configured_row(self, token, token_id, config: TokenSource, tensors, row_shape, dtype) -> np.ndarray:
        if config.kind == "zero":
            return np.zeros(row_shape, dtype)
        if config.model not in tensors:
            raise IncompatibleModelsError(f"token {token!r} takes its embedding from model `{config.model}`, which is not an input of this tensor")
        if config.kind == "model_token":
            source_id = config.token_id
            if source_id is None:
                if config.token not in self.original_vocabs[config.model]:
                    raise IncompatibleModelsError(f"token {config.token!r} (source of {token!r}) is not in model `{config.model}`'s tokenizer")
                source_id = self.original_vocabs[config.model][config.token]
            if not 0 <= source_id < tensors[config.model].shape[0]:
                raise IncompatibleModelsError(f"token id {source_id} (source of {token!r}) is out of range for model `{config.model}`")
            return tensors[config.model][source_id]
        source_id = self.permutations[config.model][token_id]
        if source_id < 0:
            raise IncompatibleModelsError(f"token {token!r} takes its embedding from model `{config.model}`, whose tokenizer lacks it")
        return tensors[config.model][source_id]


def build_output_vocabulary(config: MergeConfig, models: Mapping[str, InputModel], source_model: InputModel | None) -> OutputVocabulary | None:
    """The output tokenizer and the permutations, or None when the config asks for no tokenizer handling."""
    settings = config.tokenizer
    source = settings.source if settings is not None else config.tokenizer_source
    if source is None:
        return None
    referenced = list(models)
    base_reference = config.base_model or referenced[0]
    tokenizers = {base_reference: stripped_tokenizer(models[base_reference])}
    for reference in referenced:
        if reference not in tokenizers:
            tokenizers[reference] = _load_tokenizer(models[reference])
    if source == "base":
        output = tokenizers[base_reference]
    elif source == "union":
        output = union_tokenizer(tokenizers[base_reference], tokenizers, models)
    else:
        output = _load_tokenizer(source_model)
    added = list(settings.tokens) if settings is not None else []
    existing = set(output.get_vocab())
    for token in added:
        if token not in existing:
            output.add_tokens(token)
            existing.add(token)
    vocab = output.get_vocab()
    permutations = {}
    for reference in referenced:
        own = tokenizers[reference].get_vocab()
        rows = models[reference].hf_config.get("vocab_size") or len(own)
        permutation = np.full(len(vocab), -1, np.int64)
        for token, index in vocab.items():
            if token in own and own[token] < rows:
                permutation[index] = own[token]
        permutations[reference] = permutation
    size = len(vocab)
    multiple = settings.pad_to_multiple_of if settings is not None else None
    if multiple and size % multiple:
        size += multiple - size % multiple
    return OutputVocabulary(output, vocab, size, permutations, {r: t.get_vocab() for r, t in tokenizers.items()},
                            config.base_model, dict(settings.tokens) if settings is not None else {})
