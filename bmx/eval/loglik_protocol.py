"""lm-eval-harness's multiple-choice protocol: the log-likelihood of each option's continuation.

Tokenization follows lm-eval 0.4's `TemplateLM._encode_pair` for causal models exactly: trailing
spaces of the context move to the front of the continuation; context+continuation is encoded as a
whole (with BOS, as `tokenizer(text)` does) and the continuation's tokens are whatever follows the
context's own encoding. The model reads `(context + continuation)[-(max_length + 1):][:-1]`.

`acc` takes the option with the highest summed log-probability; `acc_norm` divides each by the
length in characters of the option's text first (lm-eval's `completion_len`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

from bmx.eval.engine import DEFAULT_TOKENS_PER_BATCH, score_continuations, score_next_token
from bmx.eval.scorers import Scorer
from bmx.tokenizer import Tokenizer


def encode_pairs(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """`(context_tokens, continuation_tokens)` for each `(context, continuation)`, as lm-eval splits them."""
    moved = []
    for context, continuation in pairs:
        if not context:
            raise ValueError("empty context: every bmx prompt has one (lm-eval would condition on BOS alone)")
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        moved.append((context, continuation))
    contexts = _encode_with_bos(tokenizer, [context for context, _ in moved])
    wholes = _encode_with_bos(tokenizer, [context + continuation for context, continuation in moved])
    return [(context, whole[len(context):]) for context, whole in zip(contexts, wholes)]


def _encode_with_bos(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    unique = list(dict.fromkeys(texts))  # the same context is shared by all of a question's options
    encoded = dict(zip(unique, tokenizer.encode_batch(unique)))
    return [[tokenizer.bos_id, *encoded[text]] for text in texts]


def score_pairs(scorer: Scorer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], *,
                tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, progress: bool = True,
                desc: str = "loglikelihood") -> tuple[np.ndarray, np.ndarray]:
    """`(summed log-probability [N], is_greedy [N])` of each continuation given its context."""
    return score_encoded(scorer, encode_pairs(tokenizer, pairs), tokens_per_batch=tokens_per_batch,
                         progress=progress, desc=desc)


def score_encoded(scorer: Scorer, encoded: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                  tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, progress: bool = True,
                  desc: str = "loglikelihood") -> tuple[np.ndarray, np.ndarray]:
    """As `score_pairs`, from token ids.

    One-token continuations that share their input (a question's lettered options) are read
    from a single forward pass; longer ones get a forward pass each.
    """
    loglik = np.zeros(len(encoded), dtype=np.float64)
    greedy = np.zeros(len(encoded), dtype=bool)
    single_by_input: dict[tuple[int, ...], list[int]] = defaultdict(list)
    multi: list[int] = []
    inputs: list[tuple[int, ...]] = []
    for index, (context, continuation) in enumerate(encoded):
        if not continuation:
            raise ValueError(f"request {index}: the continuation encodes to no tokens")
        if len(continuation) > scorer.max_length:
            raise ValueError(f"request {index}: continuation of {len(continuation)} tokens exceeds the model's "
                             f"max_length {scorer.max_length}")
        model_input = tuple((list(context) + list(continuation))[-(scorer.max_length + 1):][:-1])
        inputs.append(model_input)
        (single_by_input[model_input] if len(continuation) == 1 else multi).append(index)
    if single_by_input:
        shared_inputs = list(single_by_input)
        token_ids = [[encoded[i][1][0] for i in single_by_input[key]] for key in shared_inputs]
        logprobs, top, _ = score_next_token(scorer, shared_inputs, token_ids, tokens_per_batch=tokens_per_batch,
                                            desc=desc, progress=progress)
        for key, row_logprobs, row_top, ids in zip(shared_inputs, logprobs, top, token_ids):
            for index, logprob, token in zip(single_by_input[key], row_logprobs, ids):
                loglik[index], greedy[index] = logprob, token == row_top
    if multi:
        sums, all_greedy = score_continuations(scorer, [inputs[i] for i in multi], [encoded[i][1] for i in multi],
                                               tokens_per_batch=tokens_per_batch, desc=desc, progress=progress)
        loglik[multi], greedy[multi] = sums, all_greedy
    return loglik, greedy


@dataclass(frozen=True)
class ChoiceOutcome:
    prediction: int  # argmax of log-likelihoods
    prediction_norm: int  # argmax of log-likelihood per character of the choice


def choose(logliks: Sequence[float], choices: Sequence[str]) -> ChoiceOutcome:
    """lm-eval's `process_results` for multiple choice (first index wins ties, as `np.argmax`)."""
    logliks = np.asarray(logliks, dtype=np.float64)
    lengths = np.array([float(len(choice)) for choice in choices])
    return ChoiceOutcome(int(np.argmax(logliks)), int(np.argmax(logliks / lengths)))
