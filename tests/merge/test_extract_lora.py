"""`extract-lora` equals mergekit-extract-lora 0.1.5 (float32: every B·A within 2e-6, every factor within
2e-5 up to each SVD component's sign, every full-rank tensor bit for bit) and loads with PEFT."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bmx.merge.__main__ import main


def read_adapter(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def run_mergekit_extract(base, finetuned, out, rank: int, *extra: str):
    from mergekit.scripts.extract_lora import main as mergekit_extract

    mergekit_extract(["--model", str(finetuned), "--base-model", str(base), "--out-path", str(out), "--max-rank", str(rank),
                      "--quiet", *extra], standalone_mode=False)
    return out


# Singular vectors are determined to float32 eps / (gap between singular values): the smallest of a
# full-rank factorisation have tiny gaps, so their factors get a wider tolerance; B·A never does.
@pytest.mark.parametrize("rank, extra, factor_atol", [(8, (), 2e-5), (64, ("--no-distribute-scale",), 1e-4)],
                         ids=["rank8", "full-rank-undistributed"])
def test_extract_lora_matches_mergekit(square_models, tmp_path, rank, extra, factor_atol):
    base, tuned = square_models / "base", square_models / "tuned_b"
    assert main(["extract-lora", str(base), str(tuned), str(tmp_path / "bmx"), "--rank", str(rank), *extra]) == 0
    run_mergekit_extract(base, tuned, tmp_path / "mergekit", rank, *extra)

    ours, theirs = read_adapter(tmp_path / "bmx"), read_adapter(tmp_path / "mergekit")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        if ".lora_A." in name or ".lora_B." in name:
            continue
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    for name in (n for n in theirs if ".lora_A." in n):
        a, a_ref = ours[name], theirs[name]
        b_name = name.replace(".lora_A.", ".lora_B.")
        b, b_ref = ours[b_name], theirs[b_name]
        assert a.shape == a_ref.shape == (rank, 64) and b.shape == b_ref.shape == (64, rank) and a.dtype == a_ref.dtype
        sign = np.sign(np.sum(a * a_ref, axis=1))  # each SVD component is defined up to its sign
        np.testing.assert_allclose(a * sign[:, None], a_ref, atol=factor_atol, err_msg=name)
        np.testing.assert_allclose(b * sign[None], b_ref, atol=factor_atol, err_msg=b_name)
        np.testing.assert_allclose(b @ a, b_ref @ a_ref, atol=2e-6, err_msg=name)

    config, reference = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("bmx", "mergekit"))
    assert sorted(config.pop("target_modules")) == sorted(reference.pop("target_modules"))
    assert config == reference


def test_full_rank_adapter_on_the_base_reproduces_the_fine_tune_in_peft_and_bmx(square_models, tmp_path):
    """Loaded by PeftModel.from_pretrained and by bmx's loader (what `bmx.generate --adapter` runs)."""
    import torch
    from peft import PeftModel
    from transformers import MistralForCausalLM

    from bmx.convert import hf_to_bmx
    from bmx.lora import load_peft_adapter
    from bmx.model import load

    base, tuned = square_models / "base", square_models / "tuned_b"
    assert main(["extract-lora", str(base), str(tuned), str(tmp_path / "adapter"), "--rank", "64"]) == 0
    adapted = PeftModel.from_pretrained(MistralForCausalLM.from_pretrained(base), str(tmp_path / "adapter")).eval()
    reference = MistralForCausalLM.from_pretrained(tuned).eval()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits.numpy()
        np.testing.assert_allclose(adapted(tokens).logits.numpy(), expected, atol=1e-4)

    model, _ = load(hf_to_bmx(base, tmp_path / "base_bmx", progress=False), compute_dtype=np.float32)
    ours = load_peft_adapter(model, tmp_path / "adapter")(tokens.numpy())
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


def test_mismatched_models_are_one_line_errors(square_models, tmp_path, capsys):
    assert main(["extract-lora", str(square_models / "base"), str(tmp_path / "nowhere"), str(tmp_path / "out"), "--rank", "4"]) == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "out").exists()
