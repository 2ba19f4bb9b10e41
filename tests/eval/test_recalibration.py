"""Temperature and vector scaling: the fits equal PyTorch's L-BFGS on the same loss, and are never
fitted on the questions they score."""

import json

import numpy as np
import pytest
import torch

from bmx.eval.recalibration import BIAS_PRIOR, cross_fit, fit, fit_pooled, fold_of


def _questions(seed=0, n=300, letters=4, true_temperature=2.5):
    """Logits of an over-confident model: answers drawn from softmax(z / 2.5), letter A favoured."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, letters)) * 3
    scores = logits / true_temperature + np.r_[0.5, np.zeros(letters - 1)]
    probs = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    gold = np.array([rng.choice(letters, p=p) for p in probs])
    return logits, gold


def _torch_fit(groups, with_biases):
    """Peer: minimise the same penalised NLL with PyTorch autograd and L-BFGS (padding options masked)."""
    inverse_t = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    letters = max(z.shape[1] for z, _ in groups)
    biases = torch.zeros(letters - 1, dtype=torch.float64, requires_grad=with_biases)
    params = [inverse_t, biases] if with_biases else [inverse_t]
    optimizer = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = 0.5 * BIAS_PRIOR * (biases ** 2).sum()
        for logits, gold in groups:
            bias = torch.cat([torch.zeros(1, dtype=torch.float64), biases])[:logits.shape[1]]
            loss = loss + torch.nn.functional.cross_entropy(torch.tensor(logits) * inverse_t + bias,
                                                            torch.tensor(gold), reduction="sum")
        loss.backward()
        return loss

    optimizer.step(closure)
    return 1 / inverse_t.item(), biases.detach().numpy()


def test_temperature_scaling_equals_torch_lbfgs_on_the_nll():
    logits, gold = _questions()
    scaling = fit(logits, gold, "temperature")
    temperature, _ = _torch_fit([(logits, gold)], with_biases=False)
    assert scaling.temperature == pytest.approx(temperature, rel=1e-6)
    assert scaling.temperature > 1.5  # the model was over-confident: it is cooled, not sharpened
    assert scaling.biases == (0.0,) * 4


def test_vector_scaling_equals_torch_lbfgs_and_finds_the_favoured_letter():
    logits, gold = _questions()
    scaling = fit(logits, gold, "vector")
    temperature, biases = _torch_fit([(logits, gold)], with_biases=True)
    assert scaling.temperature == pytest.approx(temperature, rel=1e-6)
    np.testing.assert_allclose(scaling.biases[1:], biases, atol=1e-6)
    assert max(scaling.biases[1:]) < 0  # A (bias 0 by convention) is the letter the answers favour


def test_one_temperature_over_tasks_with_different_option_counts_equals_torch():
    three, four = _questions(seed=1, n=120, letters=3), _questions(seed=2, n=200, letters=4)
    pooled = fit_pooled([three, four])
    temperature, _ = _torch_fit([three, four], with_biases=False)
    assert pooled.temperature == pytest.approx(temperature, rel=1e-6) and pooled.fitted_on == 320


def test_cross_fitting_scores_each_fold_with_a_fit_that_never_saw_it():
    logits, gold = _questions(n=100)
    calibrated, scalings = cross_fit(logits, gold, "temperature", folds=5)
    folds = fold_of(100, 5)
    assert sorted(np.bincount(folds)) == [20] * 5
    relabelled = gold.copy()
    relabelled[folds == 2] = (gold[folds == 2] + 1) % 4  # change only fold 2's answers
    again, _ = cross_fit(logits, relabelled, "temperature", folds=5)
    np.testing.assert_array_equal(again[folds == 2], calibrated[folds == 2])
    assert not np.allclose(again[folds != 2], calibrated[folds != 2])
    assert [s.fitted_on for s in scalings] == [80] * 5
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)


def test_calibrated_eval_reports_before_after_and_fits_only_on_held_out_questions(tmp_path, tiny_torch_model,
                                                                                  tiny_hf_dir, torch_logits_fn,
                                                                                  eval_dir):
    from bmx.eval.evaluate import EvalModel, EvalSettings, evaluate_tasks, results_document
    from bmx.eval.report import write_outputs
    from bmx.eval.scorers import LogitsFnScorer
    from bmx.tasks.catalog import load_tasks
    from bmx.tokenizer import load_tokenizer

    # The protocol's arithmetic is what is tested here, so the tiny model runs in PyTorch: nothing to compile.
    model = EvalModel("tiny", LogitsFnScorer(torch_logits_fn(tiny_torch_model), max_length=2048),
                      load_tokenizer(str(tiny_hf_dir)))

    settings = EvalSettings(protocol="biomistral", shots=0, limit=6, calibrate="vector", calibration_folds=2,
                            progress=False, tokens_per_batch=2048)
    tasks = load_tasks([("mmlu_medical_genetics", "en"), ("medmcqa", "en")], eval_dir)
    outcomes = evaluate_tasks([model], tasks, settings)
    results = results_document(outcomes, settings, ["tiny"])
    write_outputs(tmp_path, results, outcomes)
    genetics, medmcqa = results["tasks"]["mmlu_medical_genetics"]["calibration"], results["tasks"]["medmcqa"]["calibration"]
    assert genetics["source"] == "medical_genetics_val.csv (val split)"
    assert [s["fitted_on"] for s in genetics["fits"][0]["scalings"]] == [11]  # the 11 val questions, none scored
    assert medmcqa["source"].startswith("2-fold cross-fitting")
    assert [s["fitted_on"] for s in medmcqa["fits"][0]["scalings"]] == [3, 3]
    assert set(medmcqa["fits"][0]["scalings"][0]["biases"]) == {"A", "B", "C", "D"}
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    for name, summary in results["tasks"].items():
        mine = [r for r in records if r["task"] == name]
        accuracy = np.mean([max(r["calibrated_probs"], key=r["calibrated_probs"].get) == r["gold"] for r in mine])
        assert summary["calibration"]["acc"] == pytest.approx(accuracy)
    overall = results["calibration"]
    assert set(overall["before"]) == set(overall["after"]) == {"acc", "ece_paper", "ece_10bin"}
    assert "model_temperature" not in overall  # vector biases cannot be folded into a checkpoint
    assert "→" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "reliability" / "medmcqa.png").is_file()
