"""BioMistral's letter protocol: one forward pass per question, read the next-token distribution.

The prompt ends in `**Answer:**(`. Each option's probability is the probability of its letter's
token there (over the whole vocabulary, not renormalised); the prediction is the single most
likely token, and a top token that is not one of the option letters counts as a wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from bmx.eval.engine import DEFAULT_TOKENS_PER_BATCH, score_next_token
from bmx.eval.scorers import Scorer
from bmx.tasks.prompts import biomistral_prompt
from bmx.tasks.questions import Question
from bmx.tokenizer import Tokenizer

ANSWER_CUE = "**Answer:**("


def letter_token_ids(tokenizer: Tokenizer, letters: Sequence[str]) -> list[int]:
    """The token each letter becomes right after `**Answer:**(`, as the prompt is tokenized."""
    cue = tokenizer.encode(ANSWER_CUE)
    ids = []
    for letter in letters:
        with_letter = tokenizer.encode(ANSWER_CUE + letter)
        if with_letter[:len(cue)] != cue or len(with_letter) != len(cue) + 1:
            raise ValueError(f"tokenizer {tokenizer.source!r} does not turn letter {letter!r} after "
                             f"{ANSWER_CUE!r} into exactly one token ({with_letter[len(cue) - 1:]})")
        ids.append(with_letter[-1])
    return ids


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Tokens of each prompt with the tokenizer's BOS first, as `tokenizer(prompt)` gives them."""
    return [[tokenizer.bos_id, *tokens] for tokens in tokenizer.encode_batch(prompts)]


@dataclass(frozen=True)
class LetterScores:
    """One model's answer to each of N questions with the same L letters."""

    letter_probs: np.ndarray  # [N, L] probability of each letter's token
    top_token: np.ndarray  # [N] id of the most likely next token
    top_prob: np.ndarray  # [N] its probability
    letter_ids: tuple[int, ...]  # [L] token id of each letter

    def predictions(self, letters: Sequence[str]) -> list[str | None]:
        """The top token's letter, or None when the top token is not an option letter (wrong)."""
        letter_of = dict(zip(self.letter_ids, letters))
        return [letter_of.get(int(token)) for token in self.top_token]


def score_letters(scorer: Scorer, tokenizer: Tokenizer, prompts: Sequence[str], letters: Sequence[str], *,
                  tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, desc: str = "letters",
                  progress: bool = True) -> LetterScores:
    letter_ids = letter_token_ids(tokenizer, letters)
    sequences = encode_prompts(tokenizer, prompts)
    logprobs, top, top_logprob = score_next_token(scorer, sequences, [letter_ids] * len(sequences),
                                                  tokens_per_batch=tokens_per_batch, desc=desc, progress=progress)
    return LetterScores(np.exp(np.stack(logprobs).astype(np.float64)), top, np.exp(top_logprob.astype(np.float64)),
                        tuple(letter_ids))


def ensemble_predictions(scores: Sequence[LetterScores], letters: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The paper's "BioMistral Ensemble": letter probabilities of the models summed, then argmax.

    Returns the mean letter probabilities (same argmax as the sum, and still in [0, 1] for ECE)
    and the predicted letters.
    """
    mean_probs = np.mean([s.letter_probs for s in scores], axis=0)
    return mean_probs, [letters[i] for i in mean_probs.argmax(axis=1)]


def prompts_for(questions: Sequence[Question], shots_per_question: Sequence[Sequence[Question]]) -> list[str]:
    return [biomistral_prompt(q, shots) for q, shots in zip(questions, shots_per_question)]
