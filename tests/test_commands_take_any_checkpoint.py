"""Every command that takes a model reads all three kinds, local or on an object store (`gs://`).

A Hugging Face directory on the fake GCS of `object_store.py` (read in memory, no temporary copy)
must give what the same weights converted to a local bmx checkpoint give; that path is itself
checked against transformers by the commands' own tests.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from hf_reference import save_tiny_hf_model
from object_store import upload

from bmx import checkpoints
from bmx.convert import hf_to_bmx
from bmx.tokenizer import mistral_v01_model_path

REMOTE_HF = "gs://models/biomistral-tiny"
PROMPT = "Aspirin inhibits"


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory):
    """(hf, bmx, reference): an HF directory carrying Mistral v0.1's tokenizer, and its bmx conversion."""
    root = tmp_path_factory.mktemp("any_checkpoint")
    reference = save_tiny_hf_model(root / "hf", seed=7, vocab_size=32000, sliding_window=8, max_shard_size="300KB")
    shutil.copy(mistral_v01_model_path(), root / "hf" / "tokenizer.model")
    hf_to_bmx(root / "hf", root / "bmx", progress=False)
    return root / "hf", root / "bmx", reference


@pytest.fixture
def remote_hf(local_dirs, fake_gcs):
    upload(local_dirs[0], REMOTE_HF)
    return REMOTE_HF


def test_the_tokenizer_of_a_remote_hf_directory_is_read_from_it(remote_hf):
    from bmx.tokenizer import load_tokenizer

    assert checkpoints.find_tokenizer(remote_hf) == remote_hf
    tokenizer = load_tokenizer(checkpoints.find_tokenizer(remote_hf))
    assert tokenizer.source == remote_hf and tokenizer.encode(PROMPT) == load_tokenizer().encode(PROMPT)


def test_generate_from_a_remote_hf_directory_matches_transformers(remote_hf, local_dirs, tmp_path):
    from bmx.generate.__main__ import main
    from bmx.tokenizer import load_tokenizer

    output = tmp_path / "out.jsonl"
    assert main(["--ckpt", remote_hf, "--prompt", PROMPT, "--greedy", "--max-new-tokens", "6", "--output",
                 str(output), "--quiet"]) == 0
    prompt_ids = load_tokenizer().encode(PROMPT, add_bos=True)
    with torch.no_grad():
        expected = local_dirs[2].generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=6)
    assert json.loads(output.read_text())["token_ids"] == expected[0, len(prompt_ids):].tolist()


def test_eval_from_a_remote_hf_directory_scores_like_the_local_bmx_checkpoint(remote_hf, local_dirs, tmp_path,
                                                                             shared_data):
    from bmx.eval.__main__ import main

    def predictions(ckpt, out):
        assert main(["--ckpt", ckpt, "--tasks", "medqa", "--limit", "3", "--seeds", "1", "--shots", "0",
                     "--data-dir", str(shared_data / "eval"), "--no-plots", "--out", str(out)]) == 0
        return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]

    remote, local = predictions(remote_hf, tmp_path / "remote"), predictions(str(local_dirs[1]), tmp_path / "local")
    assert len(remote) == 3 and [r["prediction"] for r in remote] == [r["prediction"] for r in local]
    probabilities = lambda records: [list(r["letter_probs"].values()) for r in records]  # noqa: E731
    np.testing.assert_allclose(probabilities(remote), probabilities(local), rtol=1e-5, atol=1e-6)


def test_quant_from_a_remote_hf_directory_equals_quantizing_the_local_bmx_checkpoint(remote_hf, local_dirs, tmp_path):
    from bmx.model.checkpoint import read_params
    from bmx.quant.pipeline import quantize_checkpoint

    quantize_checkpoint(remote_hf, tmp_path / "remote", "nf4", progress=False)
    quantize_checkpoint(local_dirs[1], tmp_path / "local", "nf4", progress=False)
    remote, local = read_params(tmp_path / "remote"), read_params(tmp_path / "local")
    assert jax.tree.structure(remote) == jax.tree.structure(local)
    for a, b in zip(jax.tree.leaves(remote), jax.tree.leaves(local)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert checkpoints.checkpoint_kind(tmp_path / "remote") == "quantized"
    model, _ = checkpoints.load(tmp_path / "remote")  # the quantized kind, through the one loader
    assert np.isfinite(np.asarray(model(np.array([[1, 5, 9]])))).all()


def test_train_init_from_reads_an_hf_directory_as_its_converted_parameters(local_dirs):
    from flax import nnx

    from bmx.model import Mistral

    config = checkpoints.read_model_config(local_dirs[0])
    target = nnx.state(nnx.eval_shape(lambda: Mistral(config)), nnx.Param).to_pure_dict()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, "bfloat16"), target)
    from_hf = checkpoints.read_params(local_dirs[0], target, dtype="bfloat16")
    from_bmx = checkpoints.read_params(local_dirs[1], target, dtype="bfloat16")
    assert jax.tree.structure(from_hf) == jax.tree.structure(from_bmx)
    for a, b in zip(jax.tree.leaves(from_hf), jax.tree.leaves(from_bmx)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_quantized_checkpoint_cannot_start_training(local_dirs, tmp_path):
    from bmx.quant.pipeline import quantize_checkpoint

    quantize_checkpoint(local_dirs[1], tmp_path / "q", "int8", progress=False)
    with pytest.raises(ValueError, match=r"q: a quantized checkpoint holds no float parameters"):
        checkpoints.read_params(tmp_path / "q", {})
