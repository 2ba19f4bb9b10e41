"""Evaluate one or two models on tasks: per shot set, per question, then the task's summary.

A task is run once per shot set (seed); its accuracy is the mean over the sets and its spread
the population standard deviation, as in the paper's tables.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from collections.abc import Sequence

import numpy as np

from bmx.eval import calibration, recalibration
from bmx.eval.engine import DEFAULT_TOKENS_PER_BATCH
from bmx.eval.letter_protocol import ensemble_predictions, prompts_for, score_letters
from bmx.eval.loglik_protocol import choose, score_pairs
from bmx.eval.scorers import Scorer
from bmx.tasks.catalog import TaskData
from bmx.tasks.prompts import TARGET_DELIMITER, lm_eval_choices, lm_eval_context
from bmx.tasks.questions import Question
from bmx.tasks.shots import ShotSampler, seeds_for
from bmx.tokenizer import Tokenizer

PROTOCOLS = ("biomistral", "loglik")


@dataclass
class EvalModel:
    name: str
    scorer: Scorer
    tokenizer: Tokenizer


@dataclass(frozen=True)
class EvalSettings:
    protocol: str = "biomistral"
    shots: int = 3
    seeds: int = 3
    limit: int | None = None
    choice_style: str = "letters"  # loglik only: score the letters (lm-eval's tasks) or the option texts
    tokens_per_batch: int = DEFAULT_TOKENS_PER_BATCH
    progress: bool = True
    calibrate: str | None = None  # temperature | vector: fit on held-out questions (see recalibration.py)
    calibration_folds: int = 5  # cross-fitting folds, for tasks without a calibration split
    suite: str | None = None  # a leaderboard's layout for results.md (tasks.SUITES)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.calibrate is not None and self.calibrate not in recalibration.METHODS:
            raise ValueError(f"--calibrate must be one of {recalibration.METHODS}, got {self.calibrate!r}")
        if self.calibration_folds < 2:
            raise ValueError(f"--calibration-folds must be at least 2, got {self.calibration_folds}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be a positive number of questions, got {self.limit}")


@dataclass
class SeedRun:
    """One shot set's answers to a task's questions."""

    seed: int
    option_probs: np.ndarray  # [N, L] as the model gives them (letter token probs, or exp(loglik))
    correct: np.ndarray  # [N] bool, by the protocol's own rule
    records: list[dict]
    correct_norm: np.ndarray | None = None  # loglik's acc_norm
    calibrated_probs: np.ndarray | None = None  # [N, L] over the options, with --calibrate
    scalings: list = field(default_factory=list)  # the fitted recalibration.Scaling(s) behind them
    calibration_set: tuple[np.ndarray, np.ndarray] | None = None  # (option logits, gold) they were fitted on


@dataclass
class TaskOutcome:
    key: str
    summary: dict
    runs: list[SeedRun] = field(default_factory=list)
    gold: np.ndarray | None = None


def task_key(name: str, lang: str) -> str:
    return name if lang == "en" else f"{name}@{lang}"


def evaluate_task(models: Sequence[EvalModel], task: TaskData, settings: EvalSettings) -> TaskOutcome:
    if len(models) > 1 and settings.protocol != "biomistral":
        raise ValueError("an ensemble sums letter probabilities: it needs --protocol biomistral")
    questions = task.questions[:settings.limit] if settings.limit else task.questions
    letter_sets = {tuple(q.letters) for q in questions}
    if len(letter_sets) != 1:
        raise ValueError(f"task {task.spec.name}: questions have different option letters {sorted(letter_sets)}")
    key = task_key(task.spec.name, task.lang)
    runs = []
    gold = np.array([q.answer_index for q in questions])
    for seed in seeds_for(settings.shots, settings.seeds):
        sampler = ShotSampler(task.shot_pool, seed)
        run_protocol = _letter_run if settings.protocol == "biomistral" else _loglik_run
        shots = [sampler.shots_for(q, settings.shots) for q in questions]
        run = run_protocol(models, task, questions, shots, seed, settings, desc=f"{key} [shot set {seed}]")
        if settings.calibrate:
            held_out = None
            if task.calibration_questions:  # scored with the same protocol and shot set, never with the test set
                held_out_questions = task.calibration_questions
                if {tuple(q.letters) for q in held_out_questions} != letter_sets:
                    raise ValueError(f"task {task.spec.name}: {task.calibration_source} has other option letters "
                                     "than its test questions")
                held_out_run = run_protocol(models, task, held_out_questions,
                                            [sampler.shots_for(q, settings.shots) for q in held_out_questions],
                                            seed, settings, desc=f"{key} [shot set {seed}, calibration]")
                held_out = (recalibration.option_logits(held_out_run.option_probs),
                            np.array([q.answer_index for q in held_out_questions]))
            _calibrate(run, gold, questions[0].letters, settings, held_out)
        runs.append(run)
    return TaskOutcome(key, summarise(task, questions, runs, gold, settings), runs, gold)


def _calibrate(run: SeedRun, gold: np.ndarray, letters: list[str], settings: EvalSettings,
               calibration_set: tuple[np.ndarray, np.ndarray] | None) -> None:
    """Fit on `calibration_set` and apply to the run's questions, or cross-fit over them without one."""
    logits = recalibration.option_logits(run.option_probs)
    if calibration_set is None:
        run.calibrated_probs, run.scalings = recalibration.cross_fit(logits, gold, settings.calibrate,
                                                                     settings.calibration_folds)
        run.calibration_set = (logits, gold)
    else:
        scaling = recalibration.fit(*calibration_set, settings.calibrate)
        run.calibrated_probs, run.scalings = scaling.probabilities(logits), [scaling]
        run.calibration_set = calibration_set
    for record, probs in zip(run.records, run.calibrated_probs):
        record["calibrated_probs"] = dict(zip(letters, map(float, probs)))


