"""`prepare-sft`: medical QA questions → the evaluation prompt + gold answer → packed shards for the trainer.

The output is a prepared directory like `prepare`'s (shards + `manifest.json`, written last), with a
third record field, `trainable`, marking the answer tokens: the loader turns it into an answer-only
loss mask (or every token counts with `answer_only=False`). Examples are split between train and
validation by a hash of their prompt, and packed with segment ids so packed examples never attend
to each other.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from bmx.data import shards
from bmx.data.manifest import FORMAT, MANIFEST, read_manifest, write_manifest
from bmx.data.packing import SPLITS, split_of
from bmx.data.sft_examples import pack_rows, render_qa_example, tokenize_example
from bmx.tasks.catalog import load_task
from bmx.tasks.questions import Question
from bmx.tokenizer import MISTRAL_V01, load_tokenizer

QUESTION_SPLITS = ("train", "test")
log = logging.getLogger("bmx.data")


@dataclass(frozen=True)
class SFTSettings:
    tasks: tuple[str, ...] = ("medqa",)
    question_split: str = "train"  # "test" fine-tunes on the evaluation questions: demos and smoke tests only
    seq_len: int = 2048
    val_fraction: float = 0.05
    answer_only: bool = True
    tokenizer: str = MISTRAL_V01

    def validate(self) -> None:
        if self.question_split not in QUESTION_SPLITS:
            raise ValueError(f"question split {self.question_split!r} is not one of {QUESTION_SPLITS}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def task_questions(task: str, data_dir: str | os.PathLike, question_split: str) -> list[Question]:
    """The questions of `task` to fine-tune on: its train split, or (asked for explicitly) its test split."""
    data = load_task(task, data_dir)
    if question_split == "test":
        return data.questions
    if not data.shot_pool or data.shot_pool is data.questions:
        raise ValueError(f"{task}: {data_dir} has no train split for it (shots: {data.shot_source}); add its train "
                         "file, or use --question-split test to fine-tune on the test questions (and do not "
                         "evaluate on them afterwards)")
    return data.shot_pool


def prepare_sft(data_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: SFTSettings = SFTSettings(),
                progress: bool = True) -> dict:
    """Write the SFT shards and manifest into `out_dir`; returns the manifest (the existing one if identical)."""
    settings.validate()
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).is_file():
        manifest = read_manifest(out_dir)
        if manifest.get("sft") != asdict(settings) | {"tasks": list(settings.tasks)}:
            raise ValueError(f"{out_dir} already holds a different preparation ({out_dir / MANIFEST}); "
                             "choose another --out or delete it")
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    shards.remove_temporary_shards(out_dir)
    tokenizer = load_tokenizer(settings.tokenizer)
    examples: dict[str, list] = {split: [] for split in SPLITS}
    too_long: dict[str, int] = {}  # examples longer than a packed sequence are left out, and counted
    for task in settings.tasks:
        questions = task_questions(task, data_dir, settings.question_split)
        for question in tqdm(questions, desc=f"tokenize {task}", disable=not progress):
            example = render_qa_example(question)
            tokenized = tokenize_example(tokenizer, example)
            if len(tokenized.token_ids) > settings.seq_len:
                too_long[task] = too_long.get(task, 0) + 1
                continue
            examples[split_of(example.prompt, settings.val_fraction)].append(tokenized)
    if too_long:
        log.warning("left out examples longer than seq_len %d: %s", settings.seq_len, too_long)
    dtype = shards.record_dtype(tokenizer.vocab_size, settings.seq_len)
    splits = {split: _write_split(out_dir, split, examples[split], settings, dtype) for split in SPLITS}
    manifest = {
        "format": FORMAT,
        "seq_len": settings.seq_len,
        "record_fields": [shards.TOKENS, shards.SEGMENT_IDS, shards.TRAINABLE],
        "record_dtype": dtype.str,
        "tokenizer": {"spec": settings.tokenizer, "vocab_size": tokenizer.vocab_size},
        "sft": asdict(settings) | {"tasks": list(settings.tasks)},
        "documents": sum(s["documents"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
        "sequences": sum(s["sequences"] for s in splits.values()),
        "splits": splits,
        "left_out_too_long": too_long,
    }
    write_manifest(out_dir, manifest)
    return manifest


def _write_split(out_dir: Path, split: str, examples: Sequence, settings: SFTSettings, dtype: np.dtype) -> dict:
    tokens, trainable, segment_ids = pack_rows(examples, settings.seq_len, answer_only=settings.answer_only)
    name = shards.shard_name(split, 0, 1)
    records = (shards.encode_record(np.stack(fields), dtype) for fields in zip(tokens, segment_ids, trainable))
    count = shards.write_shard(out_dir / name, records)
    return {"shards": [name], "sequences": count, "documents": len(examples),
            "tokens": int(sum(len(example.token_ids) for example in examples))}
