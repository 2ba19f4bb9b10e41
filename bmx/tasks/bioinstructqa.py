"""BioMistral's BioInstructQA benchmark: the ten tasks in one schema, English and 7 translations.

A record holds `identifier, corpus_name, task_type, classes, question, options{letter: text},
correct_answer_letter, context` and its shots as `few_shot_samples[1]`..`few_shot_samples[3]`
(or one `few_shot_samples` list of three sets), each set three English records with `context,
question, options, correct_answer_letter`. The `test_<lang>` splits add `question_translated`,
`options_translated` and `context_translated`; their shots stay English.

Read from a local copy, laid out in any of these ways:
- the hub's `data.zip` unpacked: `base/overall_{train,validation,test}+prompt.json` and
  `langs_processed/<Language>-full.json`;
- one `<split>.json` (a list) or `<split>.jsonl` per split: `test.jsonl`, `test_fr.jsonl`, ...;
- a `datasets.DatasetDict` saved with `save_to_disk` (splits `test`, `test_fr` or `test_french`, ...).
(The hub copy itself is built by a loading script, which bmx does not run: no remote code.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from collections.abc import Iterable

from bmx.tasks.questions import Question
from bmx.tasks.raw_formats import DataFormatError, json_lines

LANGUAGES = {"fr": "French", "zh": "Chinese", "ar": "Arabic", "de": "German", "pt": "Portuguese",
             "ru": "Russian", "es": "Spanish"}


def split_names(lang: str) -> list[str]:
    """Names a split for `lang` may carry: `test` for English; `test_fr`, `test_french` for French."""
    if lang == "en":
        return ["test"]
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; expected 'en' or one of {sorted(LANGUAGES)}")
    return [f"test_{lang}", f"test_{LANGUAGES[lang].lower()}"]


def _candidate_files(root: Path, lang: str) -> list[Path]:
    names = split_names(lang)
    files = [root / f"{name}{suffix}" for name in names for suffix in (".jsonl", ".json")]
    if lang == "en":
        files.append(root / "base" / "overall_test+prompt.json")
    else:
        files.append(root / "langs_processed" / f"{LANGUAGES[lang]}-full.json")
    return files


def read_records(root: str | Path, lang: str = "en") -> list[dict[str, Any]]:
    """All records of the `lang` test split from a local BioInstructQA copy at `root`."""
    root = Path(root)
    if (root / "dataset_dict.json").is_file():
        return _records_from_saved_dataset(root, lang)
    for path in _candidate_files(root, lang):
        if path.is_file():
            return _records_from_file(path)
    expected = ", ".join(str(p.relative_to(root)) for p in _candidate_files(root, lang))
    raise FileNotFoundError(f"no BioInstructQA split for language {lang!r} in {root}: expected one of {expected} "
                            "or a datasets.save_to_disk directory")


def _records_from_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        return [record for _, record in json_lines(path)]
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataFormatError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of BioInstructQA records, got {type(data).__name__}")
    return data


def _records_from_saved_dataset(root: Path, lang: str) -> list[dict[str, Any]]:
    import datasets

    dataset_dict = datasets.load_from_disk(str(root))
    for name in split_names(lang):
        if name in dataset_dict:
            return list(dataset_dict[name])
    raise FileNotFoundError(f"{root}: no split named any of {split_names(lang)}; it has {list(dataset_dict)}")


def _options(raw: Any, classes: Iterable[str] | None, where: str) -> dict[str, str]:
    # Arrow stores `options` as a struct with every letter any record uses, so 4-option records
    # come back with E=None: keep the record's own classes, and only letters that have a text.
    if not isinstance(raw, dict):
        raise DataFormatError(f"{where}: options must be a {{letter: text}} object, got {type(raw).__name__}")
    letters = list(classes) if classes else list(raw)
    options = {letter: raw[letter] for letter in letters if raw.get(letter) is not None}
    if not options:
        raise DataFormatError(f"{where}: no options among letters {letters}")
    return options


def _shot(raw: dict[str, Any], where: str) -> Question:
    for key in ("question", "options", "correct_answer_letter"):
        if key not in raw:
            raise DataFormatError(f"{where}: few-shot sample lacks {key!r}")
    context = raw.get("context")
    return Question(id=str(raw.get("identifier", "")), question=raw["question"],
                    options=_options(raw["options"], None, where), answer=raw["correct_answer_letter"],
                    context_passages=(context,) if context else ())


def _shot_sets(record: dict[str, Any], where: str) -> tuple[tuple[Question, ...], ...]:
    if "few_shot_samples" in record and record["few_shot_samples"] is not None:
        raw_sets = record["few_shot_samples"]
    else:
        raw_sets = [record[key] for key in (f"few_shot_samples[{i}]" for i in range(1, 10)) if key in record]
    return tuple(tuple(_shot(sample, f"{where} shot set {set_number}") for sample in samples)
                 for set_number, samples in enumerate(raw_sets, start=1))


def record_to_question(record: dict[str, Any], translated: bool, where: str) -> Question:
    """A `Question` from one record; `translated` takes the `*_translated` fields."""
    suffix = "_translated" if translated else ""
    for key in ("identifier", f"question{suffix}", f"options{suffix}", "correct_answer_letter"):
        if key not in record:
            raise DataFormatError(f"{where}: missing key {key!r}")
    context = record.get(f"context{suffix}") if record.get("context") is not None else None
    try:
        return Question(id=str(record["identifier"]), question=record[f"question{suffix}"],
                        options=_options(record[f"options{suffix}"], record.get("classes"), where),
                        answer=record["correct_answer_letter"], context_passages=(context,) if context else (),
                        shot_sets=_shot_sets(record, where))
    except ValueError as error:
        raise DataFormatError(f"{where}: {error}") from None


def read_corpus(root: str | Path, corpus_name: str, lang: str = "en") -> list[Question]:
    """The test questions of one corpus (`MedQA`, `MMLU_anatomy`, ...) in `lang`."""
    questions = []
    for index, record in enumerate(read_records(root, lang)):
        if record.get("corpus_name") != corpus_name:
            continue
        where = f"{root} [{lang}] record {index} ({record.get('identifier')})"
        questions.append(record_to_question(record, translated=lang != "en", where=where))
    if not questions:
        raise DataFormatError(f"{root}: no records with corpus_name {corpus_name!r} in the {lang!r} test split")
    return questions