def _letter_run(models, task, questions, shots, seed, settings, desc) -> SeedRun:
    letters = questions[0].letters
    prompts = prompts_for(questions, shots)
    scores = [score_letters(m.scorer, m.tokenizer, prompts, letters, tokens_per_batch=settings.tokens_per_batch,
                            desc=f"{desc} {m.name}", progress=settings.progress) for m in models]
    if len(models) == 1:
        probs, predictions = scores[0].letter_probs, scores[0].predictions(letters)
    else:
        probs, predictions = ensemble_predictions(scores, letters)
    correct = np.array([p == q.answer for p, q in zip(predictions, questions)])
    records = []
    for i, q in enumerate(questions):
        record = {"task": task.spec.name, "lang": task.lang, "seed": seed, "id": q.id, "gold": q.answer,
                  "prediction": predictions[i], "correct": bool(correct[i]),
                  "letter_probs": {letter: float(p) for letter, p in zip(letters, probs[i])},
                  "shot_ids": [s.id for s in shots[i]]}
        if len(models) == 1:
            token = int(scores[0].top_token[i])
            record.update(top_token=models[0].tokenizer.id_to_piece(token), top_token_id=token,
                          top_token_prob=float(scores[0].top_prob[i]))
        else:
            record["member_letter_probs"] = {m.name: dict(zip(letters, map(float, s.letter_probs[i])))
                                             for m, s in zip(models, scores)}
        records.append(record)
    return SeedRun(seed, probs, correct, records)


def _loglik_run(models, task, questions, shots, seed, settings, desc) -> SeedRun:
    (model,) = models
    choices = [lm_eval_choices(task.spec, q, settings.choice_style) for q in questions]
    pairs = [(lm_eval_context(task.spec, q, s, settings.choice_style), TARGET_DELIMITER + choice)
             for q, s, options in zip(questions, shots, choices) for choice in options]
    logliks, greedy = score_pairs(model.scorer, model.tokenizer, pairs, tokens_per_batch=settings.tokens_per_batch,
                                  progress=settings.progress, desc=desc)
    n_options = len(choices[0])
    logliks, greedy = logliks.reshape(len(questions), n_options), greedy.reshape(len(questions), n_options)
    outcomes = [choose(row, options) for row, options in zip(logliks, choices)]
    correct = np.array([o.prediction == q.answer_index for o, q in zip(outcomes, questions)])
    correct_norm = np.array([o.prediction_norm == q.answer_index for o, q in zip(outcomes, questions)])
    records = []
    for i, q in enumerate(questions):
        records.append({"task": task.spec.name, "lang": task.lang, "seed": seed, "id": q.id, "gold": q.answer,
                        "prediction": q.letters[outcomes[i].prediction],
                        "prediction_norm": q.letters[outcomes[i].prediction_norm],
                        "correct": bool(correct[i]), "correct_norm": bool(correct_norm[i]),
                        "loglik": {letter: float(v) for letter, v in zip(q.letters, logliks[i])},
                        "is_greedy": {letter: bool(v) for letter, v in zip(q.letters, greedy[i])},
                        "shot_ids": [s.id for s in shots[i]]})
    return SeedRun(seed, np.exp(logliks), correct, records, correct_norm)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(statistics.pstdev(values))


