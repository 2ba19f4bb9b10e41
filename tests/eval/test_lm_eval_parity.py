"""bmx's `loglik` protocol against lm-eval-harness 0.4's HF backend, on the same tiny model and tokenizer.

lm-eval runs its *own* task definitions (medqa_4options, medmcqa, mmlu_anatomy), pointed at the
shared files through a `process_docs` that maps their fields to the hub copies' schemas. Per option
scores must agree within 1e-4, contexts byte for byte, and the accuracies exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bmx.eval.evaluate import EvalSettings, evaluate_task
from bmx.eval.loglik_protocol import score_pairs
from bmx.tasks.catalog import TASKS, load_task
from bmx.tasks.prompts import TARGET_DELIMITER, lm_eval_choices, lm_eval_context

pytestmark = pytest.mark.slow  # one lm-eval run plus bmx on 16 questions per task; all 1273 with BMX_FULL_TESTS=1

FULL_TESTS = os.environ.get("BMX_FULL_TESTS") == "1"
LIMIT = 1273 if FULL_TESTS else 16
TOLERANCE = 1e-4

DOCS_PY = '''
def medqa_to_gbaker(dataset):
    return dataset.map(lambda d: {"sent1": d["question"], "label": "ABCD".index(d["answer_idx"]),
                                  **{f"ending{i}": d["options"][l] for i, l in enumerate("ABCD")}})

def medmcqa_zero_based(dataset):
    return dataset.map(lambda d: {"cop": d["cop"] - 1})

def mmlu_csv(dataset):
    return dataset.map(lambda d: {"question": d["q"], "choices": [d["a"], d["b"], d["c"], d["d"]],
                                  "answer": "ABCD".index(d["gold"])})
'''


def _task_yamls(lm_eval_tasks: Path, eval_dir: Path) -> dict[str, str]:
    medqa = eval_dir / "medqa" / "US_4_options_phrases_no_exclude_test.jsonl"
    medqa_yaml = f"""include: {lm_eval_tasks / 'medqa' / 'medqa.yaml'}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {medqa}
training_split: null
validation_split: null
test_split: test
process_docs: !function docs.medqa_to_gbaker
"""
    return {
        "parity_medqa": f"task: parity_medqa\n{medqa_yaml}",
        "parity_medqa_texts": f"task: parity_medqa_texts\n{medqa_yaml}"
                              "doc_to_choice: \"{{[ending0, ending1, ending2, ending3]}}\"\n",
        "parity_medmcqa": f"""task: parity_medmcqa
include: {lm_eval_tasks / 'medmcqa' / 'medmcqa.yaml'}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {eval_dir / 'medmcqa' / 'dev.json'}
training_split: null
validation_split: null
test_split: test
process_docs: !function docs.medmcqa_zero_based
""",
        "parity_mmlu_anatomy": f"""task: parity_mmlu_anatomy
include: {lm_eval_tasks / 'mmlu' / 'default' / 'mmlu_anatomy.yaml'}
tag: null
dataset_path: csv
dataset_name: null
dataset_kwargs:
  data_files:
    test: {eval_dir / 'mmlu_medical' / 'test' / 'anatomy_test.csv'}
    dev: {eval_dir / 'mmlu_medical' / 'dev' / 'anatomy_dev.csv'}
  column_names: [q, a, b, c, d, gold]
