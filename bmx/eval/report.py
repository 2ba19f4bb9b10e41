"""Write an evaluation's outputs: results.json, predictions.jsonl, results.md, reliability diagrams.

results.md lays accuracy out like the paper's tables: one row per model (and language), the tasks
as columns in the paper's order, then the average; each cell `mean ± population std` in percent.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Sequence

from bmx.eval.evaluate import TaskOutcome
from bmx.tasks.catalog import SUITES, TASKS


def _cell(summary: dict | None, metric: str) -> str:
    if summary is None:
        return "–"
    return f"{100 * summary[metric]:.2f} ± {100 * summary[metric + '_std']:.1f}"


def markdown_table(document: dict, model_label: str, metric: str = "acc") -> str:
    """The paper's layout: `| Model | Clinical KG | ... | MedMCQA | Avg. |`, a row per language."""
    names = [name for name in TASKS if any(s["task"] == name for s in document["tasks"].values())]
    header = ["Model", *(TASKS[name].column for name in names), "Avg."]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    langs = list(dict.fromkeys(s["lang"] for s in document["tasks"].values()))
    for lang in langs:
        by_task = {s["task"]: s for s in document["tasks"].values() if s["lang"] == lang}
        average = sum(s[metric] for s in by_task.values()) / len(by_task)
        label = model_label if lang == "en" and len(langs) == 1 else f"{model_label} [{lang}]"
        cells = [_cell(by_task.get(name), metric) for name in names]
        lines.append("| " + " | ".join([label, *cells, f"{100 * average:.2f}"]) + " |")
    return "\n".join(lines) + "\n"


def leaderboard_table(document: dict, model_label: str) -> str:
    """A suite's layout: `| Model | Average | MedMCQA | MedQA | MMLU Anatomy | ... | PubMedQA |`, in percent."""
    suite = SUITES[document["suite"]]
    by_task = {s["task"]: s for s in document["tasks"].values()}
    header = ["Model", "Average", *suite.columns]
    cells = [f"{100 * document['average']:.2f}",
             *(f"{100 * by_task[name]['acc']:.2f}" if name in by_task else "–" for name in suite.tasks)]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      "| " + " | ".join([model_label, *cells]) + " |"]) + "\n"


def calibration_table(document: dict) -> str:
    if "calibration" in document:
        return recalibration_table(document)
    lines = ["| Task | n | ECE (paper, 5 bins) | ECE (10 bins, renormalised) |", "|---|---|---|---|"]
    for key, summary in document["tasks"].items():
        paper, renormalised = 100 * summary["ece_paper"], 100 * summary["ece_10bin"]
        lines.append(f"| {key} | {summary['n']} | {paper:.2f} | {renormalised:.2f} |")
    return "\n".join(lines) + "\n"


def recalibration_table(document: dict) -> str:
    """Before → after --calibrate, per task and the mean over tasks, with what was fitted and on what."""
    lines = ["| Task | n | acc | ECE paper (5 bins) | ECE 10 bins | T | fitted on |", "|---|---|---|---|---|---|---|"]

    def row(label, n, before, after, temperature, source):
        cells = [f"{100 * before[m]:.2f} → {100 * after[m]:.2f}" for m in ("acc", "ece_paper", "ece_10bin")]
        lines.append(f"| {label} | {n} | " + " | ".join(cells) + f" | {temperature} | {source} |")

    for key, summary in document["tasks"].items():
        after = summary["calibration"]
        row(key, summary["n"], summary, after, f"{after['temperature']:.3f}", after["source"])
    overall = document["calibration"]
    model_t = overall.get("model_temperature")
    row("mean over tasks", sum(s["n"] for s in document["tasks"].values()), overall["before"], overall["after"],
        f"{model_t:.3f} (pooled)" if model_t else "–", "")
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | Path, document: dict, outcomes: Sequence[TaskOutcome], plots: bool = True) -> Path:
    """Write everything under `out_dir` and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as predictions:
        for outcome in outcomes:
            for run in outcome.runs:
                for record in run.records:
                    predictions.write(json.dumps(record, ensure_ascii=False) + "\n")
    label = " + ".join(document["models"])
    if document.get("suite"):
        markdown = [f"# {document['suite']} ({document['protocol']} protocol, {document['shots']}-shot)\n",
                    "## Accuracy, acc (%)\n", leaderboard_table(document, label)]
    else:
        markdown = [f"# {document['protocol']} protocol, {document['shots']}-shot\n", "## Accuracy (%)\n",
                    markdown_table(document, label)]
    if document["protocol"] == "loglik":
        markdown += ["\n## Normalised accuracy, acc_norm (%)\n", markdown_table(document, label, "acc_norm")]
    markdown += ["\n## Calibration (%)\n", calibration_table(document)]
    (out_dir / "results.md").write_text("".join(markdown))
    if plots:
        from bmx.eval.plots import reliability_diagram

        for outcome in outcomes:
            reliability_diagram(outcome, out_dir / "reliability" / f"{outcome.key}.png")
    return out_dir

