"""BioMistral's three published merge configs run unchanged (CLI), on tiny bfloat16 stand-ins for its models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from bmx.convert.safetensors_io import SafetensorsReader
from bmx.merge.__main__ import main
from merge.merge_testing import InjectedMasks, assert_same_tensors, build_model, inject_into_mergekit, run_mergekit, tokenizer_files

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "merge"
INSTRUCT, BIOMISTRAL = "mistralai/Mistral-7B-Instruct-v0.1", "BioMistral/BioMistral-7B"
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=96)


@pytest.fixture(scope="module")
def biomistral_dir(tmp_path_factory) -> Path:
    """A directory holding the configs and 32-layer bf16 models under the names the configs use."""
    import torch

    root = tmp_path_factory.mktemp("biomistral")
    for config in CONFIGS.glob("*.yaml"):
        shutil.copy(config, root / config.name)
    build_model(root / INSTRUCT, seed=10, **SHAPE)
    build_model(root / BIOMISTRAL, seed=11, like=root / INSTRUCT, noise=0.01, norm_noise=0.02, **SHAPE)
    for name in (INSTRUCT, BIOMISTRAL):  # the real checkpoints are bfloat16
        from transformers import MistralForCausalLM

        MistralForCausalLM.from_pretrained(root / name, dtype=torch.bfloat16).save_pretrained(root / name)
        tokenizer_files(root / name, SHAPE["vocab_size"])
    return root


def _check_output(out: Path, models: Path) -> None:
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 32 and config["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (models / INSTRUCT / "tokenizer.json").read_bytes()
    merged = SafetensorsReader(out)
    assert sorted(merged.names()) == sorted(SafetensorsReader(models / INSTRUCT).names())
    assert all(merged.spec(name).dtype.name == "bfloat16" for name in merged.names())


def _mergekit_reference(biomistral_dir: Path, name: str, out: Path) -> Path:
    return run_mergekit(yaml.safe_load((biomistral_dir / f"{name}.yaml").read_text()), biomistral_dir, out)


def test_slerp_config_runs_unchanged_and_matches_mergekit(biomistral_dir, tmp_path):
    assert main([str(biomistral_dir / "slerp.yaml"), str(tmp_path / "bmx"), "--quiet"]) == 0
    _check_output(tmp_path / "bmx", biomistral_dir)
    reference = _mergekit_reference(biomistral_dir, "slerp", tmp_path / "mergekit")
    # Both compute in float32 and round once to bfloat16: at most one bf16 ulp apart.
    assert_same_tensors(tmp_path / "bmx", reference, atol=1e-6, rtol=2**-7)
    summary = json.loads((tmp_path / "bmx" / "bmx_merge_summary.json").read_text())
    assert len(summary["slerp"]) == len(SafetensorsReader(tmp_path / "bmx").names())


def test_ties_config_runs_unchanged_and_matches_mergekit(biomistral_dir, tmp_path):
    assert main([str(biomistral_dir / "ties.yaml"), str(tmp_path / "bmx"), "--quiet"]) == 0
    _check_output(tmp_path / "bmx", biomistral_dir)
    reference = _mergekit_reference(biomistral_dir, "ties", tmp_path / "mergekit")
    _assert_bf16_close(tmp_path / "bmx", reference, may_differ=lambda name: _tied_at_top_k_threshold(biomistral_dir, name, 0.5))


def test_dare_config_runs_unchanged_and_matches_mergekit_with_the_same_masks(biomistral_dir, tmp_path, monkeypatch):
    assert main([str(biomistral_dir / "dare.yaml"), str(tmp_path / "seeded"), "--quiet", "--seed", "1"]) == 0
    _check_output(tmp_path / "seeded", biomistral_dir)

    from bmx.merge import run_merge

    instruct = SafetensorsReader(biomistral_dir / INSTRUCT)
    masks = InjectedMasks([(n, instruct.spec(n).shape) for n in instruct.names()], inputs=1)
    run_merge(biomistral_dir / "dare.yaml", tmp_path / "bmx", drop_masks=masks)
    inject_into_mergekit(monkeypatch, masks)
    _assert_bf16_close(tmp_path / "bmx", _mergekit_reference(biomistral_dir, "dare", tmp_path / "mergekit"))


def _tied_at_top_k_threshold(models: Path, name: str, density: float) -> np.ndarray:
    """Entries whose bf16 delta magnitude equals the k-th largest: which of them TIES keeps is an arbitrary
    tie-break (PyTorch's unstable argsort in mergekit, lowest index first in bmx)."""
    import torch

    base, tuned = (torch.from_numpy(np.asarray(SafetensorsReader(models / m).read(name), np.float32)).bfloat16() for m in (INSTRUCT, BIOMISTRAL))
    magnitudes = (tuned - base).abs().float().reshape(-1)
    keep_count = max(1, int(density * magnitudes.numel()))
    threshold = torch.sort(magnitudes, descending=True).values[keep_count - 1]
    return (magnitudes == threshold).reshape(base.shape).numpy()


def _assert_bf16_close(ours: Path, reference: Path, may_differ=None) -> None:
    """Equal within one bf16 rounding step, except entries `may_differ(name)` marks."""
    a, b = SafetensorsReader(ours), SafetensorsReader(reference)
    assert sorted(a.names()) == sorted(b.names())
    for name in b.names():
        x, y = np.asarray(a.read(name), np.float32), np.asarray(b.read(name), np.float32)
        off = np.abs(x - y) > 2**-7 * np.abs(y) + 1e-6
        if may_differ is not None:
            off &= ~may_differ(name)
        assert not off.any(), f"{name}: {off.sum()} entries differ beyond bf16 rounding"


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_parses_with_known_parameters(name):
    from bmx.merge import load_merge_config
    from bmx.merge.method_specs import check_parameter_names, method_spec

    config = load_merge_config(CONFIGS / f"{name}.yaml")
    spec = method_spec(config.merge_method)
    check_parameter_names(spec, "parameters", config.parameters)
    for source in config.models or [s for sl in config.slices for s in sl.sources]:
        check_parameter_names(spec, source.model, source.parameters)


def test_frankenmerge_config_stacks_40_layers_like_mergekit(biomistral_dir, tmp_path):
    assert main([str(biomistral_dir / "frankenmerge.yaml"), str(tmp_path / "bmx"), "--quiet"]) == 0
    reference = _mergekit_reference(biomistral_dir, "frankenmerge", tmp_path / "mergekit")
    assert_same_tensors(tmp_path / "bmx", reference, atol=0.0)
    assert json.loads((tmp_path / "bmx" / "config.json").read_text())["num_hidden_layers"] == 40
