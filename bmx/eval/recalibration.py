"""Temperature and vector scaling of a model's option scores, the calibration the BioMistral paper leaves open.

A question's option logits `z` (log letter probabilities, or lm-eval's summed log-likelihoods) become
calibrated option probabilities `softmax(z / T + b)`:
- `temperature`: one `T` for every question, `b = 0` (Guo et al. 2017). It never changes which option
  is the most likely, and it is what dividing the LM head by `T` does to the letter probabilities
  renormalised over the options, so it can be folded into the checkpoint (`python -m bmx.convert
  calibrate`);
- `vector`: `T` and one bias per option letter (Platt / vector scaling on the letter logits), which
  also corrects a model's preference for a letter, and may change its answers.

Both are fitted by minimising the negative log-likelihood of the gold options. In `a = 1/T` and `b`
that is a multinomial logistic regression (convex), solved by Newton's method with a backtracking
line search. The biases have a Gaussian prior of unit variance (`BIAS_PRIOR`): on a calibration set
where some letter is never the answer, the unpenalised optimum puts its bias at minus infinity.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np

METHODS = ("temperature", "vector")
BIAS_PRIOR = 1.0  # penalty 0.5 * BIAS_PRIOR * |b|^2 on the summed negative log-likelihood
_SCALE_BOUNDS = (1e-3, 1e3)  # 1/T; a calibration set the model separates perfectly drives 1/T to infinity
_LOG_FLOOR = -700.0  # log of a probability that underflowed to 0 (float64 exp(-700) is still > 0)


@dataclass(frozen=True)
class Scaling:
    """A fitted map from option logits to calibrated option probabilities."""

    method: str
    temperature: float
    biases: tuple[float, ...]  # one per option, in option order; zeros for temperature scaling
    fitted_on: int  # questions it was fitted on

    def probabilities(self, option_logits: np.ndarray) -> np.ndarray:
        """`softmax(z / T + b)` over the options: [N, L] -> [N, L]."""
        scores = _finite(option_logits) / self.temperature + np.asarray(self.biases)
        scores -= scores.max(axis=1, keepdims=True)
        weights = np.exp(scores)
        return weights / weights.sum(axis=1, keepdims=True)

    def describe(self, letters: Sequence[str]) -> dict:
        described = {"temperature": self.temperature, "fitted_on": self.fitted_on}
        if self.method == "vector":
            described["biases"] = dict(zip(letters, self.biases))
        return described


def option_logits(option_probs: np.ndarray) -> np.ndarray:
    """Log of the option probabilities a protocol reports (letter token probabilities, exp(loglik))."""
    with np.errstate(divide="ignore"):
        return _finite(np.log(np.asarray(option_probs, dtype=np.float64)))


def _finite(logits: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(logits, dtype=np.float64), _LOG_FLOOR)


def _objective(theta: np.ndarray, logits: np.ndarray, onehot: np.ndarray, valid: np.ndarray, with_biases: bool):
    """Penalised NLL, its gradient and Hessian in `theta = (1/T, b_2..b_L)` (b_1 = 0: softmax is shift-invariant)."""
    n, letters = logits.shape
    # Features of each option: its logit, then an indicator per letter after the first.
    features = [logits[..., None]]
    if with_biases:
        features.append(np.broadcast_to(np.eye(letters)[None, :, 1:], (n, letters, letters - 1)))
    features = np.concatenate(features, axis=2)  # [N, L, P]
    scores = np.where(valid, features @ theta, -np.inf)
    scores -= scores.max(axis=1, keepdims=True)
    log_probs = np.where(valid, scores - np.log(np.exp(scores).sum(axis=1, keepdims=True)), 0.0)
    probs = np.where(valid, np.exp(log_probs), 0.0)
    penalty = np.zeros_like(theta)
    penalty[1:] = BIAS_PRIOR
    value = -np.sum(onehot * log_probs) + 0.5 * np.sum(penalty * theta ** 2)
    mean_feature = np.einsum("nl,nlp->np", probs, features)  # [N, P]
    gradient = np.einsum("nl,nlp->p", probs - onehot, features) + penalty * theta
    hessian = (np.einsum("nl,nlp,nlq->pq", probs, features, features)
               - np.einsum("np,nq->pq", mean_feature, mean_feature) + np.diag(penalty))
    return value, gradient, hessian


def fit(option_logits: np.ndarray, gold: np.ndarray, method: str = "temperature",
        valid: np.ndarray | None = None) -> Scaling:
    """The scaling of `method` minimising the NLL of `gold` (option indices [N]) under `option_logits` [N, L].

    `valid` [N, L] marks the options a question really has, so questions with different numbers of
    options (PubMedQA's 3, MedQA's 4) can share one temperature; padding options are ignored.
    """
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    valid = np.ones(np.shape(option_logits), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if method == "vector" and not valid.all():
        raise ValueError("vector scaling needs every question to have the same options")
    logits = np.where(valid, _finite(option_logits), _LOG_FLOOR)
    logits = logits - logits.max(axis=1, keepdims=True)  # per-question shifts leave z/T's softmax unchanged
    gold = np.asarray(gold)
    if logits.ndim != 2 or gold.shape != logits.shape[:1] or len(gold) == 0:
        raise ValueError(f"need option logits [N, L] and gold [N] for N >= 1 questions, got {logits.shape} and "
                         f"{gold.shape}")
    with_biases = method == "vector"
    onehot = np.eye(logits.shape[1])[gold]
    theta = np.zeros(1 + (logits.shape[1] - 1) * with_biases)
    theta[0] = 1.0
    value, gradient, hessian = _objective(theta, logits, onehot, valid, with_biases)
    for _ in range(100):
        step = -np.linalg.lstsq(hessian + 1e-12 * np.eye(len(theta)), gradient, rcond=None)[0]
        size = 1.0
        while True:
            candidate = theta + size * step
            candidate[0] = np.clip(candidate[0], *_SCALE_BOUNDS)
            new_value, new_gradient, new_hessian = _objective(candidate, logits, onehot, valid, with_biases)
            if new_value <= value + 1e-4 * size * gradient @ step or size < 1e-10:
                break
            size /= 2
        converged = abs(value - new_value) <= 1e-12 * max(1.0, abs(value))
        theta, value, gradient, hessian = candidate, new_value, new_gradient, new_hessian
        if converged or np.max(np.abs(gradient)) < 1e-10:
            break
    biases = (0.0, *map(float, theta[1:])) if with_biases else (0.0,) * logits.shape[1]
    return Scaling(method, float(1.0 / theta[0]), biases, fitted_on=len(gold))


def fold_of(count: int, folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of each of `count` questions: a seeded permutation cut into `folds` near-equal parts."""
    if folds < 2:
        raise ValueError(f"--calibration-folds must be at least 2, got {folds}")
    if count < folds:
        raise ValueError(f"{count} question(s) cannot be cross-fitted in {folds} folds (use --calibration-folds "
                         f"{max(2, count)} or more questions)")
    assignment = np.empty(count, dtype=np.int64)
    assignment[np.random.default_rng(seed).permutation(count)] = np.arange(count) % folds
    return assignment


