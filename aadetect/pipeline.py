"""The tool's jobs as library calls: train, calibrate, evaluate. The CLI and the demo both use these."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from aadetect import __version__
from aadetect.card import (ANOMALIES_FORMAT_VERSION, ANOMALIES_PREFIX, CARD_FILE, DENSITY_FILE,
                           DENSITY_IMAGES_FILE, FORMAT_VERSION, HELD_OUT_FILE, LOOKALIKES_FILE,
                           LOOKALIKES_FORMAT_VERSION, REJECTED_FILE, VALIDATION_FILE, WEIGHTS_FILE,
                           ArchitectureInfo, Calibration, DataInfo, DensityInfo, ModelCard, Preprocessing,
                           TrainingInfo, read_card)
from aadetect.config import AUTO, OBJECTIVES, SCALED_MEASURES, Architecture, TrainConfig, check_fraction
from aadetect.errors import UserError, first_line
from aadetect.images import ImageRef, ImagesOnDisk, choose_image_size, find_images, image_mode, load_images
from aadetect.progress import Reporter
from aadetect.scoring import sha256_file

if TYPE_CHECKING:
    from aadetect.calibration import Measurements
    from aadetect.scoring import Detector
    from aadetect.train import TrainResult

MIN_TRAIN_IMAGES = 10
FEW_HELD_OUT = 20  # below this many held-out images, the default thresholds are rough: say so


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class TrainSummary:
    card: ModelCard
    model_dir: Path
    rejected: list[str]
    skipped: list[str]


def checkpoint_path(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + ".checkpoint.pt")


def check_output_dir(model_dir: Path) -> None:
    """Never replace a folder that is not an aadetect model: it may hold the user's data. And find
    out now, not after training, when the model cannot be written where it should go."""
    from aadetect.atomic import check_writable

    if model_dir.exists() and (not model_dir.is_dir() or
                               (any(model_dir.iterdir()) and not (model_dir / CARD_FILE).exists())):
        raise UserError(f"{model_dir}: exists and is not an aadetect model folder; choose another --out")
    check_writable(model_dir)


def fingerprint(refs: list[ImageRef], root: Path) -> str:
    """sha256 over the sorted file names and contents: says exactly which data a model saw.

    Names are taken relative to `root`, so the same folder gives the same fingerprint however its
    path is spelled (and `--resume` accepts it).
    """
    digest = hashlib.sha256()
    base = root if root.is_dir() else root.parent
    for path in sorted({ref.path for ref in refs}):
        digest.update(str(path.relative_to(base)).encode("utf-8", "surrogateescape") + b"\0")
        digest.update(bytes.fromhex(sha256_file(path)))  # streamed: an array file may be larger than memory
    return digest.hexdigest()


def read_training_images(data: Path, config: TrainConfig, reporter: Reporter):
    """Find, inspect and decode the training images once; unreadable ones are skipped and named."""
    refs = find_images(data)
    shapes, usable, skipped = [], [], []
    for ref in refs:
        try:
            shapes.append(image_mode(ref))
            usable.append(ref)
        except UserError as error:
            if config.strict:
                raise UserError(f"{error} (--strict)") from None
            skipped.append(str(error))
    if not usable:
        raise UserError(f"{data}: none of the {len(refs)} images could be read")
    channels = 1 if all(c == 1 for _, _, c in shapes) else 3
    size = config.image_size if config.image_size != AUTO else choose_image_size(shapes)
    needed_mb = len(usable) * channels * size * size / 2**20
    with reporter.progress("decoding", total=len(usable)) as advance:
        pixels, kept, errors = load_images(usable, size, channels, strict=config.strict, on_batch=advance,
                                           keep=needed_mb <= config.memory_limit_mb)
    if needed_mb > config.memory_limit_mb:
        reporter.warn(f"the decoded images need {needed_mb:,.0f} MB, over --memory-limit-mb "
                      f"{config.memory_limit_mb}: reading them from disk every epoch instead (slower)")
        pixels = ImagesOnDisk(kept, size, channels)
    skipped += errors
    for message in skipped:
        reporter.warn(f"skipped {message}")
    if skipped:
        reporter.warn(f"skipped {len(skipped)} unreadable file(s) of {len(refs)}")
    if len(kept) < MIN_TRAIN_IMAGES:
        raise UserError(f"{data}: only {len(kept)} usable images; at least {MIN_TRAIN_IMAGES} are needed to train")
    return pixels, kept, skipped, size, channels


@dataclass
class FittedDetector:
    """A freshly trained detector, what its training did, and its held-out good images' numbers."""

    detector: Detector
    training: TrainResult
    validation: Measurements  # the default thresholds were set on these
    density_indices: np.ndarray  # the images whose codes the density holds, in its order
    held_out_codes: np.ndarray  # the held-out images' codes in every view (views, n, d), as `encode_views` gives


