"""The merge's input models: where they are, what they contain, and whether they can be merged.

Everything here runs before any output is written, so an incompatible set of models
(architectures, tensor layouts, vocabularies) fails with a message naming the culprit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from bmx.convert import BmxCheckpointReader, open_checkpoint
from bmx.convert.hf import HF_SIDECAR_DIR
from bmx.merge.architecture import ARCHITECTURES, Architecture
from bmx.model.checkpoint import TOKENIZER_DIR
from bmx.model.config import MistralConfig


class IncompatibleModelsError(ValueError):
    """The input models cannot be merged with each other (or the model is not one bmx can merge)."""


@dataclass(frozen=True)
class InputModel:
    reference: str  # as written in the merge config
    path: Path
    weights: Any  # HF tensor names -> arrays, read lazily (`bmx.convert.open_checkpoint`)
    hf_config: dict
    architecture: Architecture
    tokenizer_dir: Path  # where its tokenizer files are (a bmx checkpoint keeps them in a subdirectory)

    @property
    def num_layers(self) -> int:
        return int(self.hf_config[self.architecture.layer_count_key])

    @property
    def config_file(self) -> Path:
        """The file its architecture was read from (named in errors)."""
        if isinstance(self.weights, BmxCheckpointReader):
            return self.path / "bmx_checkpoint.json"
        return self.path / "config.json"


def resolve_model_path(reference: str, config_dir: Path | None) -> Path:
    """A model named in the config: a directory relative to the config file, as given, or in the local HF cache."""
    candidates = []
    if config_dir is not None and not Path(reference).is_absolute():
        candidates.append(config_dir / reference)
    candidates.append(Path(reference))
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    cached = _local_hub_snapshot(reference)
    if cached is not None:
        return cached
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"model `{reference}`: no such directory (looked in {looked} and the local Hugging Face cache)")


def _local_hub_snapshot(reference: str) -> Path | None:
    """A model already downloaded to the Hugging Face cache (never downloads)."""
    if reference.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(reference, local_files_only=True))
    except Exception:  # not cached, or not a valid repo id: the caller reports the paths it tried
        return None


def _hf_config(reference: str, path: Path, weights) -> dict:
    """config.json of an HF directory; for a bmx checkpoint, its model config in HF terms."""
    if isinstance(weights, BmxCheckpointReader):
        sidecar = path / HF_SIDECAR_DIR / "config.json"  # the original HF config, kept by hf_to_bmx
        original = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        return {**original, **weights.config.to_hf()}
    config_file = path / "config.json"
    if not config_file.is_file():
        raise IncompatibleModelsError(f"model `{reference}`: {config_file} not found (an HF model directory needs config.json)")
    return json.loads(config_file.read_text())


def open_model(reference: str, config_dir: Path | None) -> InputModel:
    """An input model, HF safetensors directory or bmx checkpoint, with its config and architecture."""
    path = resolve_model_path(reference, config_dir)
    weights = open_checkpoint(path)
    hf_config = _hf_config(reference, path, weights)
    architectures = hf_config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise IncompatibleModelsError(f"model `{reference}`: architecture {architectures} is not one bmx.merge knows; expected one of {sorted(ARCHITECTURES)}")
    architecture = ARCHITECTURES[architectures[0]]
    if architecture.layer_count_key not in hf_config:
        raise IncompatibleModelsError(f"model `{reference}`: its config has no `{architecture.layer_count_key}`")
    tokenizer_dir = path / TOKENIZER_DIR if isinstance(weights, BmxCheckpointReader) else path
    return InputModel(reference, path, weights, hf_config, architecture, tokenizer_dir)


def _check_tensor_layout(model: InputModel) -> None:
    expected = model.architecture.all_names(model.num_layers)
    present = set(model.weights.names())
    unexpected = sorted(present - set(expected))
    if unexpected:
        raise IncompatibleModelsError(f"model `{model.reference}`: tensor {unexpected[0]!r} is not part of {model.architecture.name} ({len(unexpected)} unexpected)")
    missing = [name for name in expected if name not in present and name not in model.architecture.tied_weights]
    if missing:
        raise IncompatibleModelsError(f"model `{model.reference}`: tensor {missing[0]!r} is missing ({len(missing)} missing)")


def tokenizer_vocabulary(tokenizer_dir: Path) -> dict[str, int] | None:
    """Token -> id from tokenizer.json (model vocabulary plus added tokens), or None without one."""
    file = tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        return None
    tokenizer = json.loads(file.read_text())
    vocab = dict(tokenizer.get("model", {}).get("vocab") or {})
    if isinstance(tokenizer.get("model", {}).get("vocab"), list):  # unigram models: [[piece, score], ...]
        vocab = {piece: index for index, (piece, _score) in enumerate(tokenizer["model"]["vocab"])}
    for added in tokenizer.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    return vocab


# Fields that shape what the network computes; inputs must agree on every one (layer counts may
# differ: slices restack layers; vocabularies may differ: tokenizer_source remaps them).
_DEFAULTS = MistralConfig(num_hidden_layers=1)
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                       "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling", "sliding_window",
                       "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias")


def architecture_value(hf_config: dict, field: str) -> Any:
    """A field's effective value: transformers' defaults filled in, rope_theta found in rope_parameters too."""
    if field == "rope_theta" and "rope_theta" not in hf_config:
        return (hf_config.get("rope_parameters") or {}).get("rope_theta", _DEFAULTS.rope_theta)
    if field == "head_dim" and hf_config.get("head_dim") is None:
        return hf_config["hidden_size"] // hf_config["num_attention_heads"] if "num_attention_heads" in hf_config else None
    if field in hf_config:
        return hf_config[field]
    return getattr(_DEFAULTS, field, None)


def check_same_architecture(first: InputModel, model: InputModel) -> None:
    for field in ARCHITECTURE_FIELDS:
        ours, theirs = architecture_value(first.hf_config, field), architecture_value(model.hf_config, field)
        if ours != theirs:
            raise IncompatibleModelsError(
                f"{field} differs between {first.config_file} ({ours!r}) and {model.config_file} ({theirs!r}); "
                "merged models must share their architecture")


def check_compatible(models: Iterable[InputModel], same_vocabulary: bool = True) -> None:
    """Same architecture, complete tensor layouts and (unless `same_vocabulary` is False, when
    `tokenizer_source` re-indexes the embeddings) the same vocabulary; raises naming the first difference."""
    models = list(models)
    first = models[0]
    for model in models:
        _check_tensor_layout(model)
    for model in models[1:]:
        if model.architecture != first.architecture:
            raise IncompatibleModelsError(f"models `{first.reference}` ({first.architecture.name}) and `{model.reference}` ({model.architecture.name}) have different architectures")
        check_same_architecture(first, model)
        if same_vocabulary and model.hf_config.get("vocab_size") != first.hf_config.get("vocab_size"):
            raise IncompatibleModelsError(
                f"models `{first.reference}` and `{model.reference}` have different vocabularies "
                f"(vocab_size {first.hf_config.get('vocab_size')} vs {model.hf_config.get('vocab_size')}); set tokenizer_source (base, union or a model) to re-index the embeddings"
            )
        has_head = {m.reference: "lm_head.weight" in m.weights for m in (first, model)}
        if len(set(has_head.values())) > 1:
            raise IncompatibleModelsError(f"models `{first.reference}` and `{model.reference}` disagree on tied embeddings (lm_head.weight present: {has_head})")
    if not same_vocabulary:
        return
    vocabularies = [(m.reference, tokenizer_vocabulary(m.tokenizer_dir)) for m in models]
    vocabularies = [(reference, vocab) for reference, vocab in vocabularies if vocab is not None]
    for reference, vocab in vocabularies[1:]:
        if vocab != vocabularies[0][1]:
            differing = sorted(set(vocab.items()) ^ set(vocabularies[0][1].items()))
            raise IncompatibleModelsError(
                f"models `{vocabularies[0][0]}` and `{reference}` have different tokenizer vocabularies "
                f"(e.g. {differing[0]!r}); set tokenizer_source (base, union or a model) to re-index the embeddings"
            )
