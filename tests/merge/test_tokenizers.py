"""Models with different vocabularies merge as mergekit merges them: `tokenizer_source` (union, base, a
model) and the `tokenizer:` block build one output tokenizer and re-index every embedding row to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bmx.merge import run_merge
from merge.merge_testing import SQUARE, assert_same_tensors, build_model, run_mergekit, tokenizer_files, write_config


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> Path:
    """`tok_base` (64 words), `tok_pad` (the same words plus an added `<pad>`, 65 rows) and `tok_zebra`
    (the last word renamed `zebra`)."""
    root = tmp_path_factory.mktemp("vocab_models")
    build_model(root / "tok_base", seed=20, **SQUARE)
    tokenizer_files(root / "tok_base", 64)
    build_model(root / "tok_pad", seed=21, **{**SQUARE, "vocab_size": 65})
    tokenizer_files(root / "tok_pad", 64, pad_token="<pad>")
    build_model(root / "tok_zebra", seed=22, **SQUARE)
    tokenizer_files(root / "tok_zebra", 64, last_token="zebra")
    return root


def _vocabulary(directory: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory)).get_vocab()


def merge_both(models: Path, tmp_path: Path, config: dict) -> tuple[Path, Path]:
    run_merge(write_config(models / f"{tmp_path.name}.yaml", config), tmp_path / "bmx")
    run_mergekit(config, models, tmp_path / "mergekit")
    ours, reference = tmp_path / "bmx", tmp_path / "mergekit"
    assert_same_tensors(ours, reference)
    assert _vocabulary(ours) == _vocabulary(reference)
    rows = [json.loads((d / "config.json").read_text())["vocab_size"] for d in (ours, reference)]
    assert rows[0] == rows[1]
    return ours, reference


LINEAR = {
    "models": [{"model": "tok_base", "parameters": {"weight": 0.5}}, {"model": "tok_pad", "parameters": {"weight": 0.3}},
               {"model": "tok_zebra", "parameters": {"weight": 0.2}}],
    "merge_method": "linear",
    "base_model": "tok_base",
    "dtype": "float32",
}


@pytest.mark.parametrize("source", ["union", "tok_zebra"])
def test_tokenizer_source_matches_mergekit(vocab_models, tmp_path, source):
    ours, _ = merge_both(vocab_models, tmp_path, {**LINEAR, "tokenizer_source": source})
    vocabulary = _vocabulary(ours)
    if source == "union":  # every model's tokens: the base's 64 words, zebra, <pad>
        assert len(vocabulary) == 66 and {"zebra", "<pad>", "w63"} <= set(vocabulary)
    else:
        assert "zebra" in vocabulary and "w63" not in vocabulary and len(vocabulary) == 64


def test_tokenizer_block_with_token_sources_and_padding_matches_mergekit(vocab_models, tmp_path):
    config = {
        "models": [{"model": "tok_pad", "parameters": {"weight": 0.7}}, {"model": "tok_zebra", "parameters": {"weight": [0.2, 0.6]}}],
        "merge_method": "task_arithmetic",
        "base_model": "tok_base",
        "dtype": "float32",
        "tokenizer": {  # with `source: base` mergekit 0.1.5 fails on added tokens (KeyError), so union
            "source": "union",
            "tokens": {
                "<pad>": {"source": "tok_pad"},
                "w5": {"source": {"kind": "model_token", "model": "tok_zebra", "token": "w6"}, "force": True},
                "<extra>": {"source": {"kind": "zero"}},
            },
            "pad_to_multiple_of": 8,
        },
    }
    ours, _ = merge_both(vocab_models, tmp_path, config)
    assert json.loads((ours / "config.json").read_text())["vocab_size"] == 72  # 64 + zebra + <pad> + <extra>, padded to 8
