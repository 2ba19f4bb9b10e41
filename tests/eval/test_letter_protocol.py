"""BioMistral's letter protocol against what the paper's script computes: a transformers forward of
each prompt alone, softmax over the whole vocabulary at the last position."""

import copy

import numpy as np
import pytest
import torch

from bmx.eval.evaluate import EvalModel, EvalSettings, evaluate_task
from bmx.eval.letter_protocol import LetterScores, letter_token_ids, score_letters
from bmx.eval.scorers import JaxModelScorer, LogitsFnScorer
from bmx.tasks.catalog import load_task
from bmx.tasks.prompts import biomistral_prompt
from bmx.tokenizer import load_tokenizer

LIMIT = 6


@pytest.fixture(scope="module")
def anatomy(eval_dir):
    return load_task("mmlu_anatomy", eval_dir)


@pytest.fixture(scope="module")
def letter_model(tiny_hf_dir, torch_logits_fn):
    """A tiny model whose top token is always the letter B or C: its final norm keeps one hidden
    dimension, and the LM head maps that dimension to +/-100 on B and -/+100 on C."""
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(tiny_hf_dir).eval()
    tokenizer = load_tokenizer(str(tiny_hf_dir))
    b, c = letter_token_ids(tokenizer, "BC")
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[b, 0], model.lm_head.weight[c, 0] = 100.0, -100.0
    return EvalModel("letters-only", LogitsFnScorer(torch_logits_fn(model), max_length=2048), tokenizer)


def test_each_letter_is_one_bare_letter_token_in_mistrals_tokenizer(tiny_eval_model):
    for tokenizer in (load_tokenizer(), tiny_eval_model.tokenizer):
        ids = letter_token_ids(tokenizer, "ABCDE")
        assert [tokenizer.id_to_piece(i) for i in ids] == list("ABCDE")


def test_letter_probabilities_match_a_transformers_forward_of_each_prompt_alone(tiny_eval_model, tiny_torch_model,
                                                                                anatomy):
    questions = anatomy.questions[:LIMIT]
    prompts = [biomistral_prompt(q, anatomy.shot_pool[:3]) for q in questions]
    ours = score_letters(tiny_eval_model.scorer, tiny_eval_model.tokenizer, prompts, "ABCD", progress=False)
    hf_tokenizer = tiny_eval_model.tokenizer.backend
    ids = letter_token_ids(tiny_eval_model.tokenizer, "ABCD")
    for row, prompt in enumerate(prompts):
        with torch.no_grad():  # the paper's script: tokenizer(prompt) (BOS added), next-token scores
            logits = tiny_torch_model(**hf_tokenizer(prompt, return_tensors="pt")).logits[0, -1]
        probs = torch.softmax(logits.double(), dim=-1).numpy()
        np.testing.assert_allclose(ours.letter_probs[row], probs[ids], rtol=1e-4)
        assert ours.top_token[row] == probs.argmax()


def test_a_top_token_that_is_not_an_option_letter_is_a_wrong_answer():
    scores = LetterScores(letter_probs=np.full((3, 2), 0.1), top_token=np.array([10, 99, 11]),
                          top_prob=np.full(3, 0.5), letter_ids=(10, 11))
    assert scores.predictions("AB") == ["A", None, "B"]


def test_random_model_answers_with_non_letters_and_scores_zero(tiny_eval_model, anatomy):
    outcome = evaluate_task([tiny_eval_model], anatomy, EvalSettings(shots=3, seeds=2, limit=LIMIT, progress=False))
    records = [r for run in outcome.runs for r in run.records]
    assert outcome.summary["non_letter_top_token"] == np.mean([r["prediction"] is None for r in records])
    assert all(not r["correct"] for r in records if r["prediction"] is None)
    assert outcome.summary["acc_per_seed"] == [np.mean([r["correct"] for r in run.records]) for run in outcome.runs]
    assert len(outcome.summary["acc_per_seed"]) == 2


def test_letter_top_token_is_scored_against_gold(letter_model, anatomy):
    outcome = evaluate_task([letter_model], anatomy, EvalSettings(shots=3, seeds=3, limit=LIMIT, progress=False))
    gold = [q.answer for q in anatomy.questions[:LIMIT]]
    accuracies = []
    for run in outcome.runs:
        predictions = [r["prediction"] for r in run.records]
        assert set(predictions) <= {"B", "C"}
        accuracies.append(np.mean([p == g for p, g in zip(predictions, gold)]))
    assert outcome.summary["acc"] == pytest.approx(np.mean(accuracies))
    assert outcome.summary["acc_std"] == pytest.approx(np.std(accuracies))  # population std
    assert outcome.summary["non_letter_top_token"] == 0.0


def test_ensemble_sums_letter_probabilities_then_takes_the_argmax(tiny_eval_model, letter_model, anatomy):
    settings = EvalSettings(shots=3, seeds=1, limit=LIMIT, progress=False)
    alone = [evaluate_task([model], anatomy, settings).runs[0] for model in (tiny_eval_model, letter_model)]
    together = evaluate_task([tiny_eval_model, letter_model], anatomy, settings).runs[0]
    for i, record in enumerate(together.records):
        summed = {letter: sum(run.records[i]["letter_probs"][letter] for run in alone) for letter in "ABCD"}
        assert record["letter_probs"] == pytest.approx({k: v / 2 for k, v in summed.items()})
        assert record["prediction"] == max(summed, key=summed.get)


def test_data_parallel_over_eight_devices_equals_one_device(tiny_bmx_ckpt, tiny_eval_model, anatomy):
    import jax

    from bmx.model import load

    assert tiny_eval_model.scorer.row_multiple == len(jax.local_devices()) == 8
    model, _ = load(tiny_bmx_ckpt)
    one_device = copy.copy(tiny_eval_model)
    one_device.scorer = JaxModelScorer(model, devices=jax.local_devices()[:1])
    prompts = [biomistral_prompt(q, anatomy.shot_pool[:3]) for q in anatomy.questions[:LIMIT]]
    eight = score_letters(tiny_eval_model.scorer, tiny_eval_model.tokenizer, prompts, "ABCD", progress=False)
    one = score_letters(one_device.scorer, one_device.tokenizer, prompts, "ABCD", progress=False)
    np.testing.assert_allclose(eight.letter_probs, one.letter_probs, rtol=1e-5)
    assert (eight.top_token == one.top_token).all()
