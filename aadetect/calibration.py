"""Choosing the thresholds of the OR rule from a few labelled images (and the held-out good ones)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr

from aadetect.card import MIN_SCALE, Cut, OddsScale, Thresholds
from aadetect.config import TrainConfig
from aadetect.errors import UserError
from aadetect.metrics import confusion, decision_metrics
from aadetect.scoring import Measurements, decide, joined

MAX_CANDIDATES = 256  # cuts tried; keeps the search small for large calibration sets
FEW_SAMPLES = 10
SMALLEST_ERROR = 1e-30  # a perfect reconstruction still has a finite log error
GRID = 256  # evenly spaced cut heights tried, besides the midpoints between samples
MIN_BANDWIDTH = 0.25  # a sample's bump is at least a quarter of the good images' spread wide
NEAR_BEST = 0.005  # expected objectives this close to the best count as ties (half a point of balanced accuracy)


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
    floor = MIN_SCALE * (abs(median) + 1.0)
    spread = 1.4826 * float(np.median(np.abs(values - median)))
    if not spread > floor:
        spread = float(np.std(values))
    return max(spread, floor)


def centred_thresholds(good: Measurements) -> Thresholds:
    """Both cuts at the good images' medians (height 0), with their robust spreads as the scales.

    Reconstruction errors are right-skewed, so they are centred and scaled in log units;
    then one unit above the centre means about the same rarity for both signals.
    """
    log_error = np.log(np.maximum(good.reconstruction_error, SMALLEST_ERROR))
    error_centre, density_centre = float(np.exp(np.median(log_error))), float(np.median(good.log_density))
    return Thresholds(calibrated=False, method="", reconstruction=Cut(error_centre, robust_scale(log_error), 0.0),
                      density=Cut(density_centre, robust_scale(good.log_density), 0.0), anomaly_log_odds=None)


def sample_heights(thresholds: Thresholds, samples: Measurements) -> tuple[np.ndarray, np.ndarray]:
    """How far samples lie above the good centres, in scale units: by their error, and on the density's
    side, by their density or (with a scale for it) their log-odds of the anomalous kind, whichever
    is higher; one cut on the density's side then tests both at the same rarity."""
    reconstruction, density = thresholds.reconstruction, thresholds.density
    error_height = np.log(np.maximum(samples.reconstruction_error, SMALLEST_ERROR) / reconstruction.centre
                          ) / reconstruction.scale
    density_height = (density.centre - np.asarray(samples.log_density)) / density.scale
    odds = thresholds.anomaly_log_odds
    if odds is not None:
        density_height = np.maximum(density_height, (samples.anomaly_log_odds - odds.centre) / odds.scale)
    return error_height, density_height


def with_odds_scale(thresholds: Thresholds, reference: Measurements | None) -> Thresholds:
    """Thresholds whose log-odds test is centred and scaled on good images' log-odds (`reference`), or
    that have none (no anomalous samples to compare with)."""
    if reference is None or reference.anomaly_log_odds is None:
        return dataclasses.replace(thresholds, anomaly_log_odds=None)
    odds = reference.anomaly_log_odds
    return dataclasses.replace(thresholds, anomaly_log_odds=OddsScale(float(np.median(odds)), robust_scale(odds)))


def height_for_fpr(thresholds: Thresholds, good: Measurements, target_fpr: float) -> float:
    """The common height of both cuts that flags at most `target_fpr` of the good images."""
    error_height, density_height = sample_heights(thresholds, good)
    excess = np.sort(np.maximum(error_height, density_height))
    allowed = int(np.floor(target_fpr * len(excess) + 1e-9))
    kept = excess[len(excess) - allowed - 1]
    # halfway to the next larger value: a cut on images tied with `kept` would flag them or not by rounding
    above = excess[excess > kept]
    return float((kept + above[0]) / 2 if len(above) else kept + 0.5)


def default_thresholds(validation: Measurements, target_fpr: float) -> Thresholds:
    """Thresholds from held-out good images alone: both at one height, for a false-positive budget."""
    _check_finite(validation, "held-out good images")
    centred = centred_thresholds(validation)
    height = height_for_fpr(centred, validation, target_fpr)
    return centred.at_heights(height, height, calibrated=False,
                              method=f"default: held-out good images, target FPR {target_fpr}")