process_docs: !function docs.mmlu_csv
num_fewshot: 3
""",
    }


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory, eval_dir):
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "docs.py").write_text(DOCS_PY)
    for name, text in _task_yamls(Path(lm_eval.tasks.__file__).parent, eval_dir).items():
        (folder / f"{name}.yaml").write_text(text)
    return TaskManager(include_path=str(folder), include_defaults=False)


@pytest.fixture(scope="module")
def lm_eval_hf(task_manager, tiny_hf_dir):
    """lm-eval's HF backend's samples for every parity task (one run, shared by the tests)."""
    import lm_eval

    output = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_hf_dir},dtype=float32",
                                     tasks=["parity_medqa", "parity_medqa_texts", "parity_medmcqa",
                                            "parity_mmlu_anatomy"],
                                     limit=LIMIT, device="cpu", batch_size=8, task_manager=task_manager,
                                     log_samples=True, bootstrap_iters=0)
    assert output["configs"]["parity_mmlu_anatomy"]["num_fewshot"] == 3
    return output["samples"], output["results"]


def _lm_eval_scores(samples) -> np.ndarray:
    return np.array([[float(loglik) for loglik, _ in sample["filtered_resps"]]
                     for sample in sorted(samples, key=lambda s: s["doc_id"])])


def _compare(bmx_run, samples, results, task_key):
    lm_eval_scores = _lm_eval_scores(samples)
    bmx_scores = np.array([list(record["loglik"].values()) for record in bmx_run.records])
    assert bmx_scores.shape == lm_eval_scores.shape
    np.testing.assert_allclose(bmx_scores, lm_eval_scores, atol=TOLERANCE, rtol=0)
    assert bmx_run.correct.mean() == results[task_key]["acc,none"]
    if "acc_norm,none" in results[task_key]:
        assert bmx_run.correct_norm.mean() == results[task_key]["acc_norm,none"]


@pytest.mark.parametrize("task, lm_eval_task, style", [
    ("medqa", "parity_medqa", "letters"),
    ("medqa", "parity_medqa_texts", "texts"),  # multi-token continuations: acc_norm differs from acc
    ("medmcqa", "parity_medmcqa", "letters"),
])
def test_zero_shot_scores_and_accuracies_match_lm_eval(tiny_eval_model, eval_dir, lm_eval_hf, task, lm_eval_task,
                                                      style):
    samples, results = lm_eval_hf
    settings = EvalSettings(protocol="loglik", shots=0, limit=LIMIT, choice_style=style, progress=False)
    outcome = evaluate_task([tiny_eval_model], load_task(task, eval_dir), settings)
    questions = load_task(task, eval_dir).questions[:LIMIT]
    for question, sample in zip(questions, sorted(samples[lm_eval_task], key=lambda s: s["doc_id"])):
        choices = lm_eval_choices(TASKS[task], question, style)
        assert [tuple(arguments) for arguments in sample["arguments"]] == [
            (lm_eval_context(TASKS[task], question, []), TARGET_DELIMITER + choice) for choice in choices]
    _compare(outcome.runs[0], samples[lm_eval_task], results, lm_eval_task)


def test_three_shot_mmlu_contexts_and_scores_match_lm_eval(tiny_eval_model, eval_dir, lm_eval_hf):
    samples, results = lm_eval_hf
    task = load_task("mmlu_anatomy", eval_dir)
    shots = task.shot_pool[:3]  # lm-eval's mmlu uses sampler first_n over the dev split
    pairs, lm_eval_pairs = [], []
    for question, sample in zip(task.questions[:LIMIT], sorted(samples["parity_mmlu_anatomy"],
                                                               key=lambda s: s["doc_id"])):
        context = lm_eval_context(task.spec, question, shots)
        pairs += [(context, TARGET_DELIMITER + choice) for choice in lm_eval_choices(task.spec, question)]
        lm_eval_pairs += [tuple(arguments) for arguments in sample["arguments"]]
    assert pairs == lm_eval_pairs
    logliks, _ = score_pairs(tiny_eval_model.scorer, tiny_eval_model.tokenizer, pairs, progress=False)
    lm_eval_scores = _lm_eval_scores(samples["parity_mmlu_anatomy"])
    np.testing.assert_allclose(logliks.reshape(lm_eval_scores.shape), lm_eval_scores, atol=TOLERANCE, rtol=0)
    gold = np.array([q.answer_index for q in task.questions[:LIMIT]])
    accuracy = (logliks.reshape(lm_eval_scores.shape).argmax(axis=1) == gold).mean()
    assert accuracy == results["parity_mmlu_anatomy"]["acc,none"]


def test_bmx_backend_inside_lm_eval_matches_the_hf_backend(tiny_eval_model, task_manager, lm_eval_hf):
    import lm_eval

    from bmx.eval.harness import BmxLM

    samples, results = lm_eval_hf
    output = lm_eval.simple_evaluate(model=BmxLM(eval_model=tiny_eval_model), tasks=["parity_medqa_texts"],
                                     limit=LIMIT, task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    np.testing.assert_allclose(_lm_eval_scores(output["samples"]["parity_medqa_texts"]),
                               _lm_eval_scores(samples["parity_medqa_texts"]), atol=TOLERANCE, rtol=0)
    for metric in ("acc,none", "acc_norm,none"):
        assert output["results"]["parity_medqa_texts"][metric] == results["parity_medqa_texts"][metric]


def test_rolling_loglikelihood_matches_the_hf_backend(tiny_eval_model, tiny_hf_dir, eval_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from bmx.eval.harness import BmxLM

    # Long enough to need several windows of the HF backend's max_length.
    text = " ".join(q.question for q in load_task("medqa", eval_dir).questions[:12])
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]
    hf = HFLM(pretrained=str(tiny_hf_dir), dtype="float32", device="cpu", batch_size=4, max_length=256)
    ours = BmxLM(eval_model=_with_max_length(tiny_eval_model, 256))
    assert ours.loglikelihood_rolling(requests)[0] == pytest.approx(hf.loglikelihood_rolling(requests)[0],
                                                                    abs=TOLERANCE * 10)


def test_generate_until_matches_the_hf_backend(tiny_eval_model, tiny_hf_dir, eval_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from bmx.eval.harness import BmxLM

    # MedQA questions are longer than 128 - 12 tokens, so contexts are left-truncated as well.
    questions = [q.question for q in load_task("medqa", eval_dir).questions[:4]]
    greedy = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    requests = [Instance(request_type="generate_until", doc={}, arguments=(q, greedy), idx=0) for q in questions]
    hf = HFLM(pretrained=str(tiny_hf_dir), dtype="float32", device="cpu", batch_size=4, max_length=128)
    expected = hf.generate_until(requests)
    middle = len(expected[0]) // 2
    cut = {"until": [expected[0][middle:middle + 3]], "max_gen_toks": 12}  # a stop string it will produce
    requests.append(Instance(request_type="generate_until", doc={}, arguments=(questions[0], cut), idx=0))
    expected += hf.generate_until(requests[-1:])
    assert len(expected[-1]) < len(expected[0])

    ours = BmxLM(eval_model=_with_max_length(tiny_eval_model, 128)).generate_until(requests, disable_tqdm=True)
    assert ours == expected, (ours, expected)


def _with_max_length(eval_model, max_length):
    """The same compiled model, read in windows of `max_length` tokens."""
    import copy

    from bmx.eval.evaluate import EvalModel

    scorer = copy.copy(eval_model.scorer)
    scorer.max_length = max_length
    return EvalModel(eval_model.name, scorer, eval_model.tokenizer)
