"""Prompt text for both protocols, byte for byte.

`biomistral`: BioInstructQA's `getPrompt` (BioMistral repository, Data/Evaluation/BioInstructQA.py):

    The following are multiple choice questions (with answers) about medical knowledge. \\n <block> \\n <block>...

each block `[<context> \\n ]**Question:** <question> \\n (A) <opt> \\n (B) <opt> ... \\n **Answer:**(<letter>`,
the shots with their gold letter, the query with none. `" \\n "` is a newline with a space either side.

`loglik`: lm-eval-harness 0.4's prompts for these tasks (`mmlu_*`, `medqa_4options`, `medmcqa`,
`pubmedqa`), and its few-shot layout: description + (shot + " " + gold choice + "\\n\\n") per shot + query.
"""

from __future__ import annotations

from collections.abc import Sequence

from bmx.tasks.catalog import TaskSpec
from bmx.tasks.questions import Question

BIOMISTRAL_INSTRUCTION = "The following are multiple choice questions (with answers) about medical knowledge. \n "
BLOCK_SEPARATOR = " \n "


def biomistral_block(question: Question, answer_letter: str) -> str:
    context = f"{question.context}{BLOCK_SEPARATOR}" if question.context is not None else ""
    options = BLOCK_SEPARATOR.join(f"({letter.upper()}) {text}" for letter, text in question.options.items())
    return (f"{context}**Question:** {question.question}{BLOCK_SEPARATOR}{options}{BLOCK_SEPARATOR}"
            f"**Answer:**({answer_letter}")


def biomistral_prompt(question: Question, shots: Sequence[Question]) -> str:
    """The paper's prompt for `question`, ending in `**Answer:**(` where the letter is predicted."""
    blocks = [biomistral_block(shot, shot.answer) for shot in shots] + [biomistral_block(question, "")]
    return BIOMISTRAL_INSTRUCTION + BLOCK_SEPARATOR.join(blocks)


# ---- lm-eval-harness ------------------------------------------------------------------------------

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
CHOICE_STYLES = ("letters", "texts")


def lm_eval_query(spec: TaskSpec, question: Question) -> str:
    """lm-eval's `doc_to_text` for the task's family (no description, no shots)."""
    lettered = "".join(f"{letter}. {text}\n" for letter, text in question.options.items())
    if spec.family == "mmlu":
        return f"{question.question.strip()}\n{lettered}Answer:"
    if spec.family == "medqa":
        return f"Question: {question.question}\n{lettered}Answer:"
    if spec.family == "medmcqa":
        return f"Question: {question.question}\nChoices:\n{lettered}Answer:"
    abstract = "\n".join(question.context_passages)
    return f"Abstract: {abstract}\nQuestion: {question.question}\nAnswer:"


def lm_eval_choices(spec: TaskSpec, question: Question, style: str = "letters") -> list[str]:
    """The continuations scored, without the leading delimiter: letters, or option texts.

    PubMedQA's choices are its answers (yes/no/maybe) in lm-eval, whatever the style.
    """
    if style not in CHOICE_STYLES:
        raise ValueError(f"choice style must be one of {CHOICE_STYLES}, got {style!r}")
    if spec.family == "pubmedqa" or style == "texts":
        return list(question.options.values())
    return list(question.options)


def lm_eval_description(spec: TaskSpec) -> str:
    if spec.family != "mmlu":
        return ""
    subject = spec.mmlu_subject.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def lm_eval_context(spec: TaskSpec, question: Question, shots: Sequence[Question], style: str = "letters") -> str:
    """lm-eval's full context: description, the labelled shots, then the query."""
    labelled = "".join(
        lm_eval_query(spec, shot) + TARGET_DELIMITER + lm_eval_choices(spec, shot, style)[shot.answer_index]
        + FEWSHOT_DELIMITER for shot in shots)
    return lm_eval_description(spec) + labelled + lm_eval_query(spec, question)
