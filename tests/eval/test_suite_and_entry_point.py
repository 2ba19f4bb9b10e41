"""`--suite open-medical-llm` (the leaderboard's tasks, protocol and table), lm-eval's entry point, and
the lm-eval backend's refusal to generate without a bmx model."""

import json
import tomllib
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest

from bmx.eval.__main__ import main, parse_args, resolve_suite
from bmx.tasks.catalog import SUITES

LEADERBOARD = "open-medical-llm"


def test_the_suite_is_the_leaderboards_nine_tasks_zero_shot_loglik():
    tasks, protocol, shots = resolve_suite(parse_args(["--ckpt", "x", "--suite", LEADERBOARD, "--out", "o"]))
    assert tasks.split(",") == ["medmcqa", "medqa", "mmlu_anatomy", "mmlu_clinical_knowledge", "mmlu_college_biology",
                                "mmlu_college_medicine", "mmlu_medical_genetics", "mmlu_professional_medicine",
                                "pubmedqa"]
    assert (protocol, shots) == ("loglik", 0)


def test_a_flag_the_suite_fixes_is_refused_in_one_line(tmp_path, capsys):
    code = main(["--ckpt", str(tmp_path), "--suite", LEADERBOARD, "--shots", "3", "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and "--shots" in error


def test_suite_results_are_in_the_leaderboards_column_order_with_its_unweighted_average(
        tmp_path, tiny_torch_model, tiny_hf_dir, torch_logits_fn, eval_dir):
    from bmx.eval.evaluate import EvalModel, EvalSettings, evaluate_tasks, results_document
    from bmx.eval.report import write_outputs
    from bmx.eval.scorers import LogitsFnScorer
    from bmx.tasks.catalog import load_tasks
    from bmx.tokenizer import load_tokenizer

    model = EvalModel("tiny", LogitsFnScorer(torch_logits_fn(tiny_torch_model), max_length=2048),
                      load_tokenizer(str(tiny_hf_dir)))
    suite = SUITES[LEADERBOARD]
    settings = EvalSettings(protocol="loglik", shots=0, limit=2, suite=LEADERBOARD, progress=False,
                            tokens_per_batch=2048)
    outcomes = evaluate_tasks([model], load_tasks([(name, "en") for name in suite.tasks], eval_dir), settings)
    document = results_document(outcomes, settings, ["tiny"])
    write_outputs(tmp_path, document, outcomes, plots=False)
    header, _, row = (tmp_path / "results.md").read_text().split("## Accuracy, acc (%)\n")[1].strip().splitlines()[:3]
    assert header == "| Model | Average | " + " | ".join(suite.columns) + " |"
    accuracies = [document["tasks"][name]["acc"] for name in suite.tasks]
    assert row == "| tiny | " + " | ".join(f"{100 * a:.2f}" for a in [np.mean(accuracies), *accuracies]) + " |"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["suite"] == LEADERBOARD and saved["average"] == pytest.approx(np.mean(accuracies))


def test_pyproject_declares_the_bmx_model_for_lm_evals_entry_point_group():
    from lm_eval.api.model import LM

    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"]["lm_eval.models"]["bmx"]
    module, _, attribute = target.partition(":")
    model_class = getattr(import_module(module), attribute)
    assert issubclass(model_class, LM)
    from lm_eval.api.registry import get_model

    assert get_model("bmx") is model_class  # the same class lm-eval 0.4's registry hands out


def test_generating_with_a_logits_function_scorer_names_what_it_needs(tiny_torch_model, tiny_hf_dir, torch_logits_fn):
    from lm_eval.api.instance import Instance

    from bmx.eval.evaluate import EvalModel
    from bmx.eval.harness import BmxLM
    from bmx.eval.scorers import LogitsFnScorer
    from bmx.tokenizer import load_tokenizer

    model = EvalModel("torch", LogitsFnScorer(torch_logits_fn(tiny_torch_model), max_length=128),
                      load_tokenizer(str(tiny_hf_dir)))
    request = Instance(request_type="generate_until", doc={}, arguments=("Question:", {"max_gen_toks": 4}), idx=0)
    with pytest.raises(ValueError, match="JaxModelScorer"):
        BmxLM(eval_model=model).generate_until([request], disable_tqdm=True)