def fit_detector(pixels, config: TrainConfig, *, device: str | None = None, on_step=None, on_epoch=None,
                 save_checkpoint=None, resume_from: dict | None = None, data_label: str = "the images",
                 discard_checkpoint=None) -> FittedDetector:
    """Train the networks on uint8 images (N, C, S, S), fit the KDE over the kept images' codes and set the
    default thresholds on the held-out ones.

    The folder-free core of `train_detector`: for images already in memory (a tensor, or `ImagesOnDisk`),
    and for the benchmark's studies, which must train exactly as `train` does. `device` defaults to
    `config.device`. `discard_checkpoint` is called before an error that retraining with the same
    settings would meet again.
    """
    import torch

    from aadetect.calibration import default_thresholds
    from aadetect.density import KernelDensity
    from aadetect.devices import exact_math, flush_denormals, resolve_device
    from aadetect.model import residual_scale
    from aadetect.scoring import Detector
    from aadetect.train import encode_all, train_autoencoder, validation_size

    config.validate()
    device = resolve_device(device or config.device)
    discard_checkpoint = discard_checkpoint or (lambda: None)
    if isinstance(pixels, ImagesOnDisk):
        channels, size = pixels.channels, pixels.size
    elif (isinstance(pixels, torch.Tensor) and pixels.dtype == torch.uint8 and pixels.ndim == 4
          and pixels.shape[-1] == pixels.shape[-2]):
        channels, size = pixels.shape[1], pixels.shape[-1]
    else:
        raise UserError(f"{data_label}: training takes uint8 pixels (0-255) shaped (N, C, S, S), as load_images "
                        f"gives; got {type(pixels).__name__} {getattr(pixels, 'dtype', '')} "
                        f"{tuple(getattr(pixels, 'shape', ()))}")
    train_count = len(pixels) - validation_size(len(pixels), config.validation_fraction)
    if train_count <= config.latent_dim:  # the density needs more codes than dimensions: say so before training
        raise UserError(f"{data_label}: {train_count} training images (besides {len(pixels) - train_count} held "
                        f"out) are too few for {config.latent_dim}-dimensional codes; use more images or a "
                        f"smaller --latent-dim (below {train_count})")
    arch = Architecture.for_images(size, channels, config.latent_dim, config.extra_convs)
    with exact_math(device), flush_denormals():
        result = train_autoencoder(pixels, arch, config, device, on_step=on_step, on_epoch=on_epoch,
                                   save_checkpoint=save_checkpoint, resume_from=resume_from)
    # in the memory layout `load_model` gives it: trained channels_last, it computes other last bits, and the
    # default thresholds would rest on numbers that `score` does not give for the same images
    model = result.model.to(memory_format=torch.contiguous_format)
    fit_indices = np.setdiff1d(result.train_indices, result.rejected)
    if len(fit_indices) <= config.latent_dim:  # as the check before training, now that outliers are known
        discard_checkpoint()
        raise UserError(f"{data_label}: robust training left out {len(result.rejected)} of "
                        f"{len(result.train_indices)} training images as likely outliers, and the "
                        f"{len(fit_indices)} kept are too few for {config.latent_dim}-dimensional codes; use more "
                        f"images, a smaller --latent-dim (below {len(fit_indices)}) or --no-robust")
    with exact_math(device):
        fit_images = pixels[torch.from_numpy(fit_indices)]
        codes, _ = encode_all(model, fit_images, device, "mse")
        if config.error in SCALED_MEASURES:
            model.error_scale.copy_(residual_scale(model, fit_images, device, config.error))
    try:
        density = KernelDensity.fit(codes.double().numpy(), radius=config.code_radius)
    except ValueError as exc:
        discard_checkpoint()
        raise UserError(f"{data_label}: cannot fit the density ({exc})") from None
    detector = Detector(model, density, thresholds=None, error_measure=config.error, device=device,
                        shift_radius=config.shift_radius)
    held_out = pixels[torch.from_numpy(result.validation_indices)]
    validation = detector.measure(held_out)
    detector.thresholds = default_thresholds(validation, config.target_fpr)
    return FittedDetector(detector, result, validation, fit_indices, detector.encode_views(held_out)[1])


