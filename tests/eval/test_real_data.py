"""Every real evaluation file parses into the published number of questions, with the right gold letters."""

from collections import Counter

import pytest

from bmx.tasks import raw_formats
from bmx.tasks.catalog import TASKS, load_task

# Hendrycks et al.'s MMLU test split sizes for the six medical subjects.
MMLU_TEST_COUNTS = {"anatomy": 135, "clinical_knowledge": 265, "college_biology": 144, "college_medicine": 173,
                    "medical_genetics": 100, "professional_medicine": 272}


@pytest.fixture(scope="module")
def eval_dir(shared_data):
    return shared_data / "eval"


@pytest.mark.parametrize("subject", sorted(MMLU_TEST_COUNTS))
def test_mmlu_subject_has_its_published_test_count_and_five_dev_shots(eval_dir, subject):
    task = load_task(f"mmlu_{subject}", eval_dir)
    assert len(task.questions) == MMLU_TEST_COUNTS[subject] == TASKS[f"mmlu_{subject}"].published_count
    assert len(task.shot_pool) == 5
    assert all(q.letters == list("ABCD") for q in task.questions + task.shot_pool)


# MMLU validation split sizes, the third file of each subject.
MMLU_VAL_COUNTS = {"anatomy": 14, "clinical_knowledge": 29, "college_biology": 16, "college_medicine": 22,
                   "medical_genetics": 11, "professional_medicine": 31}


@pytest.mark.parametrize("subject", sorted(MMLU_VAL_COUNTS))
def test_mmlu_validation_files_parse_with_their_published_counts(eval_dir, subject):
    questions = raw_formats.read_mmlu_csv(eval_dir / "mmlu_medical" / "val" / f"{subject}_val.csv")
    assert len(questions) == MMLU_VAL_COUNTS[subject]


def test_mmlu_csv_keeps_quoted_commas_and_quotes(eval_dir):
    anatomy = raw_formats.read_mmlu_csv(eval_dir / "mmlu_medical" / "test" / "anatomy_test.csv")
    dished = anatomy[1]  # the CSV row is `"A ""dished face"" profile is often associated with",...,B`
    assert dished.question == 'A "dished face" profile is often associated with'
    assert dished.answer == "B"
    assert anatomy[0].options["C"] == "paralysis of the facial muscles, loss of taste and lacrimation."


def test_medqa_has_1273_four_option_questions_whose_gold_letter_names_the_answer_text(eval_dir):
    path = eval_dir / "medqa" / "US_4_options_phrases_no_exclude_test.jsonl"
    questions = raw_formats.read_medqa_jsonl(path)
    assert len(questions) == 1273
    assert all(q.letters == list("ABCD") for q in questions)
    import json

    answers = [json.loads(line)["answer"] for line in path.read_text().splitlines()]
    assert [q.options[q.answer] for q in questions] == answers


def test_medmcqa_dev_has_4183_questions_and_cop_is_one_based(eval_dir):
    questions = raw_formats.read_medmcqa(eval_dir / "medmcqa" / "dev.json")
    assert len(questions) == 4183
    # cop 1..4 counts in the file: 1348, 1085, 925, 825 -> letters A..D
    assert Counter(q.answer for q in questions) == {"A": 1348, "B": 1085, "C": 925, "D": 825}
    first = questions[0]  # cop 1: "slower than non-myelinated" is the false statement asked for
    assert first.answer == "A" and first.options["A"].startswith("Impulse through myelinated fibers is slower")


def test_pubmedqa_test_has_500_questions_with_the_published_label_split(eval_dir):
    task = load_task("pubmedqa", eval_dir)
    assert len(task.questions) == 500
    # PQA-L test: 55.2% yes, 33.8% no, 11.0% maybe (Jin et al., 2019)
    assert Counter(q.options[q.answer] for q in task.questions) == {"yes": 276, "no": 169, "maybe": 55}
    assert all(q.context_passages for q in task.questions)
    assert len(task.shot_pool) == 500 and not {q.id for q in task.shot_pool} & {q.id for q in task.questions}


def test_pubmedqa_labelled_set_has_1000_questions_and_contains_the_test_set(eval_dir):
    labelled = raw_formats.read_pubmedqa(eval_dir / "pubmedqa" / "ori_pqal.json")
    assert len(labelled) == 1000
    test = {q.id for q in load_task("pubmedqa", eval_dir).questions}
    assert test <= {q.id for q in labelled}


def test_pubmedqa_labels_come_from_the_separate_ground_truth_file(eval_dir):
    import json

    truth = json.loads((eval_dir / "pubmedqa" / "test_ground_truth.json").read_text())
    task = load_task("pubmedqa", eval_dir)
    assert {q.id: q.options[q.answer] for q in task.questions} == truth


def test_medqa_and_medmcqa_without_train_files_take_shots_from_the_test_set(eval_dir):
    for name in ("medqa", "medmcqa"):
        task = load_task(name, eval_dir)
        assert task.shot_pool is task.questions
        assert "no train file" in task.shot_source


def test_medqa_5_needs_a_file_with_five_options(eval_dir):
    with pytest.raises(FileNotFoundError, match="A-E"):
        load_task("medqa_5", eval_dir)
