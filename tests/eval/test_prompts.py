"""The BioMistral prompt, byte for byte as specified, and the seeded shot sets."""

import pytest

from bmx.tasks.catalog import TASKS, load_task
from bmx.tasks.prompts import biomistral_prompt, lm_eval_choices, lm_eval_context
from bmx.tasks.questions import Question
from bmx.tasks.shots import ShotSampler, seeds_for

QUERY = Question("q", "What is 2+2?", {"A": "3", "B": "4"}, "B")
SHOT_WITH_CONTEXT = Question("s1", "Capital of France?", {"A": "Paris", "B": "Rome"}, "A",
                             context_passages=("Paris is in France.", "Rome is in Italy."))
SHOT = Question("s2", "Largest organ?", {"A": "Skin", "B": "Liver", "C": "Brain"}, "A")


def test_zero_shot_prompt_bytes():
    expected = (b"The following are multiple choice questions (with answers) about medical knowledge. \n "
                b"**Question:** What is 2+2? \n (A) 3 \n (B) 4 \n **Answer:**(")
    assert biomistral_prompt(QUERY, []).encode("utf-8") == expected


def test_shots_end_with_their_gold_letter_and_blocks_join_with_a_spaced_newline():
    expected = (b"The following are multiple choice questions (with answers) about medical knowledge. \n "
                b"Paris is in France. Rome is in Italy. \n **Question:** Capital of France? \n (A) Paris \n (B) Rome"
                b" \n **Answer:**(A"
                b" \n "
                b"**Question:** Largest organ? \n (A) Skin \n (B) Liver \n (C) Brain \n **Answer:**(A"
                b" \n "
                b"**Question:** What is 2+2? \n (A) 3 \n (B) 4 \n **Answer:**(")
    assert biomistral_prompt(QUERY, [SHOT_WITH_CONTEXT, SHOT]).encode("utf-8") == expected


def test_real_pubmedqa_prompt_puts_the_abstract_before_the_question(shared_data):
    task = load_task("pubmedqa", shared_data / "eval")
    question = task.questions[0]
    prompt = biomistral_prompt(question, [])
    assert prompt.endswith(f"{' '.join(question.context_passages)} \n **Question:** {question.question} \n "
                           "(A) yes \n (B) no \n (C) maybe \n **Answer:**(")


def test_shot_sets_are_fixed_per_seed_and_differ_between_seeds(shared_data):
    task = load_task("mmlu_anatomy", shared_data / "eval")
    sets = {seed: ShotSampler(task.shot_pool, seed).shots_for(task.questions[0], 3) for seed in (1, 2, 3)}
    assert all(len(shots) == 3 for shots in sets.values())
    again = ShotSampler(task.shot_pool, 2).shots_for(task.questions[7], 3)
    assert again == sets[2]  # the same shots for every question of the task
    assert len({tuple(s.id for s in shots) for shots in sets.values()}) == 3


def test_a_question_is_never_its_own_shot_when_shots_come_from_the_test_set(shared_data):
    task = load_task("medqa", shared_data / "eval")
    sampler = ShotSampler(task.shot_pool, 1)
    first_shot = sampler.shots_for(task.questions[0], 3)[0]
    assert first_shot.id not in {s.id for s in sampler.shots_for(first_shot, 3)}
    assert len(sampler.shots_for(first_shot, 3)) == 3


def test_zero_shots_run_once_and_bioinstructqa_sets_are_limited_to_three():
    assert seeds_for(0, 3) == [1]
    assert seeds_for(3, 3) == [1, 2, 3]
    own = Question("x", "q?", {"A": "a", "B": "b"}, "A", shot_sets=((SHOT,) * 3,) * 3)
    with pytest.raises(ValueError, match="three"):
        ShotSampler([], 4).shots_for(own, 3)


def test_lm_eval_few_shot_context_layout():
    spec = TASKS["mmlu_anatomy"]
    context = lm_eval_context(spec, QUERY, [SHOT])
    assert context == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                       "Largest organ?\nA. Skin\nB. Liver\nC. Brain\nAnswer: A\n\n"
                       "What is 2+2?\nA. 3\nB. 4\nAnswer:")
    assert lm_eval_choices(spec, QUERY) == ["A", "B"]
    assert lm_eval_choices(spec, QUERY, "texts") == ["3", "4"]