def train_detector(data: str | Path, config: TrainConfig, model_dir: str | Path, *,
                   reporter: Reporter | None = None, resume: bool = False) -> TrainSummary:
    """Train the autoencoder, fit the KDE, set default thresholds, and write the model folder atomically."""
    import torch

    from aadetect.atomic import staged_directory, write_atomic, write_text_atomic
    from aadetect.devices import resolve_device
    from aadetect.train import validation_size

    reporter = reporter or Reporter()
    config.validate()
    device = resolve_device(config.device)
    # "." or "x/.." has no name to stage beside; a link to a model folder must keep pointing at the new model
    data, model_dir = Path(data), Path(os.path.realpath(model_dir))
    check_output_dir(model_dir)
    started = time.perf_counter()

    pixels, refs, skipped, size, channels = read_training_images(data, config, reporter)
    data_sha256 = fingerprint(refs, data)
    checkpoint_file = checkpoint_path(model_dir)
    # what the networks depend on: the code radius and the shift radius only shape the density after training
    training_settings = {k: v for k, v in dataclasses.asdict(config).items()
                         if k not in ("code_radius", "shift_radius")}
    identity = {"settings": training_settings, "data_sha256": data_sha256, "device": device}
    resume_from = _read_checkpoint(checkpoint_file, identity) if resume else None

    def save_checkpoint(state: dict) -> None:
        write_atomic(checkpoint_file, lambda temp: torch.save({**state, "identity": identity}, temp))

    train_count = len(refs) - validation_size(len(refs), config.validation_fraction)
    with reporter.progress("training", total=config.epochs * train_count) as advance:
        def on_epoch(record: dict) -> None:
            advance(0, description=f"epoch {record['epoch']}/{config.epochs} "
                                   f"loss {record['reconstruction']:.4f} val {record['validation']:.4f}"
                                   + (f" rejected {record['rejected']}" if config.robust else ""))

        fitted = fit_detector(pixels, config, device=device, on_step=lambda step: advance(step["images"]),
                              on_epoch=on_epoch, save_checkpoint=save_checkpoint, resume_from=resume_from,
                              data_label=str(data), discard_checkpoint=lambda: checkpoint_file.unlink(missing_ok=True))
    result, model, density = fitted.training, fitted.detector.model, fitted.detector.density
    arch = model.arch
    if len(fitted.validation) < FEW_HELD_OUT:
        reporter.warn(f"the default thresholds rest on only {len(fitted.validation)} held-out images; "
                      f"run `aadetect calibrate` before trusting the model's decisions")

    rejected = [refs[i].name for i in result.rejected]
    with staged_directory(model_dir) as staging:
        torch.save(model.state_dict(), staging / WEIGHTS_FILE)
        density.save(staging / DENSITY_FILE)
        write_names(staging / VALIDATION_FILE, [refs[i].name for i in result.validation_indices])
        write_names(staging / REJECTED_FILE, rejected)
        write_names(staging / DENSITY_IMAGES_FILE, [refs[i].name for i in fitted.density_indices])
        np.savez(staging / HELD_OUT_FILE, view_codes=fitted.held_out_codes,
                 reconstruction_error=fitted.validation.reconstruction_error)
        card = ModelCard(
            format_version=FORMAT_VERSION, aadetect_version=__version__, created=now(), error_measure=config.error,
            data=DataInfo(path=str(data.resolve()), image_count=len(refs), sha256=data_sha256, skipped=skipped,
                          validation_count=len(result.validation_indices), validation_file=VALIDATION_FILE,
                          rejected_count=len(rejected), rejected_file=REJECTED_FILE, held_out_file=HELD_OUT_FILE),
            preprocessing=Preprocessing(image_size=size, channels=channels,
                                        resize="bilinear to a square (aspect ratio not kept), EXIF rotation applied",
                                        normalisation="pixel / 255, so inputs lie in [0, 1]"),
            architecture=ArchitectureInfo(image_size=size, channels=channels, latent_dim=arch.latent_dim,
                                          widths=list(arch.widths), discriminator_width=arch.discriminator_width,
                                          extra_convs=arch.extra_convs),
            training=TrainingInfo(settings=dataclasses.asdict(config), device=device, epochs_run=result.epochs_run,
                                  best_epoch=result.best_epoch, seconds=round(time.perf_counter() - started, 2),
                                  final_losses={k: float(v) for k, v in result.final_losses.items()},
                                  torch_version=str(torch.__version__)),
            density=DensityInfo(estimator="scipy.stats.gaussian_kde", bandwidth=density.bandwidth,
                                factor=density.factor, radius=density.radius, shift_radius=config.shift_radius,
                                n_codes=density.n_codes, file=DENSITY_FILE),
            thresholds=fitted.detector.thresholds,
            files={name: sha256_file(staging / name) for name in (WEIGHTS_FILE, DENSITY_FILE, HELD_OUT_FILE)},
        )
        write_text_atomic(staging / CARD_FILE, card.to_yaml())
    checkpoint_file.unlink(missing_ok=True)
    return TrainSummary(card=card, model_dir=model_dir, rejected=rejected, skipped=skipped)


