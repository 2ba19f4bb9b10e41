"""The Mistral architecture's hyper-parameters, their HF `config.json` form, and named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MistralConfig:
    """Architecture of a Mistral model. Every field is used by bmx; anything else is rejected."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads, as transformers does
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # None: full causal attention
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MistralConfig.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")

    def num_parameters(self) -> int:
        embed = self.vocab_size * self.hidden_size
        attention = self.hidden_size * self.head_dim * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        mlp = 3 * self.hidden_size * self.intermediate_size
        per_layer = attention + mlp + 2 * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_hidden_layers * per_layer + self.hidden_size + head

    # ---- Hugging Face config.json --------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf_config: dict[str, Any]) -> MistralConfig:
        """Read a transformers `config.json` dict; unknown or unsupported settings are errors."""
        fields = {field.name for field in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in hf_config.items():
            if key in fields:
                values[key] = value
            elif key == "rope_parameters":
                values.update(_rope_theta_from_parameters(value))
            elif key in _HF_REQUIRED_VALUES:
                if value not in _HF_REQUIRED_VALUES[key]:
                    raise ValueError(
                        f"config.json: {key}={value!r} is not supported by bmx's Mistral "
                        f"(expected one of {_HF_REQUIRED_VALUES[key]!r})"
                    )
            elif key not in _HF_IGNORED_KEYS:
                raise ValueError(
                    f"config.json: unknown field {key!r}; bmx refuses settings it cannot honour "
                    f"(known fields: {sorted(fields)})"
                )
        if "head_dim" in values and values["head_dim"] is None:
            del values["head_dim"]
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """A transformers `config.json` dict for `MistralForCausalLM`."""
        hf = dataclasses.asdict(self)
        hf.update(
            architectures=["MistralForCausalLM"],
            model_type="mistral",
            hidden_act="silu",
            attention_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            use_cache=True,
        )
        return hf

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MistralConfig:
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"unknown MistralConfig fields {unknown}; valid fields: {sorted(fields)}")
        return cls(**values)


def _rope_theta_from_parameters(rope_parameters: dict[str, Any] | None) -> dict[str, Any]:
    """transformers ≥ 5 nests rope settings; only the default (unscaled) rope is supported."""
    if not rope_parameters:
        return {}
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"config.json: rope_type={rope_type!r} is not supported by bmx (only 'default')")
    extra = set(rope_parameters) - {"rope_type", "rope_theta"}
    if extra:
        raise ValueError(f"config.json: unsupported rope_parameters {sorted(extra)}")
    return {"rope_theta": rope_parameters["rope_theta"]} if "rope_theta" in rope_parameters else {}


# Settings that change the computation: bmx implements exactly these values.
_HF_REQUIRED_VALUES: dict[str, tuple] = {
    "model_type": ("mistral",),
    "hidden_act": ("silu",),
    "attention_dropout": (0.0, 0),
    "rope_scaling": (None,),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "pretraining_tp": (1,),
}

# Bookkeeping fields transformers writes that do not affect the computation.
_HF_IGNORED_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "use_cache", "_name_or_path", "output_hidden_states", "output_attentions", "return_dict",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task",
    "add_cross_attention", "tie_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "torchscript", "pruned_heads", "_attn_implementation_autoset", "layer_types",
})


PRESETS: dict[str, MistralConfig] = {
    # BioMistral-7B's shape (Mistral-7B v0.1 and Instruct-v0.1).
    "mistral-7b-v0.1": MistralConfig(),
    "mistral-7b-v0.2": MistralConfig(sliding_window=None, rope_theta=1_000_000.0),
    "mistral-7b-v0.3": MistralConfig(vocab_size=32768, sliding_window=None, rope_theta=1_000_000.0),
    # Runs a training step in well under a second on a laptop CPU; the real vocabulary so real tokens fit.
    "tiny": MistralConfig(
        vocab_size=32000, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, sliding_window=128, rms_norm_eps=1e-5,
    ),
}


def preset(name: str, **overrides: Any) -> MistralConfig:
    """A named architecture (`mistral-7b-v0.1`, `mistral-7b-v0.2`, `mistral-7b-v0.3`, `tiny`), optionally changed."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
    if "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & set(overrides):
        overrides["head_dim"] = None  # re-derive it from the new shape
    return dataclasses.replace(base, **overrides)
