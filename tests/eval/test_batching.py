"""Length-sorted, bucketed batches: every sequence once, few shapes, rows split evenly over devices."""

import numpy as np

from bmx.eval.batching import bucket_for, bucket_lengths, pad_batch, plan_batches


def test_buckets_grow_by_at_most_half_and_end_at_max_length():
    buckets = bucket_lengths(1000)
    assert buckets[:6] == [16, 24, 32, 48, 64, 96]
    assert buckets[-1] == 1000
    assert all(b / a <= 1.5 for a, b in zip(buckets, buckets[1:]))


def test_every_sequence_lands_in_exactly_one_batch_longest_first():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 700, size=300).tolist()
    batches = plan_batches(lengths, max_length=1024, tokens_per_batch=4096, row_multiple=8)
    seen = np.concatenate([b.indices for b in batches])
    assert sorted(seen.tolist()) == list(range(300))
    assert [lengths[b.indices[0]] for b in batches] == sorted((lengths[b.indices[0]] for b in batches), reverse=True)
    for batch in batches:
        assert batch.rows % 8 == 0 and len(batch.indices) <= batch.rows
        assert all(bucket_for(lengths[i], bucket_lengths(1024)) == batch.seq_len for i in batch.indices)
    shapes = {(b.rows, b.seq_len) for b in batches}
    assert len(shapes) <= 3 * len({b.seq_len for b in batches})  # full batches plus at most two tail pieces per bucket


def test_padding_is_on_the_right_and_filler_rows_keep_one_token():
    batches = plan_batches([3, 2], max_length=64, tokens_per_batch=64, row_multiple=4)
    input_ids, mask = pad_batch([[5, 6, 7], [8, 9]], batches[0], pad_id=0)
    assert input_ids.shape == (4, 16)
    assert input_ids[0, :4].tolist() == [5, 6, 7, 0] and mask[0, :4].tolist() == [1, 1, 1, 0]
    assert mask[2].tolist() == [1] + [0] * 15


def test_a_last_batch_is_split_rather_than_mostly_filler():
    # 3 questions of one bucket: 2 + 1 rows, not 4 rows with one computed for nothing.
    assert [(len(b.indices), b.rows) for b in plan_batches([450, 440, 430], 4096, 8192)] == [(2, 2), (1, 1)]
    # 9 of 16 possible rows: 8 + 1 instead of 16.
    assert [(len(b.indices), b.rows) for b in plan_batches([100] * 9, 128, 2048)] == [(8, 8), (1, 1)]
    # 7: one batch of 8 (4 + 4 would compute as many rows).
    assert [(len(b.indices), b.rows) for b in plan_batches([100] * 7, 128, 2048)] == [(7, 8)]
    # With 8 devices a piece is never smaller than 8 rows: 11 sequences become one batch of 16.
    assert [(len(b.indices), b.rows) for b in plan_batches([100] * 11, 128, 4096, row_multiple=8)] == [(11, 16)]
    # 19 of 32 (row multiple 8): 16 + 8.
    assert [(len(b.indices), b.rows) for b in plan_batches([100] * 19, 128, 4096, row_multiple=8)] == [(16, 16), (3, 8)]
