"""Choosing the two thresholds of the OR rule from a few labelled images."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from aadetect.card import Thresholds
from aadetect.metrics import confusion, decision_metrics
from aadetect.scoring import decide

OBJECTIVES = ("balanced-accuracy", "f1")
MAX_CANDIDATES = 256  # cuts tried; keeps the search small for large calibration sets
FEW_SAMPLES = 10
SMALLEST_ERROR = 1e-30  # a perfect reconstruction still has a finite log error
LOG_CAP = 700.0  # exp() of more overflows a float64


@dataclass
class Measurements:
    """What the detector measured on a set of images."""

    reconstruction_error: np.ndarray
    log_density: np.ndarray

    def __len__(self) -> int:
        return len(self.reconstruction_error)


@dataclass
class CalibrationResult:
    thresholds: Thresholds
    metrics: dict[str, float]
    warnings: list[str]


def robust_scale(values: np.ndarray) -> float:
    """Spread of good images' values: the scaled MAD, or the standard deviation where the MAD
    is degenerate (duplicated images give identical values), never below a relative floor."""
    values = np.asarray(values, dtype=np.float64)
    median = float(np.median(values))
    floor = 1e-6 * (abs(median) + 1.0)
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    if not spread > floor:
        spread = float(np.std(values))
    return max(spread, floor)


def centred_thresholds(good: Measurements, method: str) -> Thresholds:
    """Both thresholds at the good images' medians, with their robust spreads as the scales.

    Reconstruction errors are right-skewed, so they are centred and scaled in log units;
    then one unit above the centre means about the same rarity for both signals.
    """
    log_error = np.log(np.maximum(good.reconstruction_error, SMALLEST_ERROR))
    error_centre, density_centre = float(np.exp(np.median(log_error))), float(np.median(good.log_density))
    return Thresholds(reconstruction=error_centre, density=density_centre,
                      reconstruction_scale=robust_scale(log_error), density_scale=robust_scale(good.log_density),
                      reconstruction_centre=error_centre, density_centre=density_centre,
                      calibrated=False, method=method)


def heights(thresholds: Thresholds, error_cut, density_cut) -> tuple:
    """How far cuts lie above the good images' centres, in scale units, for each signal."""
    return (np.log(np.asarray(error_cut) / thresholds.reconstruction_centre) / thresholds.reconstruction_scale,
            (thresholds.density_centre - np.asarray(density_cut)) / thresholds.density_scale)


def at_height(thresholds: Thresholds, error_height: float, density_height: float, *, calibrated: bool,
              method: str) -> Thresholds:
    """Thresholds set the given number of scale units above the centres."""
    return dataclasses.replace(
        thresholds, calibrated=calibrated, method=method,
        reconstruction=thresholds.reconstruction_centre * math.exp(  # capped: past e^700 it never fires anyway
            min(max(error_height * thresholds.reconstruction_scale, -LOG_CAP), LOG_CAP)),
        density=thresholds.density_centre - density_height * thresholds.density_scale)


def height_for_fpr(thresholds: Thresholds, good: Measurements, target_fpr: float) -> float:
    """The common height of both cuts that flags at most `target_fpr` of the good images."""
    error_height, density_height = heights(thresholds, np.maximum(good.reconstruction_error, SMALLEST_ERROR),
                                           good.log_density)
    excess = np.sort(np.maximum(error_height, density_height))
    allowed = int(np.floor(target_fpr * len(excess) + 1e-9))
    kept = excess[len(excess) - allowed - 1]
    return float((kept + excess[len(excess) - allowed]) / 2 if allowed else kept + 0.5)


def default_thresholds(validation: Measurements, target_fpr: float) -> Thresholds:
    """Thresholds from held-out good images alone: both at one height, for a false-positive budget."""
    centred = centred_thresholds(validation, method="")
    height = height_for_fpr(centred, validation, target_fpr)
    return at_height(centred, height, height, calibrated=False,
                     method=f"default: held-out good images, target FPR {target_fpr}")


def _candidates(values: np.ndarray) -> np.ndarray:
    """Midpoints between neighbouring observed values, plus one cut beyond each end."""
    points = np.unique(values)
    if len(points) > MAX_CANDIDATES:
        points = np.unique(np.quantile(points, np.linspace(0, 1, MAX_CANDIDATES)))
    return np.concatenate([[points[0] - 1.0], (points[:-1] + points[1:]) / 2, [points[-1] + 1.0]])


