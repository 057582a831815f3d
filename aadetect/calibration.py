"""Choosing the two thresholds of the OR rule from a few labelled images."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aadetect.card import Thresholds
from aadetect.metrics import confusion, decision_metrics
from aadetect.scoring import decide

OBJECTIVES = ("balanced-accuracy", "f1")
MAX_CANDIDATES = 256  # per threshold; keeps the joint search small for large calibration sets
FEW_SAMPLES = 10


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
    """Spread of good images' values (scaled MAD, falling back to std), never zero."""
    values = np.asarray(values, dtype=np.float64)
    spread = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    if not spread > 0:
        spread = float(np.std(values))
    return spread if spread > 0 else 1e-12


def thresholds_for_fpr(good: Measurements, scales: tuple[float, float], target_fpr: float,
                       method: str, calibrated: bool) -> Thresholds:
    """With good images only: one cut in normalised units so that at most `target_fpr` of them are flagged."""
    reconstruction_scale, density_scale = scales
    reconstruction_centre = float(np.median(good.reconstruction_error))
    density_centre = float(np.median(good.log_density))
    excess = np.sort(np.maximum((good.reconstruction_error - reconstruction_centre) / reconstruction_scale,
                                (density_centre - good.log_density) / density_scale))
    allowed = int(np.floor(target_fpr * len(excess) + 1e-9))
    kept = excess[len(excess) - allowed - 1]
    cut = (kept + excess[len(excess) - allowed]) / 2 if allowed else kept + 0.5
    return Thresholds(reconstruction=reconstruction_centre + cut * reconstruction_scale,
                      density=density_centre - cut * density_scale,
                      reconstruction_scale=reconstruction_scale, density_scale=density_scale,
                      calibrated=calibrated, method=method)


def _candidates(values: np.ndarray, scale: float) -> np.ndarray:
    """Midpoints between neighbouring observed values, plus one cut beyond each end."""
    points = np.unique(values)
    if len(points) > MAX_CANDIDATES:
        points = np.unique(np.quantile(points, np.linspace(0, 1, MAX_CANDIDATES)))
    return np.concatenate([[points[0] - scale], (points[:-1] + points[1:]) / 2, [points[-1] + scale]])


def _margin(cuts: np.ndarray, values: np.ndarray, scale: float) -> np.ndarray:
    """Distance from each cut to the nearest observed value, in scale units."""
    return np.abs(cuts[:, None] - values[None, :]).min(axis=1) / scale


def choose_thresholds(good: Measurements, anomalous: Measurements | None, scales: tuple[float, float], *,
                      objective: str = "balanced-accuracy", target_fpr: float | None = None) -> CalibrationResult:
    """Search both cuts jointly for the best objective on the samples; ties go to balanced cuts.

    With no anomalous samples, fall back to a false-positive budget on the good ones.
    """
    warnings = [f"only {n} {label} samples: thresholds are rough; 10 or more of each are advised"
                for label, n in (("good", len(good)), ("anomalous", len(anomalous) if anomalous else 0))
                if 0 < n < FEW_SAMPLES]
    if anomalous is None or len(anomalous) == 0:
        budget = 0.05 if target_fpr is None else target_fpr
        thresholds = thresholds_for_fpr(good, scales, budget, method=f"good samples only, target FPR {budget}",
                                        calibrated=True)
        return CalibrationResult(thresholds, _metrics_at(thresholds, good, None), warnings)

    reconstruction_scale, density_scale = scales
    every_error = np.concatenate([good.reconstruction_error, anomalous.reconstruction_error])
    every_density = np.concatenate([good.log_density, anomalous.log_density])
    error_cuts = _candidates(every_error, reconstruction_scale)
    density_cuts = _candidates(every_density, density_scale)
    margin = np.minimum(_margin(error_cuts, every_error, reconstruction_scale)[:, None],
                        _margin(density_cuts, every_density, density_scale)[None, :])

    def flagged_counts(samples: Measurements) -> np.ndarray:
        counts = np.empty((len(error_cuts), len(density_cuts)))
        unlikely = samples.log_density[None, :] < density_cuts[:, None]  # (cuts, samples)
        for i, cut in enumerate(error_cuts):
            counts[i] = ((samples.reconstruction_error > cut)[None, :] | unlikely).sum(axis=1)
        return counts

    false_positives = flagged_counts(good)
    true_positives = flagged_counts(anomalous)
    rates = decision_metrics(true_positives, false_positives, len(good) - false_positives,
                             len(anomalous) - true_positives)
    value = rates["f1" if objective == "f1" else "balanced_accuracy"]
    if target_fpr is not None:
        value = np.where(rates["fpr"] <= target_fpr + 1e-12, value, -np.inf)
    # Among equally good pairs, prefer cuts at the same height above the good samples in scale
    # units (then the widest margin): `score`, the larger normalised excess, then ranks images by
    # both signals alike instead of by whichever threshold happened to sit closer.
    imbalance = np.abs(((error_cuts - np.median(good.reconstruction_error)) / reconstruction_scale)[:, None]
                       - ((np.median(good.log_density) - density_cuts) / density_scale)[None, :])
    best = np.flatnonzero(value == value.max())
    pick = best[np.lexsort((-margin.ravel()[best], np.round(2 * imbalance.ravel()[best])))[0]]
    i, j = np.unravel_index(pick, value.shape)
    method = f"joint search maximising {objective}" + (f" at FPR <= {target_fpr}" if target_fpr is not None else "")
    thresholds = Thresholds(reconstruction=float(error_cuts[i]), density=float(density_cuts[j]),
                            reconstruction_scale=reconstruction_scale, density_scale=density_scale,
                            calibrated=True, method=method)
    return CalibrationResult(thresholds, _metrics_at(thresholds, good, anomalous), warnings)


def _metrics_at(thresholds: Thresholds, good: Measurements, anomalous: Measurements | None) -> dict[str, float]:
    good_flags = decide(good.reconstruction_error, good.log_density, thresholds).anomaly
    anomalous_flags = (decide(anomalous.reconstruction_error, anomalous.log_density, thresholds).anomaly
                       if anomalous is not None else np.zeros(0, bool))
    counts = confusion(good_flags, anomalous_flags)
    rates = decision_metrics(counts["tp"], counts["fp"], counts["tn"], counts["fn"])
    result = {name: float(v) for name, v in rates.items() if np.isfinite(v)}
    return {**result, **counts}
