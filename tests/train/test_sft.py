"""`task: sft`: LoRA fine-tuning through the same trainer, on real MedQA questions in the evaluation format."""

import json

import numpy as np
import pytest
from hf_reference import save_tiny_hf_model

from bmx.config_io import from_dict
from bmx.convert import hf_to_bmx
from bmx.data.loader import make_loader
from bmx.data.prepare_sft import SFTSettings, prepare_sft
from bmx.tasks.catalog import load_task
from bmx.model.checkpoint import read_params
from bmx.tokenizer import load_tokenizer
from bmx.train.config import RunConfig
from bmx.train.loop import train

SEQ_LEN = 512


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A tiny random Mistral with the real 32000-piece vocabulary, as a bmx checkpoint.

    Weights ten times HF's default scale: with std 0.02 a 64-wide frozen LM head cannot move any
    logit by more than ~1.3, so no adapter could make the answer likely (the loss floor would be ~9).
    """
    root = tmp_path_factory.mktemp("sft_base")
    save_tiny_hf_model(root / "hf", vocab_size=32000, sliding_window=128, max_position_embeddings=SEQ_LEN,
                       initializer_range=0.2)
    hf_to_bmx(root / "hf", root / "bmx", progress=False)
    return root / "bmx"


@pytest.fixture(scope="module")
def medqa_sft(tmp_path_factory, shared_data):
    # The shared data has only MedQA's test split: fine for checking that fine-tuning learns.
    out = tmp_path_factory.mktemp("sft_data") / "medqa"
    prepare_sft(shared_data / "eval", out, SFTSettings(tasks=("medqa",), question_split="test", seq_len=SEQ_LEN),
                progress=False)
    return out


def test_prepared_rows_are_the_packed_examples_with_an_answer_only_loss(medqa_sft, shared_data):
    manifest = json.loads((medqa_sft / "manifest.json").read_text())
    questions = load_task("medqa", shared_data / "eval").questions
    assert manifest["documents"] + sum(manifest["left_out_too_long"].values()) == len(questions) == 1273
    batch = next(make_loader(medqa_sft, split="train", global_batch_size=4, process_index=0, process_count=1,
                             num_epochs=1))
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    # Every counted position predicts an answer letter or the EOS after it.
    tokenizer = load_tokenizer()
    counted = batch["targets"][batch["loss_mask"] > 0]
    letters = {tokenizer.encode(f"({letter}")[-1] for letter in "ABCD"} | {tokenizer.eos_id}
    assert set(counted.tolist()) <= letters
    examples = int(batch["segment_ids"].max(axis=1).sum())
    assert batch["loss_mask"].sum() == 2 * examples  # the letter and the EOS of each packed example


def test_sft_lowers_the_answer_loss_trains_only_adapters_and_writes_peft_and_merged_models(
        tmp_path, base_checkpoint, medqa_sft):
    config = from_dict(RunConfig, {
        "run_dir": str(tmp_path / "run"), "task": "sft", "init": {"from": str(base_checkpoint)},
        "data": {"path": str(medqa_sft)}, "lora": {"rank": 8, "alpha": 16, "dropout": 0.05},
        "train": {"steps": 8, "global_batch_size": 8, "eval_every": 8, "eval_batches": 2},
        "optimizer": {"learning_rate": 2e-2, "weight_decay": 0.0}, "schedule": {"decay": "constant"},
        "checkpoint": {"every": 100}, "logging": {"tensorboard": False, "progress": False},
    })
    train(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 2.0, losses
    assert records[-1]["eval_loss"] < losses[0] - 2.0

    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8
    assert (adapter / "adapter_model.safetensors").is_file()
    base, merged = read_params(base_checkpoint), read_params(tmp_path / "run" / "model")
    layers, merged_layers = base["model"]["layers"], merged["model"]["layers"]
    np.testing.assert_array_equal(merged["model"]["embed_tokens"]["weight"], base["model"]["embed_tokens"]["weight"])
    np.testing.assert_array_equal(merged_layers["input_layernorm"]["weight"], layers["input_layernorm"]["weight"])
    for parent, projection in (("self_attn", "q_proj"), ("mlp", "down_proj")):
        assert not np.array_equal(merged_layers[parent][projection]["kernel"], layers[parent][projection]["kernel"])


def test_sft_needs_a_base_checkpoint(tmp_path, medqa_sft):
    config = from_dict(RunConfig, {"run_dir": str(tmp_path / "run"), "task": "sft", "model": {"preset": "tiny"},
                                   "data": {"path": str(medqa_sft)}})
    with pytest.raises(ValueError, match="init.from"):
        train(config)


def test_qlora_trains_adapters_on_an_nf4_base_and_merges_them_into_the_float_base(tmp_path, base_checkpoint,
                                                                                    medqa_sft):
    from bmx.train.setup import build

    config = from_dict(RunConfig, {
        "run_dir": str(tmp_path / "run"), "task": "sft", "init": {"from": str(base_checkpoint)},
        "data": {"path": str(medqa_sft)}, "lora": {"rank": 8, "alpha": 16, "dropout": 0.0, "base_quantization": "nf4"},
        "train": {"steps": 8, "global_batch_size": 8},
        "optimizer": {"learning_rate": 2e-2, "weight_decay": 0.0}, "schedule": {"decay": "constant"},
        "checkpoint": {"every": 100}, "logging": {"tensorboard": False, "progress": False},
    })
    setup = build(config)
    _, frozen = setup.trainable.start(read_params(base_checkpoint, setup.trainable.abstract_base))
    q_proj = frozen["model"]["layers"]["self_attn"]["q_proj"]["base"]
    assert "kernel" not in q_proj and q_proj["packed"].dtype == np.uint8  # the base is held in 4 bits

    train(config)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 2.0, losses
    base, merged = read_params(base_checkpoint), read_params(tmp_path / "run" / "model")
    merged_kernel = merged["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    base_kernel = base["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    # The float base plus the rank-8 update: folding into the 4-bit base would add full-rank rounding error.
    for layer in range(merged_kernel.shape[0]):
        update = (merged_kernel[layer] - base_kernel[layer]).astype(np.float64)
        singular_values = np.linalg.svd(update, compute_uv=False)
        assert singular_values[0] > 0 and singular_values[8] < 1e-5 * singular_values[0]
