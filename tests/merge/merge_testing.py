"""Test helpers for bmx.merge: tiny random Mistral models saved as HF directories, and mergekit
(run in-process on CPU) as the reference implementation."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from bmx.convert.safetensors_io import SafetensorsReader

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def tokenizer_files(directory: Path, vocab_size: int, max_length: int = 512, last_token: str | None = None,
                    pad_token: str | None = None) -> None:
    """A word-level tokenizer with `vocab_size` tokens (so mergekit's vocabulary path is an identity).

    `last_token` renames the last token: same size, different vocabulary. `pad_token` adds a special
    token after the words (id `vocab_size`), as BioMistral's training added `<pad>`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab_size)]
    if last_token is not None:
        words[-1] = last_token
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", model_max_length=max_length)
    if pad_token is not None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    tokenizer.save_pretrained(directory)


# Every matrix 64 x 64 and two layers: each jitted merge kernel compiles for two shapes only.
SQUARE = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)


def build_model(directory: Path, seed: int, like: Path | None = None, noise: float = 0.0, norm_noise: float = 0.1,
                changed_fraction: float = 1.0, **overrides) -> Path:
    """A random MistralForCausalLM saved with save_pretrained (float32 safetensors).

    With `like`, start from that model's weights plus Gaussian `noise` (a fine-tune of it); norm
    weights get their own relative noise so SLERP sees both collinear and non-collinear tensors.
    `changed_fraction` < 1 leaves the other entries exactly equal to `like`'s (a sparse fine-tune).
    """
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(**{**TINY, **overrides})
    model = MistralForCausalLM(config)
    with torch.no_grad():
        if like is not None:
            reference = SafetensorsReader(like)
            for name, parameter in model.named_parameters():
                start = torch.from_numpy(np.array(reference.read(name)))
                if "norm" in name:
                    changed = start * (1 + norm_noise * torch.randn_like(start))
                else:
                    changed = start + noise * torch.randn_like(start)
                if changed_fraction < 1:
                    changed = torch.where(torch.rand_like(start) < changed_fraction, changed, start)
                parameter.copy_(changed)
        else:
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.copy_(1 + norm_noise * torch.randn_like(parameter))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def absolute_models(config: dict, root: Path) -> dict:
    """The same config with model names made absolute paths (mergekit resolves against the cwd)."""
    def fix(value):
        if isinstance(value, dict):
            # `source: base|union` (tokenizer blocks) are keywords, not models; a model may be named `base`.
            return {k: (str(root / v) if k in ("model", "base_model", "source") and isinstance(v, str)
                        and not (k == "source" and v in ("base", "union")) else fix(v))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    fixed = fix(config)
    if isinstance(config.get("tokenizer_source"), str) and config["tokenizer_source"] not in ("base", "union"):
        fixed["tokenizer_source"] = str(root / config["tokenizer_source"])
    return fixed


def run_mergekit(config: dict, root: Path, out_dir: Path) -> Path:
    """The reference: mergekit 0.1.5's own run_merge on CPU, in this process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(device="cpu", write_model_card=False, quiet=True, copy_tokenizer=True)
    run_merge(MergeConfiguration.model_validate(absolute_models(config, root)), str(out_dir), options)
    return out_dir


def assert_same_tensors(ours: Path, reference: Path, atol: float = 1e-6, rtol: float = 0.0) -> None:
    """Every tensor of the two outputs is present in both, with the same shape, dtype and values."""
    a, b = SafetensorsReader(ours), SafetensorsReader(reference)
    assert sorted(a.names()) == sorted(b.names())
    for name in b.names():
        x, y = np.asarray(a.read(name)), np.asarray(b.read(name))
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), atol=atol, rtol=rtol, err_msg=name)


class InjectedMasks:
    """The same keep masks for bmx and mergekit: uniform draws u per (tensor name, non-base position),
    kept where u < the keep probability each side computed (DARE's density, DELLA's per-entry probabilities),
    so equal outputs also prove equal probabilities."""

    def __init__(self, names_and_shapes, inputs: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.uniforms = {(name, i): rng.random(shape) for name, shape in names_and_shapes for i in range(inputs)}
        self.used: set = set()

    def keep(self, tensor_name, input_index, probabilities) -> np.ndarray:
        probabilities = np.asarray(probabilities, np.float32)
        uniform = self.uniforms[(tensor_name, input_index)]
        return uniform.reshape(probabilities.shape) < probabilities if probabilities.ndim else uniform < probabilities

    def __call__(self, tensor_name, input_index, shape, density):
        self.used.add((tensor_name, input_index))
        return jnp.asarray(self.keep(tensor_name, input_index, density).reshape(shape))

    def sample_indices(self, tensor_name, size, count):
        raise AssertionError("tiny tensors never need a quantile sample")


def inject_into_mergekit(monkeypatch, masks: InjectedMasks) -> None:
    """Make mergekit draw `masks` instead of torch.bernoulli: track which tensor and input it is on."""
    import torch
    from mergekit.merge_methods import generalized_task_arithmetic as gta

    state = {"name": None, "position": -1}
    merge_group, sparsify = gta.GeneralizedTaskArithmeticMerge.merge_group, gta.sparsify

    def tracking_merge_group(self, group, **parameters):
        state.update(name=group.metadata.name, position=-1)
        return merge_group(self, group, **parameters)

    def counting_sparsify(*args, **kwargs):  # called once per non-base input, in order
        state["position"] += 1
        return sparsify(*args, **kwargs)

    def injected_bernoulli(probabilities, *args, **kwargs):
        mask = masks.keep(state["name"], state["position"], probabilities.float().numpy())
        return torch.from_numpy(mask).to(probabilities.dtype)

    monkeypatch.setattr(gta.GeneralizedTaskArithmeticMerge, "merge_group", tracking_merge_group)
    monkeypatch.setattr(gta, "sparsify", counting_sparsify)
    monkeypatch.setattr(torch, "bernoulli", injected_bernoulli)
