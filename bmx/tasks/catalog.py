"""The ten BioMistral tasks, their groups, and where each one's questions and shots come from.

`--data-dir` is laid out like `shared/data/eval`:

    mmlu_medical/{dev,test}/<subject>_{dev,test}.csv
    medqa/*.jsonl            (a file whose options run A-E is `medqa_5`; `*train*` files give shots)
    medmcqa/dev.json         (the dev split is the test set; `train.json`, if present, gives shots)
    pubmedqa/{ori_pqal,test_set,test_ground_truth}.json
    bioinstructqa/           (optional: BioMistral's BioInstructQA, needed for translated splits)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from bmx.tasks import bioinstructqa, raw_formats
from bmx.tasks.questions import Question

MMLU_SUBJECTS = ("clinical_knowledge", "medical_genetics", "anatomy", "professional_medicine", "college_biology",
                 "college_medicine")
DATA_DIR_ENV = "BMX_EVAL_DATA"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    column: str  # header of the paper's results table
    corpus_name: str  # BioInstructQA's `corpus_name`
    published_count: int  # test questions in the published release
    family: str  # mmlu | medqa | medmcqa | pubmedqa: decides the raw reader and lm-eval's prompt

    @property
    def mmlu_subject(self) -> str | None:
        return self.name.removeprefix("mmlu_") if self.family == "mmlu" else None


_MMLU_COLUMNS = {"clinical_knowledge": ("Clinical KG", 265), "medical_genetics": ("Medical Genetics", 100),
                 "anatomy": ("Anatomy", 135), "professional_medicine": ("Pro Medicine", 272),
                 "college_biology": ("College Biology", 144), "college_medicine": ("College Medicine", 173)}

# In the paper's column order.
TASKS: dict[str, TaskSpec] = {
    **{f"mmlu_{subject}": TaskSpec(f"mmlu_{subject}", _MMLU_COLUMNS[subject][0], f"MMLU_{subject}",
                                   _MMLU_COLUMNS[subject][1], "mmlu") for subject in MMLU_SUBJECTS},
    "medqa": TaskSpec("medqa", "MedQA", "MedQA", 1273, "medqa"),
    "medqa_5": TaskSpec("medqa_5", "MedQA 5 opts", "MedQA-5_options", 1273, "medqa"),
    "pubmedqa": TaskSpec("pubmedqa", "PubMedQA", "PubMedQA", 500, "pubmedqa"),
    "medmcqa": TaskSpec("medmcqa", "MedMCQA", "MedMCQA", 4183, "medmcqa"),
}
LANGUAGES = ("en", *bioinstructqa.LANGUAGES)


@dataclass(frozen=True)
class Suite:
    """A fixed protocol over fixed tasks, reported in its own table layout."""

    tasks: tuple[str, ...]  # in the suite's column order
    columns: tuple[str, ...]  # its table's headers
    protocol: str
    shots: int


# The Open Medical-LLM Leaderboard (openlifescienceai): lm-eval's medmcqa (validation), medqa_4options,
# the six MMLU subjects and pubmedqa, zero-shot, log-likelihood `acc`; its Average is the unweighted
# mean of the nine columns.
SUITES = {"open-medical-llm": Suite(
    tasks=("medmcqa", "medqa", "mmlu_anatomy", "mmlu_clinical_knowledge", "mmlu_college_biology",
           "mmlu_college_medicine", "mmlu_medical_genetics", "mmlu_professional_medicine", "pubmedqa"),
    columns=("MedMCQA", "MedQA", "MMLU Anatomy", "MMLU Clinical Knowledge", "MMLU College Biology",
             "MMLU College Medicine", "MMLU Medical Genetics", "MMLU Professional Medicine", "PubMedQA"),
    protocol="loglik", shots=0)}
GROUPS = {"all": list(TASKS), "mmlu": [name for name in TASKS if name.startswith("mmlu_")]}
# The multilingual group is every task in each of BioInstructQA's seven translations.
MULTILINGUAL = "multilingual"


def resolve_tasks(spec: str, lang: str = "en") -> list[tuple[str, str]]:
    """`all`, `multilingual`, a group or `name,name,...` -> `[(task, lang), ...]`."""
    if lang not in LANGUAGES:
        raise ValueError(f"unknown language {lang!r}; expected one of {list(LANGUAGES)}")
    selected: list[tuple[str, str]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == MULTILINGUAL:
            selected += [(name, code) for code in bioinstructqa.LANGUAGES for name in TASKS]
        elif part in GROUPS:
            selected += [(name, lang) for name in GROUPS[part]]
        elif part in TASKS:
            selected.append((part, lang))
        else:
            raise ValueError(f"unknown task {part!r}; expected one of {list(TASKS)}, a group "
                             f"{[*GROUPS, MULTILINGUAL]}, or a comma-separated list")
    if not selected:
        raise ValueError(f"no task named in {spec!r}")
    return list(dict.fromkeys(selected))


@dataclass
class TaskData:
    """A task's test questions and where its few-shot examples come from."""

    spec: TaskSpec
    lang: str
    questions: list[Question]
    shot_pool: list[Question]  # empty when every question carries its own `shot_sets`
    shot_source: str  # said in results.json, so a number can be traced to its shots
    # Questions disjoint from `questions` that `--calibrate` may fit on (MMLU's val split); empty
    # where the data has none, and then calibration cross-fits over `questions` in folds.
    calibration_questions: list[Question] = field(default_factory=list)
    calibration_source: str = ""