def write_names(path: Path, names: list[str], *, atomic: bool = False) -> None:
    """One file name a line, as the bytes the file system gave (a name need not be UTF-8 on Linux)."""
    from aadetect.atomic import write_atomic

    def write(target: Path) -> None:
        target.write_text("".join(name + "\n" for name in names), encoding="utf-8", errors="surrogateescape")

    if atomic:
        write_atomic(path, write)
    else:
        write(path)


def read_names(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()


def _read_checkpoint(path: Path, identity: dict) -> dict:
    import torch

    if not path.exists():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise UserError(f"{path}: cannot read checkpoint ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not an aadetect checkpoint")
    if state.get("identity") != identity:
        raise UserError(f"{path}: checkpoint is from other data or settings; start afresh without --resume")
    return state


@dataclass
class MeasuredSet:
    """Per-image numbers for a labelled folder, in file order; unreadable files listed apart."""

    names: list[str]
    reconstruction_error: np.ndarray
    log_density: np.ndarray
    anomaly_log_odds: np.ndarray | None  # models calibrated with anomalous samples only
    score: np.ndarray
    anomaly: np.ndarray
    errors: list[str]


def unreadable_summary(errors: list[str]) -> str:
    """One line for many unreadable files: the count and the first file's own message."""
    return f"{len(errors)} unreadable image{'s' if len(errors) > 1 else ''} (first: {errors[0]})"


def measure_folder(detector, path: str | Path, refs: list[ImageRef], reporter: Reporter, label: str) -> MeasuredSet:
    """Scores of the images found in `path` (found first by the caller, so that a wrong second folder
    is reported before the first is scored)."""
    names, rows, errors = [], [], []
    with reporter.progress(f"scoring {label}", total=len(refs)) as advance:
        for ref, row, error in detector.score_images(refs):
            advance(1)
            if error is not None:
                reporter.warn(error)
                errors.append(error)
                continue
            names.append(ref.name)
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: none of the {len(refs)} images could be read")
    column = lambda key, dtype=np.float64: np.array([row[key] for row in rows], dtype=dtype)  # noqa: E731
    odds = column("anomaly_log_odds") if rows[0]["anomaly_log_odds"] is not None else None
    return MeasuredSet(names, column("reconstruction_error"), column("log_density"), odds, column("score"),
                       column("anomaly", bool), errors)


def calibrate_detector(model_dir: str | Path, good: str | Path, anomalous: str | Path | None = None, *,
                       objective: str = "balanced-accuracy", target_fpr: float | None = None,
                       one_class: bool = False, device: str = "auto", reporter: Reporter | None = None):
    """Choose the thresholds from labelled samples and rewrite the card atomically.

    With anomalous samples (unless `one_class`), the training codes that look like them are first left
    out of the density and join the samples' kernel mixture (`aadetect.lookalikes`); each image is then
    also tested by its log-odds of being of their kind. The held-out images `train` kept join the good
    side of the search. Each calibration starts from the model as trained, so calibrating again with
    other samples undoes what the last one learnt.
    """
    from aadetect.atomic import check_writable, write_text_atomic
    from aadetect.calibration import Measurements, choose_thresholds
    from aadetect.scoring import Detector

    reporter = reporter or Reporter()
    if objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if target_fpr is not None:
        check_fraction("--target-fpr", target_fpr)
    model_dir = Path(model_dir)
    card = read_card(model_dir)
    check_writable(model_dir / CARD_FILE)  # rewritten at the end: find out before measuring
    model_fpr = card.training.settings.get("target_fpr", TrainConfig.target_fpr)  # the budget it was trained for
    if isinstance(model_fpr, bool) or not isinstance(model_fpr, (int, float)) or not 0 < model_fpr < 1:
        raise UserError(f"{model_dir / CARD_FILE}: training.settings.target_fpr must be a number between "
                        f"0 and 1 (exclusive), got {model_fpr!r}")
    detector = Detector.load(model_dir, device, as_trained=True)
    trained_density = detector.density
    good_refs, anomalous_refs = find_images(good), find_images(anomalous) if anomalous else None
    lookalikes, centres, anomalous_views = [], None, None
    if anomalous and not one_class:  # first, so that the samples are measured once, as `score` will
        lookalikes, centres, anomalous_views = learn_anomalies(detector, good_refs, anomalous_refs, reporter)
    good_set = measure_folder(detector, good, good_refs, reporter, "good")
    anomalous_set = measure_folder(detector, anomalous, anomalous_refs, reporter, "anomalous") if anomalous else None
    unreadable = good_set.errors + (anomalous_set.errors if anomalous_set else [])
    if unreadable:  # a few samples set both thresholds: one silently missing would move them
        raise UserError(f"{unreadable_summary(unreadable)}; the card is unchanged")
    if target_fpr is None and not anomalous_set:  # good samples alone: recorded as the budget they were set for
        target_fpr = model_fpr
    as_measurements = lambda s: Measurements(s.reconstruction_error, s.log_density, s.anomaly_log_odds)  # noqa: E731
    anomalous_measured = as_measurements(anomalous_set) if anomalous_set else None
    if anomalous_views is not None:
        from aadetect.lookalikes import left_out_log_odds

        anomalous_measured.anomaly_log_odds = left_out_log_odds(detector, anomalous_views)
    held_out = measure_held_out(model_dir, card, detector) if anomalous_set else None
    result = choose_thresholds(card.thresholds, as_measurements(good_set), anomalous_measured, held_out=held_out,
                               objective=objective, target_fpr=target_fpr, default_fpr=model_fpr)
    for warning in result.warnings:
        reporter.warn(warning)
    anomalies_file, previous_file = None, card.calibration.anomalies_file if card.calibration else None
    if centres is not None:  # named by its content, so the card in force never names a file being rewritten
        anomalies_file = save_anomalies(model_dir, centres)
    card.format_version = (ANOMALIES_FORMAT_VERSION if anomalies_file else
                           LOOKALIKES_FORMAT_VERSION if lookalikes else FORMAT_VERSION)
    card.thresholds = result.thresholds
    card.files = {name: digest for name, digest in card.files.items() if not name.startswith(ANOMALIES_PREFIX)}
    if anomalies_file:
        card.files[anomalies_file] = sha256_file(model_dir / anomalies_file)
    card.calibration = Calibration(
        created=now(), objective=objective, target_fpr=target_fpr, good_count=len(good_set.names),
        anomalous_count=len(anomalous_set.names) if anomalous_set else 0, good_path=str(Path(good).resolve()),
        anomalous_path=str(Path(anomalous).resolve()) if anomalous else None, metrics=result.metrics,
        warnings=result.warnings, lookalike_codes=lookalikes, lookalikes_file=LOOKALIKES_FILE,
        anomalies_file=anomalies_file)
    write_text_atomic(model_dir / CARD_FILE, card.to_yaml())  # the card decides; the list only reports it
    write_names(model_dir / LOOKALIKES_FILE, density_image_names(model_dir, card, lookalikes), atomic=True)
    # older calibrations' centres; the card just replaced keeps its own, for a `score` that read that card
    # a moment ago (it goes with the next calibration)
    for stale in model_dir.glob(f"{ANOMALIES_PREFIX}*.npy"):
        if stale.name not in (anomalies_file, previous_file):
            stale.unlink(missing_ok=True)
    if lookalikes:
        reporter.info(f"left {len(lookalikes)} of the {trained_density.n_codes} training images out of the density: "
                      f"they look like the anomalous samples (listed in {model_dir / LOOKALIKES_FILE})")
    return card


def learn_anomalies(detector: Detector, good_refs: list[ImageRef], anomalous_refs: list[ImageRef],
                    reporter: Reporter | None = None):
    """Leave the training codes that the anomalous samples claim out of the detector's density, and give it
    their kernel mixture (with two samples or more: one left out of its own mixture leaves none).

    Returns the claimed codes' indices, the samples' kernel centres (None without a mixture) and the
    samples' codes in every view (views, n, d), for their left-out log-odds.
    """
    from aadetect.devices import exact_math
    from aadetect.lookalikes import anomaly_mixture, find_lookalikes, sample_centres
    from aadetect.train import encode_all

    def read(refs: list[ImageRef]):
        pixels, _, unreadable = load_images(refs, detector.image_size, detector.channels)
        if unreadable:  # a few samples decide what is left out: one silently missing would move it
            raise UserError(f"{unreadable_summary(unreadable)}; the card is unchanged")
        return pixels

    def codes(pixels):  # unmoved, as training computed the density's
        with exact_math(detector.device):
            return encode_all(detector.model, pixels, detector.device, "mse")[0].double().numpy()

    anomalous_pixels = read(anomalous_refs)
    anomalous_codes, good_codes = codes(anomalous_pixels), codes(read(good_refs))
    trained = detector.density
    with (reporter or Reporter()).progress("looking for lookalikes", total=trained.n_codes) as advance:
        lookalikes = find_lookalikes(trained, anomalous_codes, good_codes, on_codes=advance).tolist()
    if lookalikes:
        detector.density = trained.without(lookalikes)
    if len(anomalous_codes) < 2:
        return lookalikes, None, None
    centres = sample_centres(trained, anomalous_codes)
    detector.anomalies = anomaly_mixture(trained, centres, lookalikes)
    return lookalikes, centres, detector.encode_views(anomalous_pixels)[1]


def measure_held_out(model_dir: Path, card: ModelCard, detector: Detector) -> Measurements | None:
    """The held-out good images measured against the detector's (calibrated) density, from the codes
    `train` saved; None for a model trained before it saved them."""
    from aadetect.calibration import Measurements
    from aadetect.scoring import load_held_out

    saved = load_held_out(model_dir, card)
    if saved is None or saved[0].size == 0:
        return None
    errors, view_codes = saved
    return Measurements(errors, *detector.log_densities(view_codes))


def save_anomalies(model_dir: Path, centres: np.ndarray) -> str:
    """Write the samples' kernel centres under a name made from their content; returns the name."""
    import io

    from aadetect.atomic import write_atomic

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(centres, dtype=np.float64))  # .npy: the same centres give the same bytes
    content = buffer.getvalue()
    name = f"{ANOMALIES_PREFIX}{hashlib.sha256(content).hexdigest()[:16]}.npy"
    write_atomic(model_dir / name, lambda temp: temp.write_bytes(content))
    return name


