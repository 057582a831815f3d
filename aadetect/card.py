"""The YAML model card: what was trained on what, how, and where its thresholds came from.

The card is plain data (dataclasses) so it round-trips through ``yaml.safe_load`` and is
checked field by field when read: every key is required, unknown keys are refused, and a
hand-edited or damaged card gives a clear error that names the field, never a crash later on.
One format: a folder written by anything else is refused with a line that says to retrain.
Where the files live and how they are written is `aadetect.store`'s business.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aadetect.config import Architecture, TrainConfig
from aadetect.errors import UserError, first_line

FORMAT_VERSION = 1
MAX_NESTING = 16  # the card's own is 4 deep
MIN_SCALE = 1e-6  # the floor of calibration.robust_scale: a spread that training writes is never smaller
ANOMALIES_PREFIX = "anomalies-"  # + a digest of the content + ".npy" (see aadetect.store)
LOG_CAP = 700.0  # exp() of more overflows a float64: a cut that far out never fires anyway


@dataclass(frozen=True)
class DataInfo:
    path: str
    image_count: int  # usable images found (train + validation)
    sha256: str  # over the sorted file names and contents
    skipped: list[str]  # unreadable files, with the reason
    validation_count: int
    rejected_count: int  # likely outliers left out by robust training


@dataclass(frozen=True)
class TrainingInfo:
    settings: TrainConfig  # verbatim: the error measure, code radius and shift radius are read from here
    device: str
    world_size: int  # processes that trained it together (torchrun); 1 for one process
    epochs_run: int
    best_epoch: int
    seconds: float
    final_losses: dict[str, float]
    torch_version: str


@dataclass(frozen=True)
class DensityInfo:
    bandwidth: str
    factor: float
    n_codes: int


@dataclass(frozen=True)
class Cut:
    """One test of the OR rule, on a scale where good images sit at `centre` with robust spread `scale`
    (for the reconstruction error: its log); the cut lies `height` spreads on the anomalous side."""

    centre: float
    scale: float
    height: float


@dataclass(frozen=True)
class OddsScale:
    """Where good images' log-odds of the labelled anomalous kind sit, and their spread; the odds test
    has no height of its own: it cuts as high above this centre as the density's cut lies below its own."""

    centre: float
    scale: float


@dataclass(frozen=True)
class Thresholds:
    """The OR rule: anomalous when reconstruction_error > reconstruction_cut or log_density < density_cut
    (or, calibrated with anomalous samples, anomaly_log_odds > odds_cut).

    Stored as centres, spreads and heights, so that every excess is in one unit (``score`` is the largest
    excess, positive exactly when the rule fires); the cuts themselves are derived.
    """

    calibrated: bool
    method: str
    reconstruction: Cut
    density: Cut
    anomaly_log_odds: OddsScale | None

    @property
    def reconstruction_cut(self) -> float:
        cut = self.reconstruction
        return cut.centre * math.exp(min(max(cut.height * cut.scale, -LOG_CAP), LOG_CAP))

    @property
    def density_cut(self) -> float:
        return self.density.centre - self.density.height * self.density.scale

    @property
    def odds_cut(self) -> float | None:
        odds = self.anomaly_log_odds
        return None if odds is None else odds.centre + self.density.height * odds.scale

    def at_heights(self, reconstruction: float, density: float, *, calibrated: bool, method: str) -> Thresholds:
        return dataclasses.replace(self, calibrated=calibrated, method=method,
                                   reconstruction=dataclasses.replace(self.reconstruction, height=reconstruction),
                                   density=dataclasses.replace(self.density, height=density))


@dataclass(frozen=True)
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
    lookalike_codes: list[int]  # training codes left out of the density: they look like the anomalous samples
    anomalies_file: str | None  # the anomalous samples' kernel centres (aadetect.lookalikes.AnomalyKind)


@dataclass(frozen=True)
class Export:
    """The scoring path exported as one graph (`aadetect export`): from decoded pixels to every number of
    `score`. It reflects one card: `card_sha256` is the digest of the card without this record
    (`aadetect.store.card_digest`), so a later calibration makes the export stale."""

    format: str  # "onnx"
    file: str  # in the model folder
    sha256: str
    opset: int
    card_sha256: str
    exporter: str  # e.g. "torch 2.14.1"
    input: str  # what the graph takes: decoding and resizing stay outside it
    outputs: list[str]


