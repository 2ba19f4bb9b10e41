"""Few-shot examples: three fixed shot sets per task, each drawn with its own seed.

Shot set `s` (1, 2, 3, ... like BioInstructQA's `few_shot_samples[s]`) is the first `k` questions
of the pool in the order of a permutation seeded with `s`, skipping the question being asked.
With a separate train/dev pool that is the same `k` shots for every question; when the pool is
the test set itself (no train file), a question that would be its own shot is replaced by the
next question of the permutation, so no question ever sees its own answer.
Questions from BioInstructQA carry their own sets, which are used as they are.
"""

from __future__ import annotations

import numpy as np

from bmx.tasks.questions import Question


class ShotSampler:
    """Draws the shots of shot set `seed` from `pool`."""

    def __init__(self, pool: list[Question], seed: int):
        self.pool = pool
        self.seed = seed
        self.order = np.random.default_rng(seed).permutation(len(pool))

    def shots_for(self, question: Question, k: int) -> tuple[Question, ...]:
        if question.shot_sets:
            return own_shots(question, self.seed, k)
        shots = []
        for index in self.order:
            candidate = self.pool[index]
            if candidate.id != question.id:
                shots.append(candidate)
                if len(shots) == k:
                    return tuple(shots)
        if k == 0:
            return ()
        raise ValueError(f"shot pool has {len(self.pool)} question(s); {k} shots other than {question.id!r} "
                         "were asked for")


def own_shots(question: Question, seed: int, k: int) -> tuple[Question, ...]:
    """The first `k` shots of the question's own shot set number `seed` (1-based)."""
    if not 1 <= seed <= len(question.shot_sets):
        raise ValueError(f"question {question.id!r} has {len(question.shot_sets)} shot sets; set {seed} was asked "
                         "for (BioInstructQA ships three: use --seeds 3 or fewer)")
    shots = question.shot_sets[seed - 1]
    if k > len(shots):
        raise ValueError(f"question {question.id!r}: shot set {seed} has {len(shots)} shots, {k} were asked for")
    return tuple(shots[:k])


def seeds_for(shots: int, seeds: int) -> list[int]:
    """Shot-set numbers to run: 1..seeds, or a single run when there are no shots to vary."""
    if shots < 0 or seeds < 1:
        raise ValueError(f"--shots must be >= 0 and --seeds >= 1, got shots={shots}, seeds={seeds}")
    return [1] if shots == 0 else list(range(1, seeds + 1))
