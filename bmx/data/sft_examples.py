"""Supervised fine-tuning data: QA examples in the evaluation prompt format, answer-only loss, packing.

BioMistral fine-tunes on the QA training sets rendered exactly as they are evaluated: BioInstructQA's
prompt, ending in `**Answer:**(`, followed by the gold letter, the way a few-shot example shows it.
A sequence is `<s> prompt answer </s>`; with `answer_only` the loss counts only the tokens that
predict the answer and the EOS. Sequences are packed into fixed-length rows with segment ids, and
`bmx.data prepare-sft` stores each row's tokens, trainable marks and segment ids; the loader
(`bmx.data.loader.batch_features`) turns them into the trainer's batch, whose document masking keeps
packed examples apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable, Sequence

import numpy as np

from bmx.tasks.prompts import biomistral_prompt
from bmx.tasks.questions import Question
from bmx.tokenizer import Tokenizer


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    answer: str


@dataclass(frozen=True)
class TokenizedExample:
    token_ids: list[int]  # <s> prompt answer </s>
    answer_mask: list[int]  # 1 on the answer's tokens and the EOS, 0 elsewhere


def render_qa_example(question: Question, shots: Sequence[Question] = ()) -> SFTExample:
    """The evaluation prompt for `question` (BioInstructQA format) with its gold letter as the answer."""
    return SFTExample(biomistral_prompt(question, shots), question.answer)


def tokenize_example(tokenizer: Tokenizer, example: SFTExample, *, add_eos: bool = True) -> TokenizedExample:
    """Tokens of prompt + answer together, split where the prompt's own tokens end.

    Tokenizing the pair as one text gives the answer the tokens it has after the prompt (the letter
    the evaluation reads), which tokenizing it alone would not (SentencePiece would add a space).
    """
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(example.prompt)]
    full_ids = [tokenizer.bos_id, *tokenizer.encode(example.prompt + example.answer)]
    if full_ids[:len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise ValueError(f"answer {example.answer!r} does not tokenize as separate tokens after its prompt "
                         f"(prompt ends {example.prompt[-30:]!r}); the answer-only loss needs a clean token boundary")
    answer_length = len(full_ids) - len(prompt_ids) + (1 if add_eos else 0)
    token_ids = full_ids + ([tokenizer.eos_id] if add_eos else [])
    return TokenizedExample(token_ids, [0] * len(prompt_ids) + [1] * answer_length)


def pack_rows(examples: Iterable[TokenizedExample], seq_len: int, *, answer_only: bool = True,
              pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack examples in order into rows of `seq_len` (an example never straddles two rows).

    Returns `(tokens, trainable, segment_ids)`, each int32 `[rows, seq_len]`: `trainable` marks the
    tokens worth predicting (the answers, or every real token); segment ids run 1, 2, ... per example
    in a row, 0 on padding. This is what `bmx.data prepare-sft` stores per record.
    """
    rows: list[list[TokenizedExample]] = []
    used = seq_len
    for number, example in enumerate(examples):
        length = len(example.token_ids)
        if length > seq_len:
            raise ValueError(f"example {number} has {length} tokens, more than the packed sequence length {seq_len}")
        if used + length > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(example)
        used += length
    shape = (len(rows), seq_len)
    tokens = np.full(shape, pad_id, np.int32)
    trainable = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    for row, members in enumerate(rows):
        start = 0
        for segment, example in enumerate(members, 1):
            end = start + len(example.token_ids)
            tokens[row, start:end] = example.token_ids
            trainable[row, start:end] = example.answer_mask if answer_only else 1
            segment_ids[row, start:end] = segment
            start = end
    return tokens, trainable, segment_ids
