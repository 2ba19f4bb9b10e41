"""`python -m bmx.convert calibrate`: the LM head divided by T, checked by running the output in transformers."""

import json

import numpy as np
import pytest
import torch
from hf_reference import hf_logits, save_tiny_hf_model
from safetensors import safe_open
from transformers import MistralForCausalLM

from bmx.convert import hf_to_bmx
from bmx.convert.__main__ import main as convert_cli
from bmx.eval.calibration import renormalise
from bmx.eval.evaluate import EvalModel, EvalSettings, evaluate_task, results_document
from bmx.eval.scorers import LogitsFnScorer
from bmx.tasks.catalog import load_task
from bmx.tokenizer import load_tokenizer

MAX_LENGTH = 1024


def _transformers_eval_model(model: MistralForCausalLM) -> EvalModel:
    """The letter protocol run by transformers itself: bmx only builds prompts and reads letters."""
    def logits_fn(input_ids, attention_mask):
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(input_ids, dtype=torch.long),
                         attention_mask=torch.as_tensor(attention_mask, dtype=torch.long)).logits.numpy()

    return EvalModel("transformers", LogitsFnScorer(logits_fn, max_length=MAX_LENGTH), load_tokenizer())


def test_calibrated_checkpoint_gives_the_evals_calibrated_letter_probabilities(tmp_path, shared_data):
    reference = save_tiny_hf_model(tmp_path / "hf", vocab_size=32000, max_position_embeddings=MAX_LENGTH)
    task = load_task("mmlu_anatomy", shared_data / "eval")
    settings = EvalSettings(protocol="biomistral", shots=0, limit=6, calibrate="temperature", progress=False,
                            tokens_per_batch=2048)
    outcome = evaluate_task([_transformers_eval_model(reference)], task, settings)
    results = results_document([outcome], settings, ["tiny"])
    (tmp_path / "results.json").write_text(json.dumps(results))
    temperature = results["calibration"]["model_temperature"]
    assert abs(np.log(temperature)) > 0.05  # a temperature of 1 would leave nothing to check

    assert convert_cli(["calibrate", str(tmp_path / "hf"), str(tmp_path / "out"), "--from-eval",
                        str(tmp_path / "results.json")]) == 0
    calibrated = MistralForCausalLM.from_pretrained(tmp_path / "out").eval()
    plain = EvalSettings(protocol="biomistral", shots=0, limit=6, progress=False, tokens_per_batch=2048)
    after = evaluate_task([_transformers_eval_model(calibrated)], task, plain).runs[0].option_probs
    np.testing.assert_allclose(renormalise(after), outcome.runs[0].calibrated_probs, atol=1e-6)
    assert json.loads((tmp_path / "out" / "calibration.json").read_text())["temperature"] == temperature


@pytest.mark.parametrize("source, tied", [("bmx", False), ("hf", True)])
def test_every_logit_is_divided_by_t_from_a_bmx_or_hf_checkpoint(tmp_path, source, tied):
    reference = save_tiny_hf_model(tmp_path / "hf", tie_word_embeddings=tied)
    src = hf_to_bmx(tmp_path / "hf", tmp_path / "bmx", progress=False) if source == "bmx" else tmp_path / "hf"
    assert convert_cli(["calibrate", str(src), str(tmp_path / "out"), "--temperature", "2.5"]) == 0
    calibrated = MistralForCausalLM.from_pretrained(tmp_path / "out").eval()
    input_ids = np.random.default_rng(0).integers(0, 256, size=(2, 12))
    np.testing.assert_allclose(hf_logits(calibrated, input_ids), hf_logits(reference, input_ids) / 2.5, atol=1e-5)
    assert calibrated.config.tie_word_embeddings is False  # a tied head is untied: the inputs stay as they were
    torch.testing.assert_close(calibrated.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    with safe_open(tmp_path / "out" / "model.safetensors", "np") as handle:
        assert float(handle.metadata()["bmx_calibration_temperature"]) == 2.5


def test_a_vector_scaled_eval_is_refused_in_one_line_and_nothing_is_written(tmp_path, capsys):
    save_tiny_hf_model(tmp_path / "hf")
    (tmp_path / "results.json").write_text(json.dumps({"calibration": {"method": "vector"}}))
    capsys.readouterr()  # transformers' own progress output
    code = convert_cli(["calibrate", str(tmp_path / "hf"), str(tmp_path / "out"), "--from-eval",
                        str(tmp_path / "results.json")])
    error = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in error and "results.json" in error and "temperature" in error
    assert not (tmp_path / "out").exists()
    assert convert_cli(["calibrate", str(tmp_path / "hf"), str(tmp_path / "out"), "--temperature", "-1"]) != 0
    assert not (tmp_path / "out").exists()
