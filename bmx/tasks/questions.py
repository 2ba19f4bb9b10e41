"""One multiple-choice question, whatever file it came from.

Every loader (MMLU CSV, MedQA JSONL, MedMCQA, PubMedQA, BioInstructQA) produces `Question`s, so the
prompts, the scoring and the reports never look at a raw format.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Question:
    """A question with lettered options and its gold letter.

    `context_passages` holds PubMedQA's abstract, one string per labelled section (BACKGROUND,
    METHODS, ...); it is empty for the other tasks. `shot_sets` carries BioInstructQA's own
    `few_shot_samples` (three sets of three English shots) when the record has them.
    """

    id: str
    question: str
    options: dict[str, str]  # letter -> option text, in the order the options are shown
    answer: str  # gold letter, one of `options`
    context_passages: tuple[str, ...] = ()
    shot_sets: tuple[tuple[Question, ...], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"question {self.id!r} has no options")
        if self.answer not in self.options:
            raise ValueError(f"question {self.id!r}: gold letter {self.answer!r} is not one of its options "
                             f"{list(self.options)}")

    @property
    def letters(self) -> list[str]:
        return list(self.options)

    @property
    def answer_index(self) -> int:
        return self.letters.index(self.answer)

    @property
    def context(self) -> str | None:
        """The context as one string (passages joined by a space), or None without one."""
        return " ".join(self.context_passages) if self.context_passages else None