def density_image_names(model_dir: Path, card: ModelCard, codes: list[int]) -> list[str]:
    """The training images behind density codes, from the list `train` writes; "code N" for a model folder
    without it (trained before it was written) or with a damaged one."""
    try:
        fitted = read_names(model_dir / DENSITY_IMAGES_FILE)
    except (OSError, UnicodeError):
        fitted = []
    if len(fitted) != card.density.n_codes:
        return [f"code {i}" for i in codes]
    return [fitted[i] for i in codes]


def evaluate_detector(model_dir: str | Path, good: str | Path, anomalous: str | Path, *,
                      device: str = "auto", reporter: Reporter | None = None) -> dict:
    """Ranking quality of each signal and decision quality at the card's thresholds, on labelled images."""
    from aadetect.metrics import auroc, average_precision, confusion, decision_metrics
    from aadetect.scoring import Detector

    reporter = reporter or Reporter()
    detector = Detector.load(model_dir, device)
    good_refs, anomalous_refs = find_images(good), find_images(anomalous)
    good_set = measure_folder(detector, good, good_refs, reporter, "good")
    anomalous_set = measure_folder(detector, anomalous, anomalous_refs, reporter, "anomalous")
    signals = {  # higher means more anomalous
        "reconstruction": (good_set.reconstruction_error, anomalous_set.reconstruction_error),
        "density": (-good_set.log_density, -anomalous_set.log_density),
        **({"lookalike": (good_set.anomaly_log_odds, anomalous_set.anomaly_log_odds)}
           if good_set.anomaly_log_odds is not None else {}),
        "combined": (good_set.score, anomalous_set.score),
    }
    counts = confusion(good_set.anomaly, anomalous_set.anomaly)
    rates = decision_metrics(**counts)
    return {
        "auroc": {name: auroc(*pair) for name, pair in signals.items()},
        "auprc": {name: average_precision(*pair) for name, pair in signals.items()},
        **{name: float(value) for name, value in rates.items()},
        "confusion": counts,
        "n_good": len(good_set.names),
        "n_anomalous": len(anomalous_set.names),
        "unreadable": good_set.errors + anomalous_set.errors,
        "thresholds_calibrated": detector.thresholds.calibrated,
    }
