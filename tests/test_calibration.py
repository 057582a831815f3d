"""Choosing the cut on measurements with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aadetect.calibration import Measurements, centred_thresholds, choose_thresholds, default_thresholds
from aadetect.card import Cut, Thresholds
from aadetect.scoring import decide, joined

UNIT = Thresholds(calibrated=False, method="test", reconstruction=Cut(1.0, 1.0, 0.0), density=Cut(0.0, 1.0, 0.0),
                  anomaly_log_odds=None)  # height = log error, and minus the log-density


def sample(rng, count, log_error_mean, density_mean):
    return Measurements(np.exp(rng.normal(log_error_mean, 1.0, count)), rng.normal(density_mean, 1.0, count))


def test_or_rule_needs_both_thresholds():
    """Half the anomalies show only in reconstruction error, half only in density: one signal alone cannot win."""
    rng = np.random.default_rng(0)
    good = sample(rng, 30, 0.0, 0.0)
    by_error = sample(rng, 15, 8.0, 0.0)
    by_density = sample(rng, 15, 0.0, -8.0)
    anomalous = Measurements(np.r_[by_error.reconstruction_error, by_density.reconstruction_error],
                             np.r_[by_error.log_density, by_density.log_density])
    result = choose_thresholds(centred_thresholds(good), good, anomalous)
    assert result.metrics["balanced_accuracy"] == 1.0
    flags = decide(anomalous, result.thresholds)
    assert set(flags.reason[:15]) <= {"reconstruction", "both"} and set(flags.reason[15:]) <= {"density", "both"}
    assert "reconstruction" in flags.reason[:15] and "density" in flags.reason[15:]
    assert result.warnings == []


def test_ties_go_to_balanced_cuts_in_the_middle_of_the_gap():
    """Either signal alone separates these: both cuts sit at one height, mid-gap, so both rank."""
    good = Measurements(np.exp([0.0, 1.0]), np.array([0.0, -1.0]))
    anomalous = Measurements(np.exp([10.0, 11.0]), np.array([-10.0, -11.0]))
    result = choose_thresholds(UNIT, good, anomalous)
    assert math.log(result.thresholds.reconstruction_cut) == pytest.approx(5.5)  # not just above 1.0, nor out of range
    assert result.thresholds.density_cut == pytest.approx(-5.5)


def test_both_cuts_are_placed_where_the_samples_show_a_gap():
    """Heights from the MNIST 0-vs-2 benchmark (1% contamination); either signal separates the samples.

    Counted, the density cut alone already catches all ten anomalies, so the reconstruction cut
    was free and went past every sample (4.9), and later anomalies with a lower density were
    missed. As expected values, each cut earns its place: both sit inside their gaps.
    """
    good_error = np.array([-1.15, -0.61, -0.22, 0.09, 0.42, 0.61, 0.79, 0.99, 1.01, 1.11])
    good_density = np.array([-1.2, -1.0, 0.1, 0.29, 0.39, 0.57, 1.27, 2.14, 2.4, 6.79])
    anomalous_error = np.array([2.83, 3.16, 3.19, 3.34, 3.51, 3.56, 3.57, 3.64, 3.82, 3.92])
    anomalous_density = np.array([8.24, 8.7, 9.52, 9.72, 10.85, 10.93, 10.94, 11.57, 12.12, 20.39])
    good, anomalous = (Measurements(np.exp(error), -density) for error, density in
                       ((good_error, good_density), (anomalous_error, anomalous_density)))
    result = choose_thresholds(UNIT, good, anomalous)
    assert result.metrics["balanced_accuracy"] == 1.0
    assert 1.11 < math.log(result.thresholds.reconstruction_cut) < 2.83
    assert 6.79 < -result.thresholds.density_cut < 8.24
    assert set(decide(anomalous, result.thresholds).reason) == {"both"}


def test_a_useless_signal_is_pushed_out():
    """Density says nothing here: a cut on it would only add false alarms, so it goes past every sample."""
    rng = np.random.default_rng(4)
    good = Measurements(np.exp(rng.normal(0, 1, 20)), rng.normal(0, 1, 20))
    anomalous = Measurements(np.exp(rng.normal(6, 1, 20)), rng.normal(0, 1, 20))
    result = choose_thresholds(UNIT, good, anomalous)
    assert result.metrics["balanced_accuracy"] == 1.0
    assert result.thresholds.density_cut < min(good.log_density.min(), anomalous.log_density.min())


def test_f1_objective_and_fpr_budget():
    rng = np.random.default_rng(1)
    good = sample(rng, 40, 0.0, 0.0)
    anomalous = sample(rng, 40, 1.0, -1.0)
    start = centred_thresholds(good)
    loose = choose_thresholds(start, good, anomalous, objective="f1")
    strict = choose_thresholds(start, good, anomalous, target_fpr=0.05)
    assert strict.metrics["fpr"] <= 0.05
    assert loose.metrics["f1"] >= strict.metrics["f1"]


@pytest.mark.parametrize("target", [0.05, 0.1, 0.3])
def test_good_only_thresholds_respect_the_budget(target):
    rng = np.random.default_rng(2)
    good = sample(rng, 200, 0.0, 0.0)
    thresholds = default_thresholds(good, target)
    flagged = decide(good, thresholds).anomaly.mean()
    assert flagged <= target
    assert flagged >= target - 0.01  # and uses the budget, not an empty rule
    again = choose_thresholds(centred_thresholds(good), good, None, target_fpr=target)
    assert decide(good, again.thresholds).anomaly.mean() == pytest.approx(flagged)
    assert again.metrics["fpr"] == pytest.approx(flagged) and not {"tpr", "f1", "balanced_accuracy"} & set(again.metrics)


@pytest.mark.parametrize("seed", range(40))
def test_tied_good_images_at_the_budget_edge_are_never_half_flagged(seed):
    """Two identical images (a duplicate file) at the edge of the budget: both or neither, never
    one by rounding, and so never more than the budget allows."""
    rng = np.random.default_rng(seed)
    good = sample(rng, 10, 0.0, 0.0)
    top = int(np.argmax(good.reconstruction_error))
    twin = (top + 1) % 10
    good.reconstruction_error[twin], good.log_density[twin] = good.reconstruction_error[top], good.log_density[top]
    for thresholds in (default_thresholds(good, 0.1),
                       choose_thresholds(centred_thresholds(good), good, None, target_fpr=0.1).thresholds):
        flagged = decide(good, thresholds).anomaly
        assert flagged.sum() <= 1
        assert flagged[top] == flagged[twin]


def test_centred_thresholds_use_log_errors():
    errors = np.array([1.0, 2.0, 4.0, 8.0, 1000.0])
    centred = centred_thresholds(Measurements(errors, np.zeros(5)))
    assert centred.reconstruction_cut == pytest.approx(4.0)
    assert centred.reconstruction.scale == pytest.approx(1.4826 * math.log(2))
    assert centred.reconstruction.centre == centred.reconstruction_cut


def test_few_samples_warn():
    rng = np.random.default_rng(3)
    result = choose_thresholds(UNIT, sample(rng, 4, 0, 0), sample(rng, 3, 5, -5))
    assert len(result.warnings) == 2


@pytest.mark.parametrize("errors, densities", [(np.full(30, 0.01), np.full(30, -5.0)),
                                               (np.exp(np.linspace(-5, 0, 30)), np.r_[np.full(20, 121.2708), [120.86] * 10]
                                                + 1e-10 * np.linspace(0, 1, 30)),
                                               (np.full(30, 0.01), np.linspace(-50, 0, 30))])
def test_degenerate_held_out_images_give_usable_thresholds(errors, densities):
    """Duplicated held-out images (no spread in one or both signals) must not overflow or give NaN."""
    thresholds = default_thresholds(Measurements(errors, densities), 0.05)
    values = [thresholds.reconstruction_cut, thresholds.density_cut, thresholds.reconstruction.scale,
              thresholds.density.scale]
    assert all(math.isfinite(v) for v in values) and thresholds.reconstruction_cut > 0
    assert decide(Measurements(errors, densities), thresholds).anomaly.mean() <= 0.05


def test_samples_that_nothing_tells_apart_fall_back_to_the_good_images_budget():
    """Identical classes tie every pair of cuts; the widest margin then lay below every sample and
    flagged all good images, without a word."""
    rng = np.random.default_rng(3)
    validation = sample(rng, 40, 0.0, 0.0)
    same = sample(rng, 10, 0.0, 0.0)
    result = choose_thresholds(centred_thresholds(validation), same, same, default_fpr=0.2)
    assert result.thresholds.method == "good samples only, target FPR 0.2"
    assert result.metrics["fpr"] <= 0.2 and result.metrics["balanced_accuracy"] <= 0.5
    assert any("no thresholds tell the anomalous samples from the good ones" in w for w in result.warnings)
    informative = choose_thresholds(centred_thresholds(validation), same, sample(rng, 10, 6.0, -6.0))
    assert informative.thresholds.method.startswith("joint search") and not informative.warnings


@pytest.mark.parametrize("broken", [np.nan, np.inf])
def test_nan_or_infinite_measurements_are_refused_in_one_line(broken):
    from aadetect.errors import UserError

    rng = np.random.default_rng(4)
    good, anomalous = sample(rng, 10, 0.0, 0.0), sample(rng, 10, 6.0, -6.0)
    good.log_density[3] = broken
    with pytest.raises(UserError, match="1 of 10 good samples have a NaN or infinite"):
        choose_thresholds(UNIT, good, anomalous)
    with pytest.raises(UserError, match="1 of 10 held-out good images have a NaN or infinite"):
        default_thresholds(good, 0.05)


def test_anomalies_that_only_their_odds_tell_apart_are_flagged_by_them():
    """Same errors and densities as the good images; their log-odds of the labelled kind differ. The odds
    test is centred and scaled on the held-out images, and the cut that separates the samples flags them."""
    rng = np.random.default_rng(4)

    def measured(count, odds_mean):
        return Measurements(np.exp(rng.normal(0, 1, count)), rng.normal(0, 1, count), rng.normal(odds_mean, 1, count))

    good, anomalous, held_out = measured(10, -10.0), measured(10, 0.0), measured(300, -10.0)
    centred = centred_thresholds(held_out)
    result = choose_thresholds(centred, good, anomalous, held_out=held_out)
    thresholds = result.thresholds
    assert thresholds.anomaly_log_odds.centre == pytest.approx(np.median(held_out.anomaly_log_odds))
    assert -10.0 < thresholds.odds_cut < 0.0
    assert result.metrics["balanced_accuracy"] == 1.0
    flags = decide(anomalous, thresholds)
    assert set(flags.reason) == {"lookalike"}
    # without the odds, nothing tells them apart
    plain = lambda m: Measurements(m.reconstruction_error, m.log_density)  # noqa: E731
    assert choose_thresholds(centred, plain(good), plain(anomalous), held_out=plain(held_out)).thresholds.anomaly_log_odds is None


def test_held_out_images_count_on_the_good_side():
    """Ten good samples all below a cut that would flag a fifth of the good images: the held-out images
    show it, and the cut moves up."""
    rng = np.random.default_rng(6)
    held_out = Measurements(np.exp(rng.normal(0, 1, 400)), rng.normal(0, 1, 400))
    centred = centred_thresholds(held_out)
    good = Measurements(np.exp(rng.normal(-0.5, 0.2, 10)), rng.normal(0.5, 0.2, 10))  # the tamest good images
    anomalous = Measurements(np.exp(rng.normal(1.5, 0.5, 10)), rng.normal(-1.5, 0.5, 10))
    alone = choose_thresholds(centred, good, anomalous).thresholds
    with_held_out = choose_thresholds(centred, good, anomalous, held_out=held_out).thresholds

    def flagged(thresholds):
        return decide(held_out, thresholds).anomaly.mean()

    assert flagged(alone) > 0.2
    assert flagged(with_held_out) < flagged(alone) / 2


def test_a_false_positive_budget_holds_on_the_labelled_good_samples_alone():
    """The held-out images are a slice of the training folder and may hide an anomaly: one of them must not
    hold every cut above it when a budget is set."""
    rng = np.random.default_rng(8)
    held_out = Measurements(np.exp(rng.normal(0, 1, 30)), rng.normal(0, 1, 30))
    hidden = Measurements(np.exp([6.0]), np.array([0.0]))  # a hidden anomaly: 1 of 41 good images is over 0.02
    centred = centred_thresholds(held_out)
    good = Measurements(np.exp(rng.normal(0, 1, 10)), rng.normal(0, 1, 10))
    anomalous = Measurements(np.exp(np.linspace(4.0, 8.0, 10)), np.zeros(10))
    result = choose_thresholds(centred, good, anomalous, held_out=joined([held_out, hidden]), target_fpr=0.02)
    assert result.metrics["fpr"] <= 0.02 and result.metrics["tpr"] == 1.0
