"""The YAML model card: what was trained on what, how, and where its thresholds came from.

The card is plain data (dataclasses) so it round-trips through ``yaml.safe_load``
and is checked field by field when read: a hand-edited or damaged card gives a
clear error that names the field, never a crash later on.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aadetect.config import CODE_RADII, ERROR_MEASURES, MAX_SHIFT_RADIUS
from aadetect.errors import UserError, first_line

FORMAT_VERSION = 2  # 2: reconstruction scale in log units; centres of held-out good images
# 3: a card whose density leaves out calibration.lookalike_codes; an aadetect that reads only 2 would
# silently score with every code, so it must refuse the card instead
LOOKALIKES_FORMAT_VERSION = 3
# 4: thresholds that also compare images with the anomalous samples (calibration.anomalies_file); an
# aadetect that reads only 2 and 3 would ignore that test
ANOMALIES_FORMAT_VERSION = 4
READABLE_VERSIONS = (FORMAT_VERSION, LOOKALIKES_FORMAT_VERSION, ANOMALIES_FORMAT_VERSION)
CARD_FILE = "card.yaml"
WEIGHTS_FILE = "weights.pt"
DENSITY_FILE = "density.npz"
VALIDATION_FILE = "validation.txt"
REJECTED_FILE = "rejected.txt"
LOOKALIKES_FILE = "lookalikes.txt"
DENSITY_IMAGES_FILE = "density_images.txt"  # the training images behind the density's codes, in order
HELD_OUT_FILE = "held_out.npz"  # the held-out images' codes and errors, to measure them again at calibration
ANOMALIES_PREFIX = "anomalies-"  # + a digest of the content + ".npy": a new calibration never overwrites the file
#                                  the card in force names


@dataclass
class DataInfo:
    path: str
    image_count: int  # usable images found (train + validation)
    sha256: str  # over the sorted file names and contents
    skipped: list[str]  # unreadable files, with the reason
    validation_count: int
    validation_file: str
    rejected_count: int  # likely outliers left out by robust training
    rejected_file: str
    held_out_file: str | None = None  # models trained before it have none


@dataclass
class Preprocessing:
    image_size: int
    channels: int
    resize: str
    normalisation: str


@dataclass
class ArchitectureInfo:
    image_size: int
    channels: int
    latent_dim: int
    widths: list[int]
    discriminator_width: int
    extra_convs: int = 0  # cards written before the option: none


@dataclass
class TrainingInfo:
    settings: dict[str, Any]  # the TrainConfig, verbatim
    device: str
    epochs_run: int
    best_epoch: int
    seconds: float
    final_losses: dict[str, float]
    torch_version: str


@dataclass
class DensityInfo:
    estimator: str
    bandwidth: str
    factor: float
    n_codes: int
    file: str
    radius: str = "linear"  # cards written before the option: the codes as they are
    shift_radius: int = 0  # cards written before the option: the image as it is


@dataclass
class Thresholds:
    """The OR rule: anomalous when reconstruction_error > reconstruction or log_density < density (or,
    calibrated with anomalous samples, anomaly_log_odds > anomaly_log_odds).

    The centres (medians) and scales (robust spreads) of held-out good images, for the log
    reconstruction error, the log-density and the log-odds, put the excesses in one unit, so that
    ``score`` is the largest normalised excess and is positive exactly when the rule fires.
    """

    reconstruction: float
    density: float
    reconstruction_scale: float
    density_scale: float
    reconstruction_centre: float
    density_centre: float
    calibrated: bool
    method: str
    anomaly_log_odds: float | None = None
    anomaly_odds_scale: float | None = None
    anomaly_odds_centre: float | None = None


@dataclass
class Calibration:
    created: str
    objective: str
    target_fpr: float | None
    good_count: int
    anomalous_count: int
    good_path: str
    anomalous_path: str | None
    metrics: dict[str, float]
    warnings: list[str]
    # training codes left out of the density: they look like the anomalous samples (aadetect.lookalikes)
    lookalike_codes: list[int] = field(default_factory=list)
    lookalikes_file: str | None = None
    # the anomalous samples' codes: their kernel mixture, with the lookalikes', gives anomaly_log_odds
    anomalies_file: str | None = None


@dataclass
class ModelCard:
    format_version: int
    aadetect_version: str
    created: str
    error_measure: str
    data: DataInfo
    preprocessing: Preprocessing
    architecture: ArchitectureInfo
    training: TrainingInfo
    density: DensityInfo
    thresholds: Thresholds
    files: dict[str, str]  # file name -> sha256, checked on load
    calibration: Calibration | None = None
    intended_use: str = field(default=(
        "Flag images unlike the good images this model was trained on. Anomaly scores are only meaningful "
        "for images from the same source and imaging set-up; calibrate the thresholds on labelled samples "
        "before relying on the decisions."))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(_plain(dataclasses.asdict(self)), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str, source: str = CARD_FILE) -> ModelCard:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)  # where a hand edit went wrong
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise UserError(f"{source}: not valid YAML{where} ({getattr(exc, 'problem', None) or first_line(exc)})"
                            ) from None
        if not isinstance(data, dict):
            raise UserError(f"{source}: not a model card (expected a mapping)")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise UserError(f"{source}: unknown card format_version {version!r} (this aadetect reads "
                            f"{' and '.join(map(str, READABLE_VERSIONS))}; retrain the model with this version)")
        card = _build(cls, data, source, "")
        card.check(source)
        return card

    def check(self, source: str = CARD_FILE) -> None:
        """Values that parse but cannot work."""
        for name in ("reconstruction", "density", "reconstruction_scale", "density_scale", "reconstruction_centre",
                     "density_centre"):
            value = getattr(self.thresholds, name)
            if not math.isfinite(value):
                raise UserError(f"{source}: thresholds.{name} is not a finite number ({value})")
        if self.thresholds.reconstruction_scale <= 0 or self.thresholds.density_scale <= 0:
            raise UserError(f"{source}: threshold scales must be positive")
        odds = (self.thresholds.anomaly_log_odds, self.thresholds.anomaly_odds_scale, self.thresholds.anomaly_odds_centre)
        anomalies_file = self.calibration.anomalies_file if self.calibration else None
        present = [value is not None for value in (*odds, anomalies_file)]
        if any(present) and not all(present):
            raise UserError(f"{source}: thresholds.anomaly_log_odds, anomaly_odds_scale, anomaly_odds_centre and "
                            f"calibration.anomalies_file go together: all of them or none")
        if anomalies_file is not None:
            if not all(math.isfinite(value) for value in odds) or self.thresholds.anomaly_odds_scale <= 0:
                raise UserError(f"{source}: the anomaly_log_odds threshold, scale and centre must be finite, "
                                f"the scale positive")
            if self.format_version != ANOMALIES_FORMAT_VERSION:
                raise UserError(f"{source}: a card with calibration.anomalies_file must have format_version "
                                f"{ANOMALIES_FORMAT_VERSION}, got {self.format_version}")
            if anomalies_file != Path(anomalies_file).name or not anomalies_file.startswith(ANOMALIES_PREFIX):
                raise UserError(f"{source}: calibration.anomalies_file must be a file name starting with "
                                f"{ANOMALIES_PREFIX!r}, got {anomalies_file!r:.60}")
        if self.thresholds.reconstruction <= 0 or self.thresholds.reconstruction_centre <= 0:
            raise UserError(f"{source}: thresholds.reconstruction and reconstruction_centre must be positive")
        if self.architecture.channels not in (1, 3):
            raise UserError(f"{source}: architecture.channels must be 1 or 3")
        sizes = {"image_size": self.architecture.image_size, "latent_dim": self.architecture.latent_dim,
                 "discriminator_width": self.architecture.discriminator_width,
                 **{f"widths[{i}]": width for i, width in enumerate(self.architecture.widths)}}
        for name, size in sizes.items():  # torch would warn, then fail, on a zero-sized layer
            if size < 1:
                raise UserError(f"{source}: architecture.{name} must be positive, got {size}")
        if self.architecture.extra_convs < 0:
            raise UserError(f"{source}: architecture.extra_convs must not be negative")
        if not 0 <= self.density.shift_radius <= MAX_SHIFT_RADIUS:
            raise UserError(f"{source}: density.shift_radius must be between 0 and {MAX_SHIFT_RADIUS}")
        for name in ("image_size", "channels"):  # images are read at the architecture's; the two must agree
            if getattr(self.preprocessing, name) != getattr(self.architecture, name):
                raise UserError(f"{source}: preprocessing.{name} ({getattr(self.preprocessing, name)!r:.20}) "
                                f"differs from architecture.{name} ({getattr(self.architecture, name)!r:.20})")
        if self.error_measure not in ERROR_MEASURES:
            raise UserError(f"{source}: error_measure must be one of {', '.join(ERROR_MEASURES)}, "
                            f"got {self.error_measure!r:.40}")
        lookalikes = self.calibration.lookalike_codes if self.calibration else []
        if any(not 0 <= i < self.density.n_codes for i in lookalikes) or len(set(lookalikes)) != len(lookalikes):
            raise UserError(f"{source}: calibration.lookalike_codes must be distinct code numbers from 0 to "
                            f"{self.density.n_codes - 1}")
        if len(lookalikes) >= self.density.n_codes - self.architecture.latent_dim:
            raise UserError(f"{source}: calibration.lookalike_codes leaves too few codes for the density")
        if self.density.radius not in CODE_RADII:
            raise UserError(f"{source}: density.radius must be one of {', '.join(CODE_RADII)}, "
                            f"got {self.density.radius!r:.40}")


def _plain(value: Any) -> Any:
    """Builtin types only (numpy scalars become floats and ints), so safe_dump can write them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _build(cls, data: Any, source: str, where: str):
    """Make dataclass `cls` from parsed YAML, checking every field's presence and type."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {where.rstrip('.') or 'card'} must be a mapping")
    hints = typing.get_type_hints(cls)
    values = {}
    for spec in dataclasses.fields(cls):
        key = f"{where}{spec.name}"
        if spec.name not in data:
            if spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING:
                continue
            raise UserError(f"{source}: missing key {key!r}")
        values[spec.name] = _convert(hints[spec.name], data[spec.name], source, key)
    return cls(**values)


def _convert(hint, value: Any, source: str, key: str):
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, source, key)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    expected = origin or hint
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        raise UserError(f"{source}: {key} must be {getattr(expected, '__name__', expected)}, got {value!r:.60}")
    if expected is list and typing.get_args(hint):  # the items too: a quoted "16" in widths fails late
        (item,) = typing.get_args(hint)
        return [_convert(item, entry, source, f"{key}[{i}]") for i, entry in enumerate(value)]
    if expected is dict and typing.get_args(hint):
        key_type, item = typing.get_args(hint)
        return {_convert(key_type, name, source, f"{key} key {name!r:.40}"):
                _convert(item, entry, source, f"{key}.{name}") for name, entry in value.items()}
    return value


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no model card here (train a model first, or pass --model)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read model card ({exc})") from None
    return ModelCard.from_yaml(text, str(path))