EXPORT_FORMATS = {"onnx": "model.onnx"}  # format -> the file it is written to


INTENDED_USE = ("Flag images unlike the good images this model was trained on. Anomaly scores are only meaningful "
                "for images from the same source and imaging set-up; calibrate the thresholds on labelled samples "
                "before relying on the decisions.")


@dataclass(frozen=True)
class ModelCard:
    format_version: int
    aadetect_version: str
    created: str
    data: DataInfo
    architecture: Architecture
    training: TrainingInfo
    density: DensityInfo
    thresholds: Thresholds
    calibration: Calibration | None
    files: dict[str, str]  # file name -> sha256, checked on load
    intended_use: str = field(default=INTENDED_USE)
    export: Export | None = None  # until `aadetect export` runs

    @property
    def settings(self) -> TrainConfig:
        return self.training.settings

    @property
    def shift_radius(self) -> int:
        """The shift radius the model is scored with (`TrainConfig.resolved`)."""
        return self.settings.resolved(self.architecture.image_size).shift_radius

    def summary(self) -> dict:
        """What a person wants to know of the model before trusting its verdicts: what it was trained on,
        what it sees, and its thresholds with how they were set (for `serve`'s /model and the report)."""
        thresholds, calibration = self.thresholds, self.calibration
        return {
            "aadetect_version": self.aadetect_version, "created": self.created,
            "training_data": {"path": self.data.path, "images": self.data.image_count,
                              "rejected_as_outliers": self.data.rejected_count, "skipped": len(self.data.skipped)},
            "image_size": self.architecture.image_size, "channels": self.architecture.channels,
            "code_grid": self.architecture.code_grid, "adversarial": self.settings.adversarial,
            "error_measure": self.settings.error,
            "thresholds": {"reconstruction": thresholds.reconstruction_cut, "density": thresholds.density_cut,
                           "anomaly_log_odds": thresholds.odds_cut, "calibrated": thresholds.calibrated, "method": thresholds.method},
            "calibration": None if calibration is None else {
                "created": calibration.created, "objective": calibration.objective,
                "target_fpr": calibration.target_fpr, "good_samples": calibration.good_count,
                "anomalous_samples": calibration.anomalous_count, "metrics": calibration.metrics,
                "warnings": calibration.warnings},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(dataclasses.asdict(self)), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str, source: str = "card.yaml") -> ModelCard:
        try:
            data = yaml.load(text, Loader=_CardLoader)  # noqa: S506 (a SafeLoader, stricter still)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)  # where a hand edit went wrong
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise UserError(f"{source}: not valid YAML{where} ({getattr(exc, 'problem', None) or first_line(exc)})"
                            ) from None
        if not isinstance(data, dict):
            raise UserError(f"{source}: not a model card (expected a mapping)")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise UserError(f"{source}: card format_version {version!r:.20} is not this aadetect's "
                            f"({FORMAT_VERSION}); retrain the model with this version")
        card = _build(cls, data, source, "")
        card.check(source)
        return card

    def check(self, source: str) -> None:
        """Values that parse but cannot work."""
        cuts = {"reconstruction": self.thresholds.reconstruction, "density": self.thresholds.density}
        if self.thresholds.anomaly_log_odds is not None:
            cuts["anomaly_log_odds"] = self.thresholds.anomaly_log_odds
        for name, cut in cuts.items():
            for part, value in dataclasses.asdict(cut).items():
                if not math.isfinite(value):
                    raise UserError(f"{source}: thresholds.{name}.{part} is not a finite number ({value})")
            if not cut.scale >= MIN_SCALE:  # a smaller one would blow scores up to infinity, which is not JSON
                raise UserError(f"{source}: thresholds.{name}.scale must be at least {MIN_SCALE:g}")
        if self.thresholds.reconstruction.centre <= 0:
            raise UserError(f"{source}: thresholds.reconstruction.centre must be positive")
        anomalies_file = self.calibration.anomalies_file if self.calibration else None
        if (anomalies_file is None) != (self.thresholds.anomaly_log_odds is None):
            raise UserError(f"{source}: thresholds.anomaly_log_odds and calibration.anomalies_file go together: "
                            f"both or neither")
        if anomalies_file is not None and (anomalies_file != Path(anomalies_file).name
                                           or not anomalies_file.startswith(ANOMALIES_PREFIX)):
            raise UserError(f"{source}: calibration.anomalies_file must be a file name starting with "
                            f"{ANOMALIES_PREFIX!r}, got {anomalies_file!r:.60}")
        arch = self.architecture
        resolved = self.settings.resolved(arch.image_size)
        if arch.channels not in (1, 3):
            raise UserError(f"{source}: architecture.channels must be 1 or 3")
        sizes = {"image_size": arch.image_size, "latent_dim": arch.latent_dim,
                 "discriminator_width": arch.discriminator_width,
                 **{f"widths[{i}]": width for i, width in enumerate(arch.widths)}}
        for name, size in sizes.items():  # torch would warn, then fail, on a zero-sized layer
            if size < 1:
                raise UserError(f"{source}: architecture.{name} must be positive, got {size}")
        if (arch.extra_convs != self.settings.extra_convs
                or (arch.code_grid, arch.latent_dim) != (resolved.code_grid, resolved.latent_dim)):
            raise UserError(f"{source}: architecture and training.settings disagree on extra_convs, code_grid or "
                            f"latent_dim")
        lookalikes = self.calibration.lookalike_codes if self.calibration else []
        if any(not 0 <= i < self.density.n_codes for i in lookalikes) or len(set(lookalikes)) != len(lookalikes):
            raise UserError(f"{source}: calibration.lookalike_codes must be distinct code numbers from 0 to "
                            f"{self.density.n_codes - 1}")
        if len(lookalikes) >= self.density.n_codes - arch.latent_dim:
            raise UserError(f"{source}: calibration.lookalike_codes leaves too few codes for the density")
        export = self.export
        if export is not None:
            if EXPORT_FORMATS.get(export.format) != export.file:
                raise UserError(f"{source}: export.file must be {' or '.join(EXPORT_FORMATS.values())} for its "
                                f"format, got {export.format!r:.20} and {export.file!r:.60}")
            for name in ("sha256", "card_sha256"):
                value = getattr(export, name)
                if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                    raise UserError(f"{source}: export.{name} must be a sha256 in 64 hex digits")
            if export.opset < 1:
                raise UserError(f"{source}: export.opset must be positive, got {export.opset}")