def default_data_dir() -> Path:
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        raise ValueError(f"no --data-dir given and ${DATA_DIR_ENV} is not set: point either at a folder laid out "
                         "like shared/data/eval")
    return Path(value)


def bioinstructqa_root(data_dir: Path) -> Path | None:
    for root in (data_dir / "bioinstructqa", data_dir):
        markers = ("dataset_dict.json", "base", "langs_processed")
        if any((root / marker).exists() for marker in markers) or any(root.glob("test*.json*")):
            return root
    return None


def load_task(name: str, data_dir: str | os.PathLike, lang: str = "en", source: str = "auto") -> TaskData:
    """Questions of task `name` in `lang` from `data_dir`.

    `source`: `raw` (the authors' files), `bioinstructqa`, or `auto` (raw files for English when
    present, BioInstructQA otherwise; translations exist only in BioInstructQA).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {list(TASKS)}")
    if source not in ("auto", "raw", "bioinstructqa"):
        raise ValueError(f"source must be auto, raw or bioinstructqa, got {source!r}")
    spec, data_dir = TASKS[name], Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"evaluation data folder {data_dir} does not exist")
    if source == "raw" and lang != "en":
        raise ValueError(f"translated questions ({lang}) exist only in BioInstructQA, not in the raw files")
    if source == "raw" or (source == "auto" and lang == "en" and _raw_available(spec, data_dir)):
        return _load_raw(spec, data_dir)
    root = bioinstructqa_root(data_dir)
    if root is None and lang == "en":
        _raw_paths(spec, data_dir)  # raises, naming the raw file that is missing
    if root is None:
        wanted = "BioInstructQA copy (bioinstructqa/)" if lang != "en" else "raw files or a BioInstructQA copy"
        raise FileNotFoundError(f"{data_dir}: no {wanted} for task {name!r} [{lang}]")
    questions = bioinstructqa.read_corpus(root, spec.corpus_name, lang)
    return TaskData(spec, lang, questions, shot_pool=[], shot_source="BioInstructQA few_shot_samples")


def _raw_available(spec: TaskSpec, data_dir: Path) -> bool:
    try:
        _raw_paths(spec, data_dir)
        return True
    except FileNotFoundError:
        return False


def _medqa_files(directory: Path, option_count: int) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*.jsonl") if raw_formats.medqa_option_count(p) == option_count)


def _raw_paths(spec: TaskSpec, data_dir: Path) -> dict[str, Path]:
    """The files a raw task reads: `test`, and `shots` when a separate train/dev file exists."""
    if spec.family == "mmlu":
        subject = spec.mmlu_subject
        paths = {"test": data_dir / "mmlu_medical" / "test" / f"{subject}_test.csv",
                 "shots": data_dir / "mmlu_medical" / "dev" / f"{subject}_dev.csv"}
    elif spec.family == "medqa":
        options = 5 if spec.name == "medqa_5" else 4
        files = _medqa_files(data_dir / "medqa", options)
        tests = [p for p in files if "test" in p.name]
        if len(tests) != 1:
            raise FileNotFoundError(f"{data_dir / 'medqa'}: expected one *test*.jsonl with {options} options (A-"
                                    f"{'ABCDE'[options - 1]}) for {spec.name}, found {[p.name for p in tests]}")
        paths = {"test": tests[0]}
        trains = [p for p in files if "train" in p.name]
        if trains:
            paths["shots"] = trains[0]
    elif spec.family == "medmcqa":
        paths = {"test": data_dir / "medmcqa" / "dev.json"}
        if (data_dir / "medmcqa" / "train.json").is_file():
            paths["shots"] = data_dir / "medmcqa" / "train.json"
    else:
        paths = {"test": data_dir / "pubmedqa" / "test_ground_truth.json",
                 "shots": data_dir / "pubmedqa" / "ori_pqal.json"}
    for role, path in paths.items():
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name}: {role} file {path} not found")
    return paths


def _load_raw(spec: TaskSpec, data_dir: Path) -> TaskData:
    paths = _raw_paths(spec, data_dir)
    if spec.family == "mmlu":
        task = TaskData(spec, "en", raw_formats.read_mmlu_csv(paths["test"]),
                        raw_formats.read_mmlu_csv(paths["shots"]), shot_source=f"{paths['shots'].name} (dev split)")
        val = data_dir / "mmlu_medical" / "val" / f"{spec.mmlu_subject}_val.csv"
        if val.is_file():
            task.calibration_questions = raw_formats.read_mmlu_csv(val)
            task.calibration_source = f"{val.name} (val split)"
        return task
    if spec.family == "pubmedqa":
        return _load_raw_pubmedqa(spec, data_dir)
    read = raw_formats.read_medqa_jsonl if spec.family == "medqa" else raw_formats.read_medmcqa
    questions = read(paths["test"])
    if "shots" in paths:
        return TaskData(spec, "en", questions, read(paths["shots"]), shot_source=f"{paths['shots'].name} (train split)")
    # No train file beside the test file: shots come from the test set itself, never the question
    # being asked (see shots.py). Said loudly in results.json.
    return TaskData(spec, "en", questions, questions,
                    shot_source=f"{paths['test'].name} (test split minus the question: no train file found)")


def _load_raw_pubmedqa(spec: TaskSpec, data_dir: Path) -> TaskData:
    folder = data_dir / "pubmedqa"
    labelled = folder / "ori_pqal.json"
    test_set = folder / "test_set.json"
    ground_truth = folder / "test_ground_truth.json"
    if test_set.is_file():
        questions = raw_formats.read_pubmedqa(test_set, ground_truth)
    else:  # the test PMIDs are a subset of the 1,000 labelled ones
        labels = raw_formats.read_pubmedqa_labels(ground_truth)
        questions = [q for q in raw_formats.read_pubmedqa(labelled) if q.id in labels]
        if len(questions) != len(labels):
            raise raw_formats.DataFormatError(f"{ground_truth}: {len(labels) - len(questions)} PMIDs are not in "
                                              f"{labelled} (and no test_set.json beside it)")
    test_ids = {q.id for q in questions}
    pool = raw_formats.read_pubmedqa(labelled, exclude_ids=test_ids)
    return TaskData(spec, "en", questions, pool, shot_source="ori_pqal.json minus the test PMIDs (PQA-L train)")


def load_tasks(task_langs: list[tuple[str, str]], data_dir: str | os.PathLike,
               source: str = "auto") -> list[TaskData]:
    """Every `(task, lang)`, all read before any model runs, so a missing file fails fast."""
    return [load_task(name, data_dir, lang, source) for name, lang in task_langs]