def _candidates(values: np.ndarray) -> np.ndarray:
    """Midpoints between neighbouring observed values, plus one cut beyond each end."""
    points = np.unique(values)
    if len(points) > MAX_CANDIDATES:
        points = np.unique(np.quantile(points, np.linspace(0, 1, MAX_CANDIDATES)))
    return np.concatenate([[points[0] - 1.0], (points[:-1] + points[1:]) / 2, [points[-1] + 1.0]])


def kernel_bandwidth(heights: np.ndarray) -> float:
    """Silverman's rule of thumb for one class's heights on one signal, in good-spread units, floored."""
    heights = np.asarray(heights, dtype=np.float64)
    if len(heights) < 2:
        return MIN_BANDWIDTH
    spread = float(np.std(heights, ddof=1))
    quartile_spread = float(np.subtract(*np.percentile(heights, [75, 25]))) / 1.349
    if quartile_spread > 0:
        spread = min(spread, quartile_spread)
    return max(0.9 * spread * len(heights) ** -0.2, MIN_BANDWIDTH)


def _below(cuts: np.ndarray, heights: np.ndarray, bandwidth: float) -> np.ndarray:
    """(cuts, samples): 1 where a sample stays under a cut; with a bandwidth, the chance that it does."""
    if bandwidth == 0:
        return (heights[None, :] <= cuts[:, None]).astype(np.float64)

    return ndtr((cuts[:, None] - heights[None, :]) / bandwidth)


def _flagged(cuts: np.ndarray, error_height: np.ndarray, density_height: np.ndarray, smooth: bool) -> np.ndarray:
    """Images the OR rule flags for every (error cut, density cut) pair: counted, or expected when smooth."""
    error_bandwidth, density_bandwidth = ((kernel_bandwidth(error_height), kernel_bandwidth(density_height))
                                          if smooth else (0.0, 0.0))
    unflagged = _below(cuts, error_height, error_bandwidth) @ _below(cuts, density_height, density_bandwidth).T
    return len(error_height) - unflagged


