"""Bad merges fail before anything is written, with one line naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bmx.convert.safetensors_io import CheckpointFormatError, SafetensorsReader
from bmx.merge import IncompatibleModelsError, MergeConfigError, run_merge
from bmx.merge.__main__ import main
from merge.merge_testing import build_model, tokenizer_files, write_config


@pytest.fixture(scope="module")
def odd_models(tiny_models) -> Path:
    """Models that cannot be merged with `base`, each for one reason, beside the tiny models."""
    root = tiny_models
    build_model(root / "wider_mlp", seed=4, intermediate_size=96)
    build_model(root / "bigger_vocab", seed=5, vocab_size=130)
    shutil.copytree(root / "base", root / "llama")
    config = json.loads((root / "llama" / "config.json").read_text())
    (root / "llama" / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    for name, last_token in (("base_tok", None), ("renamed_tok", "zebra")):
        shutil.copytree(root / "base", root / name)
        tokenizer_files(root / name, 128, last_token=last_token)
    shutil.copytree(root / "base", root / "long_rope")
    (root / "long_rope" / "config.json").write_text(json.dumps({**config, "rope_theta": 1e6}))
    shutil.copytree(root / "wider_mlp", root / "lying_mlp")  # says 128 like base, stores 96
    (root / "lying_mlp" / "config.json").write_text(json.dumps(config))
    (root / "pickled").mkdir()
    shutil.copy(root / "base" / "config.json", root / "pickled")
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"not really a pickle")
    return root


def two_model_ties(first: str, second: str) -> dict:
    return {
        "models": [{"model": first}, {"model": second, "parameters": {"weight": 0.5, "density": 0.5}}],
        "merge_method": "ties",
        "base_model": first,
        "dtype": "float32",
    }


def slerp(first: str, second: str, **overrides) -> dict:
    return {
        "slices": [{"sources": [{"model": first, "layer_range": [0, 4]}, {"model": second, "layer_range": [0, 4]}]}],
        "merge_method": "slerp",
        "base_model": first,
        "parameters": {"t": 0.5},
        **overrides,
    }


CASES = {
    "architecture field": (two_model_ties("base", "wider_mlp"), IncompatibleModelsError, r"intermediate_size differs between \S+/base/config.json \(128\) and \S+/wider_mlp/config.json \(96\)"),
    "rope_theta": (slerp("base", "long_rope"), IncompatibleModelsError, r"rope_theta differs between \S+/base/config.json \(10000.0\) and \S+/long_rope/config.json \(1000000.0\)"),
    "shapes": (two_model_ties("base", "lying_mlp"), IncompatibleModelsError, r"tensor 'model.layers.0.mlp.up_proj.weight': shapes differ between models \{'base': \(128, 64\), 'lying_mlp': \(96, 64\)\}"),
    "della window": ({**two_model_ties("base", "other"), "merge_method": "della", "parameters": {"epsilon": 0.5}}, MergeConfigError, r"model `other`, tensor 'model.embed_tokens.weight': epsilon 0.5 must keep density ± epsilon inside \(0, 1\) \(density 0.5\)"),
    "two for passthrough": ({**two_model_ties("base", "other"), "merge_method": "passthrough", "models": [{"model": "base"}, {"model": "other"}]}, MergeConfigError, r"passthrough needs exactly 1 input models, got 2"),
    "two for model_stock": ({**two_model_ties("base", "other"), "merge_method": "model_stock", "models": [{"model": "base"}, {"model": "other"}]}, MergeConfigError, r"model_stock needs at least 3 input models, got 2"),
    "three for nuslerp": ({"models": [{"model": m, "parameters": {"weight": 1}} for m in ("other", "tuned_a", "tuned_b")], "merge_method": "nuslerp", "base_model": "base"}, MergeConfigError, r"nuslerp needs exactly 2 models besides the base, got 3"),
    "whole max_iter": ({"models": [{"model": "base"}, {"model": "other"}], "merge_method": "karcher", "parameters": {"max_iter": 2.5}}, MergeConfigError, r"parameter `max_iter` must be a whole number, got 2.5"),
    "vocab size": (two_model_ties("base", "bigger_vocab"), IncompatibleModelsError, r"different vocabularies \(vocab_size 128 vs 130\)"),
    "tokenizer vocab": (two_model_ties("base_tok", "renamed_tok"), IncompatibleModelsError, r"different tokenizer vocabularies \(e.g. \('w127', 127\)\)"),
    "architecture": (two_model_ties("base", "llama"), IncompatibleModelsError, r"model `llama`: architecture \['LlamaForCausalLM'\] is not one bmx.merge knows"),
    "pickled": (two_model_ties("base", "pickled"), CheckpointFormatError, r"pytorch_model.bin: pickled PyTorch checkpoints are refused"),
    "missing model": (two_model_ties("base", "nowhere"), FileNotFoundError, r"model `nowhere`: no such directory"),
    "method": ({**two_model_ties("base", "other"), "merge_method": "frankenmerge"}, MergeConfigError, r"merge_method `frankenmerge` is not one of mergekit's; expected one of \['arcee_fusion', 'breadcrumbs'"),
    "foreign parameter": (slerp("base", "other", parameters={"t": 0.5, "density": 0.3}), MergeConfigError, r"`density` is not a parameter of slerp"),
    "missing t": (slerp("base", "other", parameters={}), MergeConfigError, r"missing required parameter `t`"),
    "missing weight": ({**two_model_ties("base", "other"), "models": [{"model": "base"}, {"model": "other"}]}, MergeConfigError, r"model `other`, tensor 'model.embed_tokens.weight': missing required parameter `weight`"),
    "three for slerp": ({**slerp("base", "other"), "slices": [{"sources": [{"model": m, "layer_range": [0, 4]} for m in ("base", "other", "tuned_a")]}]}, MergeConfigError, r"slerp needs exactly 2 input models, got 3"),
    "no base": ({k: v for k, v in two_model_ties("base", "other").items() if k != "base_model"}, MergeConfigError, r"ties needs a `base_model`"),
    "base not a source": (slerp("base", "other", base_model="tuned_a"), MergeConfigError, r"base_model `tuned_a` is not among the sources \['base', 'other'\]"),
    "layer range": ({**slerp("base", "other"), "slices": [{"sources": [{"model": "base", "layer_range": [0, 4]}, {"model": "other", "layer_range": [1, 5]}]}]}, MergeConfigError, r"layer_range \[1, 5\] of `other` exceeds its 4 layers"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_merge_fails_before_writing(odd_models, tmp_path, case):
    config, error, message = CASES[case]
    with pytest.raises(error, match=message):
        run_merge(write_config(odd_models / f"{tmp_path.name}.yaml", config), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # no output, no half-built staging directory


def test_existing_output_is_left_untouched(tiny_models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        run_merge(write_config(tiny_models / f"{tmp_path.name}.yaml", slerp("base", "other")), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_unavailable_device_is_named(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"device 'tpu': JAX has no such backend here \(available: \['cpu'\]\)"):
        run_merge(write_config(tiny_models / f"{tmp_path.name}.yaml", slerp("base", "other")), tmp_path / "out", device="tpu")


def test_cli_reports_one_line_and_exit_code_2(odd_models, tmp_path, capsys):
    config = write_config(odd_models / f"{tmp_path.name}.yaml", two_model_ties("base", "lying_mlp"))
    assert main([str(config), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and error.startswith("bmx merge: error: tensor 'model.layers.0.mlp.up_proj.weight': shapes differ")
    assert not (tmp_path / "out").exists()


def test_tokenizer_comes_from_tokenizer_source_else_the_base(odd_models, tmp_path):
    shutil.copytree(odd_models / "base_tok", odd_models / f"{tmp_path.name}_long")
    tokenizer_files(odd_models / f"{tmp_path.name}_long", 128, max_length=4096)
    long_name = f"{tmp_path.name}_long"
    run_merge(write_config(odd_models / f"{tmp_path.name}_a.yaml", slerp("base_tok", long_name)), tmp_path / "default")
    run_merge(write_config(odd_models / f"{tmp_path.name}_b.yaml", slerp("base_tok", long_name, tokenizer_source=long_name)), tmp_path / "chosen")
    max_length = lambda out: json.loads((out / "tokenizer_config.json").read_text())["model_max_length"]  # noqa: E731
    assert max_length(tmp_path / "default") == 512 and max_length(tmp_path / "chosen") == 4096


def test_output_config_counts_the_sliced_layers_and_takes_the_dtype(tiny_models, tmp_path):
    config = {**slerp("base", "other"), "dtype": "bfloat16"}
    config["slices"] = [{"sources": [{"model": "base", "layer_range": [1, 3]}, {"model": "other", "layer_range": [0, 2]}]}]
    run_merge(write_config(tiny_models / f"{tmp_path.name}.yaml", config), tmp_path / "out", out_shard_size="100KB")
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == 2 and hf_config["dtype"] == "bfloat16"
    merged = SafetensorsReader(tmp_path / "out")  # sharded, with an index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert not any("layers.2." in name for name in merged.names())
