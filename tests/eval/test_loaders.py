"""Loaders: task selection, data-folder layouts, BioInstructQA's schema, and one-line errors naming the culprit."""

import json

import pytest

from bmx.tasks import bioinstructqa, raw_formats
from bmx.tasks.catalog import GROUPS, TASKS, load_task, resolve_tasks
from bmx.tasks.raw_formats import DataFormatError

MEDQA_FILE = "medqa/US_4_options_phrases_no_exclude_test.jsonl"


def test_all_is_the_ten_tasks_in_the_papers_column_order():
    assert resolve_tasks("all") == [(name, "en") for name in (
        "mmlu_clinical_knowledge", "mmlu_medical_genetics", "mmlu_anatomy", "mmlu_professional_medicine",
        "mmlu_college_biology", "mmlu_college_medicine", "medqa", "medqa_5", "pubmedqa", "medmcqa")]
    assert GROUPS["all"] == list(TASKS)


def test_multilingual_is_every_task_in_the_seven_translations():
    pairs = resolve_tasks("multilingual")
    assert len(pairs) == 70
    assert {lang for _, lang in pairs} == {"fr", "zh", "ar", "de", "pt", "ru", "es"}


def test_a_named_list_keeps_order_and_language():
    assert resolve_tasks("medqa,pubmedqa", lang="de") == [("medqa", "de"), ("pubmedqa", "de")]


def test_unknown_task_is_named_in_the_error():
    with pytest.raises(ValueError, match="'medqa4'"):
        resolve_tasks("medqa4")


def test_a_medqa_file_with_options_a_to_e_is_medqa_5(tmp_path, shared_data):
    (tmp_path / "medqa").mkdir()
    records = [json.loads(line) for line in (shared_data / "eval" / MEDQA_FILE).read_text().splitlines()[:7]]
    with open(tmp_path / "medqa" / "US_5_options_test.jsonl", "w") as five:
        for record in records:
            record["options"]["E"] = "None of the above"
            five.write(json.dumps(record) + "\n")
    (tmp_path / "medqa" / "US_4_options_test.jsonl").write_text(
        "\n".join((shared_data / "eval" / MEDQA_FILE).read_text().splitlines()[:3]) + "\n")
    five_task, four_task = load_task("medqa_5", tmp_path), load_task("medqa", tmp_path)
    assert len(five_task.questions) == 7 and five_task.questions[0].letters == list("ABCDE")
    assert len(four_task.questions) == 3 and four_task.questions[0].letters == list("ABCD")


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text('{"id": "x", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1}\n{oops\n')
    with pytest.raises(DataFormatError, match=r"dev\.json:2: not a JSON object"):
        raw_formats.read_medmcqa(path)


def test_medmcqa_zero_based_cop_is_rejected_with_a_hint(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text('{"id": "x", "question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0}\n')
    with pytest.raises(DataFormatError, match=r"dev\.json:1: cop=0, expected 1-4.*0-based"):
        raw_formats.read_medmcqa(path)


def test_mmlu_row_with_wrong_column_count_names_the_row(tmp_path):
    path = tmp_path / "anatomy_test.csv"
    path.write_text("q,a,b,c,d,A\nq,a,b,c,B\n")
    with pytest.raises(DataFormatError, match=r"anatomy_test\.csv:2: expected 6 columns"):
        raw_formats.read_mmlu_csv(path)


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_task("medqa", tmp_path / "nowhere")


def test_translations_need_bioinstructqa(shared_data):
    with pytest.raises(FileNotFoundError, match="BioInstructQA"):
        load_task("medqa", shared_data / "eval", lang="fr")


# ---- BioInstructQA ------------------------------------------------------------------------------
# The hub copy is not reachable offline: these records follow its documented schema, built from
# real MedQA / PubMedQA questions, with stand-in "translations".

def _bioinstructqa_records(shared_data, translated: bool):
    medqa = raw_formats.read_medqa_jsonl(shared_data / "eval" / MEDQA_FILE)[:8]
    shots = [{"context": None, "question": q.question, "options": q.options, "correct_answer_letter": q.answer}
             for q in medqa[5:8]]
    records = []
    for i, q in enumerate(medqa[:5]):
        record = {"identifier": f"medqa-{i}", "corpus_name": "MedQA", "task_type": "mcqa", "classes": q.letters,
                  "question": q.question, "options": {**q.options, "E": None}, "correct_answer_letter": q.answer,
                  "context": None, **{f"few_shot_samples[{s}]": shots[s - 1:] + shots[:s - 1] for s in (1, 2, 3)}}
        if translated:
            record.update(question_translated="[fr] " + q.question,
                          options_translated={k: "[fr] " + v for k, v in q.options.items()}, context_translated=None)
        records.append(record)
    records.append({**records[0], "identifier": "other", "corpus_name": "MedMCQA"})
    return records


def test_bioinstructqa_unpacked_hub_layout_gives_questions_with_their_own_shot_sets(tmp_path, shared_data):
    (tmp_path / "bioinstructqa" / "base").mkdir(parents=True)
    records = _bioinstructqa_records(shared_data, translated=False)
    (tmp_path / "bioinstructqa" / "base" / "overall_test+prompt.json").write_text(json.dumps(records))
    task = load_task("medqa", tmp_path)
    assert [q.id for q in task.questions] == [f"medqa-{i}" for i in range(5)]
    assert task.questions[0].letters == list("ABCD")  # Arrow-style E=None dropped
    assert len(task.questions[0].shot_sets) == 3 and len(task.questions[0].shot_sets[1]) == 3
    assert task.shot_source == "BioInstructQA few_shot_samples"


def test_bioinstructqa_translated_split_reads_translated_fields_and_english_shots(tmp_path, shared_data):
    records = _bioinstructqa_records(shared_data, translated=True)
    (tmp_path / "bioinstructqa").mkdir()
    with open(tmp_path / "bioinstructqa" / "test_fr.jsonl", "w") as split:
        for record in records:
            split.write(json.dumps(record) + "\n")
    task = load_task("medqa", tmp_path, lang="fr")
    question = task.questions[0]
    assert question.question.startswith("[fr] ") and question.options["A"].startswith("[fr] ")
    assert not question.shot_sets[0][0].question.startswith("[fr]")


def test_bioinstructqa_saved_datasets_dict_is_read(tmp_path, shared_data):
    import datasets

    records = _bioinstructqa_records(shared_data, translated=True)
    for record in records:  # Arrow needs one type per column
        record["few_shot_samples"] = [record.pop(f"few_shot_samples[{s}]") for s in (1, 2, 3)]
    datasets.DatasetDict({"test_french": datasets.Dataset.from_list(records)}).save_to_disk(tmp_path / "biqa")
    questions = bioinstructqa.read_corpus(tmp_path / "biqa", "MedQA", lang="fr")
    assert len(questions) == 5 and questions[0].letters == list("ABCD")
    assert len(questions[0].shot_sets) == 3


def test_bioinstructqa_without_the_corpus_says_which(tmp_path, shared_data):
    (tmp_path / "test.json").write_text(json.dumps(_bioinstructqa_records(shared_data, translated=False)))
    with pytest.raises(DataFormatError, match="'PubMedQA'"):
        bioinstructqa.read_corpus(tmp_path, "PubMedQA")
