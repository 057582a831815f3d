"""Metrics against their definitions, computed the slow way."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from aadetect.metrics import auroc, average_precision, confusion, decision_metrics


def pairwise_auroc(good, anomalous):
    wins = sum((a > g) + 0.5 * (a == g) for a, g in itertools.product(anomalous, good))
    return wins / (len(good) * len(anomalous))


def threshold_average_precision(good, anomalous):
    """AP = sum over distinct thresholds of (recall step) x precision."""
    scores = np.concatenate([good, anomalous])
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(scores), reverse=True):
        tp = np.sum(anomalous >= threshold)
        flagged = np.sum(scores >= threshold)
        recall = tp / len(anomalous)
        total += (recall - previous_recall) * tp / flagged
        previous_recall = recall
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_average_precision_match_definitions(seed):
    rng = np.random.default_rng(seed)
    good = rng.normal(0, 1, 40).round(1)  # rounding makes ties
    anomalous = rng.normal(0.8, 1, 25).round(1)
    assert auroc(good, anomalous) == pytest.approx(pairwise_auroc(good, anomalous), abs=1e-12)
    assert average_precision(good, anomalous) == pytest.approx(threshold_average_precision(good, anomalous),
                                                                abs=1e-12)


def test_average_precision_groups_infinite_ties_and_has_no_value_with_nan():
    good, anomalous = np.array([1.0, np.inf]), np.array([np.inf])
    assert average_precision(good, anomalous) == threshold_average_precision(good, anomalous) == 0.5
    assert average_precision(np.array([-np.inf, 0.0]), np.array([-np.inf])) == pytest.approx(1 / 3)
    assert np.isnan(average_precision(np.array([np.nan, 0.0]), np.array([1.0])))


def test_perfect_and_inverted_rankings():
    good, anomalous = np.array([0.0, 1.0, 2.0]), np.array([3.0, 4.0])
    assert auroc(good, anomalous) == 1.0 and average_precision(good, anomalous) == 1.0
    assert auroc(anomalous, good) == 0.0


def test_decision_metrics_from_confusion():
    counts = confusion(np.array([True, False, False, False]), np.array([True, True, False]))
    assert counts == {"tp": 2, "fp": 1, "tn": 3, "fn": 1}
    rates = decision_metrics(**counts)
    assert rates["tpr"] == pytest.approx(2 / 3)
    assert rates["fpr"] == pytest.approx(1 / 4)
    assert rates["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert rates["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_rates_that_need_anomalies_are_undefined_without_any():
    """Good samples alone say nothing about recall, so neither TPR nor F1 may read as 0 (a card
    calibrated on good images only once recorded f1: 0.0)."""
    rates = decision_metrics(**confusion(np.array([True, False, False, False]), np.array([], bool)))
    assert rates["fpr"] == pytest.approx(1 / 4)
    assert np.isnan(rates["tpr"]) and np.isnan(rates["f1"]) and np.isnan(rates["balanced_accuracy"])
    assert decision_metrics(**confusion(np.array([False]), np.array([False])))["f1"] == 0.0  # anomalies, none found
