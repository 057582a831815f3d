"""The joint threshold search on measurements with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from aadetect.calibration import Measurements, choose_thresholds, thresholds_for_fpr
from aadetect.scoring import decide


def sample(rng, count, error_mean, density_mean):
    return Measurements(rng.normal(error_mean, 1.0, count), rng.normal(density_mean, 1.0, count))


def test_or_rule_needs_both_thresholds():
    """Half the anomalies show only in reconstruction error, half only in density: one cut alone cannot win."""
    rng = np.random.default_rng(0)
    good = sample(rng, 30, 0.0, 0.0)
    by_error = sample(rng, 15, 8.0, 0.0)
    by_density = sample(rng, 15, 0.0, -8.0)
    anomalous = Measurements(np.r_[by_error.reconstruction_error, by_density.reconstruction_error],
                             np.r_[by_error.log_density, by_density.log_density])
    result = choose_thresholds(good, anomalous, (1.0, 1.0))
    assert result.metrics["balanced_accuracy"] == 1.0
    flags = decide(anomalous.reconstruction_error, anomalous.log_density, result.thresholds)
    assert set(flags.reason[:15]) <= {"reconstruction", "both"} and set(flags.reason[15:]) <= {"density", "both"}
    assert "reconstruction" in flags.reason[:15] and "density" in flags.reason[15:]
    assert result.warnings == []


def test_ties_go_to_balanced_cuts_in_the_middle_of_the_gap():
    """Either signal alone separates these: both cuts sit at the same height, mid-gap, so both rank."""
    good = Measurements(np.array([0.0, 1.0]), np.array([0.0, -1.0]))
    anomalous = Measurements(np.array([10.0, 11.0]), np.array([-10.0, -11.0]))
    result = choose_thresholds(good, anomalous, (1.0, 1.0))
    assert result.thresholds.reconstruction == pytest.approx(5.5)  # not just above 1.0, nor out of range
    assert result.thresholds.density == pytest.approx(-5.5)


def test_f1_objective_and_fpr_budget():
    rng = np.random.default_rng(1)
    good = sample(rng, 40, 0.0, 0.0)
    anomalous = sample(rng, 40, 1.0, -1.0)
    loose = choose_thresholds(good, anomalous, (1.0, 1.0), objective="f1")
    strict = choose_thresholds(good, anomalous, (1.0, 1.0), target_fpr=0.05)
    assert strict.metrics["fpr"] <= 0.05
    assert loose.metrics["f1"] >= strict.metrics["f1"]


@pytest.mark.parametrize("target", [0.05, 0.1, 0.3])
def test_good_only_thresholds_respect_the_budget(target):
    rng = np.random.default_rng(2)
    good = sample(rng, 200, 0.0, 0.0)
    thresholds = thresholds_for_fpr(good, (1.0, 1.0), target, method="test", calibrated=False)
    flagged = decide(good.reconstruction_error, good.log_density, thresholds).anomaly.mean()
    assert flagged <= target
    assert flagged >= target - 0.01  # and uses the budget, not an empty rule


def test_few_samples_warn():
    rng = np.random.default_rng(3)
    result = choose_thresholds(sample(rng, 4, 0, 0), sample(rng, 3, 5, -5), (1.0, 1.0))
    assert len(result.warnings) == 2