def choose_thresholds(thresholds: Thresholds, good: Measurements, anomalous: Measurements | None, *,
                      objective: str = "balanced-accuracy", target_fpr: float | None = None) -> CalibrationResult:
    """Search both cuts jointly for the best objective on the samples.

    Cuts are searched as heights above the good centres, in scale units. Among equally good
    pairs, the one with both cuts at the same height wins (then the widest margin): `score`
    then ranks images by both signals alike, which ranked MNIST best; a clearly weaker signal
    still gets pushed out when that is strictly better on the samples (benchmarks/RESULTS.md).
    With no anomalous samples, both cuts sit at one height set by a false-positive budget.
    """
    warnings = [f"only {n} {label} samples: thresholds are rough; 10 or more of each are advised"
                for label, n in (("good", len(good)), ("anomalous", len(anomalous) if anomalous else 0))
                if 0 < n < FEW_SAMPLES]
    if anomalous is None or len(anomalous) == 0:
        budget = 0.05 if target_fpr is None else target_fpr
        height = height_for_fpr(thresholds, good, budget)
        calibrated = at_height(thresholds, height, height, calibrated=True,
                               method=f"good samples only, target FPR {budget}")
        return CalibrationResult(calibrated, _metrics_at(calibrated, good, None), warnings)

    def as_heights(samples: Measurements) -> tuple[np.ndarray, np.ndarray]:
        return heights(thresholds, np.maximum(samples.reconstruction_error, SMALLEST_ERROR), samples.log_density)

    good_error, good_density = as_heights(good)
    anomalous_error, anomalous_density = as_heights(anomalous)
    every_error, every_density = np.r_[good_error, anomalous_error], np.r_[good_density, anomalous_density]
    error_cuts, density_cuts = _candidates(every_error), _candidates(every_density)

    def flagged_counts(error_height: np.ndarray, density_height: np.ndarray) -> np.ndarray:
        counts = np.empty((len(error_cuts), len(density_cuts)))
        over_density = density_height[None, :] > density_cuts[:, None]  # (cuts, samples)
        for i, cut in enumerate(error_cuts):
            counts[i] = ((error_height > cut)[None, :] | over_density).sum(axis=1)
        return counts

    false_positives = flagged_counts(good_error, good_density)
    true_positives = flagged_counts(anomalous_error, anomalous_density)
    rates = decision_metrics(true_positives, false_positives, len(good) - false_positives,
                             len(anomalous) - true_positives)
    value = rates["f1" if objective == "f1" else "balanced_accuracy"]
    if target_fpr is not None:
        value = np.where(rates["fpr"] <= target_fpr + 1e-12, value, -np.inf)
    margin = np.minimum(np.abs(error_cuts[:, None] - every_error[None, :]).min(axis=1)[:, None],
                        np.abs(density_cuts[:, None] - every_density[None, :]).min(axis=1)[None, :])
    imbalance = np.round(2 * np.abs(error_cuts[:, None] - density_cuts[None, :]))  # half-unit steps
    best = np.flatnonzero(value == value.max())
    pick = best[np.lexsort((-margin.ravel()[best], imbalance.ravel()[best]))[0]]
    i, j = np.unravel_index(pick, value.shape)
    method = f"joint search maximising {objective}" + (f" at FPR <= {target_fpr}" if target_fpr is not None else "")
    calibrated = at_height(thresholds, float(error_cuts[i]), float(density_cuts[j]), calibrated=True, method=method)
    return CalibrationResult(calibrated, _metrics_at(calibrated, good, anomalous), warnings)


def _metrics_at(thresholds: Thresholds, good: Measurements, anomalous: Measurements | None) -> dict[str, float]:
    good_flags = decide(good.reconstruction_error, good.log_density, thresholds).anomaly
    anomalous_flags = (decide(anomalous.reconstruction_error, anomalous.log_density, thresholds).anomaly
                       if anomalous is not None else np.zeros(0, bool))
    counts = confusion(good_flags, anomalous_flags)
    rates = decision_metrics(counts["tp"], counts["fp"], counts["tn"], counts["fn"])
    result = {name: float(v) for name, v in rates.items() if np.isfinite(v)}
    return {**result, **counts}
