"""Reliability diagrams: accuracy against confidence per bin, beside the diagonal of perfect calibration."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bmx.eval import calibration
from bmx.eval.calibration import ReliabilityBins


def _panel(axes, bins: ReliabilityBins, title: str, calibrated: ReliabilityBins | None = None) -> None:
    centres = (bins.edges[:-1] + bins.edges[1:]) / 2
    width = bins.edges[1] - bins.edges[0]
    filled = bins.counts > 0
    axes.bar(centres[filled], bins.accuracy[filled], width=width * 0.9, color="tab:blue", alpha=0.8,
             label="accuracy")
    axes.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    axes.scatter(bins.mean_confidence[filled], bins.accuracy[filled], color="tab:red", s=12, zorder=3,
                 label="mean confidence")
    for centre, count, accuracy in zip(centres[filled], bins.counts[filled], bins.accuracy[filled]):
        axes.annotate(str(count), (centre, accuracy), ha="center", va="bottom", fontsize=7)
    ece = f"ECE {100 * bins.ece:.2f}%"
    if calibrated is not None:
        after = calibrated.counts > 0
        axes.plot(calibrated.mean_confidence[after], calibrated.accuracy[after], "o-", color="tab:green", ms=4,
                  zorder=4, label="after calibration (x = mean confidence)")
        ece = f"ECE {100 * bins.ece:.2f}% before, {100 * calibrated.ece:.2f}% after"
    axes.set(xlim=(0, 1), ylim=(0, 1.05), xlabel="confidence", ylabel="accuracy", title=f"{title}\n{ece}")
    axes.legend(fontsize=7, loc="upper left")


def pooled_bins(outcome, calibrated: bool = False) -> tuple[ReliabilityBins, ReliabilityBins]:
    """Paper-style and renormalised bins over all shot sets' answers together (`calibrated`: after --calibrate)."""
    probs = np.concatenate([run.calibrated_probs if calibrated else run.option_probs for run in outcome.runs])
    gold = np.concatenate([outcome.gold] * len(outcome.runs))
    return calibration.paper_bins(probs, gold), calibration.renormalised_bins(probs, gold)


def reliability_diagram(outcome, path: str | Path) -> Path:
    """Two panels for a task: the paper's 5 bins (unrenormalised), 10 bins (renormalised); with --calibrate,
    the calibrated probabilities' curve on each (they are over the options, so renormalised already)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper, renormalised = pooled_bins(outcome)
    after = pooled_bins(outcome, calibrated=True) if outcome.runs[0].calibrated_probs is not None else (None, None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    _panel(left, paper, "paper: 5 bins, top option prob.", after[0])
    _panel(right, renormalised, "10 bins, renormalised over options", after[1])
    seeds = len(outcome.runs)
    figure.suptitle(f"{outcome.key}: {outcome.summary['n']} questions x {seeds} shot set{'s' * (seeds > 1)}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

