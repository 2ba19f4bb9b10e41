"""Readers for the four tasks' files as their authors publish them.

- MMLU: headerless CSV `question,A,B,C,D,answer_letter`.
- MedQA (USMLE): JSONL `{question, options: {A..D} or {A..E}, answer_idx, ...}`.
- MedMCQA: one JSON object per line `{id, question, opa..opd, cop, ...}` with `cop` 1-based.
- PubMedQA (PQA-L): JSON dict `PMID -> {QUESTION, CONTEXTS[], final_decision, ...}`; the test split's
  labels may come from a separate `PMID -> yes/no/maybe` ground-truth file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from bmx.tasks.questions import Question

PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


class DataFormatError(ValueError):
    """A data file does not have the layout its task expects."""


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{path}:{line_number}: not a JSON object ({error.msg})") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def _require(record: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [key for key in keys if key not in record]
    if missing:
        raise DataFormatError(f"{where}: missing key(s) {missing}; expected {list(keys)}")


def read_mmlu_csv(path: str | Path) -> list[Question]:
    """MMLU subject file: each row `question,A,B,C,D,answer_letter`, no header."""
    path = Path(path)
    questions = []
    with open(path, newline="", encoding="utf-8") as rows:
        for row_number, row in enumerate(csv.reader(rows), start=1):
            if len(row) != 6:
                raise DataFormatError(f"{path}:{row_number}: expected 6 columns (question,A,B,C,D,answer), "
                                      f"got {len(row)}")
            question, *option_texts, answer = row
            if answer not in "ABCD" or len(answer) != 1:
                raise DataFormatError(f"{path}:{row_number}: answer {answer!r} is not one of A, B, C, D")
            questions.append(Question(id=f"{path.stem}-{row_number}", question=question,
                                      options=dict(zip("ABCD", option_texts)), answer=answer))
    return questions


def read_medqa_jsonl(path: str | Path) -> list[Question]:
    """MedQA-USMLE JSONL with 4 (A-D) or 5 (A-E) options per record."""
    path = Path(path)
    questions = []
    for line_number, record in json_lines(path):
        where = f"{path}:{line_number}"
        _require(record, ("question", "options", "answer_idx"), where)
        options = record["options"]
        if not isinstance(options, dict) or list(options) not in (list("ABCD"), list("ABCDE")):
            raise DataFormatError(f"{where}: options must be a dict lettered A-D or A-E, got {options!r:.80}")
        try:
            questions.append(Question(id=f"{path.stem}-{line_number}", question=record["question"],
                                      options=dict(options), answer=record["answer_idx"]))
        except ValueError as error:
            raise DataFormatError(f"{where}: {error}") from None
    return questions


def medqa_option_count(path: str | Path) -> int:
    """Number of options of a MedQA file's first record: 4 for `medqa`, 5 for `medqa_5`."""
    for line_number, record in json_lines(Path(path)):
        _require(record, ("options",), f"{path}:{line_number}")
        return len(record["options"])
    raise DataFormatError(f"{path}: no records")


def read_medmcqa(path: str | Path) -> list[Question]:
    """MedMCQA as released (one JSON object per line), `cop` being 1-based (1 = option a)."""
    path = Path(path)
    questions = []
    for line_number, record in json_lines(path):
        where = f"{path}:{line_number}"
        _require(record, ("id", "question", "opa", "opb", "opc", "opd", "cop"), where)
        cop = record["cop"]
        if cop not in (1, 2, 3, 4):
            raise DataFormatError(f"{where}: cop={cop!r}, expected 1-4 (this release numbers options from 1; "
                                  "the 0-based Hugging Face copy needs converting)")
        options = {letter: record[key] for letter, key in zip("ABCD", ("opa", "opb", "opc", "opd"))}
        questions.append(Question(id=str(record["id"]), question=record["question"], options=options,
                                  answer="ABCD"[cop - 1]))
    return questions


def _read_json_dict(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise DataFormatError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"{path}: expected a JSON object keyed by PMID, got {type(data).__name__}")
    return data


def read_pubmedqa_labels(path: str | Path) -> dict[str, str]:
    """PubMedQA ground truth: `PMID -> yes/no/maybe`."""
    labels = _read_json_dict(Path(path))
    for pmid, label in labels.items():
        if label not in PUBMEDQA_OPTIONS.values():
            raise DataFormatError(f"{path}: PMID {pmid} has label {label!r}, expected yes, no or maybe")
    return labels


def read_pubmedqa(path: str | Path, ground_truth: str | Path | None = None,
                  exclude_ids: set[str] = frozenset()) -> list[Question]:
    """PubMedQA PQA-L: options yes/no/maybe lettered A/B/C, the abstract's sections as context.

    Labels come from `ground_truth` (`PMID -> yes/no/maybe`) when given, else from each record's
    `final_decision`. `exclude_ids` drops records (the test PMIDs, when reading the shot pool).
    """
    path = Path(path)
    records = _read_json_dict(path)
    labels = read_pubmedqa_labels(ground_truth) if ground_truth is not None else None
    if labels is not None and set(labels) != set(records):
        missing = sorted(set(records) - set(labels))[:3]
        extra = sorted(set(labels) - set(records))[:3]
        raise DataFormatError(f"{ground_truth}: PMIDs differ from {path} (missing {missing}, extra {extra})")
    letter_of = {text: letter for letter, text in PUBMEDQA_OPTIONS.items()}
    questions = []
    for pmid, record in records.items():
        if pmid in exclude_ids:
            continue
        where = f"{path}: PMID {pmid}"
        _require(record, ("QUESTION", "CONTEXTS"), where)
        label = labels[pmid] if labels is not None else record.get("final_decision")
        if label not in letter_of:
            raise DataFormatError(f"{where}: label {label!r}, expected one of {list(letter_of)}")
        questions.append(Question(id=pmid, question=record["QUESTION"], options=dict(PUBMEDQA_OPTIONS),
                                  answer=letter_of[label], context_passages=tuple(record["CONTEXTS"])))
    return questions