def summarise(task: TaskData, questions: Sequence[Question], runs: Sequence[SeedRun], gold: np.ndarray,
              settings: EvalSettings) -> dict:
    accuracies = [float(run.correct.mean()) for run in runs]
    acc, acc_std = _mean_std(accuracies)
    paper_ece = [calibration.paper_bins(run.option_probs, gold).ece for run in runs]
    renormalised_ece = [calibration.renormalised_bins(run.option_probs, gold).ece for run in runs]
    summary = {"task": task.spec.name, "lang": task.lang, "acc": acc, "acc_std": acc_std, "acc_per_seed": accuracies,
               "n": len(questions), "seeds": [run.seed for run in runs], "shots": settings.shots,
               "shot_source": task.shot_source, "ece_paper": float(np.mean(paper_ece)),
               "ece_10bin": float(np.mean(renormalised_ece))}
    if settings.protocol == "loglik":
        norm = [float(run.correct_norm.mean()) for run in runs]
        summary.update(zip(("acc_norm", "acc_norm_std"), _mean_std(norm)), acc_norm_per_seed=norm)
    elif "top_token_id" in runs[0].records[0]:
        summary["non_letter_top_token"] = float(np.mean(
            [np.mean([r["prediction"] is None for r in run.records]) for run in runs]))
    if settings.calibrate:
        summary["calibration"] = _calibration_summary(task, questions, runs, gold, settings)
    return summary


def _calibration_summary(task: TaskData, questions: Sequence[Question], runs: Sequence[SeedRun], gold: np.ndarray,
                         settings: EvalSettings) -> dict:
    """Accuracy and both ECEs after calibration (probabilities over the options), and what was fitted."""
    accuracies = [float((run.calibrated_probs.argmax(axis=1) == gold).mean()) for run in runs]
    source = (task.calibration_source if task.calibration_questions else
              f"{settings.calibration_folds}-fold cross-fitting over the task's questions")
    letters = questions[0].letters
    return {"method": settings.calibrate, "source": source, "acc": float(np.mean(accuracies)),
            "acc_per_seed": accuracies,
            "ece_paper": float(np.mean([calibration.paper_bins(run.calibrated_probs, gold).ece for run in runs])),
            "ece_10bin": float(np.mean([calibration.renormalised_bins(run.calibrated_probs, gold).ece
                                        for run in runs])),
            "temperature": float(np.mean([s.temperature for run in runs for s in run.scalings])),
            "fits": [{"seed": run.seed, "scalings": [s.describe(letters) for s in run.scalings]} for run in runs]}


def evaluate_tasks(models: Sequence[EvalModel], tasks: Sequence[TaskData], settings: EvalSettings) -> list[TaskOutcome]:
    return [evaluate_task(models, task, settings) for task in tasks]


def results_document(outcomes: Sequence[TaskOutcome], settings: EvalSettings, model_names: Sequence[str]) -> dict:
    """Everything for results.json: settings, every task's summary, the averages."""
    tasks = {outcome.key: outcome.summary for outcome in outcomes}
    by_lang: dict[str, list[float]] = {}
    for summary in tasks.values():
        by_lang.setdefault(summary["lang"], []).append(summary["acc"])
    document = {"models": list(model_names), "suite": settings.suite, "protocol": settings.protocol,
                "shots": settings.shots, "seeds": settings.seeds, "limit": settings.limit, "tasks": tasks,
                "average": float(np.mean([s["acc"] for s in tasks.values()])),
                "average_by_lang": {lang: float(np.mean(accs)) for lang, accs in by_lang.items()}}
    if settings.protocol == "loglik":
        document["choice_style"] = settings.choice_style
        document["average_acc_norm"] = float(np.mean([s["acc_norm"] for s in tasks.values()]))
    if settings.suite:  # lm-eval's own group average weights tasks by size: given beside the leaderboard's
        document["average_weighted_by_size"] = float(sum(s["acc"] * s["n"] for s in tasks.values())
                                                     / sum(s["n"] for s in tasks.values()))
    if settings.calibrate:
        document["calibration"] = _overall_calibration(outcomes, settings)
    return document


def _overall_calibration(outcomes: Sequence[TaskOutcome], settings: EvalSettings) -> dict:
    """Means over tasks before and after, and (temperature scaling) the one temperature for the whole model."""
    summaries = [outcome.summary for outcome in outcomes]
    overall = {"method": settings.calibrate, "folds": settings.calibration_folds,
               "before": {metric: float(np.mean([s[metric] for s in summaries]))
                          for metric in ("acc", "ece_paper", "ece_10bin")},
               "after": {metric: float(np.mean([s["calibration"][metric] for s in summaries]))
                         for metric in ("acc", "ece_paper", "ece_10bin")}}
    if settings.calibrate == "temperature":
        # Pooled over every task's calibration set (for cross-fitted tasks: all their questions), what
        # `python -m bmx.convert calibrate --from-eval` folds into the LM head.
        pooled = recalibration.fit_pooled([run.calibration_set for outcome in outcomes for run in outcome.runs])
        overall["model_temperature"] = pooled.temperature
        overall["model_temperature_fitted_on"] = pooled.fitted_on
    return overall