class _CardLoader(yaml.SafeLoader):
    """`yaml.safe_load`, without aliases (a kilobyte of them expands to gigabytes) and with bounded nesting
    (thousands of levels would exhaust the stack)."""

    depth = 0

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases are not allowed in a model card", mark)
        if self.depth >= MAX_NESTING:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_NESTING} levels deep", mark)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _plain(value: Any) -> Any:
    """Builtin types only (numpy scalars become floats and ints, tuples lists), so safe_dump can write them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def _build(cls, data: Any, source: str, where: str):
    """Make dataclass `cls` from parsed YAML: every field present and of its type, nothing else."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: {where.rstrip('.') or 'card'} must be a mapping")
    names = [spec.name for spec in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        raise UserError(f"{source}: unknown key {(where + str(unknown[0]))[:60]!r}")
    missing = [name for name in names if name not in data]
    if missing:
        raise UserError(f"{source}: missing key {where + missing[0]!r}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], data[name], source, f"{where}{name}") for name in names}
    try:
        return cls(**values)
    except UserError as error:  # a TrainConfig checks itself
        raise UserError(f"{source}: {where.rstrip('.')}: {error}") from None


def _convert(hint, value: Any, source: str, key: str):
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
    wanted = list if expected is tuple else expected  # YAML has lists only
    ok = isinstance(value, wanted) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        raise UserError(f"{source}: {key} must be {getattr(expected, '__name__', expected)}, got {value!r:.60}")
    if expected in (list, tuple) and typing.get_args(hint):  # the items too: a quoted "16" in widths fails late
        item = typing.get_args(hint)[0]
        return expected(_convert(item, entry, source, f"{key}[{i}]") for i, entry in enumerate(value))
    if expected is dict and typing.get_args(hint):
        key_type, item = typing.get_args(hint)
        return {_convert(key_type, name, source, f"{key} key {name!r:.40}"):
                _convert(item, entry, source, f"{key}.{name}") for name, entry in value.items()}
    return value
