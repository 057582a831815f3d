"""Ranking and decision metrics; anomalous is the positive class throughout."""

from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu


def auroc(good_scores: np.ndarray, anomalous_scores: np.ndarray) -> float:
    """P(score of an anomaly > score of a good image), ties counted half: the Mann-Whitney U statistic."""
    good_scores, anomalous_scores = np.asarray(good_scores), np.asarray(anomalous_scores)
    if len(good_scores) == 0 or len(anomalous_scores) == 0:
        return float("nan")
    statistic = mannwhitneyu(anomalous_scores, good_scores, alternative="two-sided").statistic
    return float(statistic / (len(good_scores) * len(anomalous_scores)))


def average_precision(good_scores: np.ndarray, anomalous_scores: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each recall step (tied scores grouped)."""
    scores = np.concatenate([anomalous_scores, good_scores]).astype(np.float64)
    labels = np.concatenate([np.ones(len(anomalous_scores)), np.zeros(len(good_scores))])
    if len(anomalous_scores) == 0 or np.isnan(scores).any():  # NaN has no rank (as in auroc)
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_group = np.r_[np.flatnonzero(scores[1:] != scores[:-1]), len(scores) - 1]  # inf - inf is no step
    true_positives = np.cumsum(labels)[last_of_group]
    flagged = last_of_group + 1
    precision = true_positives / flagged
    recall_steps = np.diff(np.r_[0.0, true_positives]) / len(anomalous_scores)
    return float(np.sum(recall_steps * precision))


def decision_metrics(tp, fp, tn, fn) -> dict:
    """Balanced accuracy, F1, TPR and FPR from confusion counts (scalars or arrays alike); NaN where
    a rate needs samples of a class that has none (F1 and TPR without anomalies, FPR without good ones)."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.nan)
        fpr = np.where(fp + tn > 0, fp / np.maximum(fp + tn, 1), np.nan)
        f1 = np.where(tp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)
    return {"balanced_accuracy": (tpr + 1 - fpr) / 2, "f1": f1, "tpr": tpr, "fpr": fpr}


def confusion(good_flags: np.ndarray, anomalous_flags: np.ndarray) -> dict[str, int]:
    good_flags, anomalous_flags = np.asarray(good_flags, bool), np.asarray(anomalous_flags, bool)
    return {"tp": int(anomalous_flags.sum()), "fp": int(good_flags.sum()),
            "tn": int((~good_flags).sum()), "fn": int((~anomalous_flags).sum())}