def cross_fit(option_logits: np.ndarray, gold: np.ndarray, method: str, folds: int) -> tuple[np.ndarray, list[Scaling]]:
    """K-fold cross-fitting: each fold's probabilities come from a scaling fitted on the other folds only."""
    assignment = fold_of(len(gold), folds)
    calibrated = np.zeros(np.shape(option_logits), dtype=np.float64)
    scalings = []
    for fold in range(folds):
        held_out = assignment == fold
        scaling = fit(option_logits[~held_out], gold[~held_out], method)
        calibrated[held_out] = scaling.probabilities(option_logits[held_out])
        scalings.append(scaling)
    return calibrated, scalings


def fit_pooled(groups: Sequence[tuple[np.ndarray, np.ndarray]]) -> Scaling:
    """One temperature for several `(option_logits [N_i, L_i], gold [N_i])` groups with different option counts."""
    width = max(logits.shape[1] for logits, _ in groups)
    padded, valid = [], []
    for logits, _ in groups:
        extra = width - logits.shape[1]
        padded.append(np.pad(_finite(logits), ((0, 0), (0, extra)), constant_values=_LOG_FLOOR))
        valid.append(np.pad(np.ones(logits.shape, dtype=bool), ((0, 0), (0, extra)), constant_values=False))
    return fit(np.concatenate(padded), np.concatenate([gold for _, gold in groups]), "temperature",
               valid=np.concatenate(valid))
