"""SFT sequences from real MedQA questions: the evaluation's prompt and letter, answer-only loss, packing.

The packed batch's loss (bmx model, document masking, the trainer's chunked cross-entropy) must
equal transformers' loss computed example by example with `labels = -100` outside the answer.
"""

import numpy as np
import pytest
import torch
from flax import nnx
from generate.generation_testing import hf_and_bmx

from bmx.data.loader import batch_features
from bmx.data.sft_examples import TokenizedExample, pack_rows, render_qa_example, tokenize_example
from bmx.data.shards import SEGMENT_IDS, TOKENS, TRAINABLE
from bmx.eval.letter_protocol import letter_token_ids
from bmx.tasks.prompts import biomistral_prompt
from bmx.tasks.raw_formats import read_medqa_jsonl
from bmx.tokenizer import load_tokenizer
from bmx.train.loss import chunked_cross_entropy
from bmx.train.step import _head_kernel

MEDQA_TEST = "eval/medqa/US_4_options_phrases_no_exclude_test.jsonl"


def pack_examples(examples, seq_len: int, *, answer_only: bool = True) -> dict[str, np.ndarray]:
    """Packed rows as the trainer receives them: what prepare-sft stores, through the loader's batch layout."""
    fields = [TOKENS, TRAINABLE, SEGMENT_IDS]
    tokens, trainable, segment_ids = pack_rows(examples, seq_len, answer_only=answer_only)
    return batch_features(np.stack([tokens, trainable, segment_ids], axis=1), fields)


@pytest.fixture(scope="module")
def questions(shared_data):
    return read_medqa_jsonl(shared_data / MEDQA_TEST)[:5]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_example_is_the_evaluation_prompt_then_the_letter_the_evaluation_reads(questions, tokenizer):
    for question in questions:
        example = render_qa_example(question)
        assert example.prompt == biomistral_prompt(question, []) and example.prompt.endswith("**Answer:**(")
        tokens = tokenize_example(tokenizer, example)
        prompt_ids = [tokenizer.bos_id, *tokenizer.encode(example.prompt)]
        assert tokens.token_ids == prompt_ids + letter_token_ids(tokenizer, [question.answer]) + [tokenizer.eos_id]
        assert tokens.answer_mask == [0] * len(prompt_ids) + [1, 1]


def transformers_mean_loss(reference, examples, answer_only: bool) -> tuple[float, int]:
    """Token-weighted mean loss over the examples, one forward each, `labels = -100` where not trained."""
    loss_sum, count = 0.0, 0
    for example in examples:
        labels = torch.tensor([example.token_ids])
        if answer_only:
            labels[0, torch.tensor(example.answer_mask) == 0] = -100
        with torch.no_grad():
            mean = reference(input_ids=torch.tensor([example.token_ids]), labels=labels).loss.item()
        counted = int((labels[0, 1:] != -100).sum())
        loss_sum, count = loss_sum + mean * counted, count + counted
    return loss_sum / count, count


def test_packed_loss_equals_transformers_per_example_loss(tmp_path, questions, tokenizer):
    reference, model = hf_and_bmx(tmp_path, vocab_size=32000, sliding_window=64, max_position_embeddings=1024)
    examples = [tokenize_example(tokenizer, render_qa_example(q)) for q in questions]
    seq_len = 640  # MedQA prompts are 150-350 tokens: several examples per row, and several rows
    rows = {mode: pack_examples(examples, seq_len, answer_only=mode) for mode in (True, False)}
    assert 1 < len(rows[True]["inputs"]) < len(examples)
    packed = rows[True]  # the same rows either way; only the loss mask differs
    hidden = nnx.jit(lambda m, r: m.hidden_states(r["inputs"], positions=r["positions"], segment_ids=r["segment_ids"]))(
        model, {key: packed[key] for key in ("inputs", "positions", "segment_ids")})
    for answer_only in (True, False):
        loss_sum, _, count = chunked_cross_entropy(hidden, _head_kernel(model), packed["targets"],
                                                   rows[answer_only]["loss_mask"], vocab_chunk=0)
        expected_mean, expected_count = transformers_mean_loss(reference, examples, answer_only)
        assert int(count) == expected_count == (
            2 * len(examples) if answer_only else sum(len(e.token_ids) - 1 for e in examples))
        assert abs(float(loss_sum) / float(count) - expected_mean) < 1e-4


def test_rows_keep_examples_whole_and_apart():
    examples = [TokenizedExample([1, 5, 6, 7, 2], [0, 0, 0, 1, 1]), TokenizedExample([1, 8, 9, 2], [0, 0, 1, 1]),
                TokenizedExample([1, 4, 2], [0, 1, 1])]
    rows = pack_examples(examples, seq_len=9)
    np.testing.assert_array_equal(rows["inputs"], [[1, 5, 6, 7, 2, 1, 8, 9, 2], [1, 4, 2, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3, 4, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0, 0, 0, 0]])
    # Position i counts when token i + 1 is an answer token of the same example.
    np.testing.assert_array_equal(rows["loss_mask"], [[0, 0, 1, 1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0]])


def test_example_longer_than_a_row_is_an_error_naming_it():
    with pytest.raises(ValueError, match="example 1 has 6 tokens, more than the packed sequence length 5"):
        pack_examples([TokenizedExample([1, 2], [0, 1]), TokenizedExample([1] * 6, [0] * 5 + [1])], seq_len=5)
