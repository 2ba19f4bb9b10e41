"""Run a `Scorer` over many token sequences: bucketed batches, a progress bar, results in input order."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from bmx.eval.batching import pad_batch, plan_batches
from bmx.eval.scorers import Scorer

DEFAULT_TOKENS_PER_BATCH = 8192
_TOKEN_ID_SLOTS = 8  # requested ids per row are padded to a multiple of this: one compilation for 2-8 options


def target_slots(count: int) -> int:
    """Positions scored per row: the next power of two (at least 4), so continuations of any length
    share a few compiled shapes."""
    return max(4, 1 << (count - 1).bit_length())


def left_truncate(tokens: Sequence[int], max_length: int) -> list[int]:
    return list(tokens[-max_length:])


def score_next_token(scorer: Scorer, sequences: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]], *,
                     tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, desc: str = "scoring",
                     progress: bool = True) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """For each sequence, the next-token log-probabilities of its `token_ids`, and the top token.

    Sequences longer than the model's `max_length` keep their last `max_length` tokens.
    Returns `(logprobs per sequence, top token id [N], top log-probability [N])`.
    """
    sequences = [left_truncate(s, scorer.max_length) for s in sequences]
    slots = -(-max(len(ids) for ids in token_ids) // _TOKEN_ID_SLOTS) * _TOKEN_ID_SLOTS
    requested = np.zeros((len(sequences), slots), dtype=np.int32)
    for row, ids in enumerate(token_ids):
        requested[row, :len(ids)] = ids
    logprobs = np.zeros((len(sequences), slots), dtype=np.float32)
    top_id = np.zeros(len(sequences), dtype=np.int64)
    top_logprob = np.zeros(len(sequences), dtype=np.float32)
    lengths = [len(s) for s in sequences]
    with tqdm(total=len(sequences), desc=desc, unit="seq", disable=not progress) as bar:
        for batch in plan_batches(lengths, scorer.max_length, tokens_per_batch, scorer.row_multiple):
            input_ids, mask = pad_batch(sequences, batch)
            last_index = np.zeros(batch.rows, dtype=np.int32)
            last_index[:len(batch.indices)] = [lengths[i] - 1 for i in batch.indices]
            batch_ids = np.zeros((batch.rows, slots), dtype=np.int32)
            batch_ids[:len(batch.indices)] = requested[batch.indices]
            out_logprobs, out_top, out_top_logprob = scorer.next_token(input_ids, mask, last_index, batch_ids)
            real = len(batch.indices)
            logprobs[batch.indices], top_id[batch.indices] = out_logprobs[:real], out_top[:real]
            top_logprob[batch.indices] = out_top_logprob[:real]
            bar.update(real)
    return [logprobs[row, :len(ids)] for row, ids in enumerate(token_ids)], top_id, top_logprob


def score_continuations(scorer: Scorer, inputs: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
                        tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH, desc: str = "scoring",
                        progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each continuation, predicted at the last positions of its input.

    `inputs[i]` is context + continuation without its last token (already truncated to fit); the
    continuation's tokens are the ones predicted at its last `len(continuations[i])` positions.
    Returns `(summed logprob [N], all tokens greedy [N])`.
    """
    sums = np.zeros(len(inputs), dtype=np.float64)
    greedy = np.zeros(len(inputs), dtype=bool)
    lengths = [len(s) for s in inputs]
    with tqdm(total=len(inputs), desc=desc, unit="seq", disable=not progress) as bar:
        for batch in plan_batches(lengths, scorer.max_length, tokens_per_batch, scorer.row_multiple):
            input_ids, mask = pad_batch(inputs, batch)
            slots = target_slots(max(len(continuations[i]) for i in batch.indices))
            target_positions = np.zeros((batch.rows, slots), dtype=np.int32)
            target_ids = np.zeros((batch.rows, slots), dtype=np.int32)
            target_mask = np.zeros((batch.rows, slots), dtype=np.float32)
            for row, index in enumerate(batch.indices):
                end, count = lengths[index], len(continuations[index])
                target_positions[row, :count] = np.arange(end - count, end)
                target_ids[row, :count] = continuations[index]
                target_mask[row, :count] = 1.0
            out_sums, out_greedy = scorer.continuation(input_ids, mask, target_positions, target_ids, target_mask)
            real = len(batch.indices)
            sums[batch.indices], greedy[batch.indices] = out_sums[:real], out_greedy[:real]
            bar.update(real)
    return sums, greedy