def choose_thresholds(thresholds: Thresholds, good: Measurements, anomalous: Measurements | None, *,
                      held_out: Measurements | None = None, objective: str = "balanced-accuracy",
                      target_fpr: float | None = None, default_fpr: float = TrainConfig.target_fpr) -> CalibrationResult:
    """Search both cuts jointly for the best expected objective on the samples.

    A few samples are a coarse picture: counted, one odd good image can drag a cut across a wide
    gap. So each sample counts as a small Gaussian bump (Silverman's bandwidth, per class and
    signal), and the cuts maximise the expected objective. Cuts are heights above the good
    centres, in scale units. Pairs within NEAR_BEST of the best count as ties, and the one with
    both cuts at the same height (within a quarter unit) wins (then the better value, then the
    widest margin): `score` then ranks images by both signals alike, which ranked MNIST best; a
    clearly weaker signal still gets pushed out when that is clearly better
    (benchmarks/RESULTS.md). A false-positive budget is kept on the samples as counted. With no
    anomalous samples, or anomalous samples that no pair of cuts tells from the good ones, both
    cuts sit at one height set by a false-positive budget (`target_fpr`, else `default_fpr`).

    `held_out`: good images the model held out from training, measured as the samples were. With
    anomalous samples they join the good side of the search: ten good samples say little about how
    many good images a cut flags, hundreds of held-out ones say it well. A false-positive budget is
    kept on the labelled good samples alone: the held-out images are a slice of the training folder,
    which may hide a few anomalies, and one of those must not hold every cut above it. Where the
    anomalous samples carry log-odds of their kind, those are centred and scaled on the held-out
    images (else on the good samples) and tested on the density's side of the rule
    (`sample_heights`). The reported metrics are the labelled samples' own.
    """
    _check_finite(good, "good samples")
    if anomalous is not None:
        _check_finite(anomalous, "anomalous samples")
    if held_out is not None:
        _check_finite(held_out, "held-out good images")
    warnings = [f"only {n} {label} samples: thresholds are rough; 10 or more of each are advised"
                for label, n in (("good", len(good)), ("anomalous", len(anomalous) if anomalous else 0))
                if 0 < n < FEW_SAMPLES]
    budget = default_fpr if target_fpr is None else target_fpr
    if anomalous is None or len(anomalous) == 0:
        thresholds = with_odds_scale(thresholds, None)
        calibrated = _good_only(thresholds, good, budget)
        return CalibrationResult(calibrated, _metrics_at(calibrated, good, None), warnings)

    if held_out is not None and (held_out.anomaly_log_odds is None) != (anomalous.anomaly_log_odds is None):
        raise ValueError("held-out images and anomalous samples must both have log-odds, or neither")
    reference = held_out if held_out is not None and len(held_out) else good
    thresholds = with_odds_scale(thresholds, reference if anomalous.anomaly_log_odds is not None else None)
    every_good = joined([good, held_out])
    good_error, good_density = sample_heights(thresholds, every_good)
    anomalous_error, anomalous_density = sample_heights(thresholds, anomalous)
    every_error, every_density = np.r_[good_error, anomalous_error], np.r_[good_density, anomalous_density]
    every_height = np.r_[every_error, every_density]
    cuts = np.unique(np.r_[_candidates(every_error), _candidates(every_density),
                           np.linspace(min(every_height.min(), 0.0) - 1.0, every_height.max() + 1.0, GRID)])

    false_positives = _flagged(cuts, good_error, good_density, smooth=True)
    true_positives = _flagged(cuts, anomalous_error, anomalous_density, smooth=True)
    rates = decision_metrics(true_positives, false_positives, len(every_good) - false_positives,
                             len(anomalous) - true_positives)
    value = rates["f1" if objective == "f1" else "balanced_accuracy"]
    if target_fpr is not None:  # counted on the labelled good samples: held-out images may hide anomalies
        labelled_fpr = _flagged(cuts, *sample_heights(thresholds, good), smooth=False) / len(good)
        value = np.where(labelled_fpr <= target_fpr + 1e-12, value, -np.inf)
    margin = np.minimum(np.abs(cuts[:, None] - every_error[None, :]).min(axis=1)[:, None],
                        np.abs(cuts[:, None] - every_density[None, :]).min(axis=1)[None, :])
    imbalance = np.round(2 * np.abs(cuts[:, None] - cuts[None, :]))  # half-unit steps
    near = np.flatnonzero(value.ravel() >= value.max() - NEAR_BEST)
    pick = near[np.lexsort((-margin.ravel()[near], -value.ravel()[near], imbalance.ravel()[near]))[0]]
    i, j = np.unravel_index(pick, value.shape)
    method = f"joint search maximising {objective}" + (f" at FPR <= {target_fpr}" if target_fpr is not None else "")
    calibrated = thresholds.at_heights(float(cuts[i]), float(cuts[j]), calibrated=True, method=method)
    metrics = _metrics_at(calibrated, good, anomalous)
    if metrics["balanced_accuracy"] <= 0.5:  # no better than chance: the widest margin lies below every sample
        calibrated = _good_only(thresholds, good, budget)
        warnings.append(f"no thresholds tell the anomalous samples from the good ones (balanced accuracy "
                        f"{metrics['balanced_accuracy']:.2f} at best): set from the good samples alone, for a "
                        f"false-positive budget of {budget}; check the labels, and whether the anomalies "
                        f"differ from the good images in a way the model can see")
        metrics = _metrics_at(calibrated, good, anomalous)
    return CalibrationResult(calibrated, metrics, warnings)


def _good_only(thresholds: Thresholds, good: Measurements, budget: float) -> Thresholds:
    height = height_for_fpr(thresholds, good, budget)
    return thresholds.at_heights(height, height, calibrated=True, method=f"good samples only, target FPR {budget}")


def _check_finite(samples: Measurements, label: str) -> None:
    """NaN or infinite measurements (a model whose training diverged) have no place on any cut."""
    broken = ~(np.isfinite(samples.reconstruction_error) & np.isfinite(samples.log_density))
    if samples.anomaly_log_odds is not None:
        broken |= ~np.isfinite(samples.anomaly_log_odds)
    if broken.any():
        raise UserError(f"{int(broken.sum())} of {len(samples)} {label} have a NaN or infinite reconstruction "
                        f"error, log-density or log-odds: the model is broken (did its training diverge?)")


def _metrics_at(thresholds: Thresholds, good: Measurements, anomalous: Measurements | None) -> dict[str, float]:
    good_flags = decide(good, thresholds).anomaly
    anomalous_flags = decide(anomalous, thresholds).anomaly if anomalous is not None else np.zeros(0, bool)
    counts = confusion(good_flags, anomalous_flags)
    rates = decision_metrics(**counts)
    result = {name: float(v) for name, v in rates.items() if np.isfinite(v)}
    return {**result, **counts}
