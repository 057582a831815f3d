"""The tool's three jobs as library calls: train, calibrate, evaluate. The CLI and the demo both use these."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from aadetect import __version__, distributed, store
from aadetect.atomic import check_writable
from aadetect.calibration import choose_thresholds, default_thresholds
from aadetect.card import Calibration, DataInfo, DensityInfo, ModelCard, TrainingInfo
from aadetect.config import AUTO, OBJECTIVES, SCALED_MEASURES, Architecture, TrainConfig, check_fraction
from aadetect.density import GridDensity, KernelDensity
from aadetect.devices import exact_math, flush_denormals, resolve_device
from aadetect.errors import UserError, first_line
from aadetect.images import ImageRef, ImagesOnDisk, choose_image_size, find_images, image_mode, load_images
from aadetect.localisation import mask_path, pixel_auroc, read_mask
from aadetect.lookalikes import AnomalyKind, learn_anomaly_kind, left_out_log_odds
from aadetect.metrics import auroc, average_precision, confusion, decision_metrics
from aadetect.model import residual_scale
from aadetect.progress import Reporter
from aadetect.scoring import Detector, Measurements, Scores
from aadetect.training import TrainResult, encode_all, train_autoencoder, validation_size

MIN_TRAIN_IMAGES = 10
FEW_HELD_OUT = 20  # below this many held-out images, the default thresholds are rough: say so


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------- train

def train(data: str | Path, out: str | Path = "aadetect-model", config: TrainConfig | None = None, *,
          resume: bool = False, reporter: Reporter | None = None) -> ModelCard | None:
    """Train the autoencoder on a folder of good images, fit the KDE over their codes, set default
    thresholds on the held-out ones, and write the model folder `out` atomically; returns its card
    (under torchrun, on rank 0; the other processes return None).

    >>> from aadetect import TrainConfig, train
    >>> card = train("good", "model", TrainConfig(epochs=2, image_size=16, device="cpu"))
    >>> card.data.image_count, card.thresholds.calibrated
    (120, False)
    """
    config = config or TrainConfig()
    if distributed.launched():  # one of several processes started by torchrun
        return _train_together(Path(data), store.resolved(out), config, resume, reporter or Reporter())
    device = resolve_device(config.device)
    data, model_dir = Path(data), store.resolved(out)
    store.check_output_dir(model_dir, data)  # before anything is written, even the lock
    with store.writing(model_dir):
        store.check_output_dir(model_dir, data)  # as it is now that no other writer changes it
        return _train_into(model_dir, data, config, device, resume, reporter or Reporter())


def _train_together(data: Path, model_dir: Path, config: TrainConfig, resume: bool,
                    reporter: Reporter) -> ModelCard | None:
    """`train` under torchrun: every process trains on its share of each batch; rank 0 alone takes the lock,
    reports progress, writes checkpoints, fits the density and writes the folder, which the others wait for
    before they return None. (A process that fails ends; torchrun then stops the others.)"""
    with distributed.process_group(config.device) as device:
        if not distributed.is_main():
            _train_into(model_dir, data, config, device, resume, Reporter())
            distributed.barrier()
            return None
        store.check_output_dir(model_dir, data)
        with store.writing(model_dir):
            store.check_output_dir(model_dir, data)
            card = _train_into(model_dir, data, config, device, resume, reporter)
        distributed.barrier()
        return card


def _train_into(model_dir: Path, data: Path, config: TrainConfig, device: str, resume: bool,
                reporter: Reporter) -> ModelCard | None:
    started = time.perf_counter()
    pixels, refs, skipped = read_training_images(data, config, reporter)
    data_sha256 = fingerprint(refs, data)
    checkpoint_file = store.checkpoint_path(model_dir)
    # what the networks depend on: the code radius and the shift radius only shape the density after training
    training_settings = {k: v for k, v in dataclasses.asdict(config).items()
                         if k not in ("code_radius", "shift_radius", "density_codes")}
    world_size = distributed.size()
    identity = {"settings": training_settings, "data_sha256": data_sha256, "world_size": world_size,
                "device": device.split(":")[0] if world_size > 1 else device}  # (each process has its own GPU)
    resume_from = _read_checkpoint(checkpoint_file, identity) if resume else None

    def save_checkpoint(state: dict) -> None:
        store.save_checkpoint(checkpoint_file, {**state, "identity": identity})

    train_count = len(refs) - validation_size(len(refs), config.validation_fraction)
    epochs = config.resolved(pixels.shape[-1] if isinstance(pixels, torch.Tensor) else pixels.size).epochs
    with reporter.progress("training", total=epochs * train_count) as advance:
        def on_epoch(record: dict) -> None:
            advance(0, description=f"epoch {record['epoch']}/{epochs} "
                                   f"loss {record['reconstruction']:.4f} val {record['validation']:.4f}"
                                   + (f" rejected {record['rejected']}" if config.robust else ""))

        fitted = fit_detector(pixels, config, device=device, on_step=lambda step: advance(step["images"]),
                              on_epoch=on_epoch, save_checkpoint=save_checkpoint if distributed.is_main() else None,
                              resume_from=resume_from, data_label=str(data),
                              discard_checkpoint=lambda: checkpoint_file.unlink(missing_ok=True))
    if fitted is None:  # another process's share of the training under torchrun: rank 0 writes the model
        return None
    result, detector = fitted.training, fitted.detector
    if len(fitted.validation) < FEW_HELD_OUT:
        reporter.warn(f"the default thresholds rest on only {len(fitted.validation)} held-out images; "
                      f"run `aadetect calibrate` before trusting the model's decisions")
    names = lambda indices: [refs[i].name for i in indices]  # noqa: E731
    card = ModelCard(
        format_version=1, aadetect_version=__version__, created=now(),
        data=DataInfo(path=str(data.resolve()), image_count=len(refs), sha256=data_sha256, skipped=skipped,
                      validation_count=len(result.validation_indices), rejected_count=len(result.rejected)),
        architecture=detector.model.arch,
        training=TrainingInfo(settings=config, device=device, world_size=world_size, epochs_run=result.epochs_run,
                              best_epoch=result.best_epoch, seconds=round(time.perf_counter() - started, 2),
                              final_losses={k: float(v) for k, v in result.final_losses.items()},
                              torch_version=str(torch.__version__)),
        density=DensityInfo(bandwidth=detector.density.bandwidth, factor=detector.density.factor,
                            n_codes=detector.density.n_codes),
        thresholds=detector.thresholds, calibration=None, files={})
    card = store.save_trained(model_dir, card, detector.model, detector.density,
                              validation=names(result.validation_indices), rejected=names(result.rejected),
                              density_images=names(fitted.density_indices),
                              held_out_errors=fitted.validation.reconstruction_error,
                              held_out_codes=fitted.held_out_codes)
    checkpoint_file.unlink(missing_ok=True)
    return card


def fingerprint(refs: list[ImageRef], root: Path) -> str:
    """sha256 over the sorted file names and contents: says exactly which data a model saw.

    Names are taken relative to `root`, so the same folder gives the same fingerprint however its
    path is spelled (and `--resume` accepts it).
    """
    digest = hashlib.sha256()
    base = root if root.is_dir() else root.parent
    for path in sorted({ref.path for ref in refs}):
        digest.update(str(path.relative_to(base)).encode("utf-8", "surrogateescape") + b"\0")
        digest.update(bytes.fromhex(store.sha256_file(path)))  # streamed: an array file may be larger than memory
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
    return pixels, kept, skipped


@dataclass(frozen=True)
class FittedDetector:
    """A freshly trained detector, what its training did, and its held-out good images' numbers."""

    detector: Detector
    training: TrainResult
    validation: Measurements  # the default thresholds were set on these
    density_indices: np.ndarray  # the images whose codes the density holds, in its order
    held_out_codes: np.ndarray  # the held-out images' codes in every view (views, n, d), as `encode_views` gives


def fit_detector(pixels, config: TrainConfig, *, device: str | None = None, on_step=None, on_epoch=None,
                 save_checkpoint=None, resume_from: dict | None = None, data_label: str = "the images",
                 discard_checkpoint=None) -> FittedDetector | None:
    """Train the networks on uint8 images (N, C, S, S), fit the KDE over the kept images' codes and set the
    default thresholds on the held-out ones. Under torchrun, the processes other than rank 0 return None
    after training.

    The folder-free core of `train`: for images already in memory (a tensor, or `ImagesOnDisk`), and
    for the benchmark's studies, which must train exactly as `train` does. `device` defaults to
    `config.device`. `discard_checkpoint` is called before an error that retraining with the same
    settings would meet again.
    """
    device = device or resolve_device(config.device)
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
    config = config.resolved(size)
    grid, latent_dim = config.code_grid, config.latent_dim
    arch = Architecture.for_images(size, channels, latent_dim, config.extra_convs, grid)
    train_count = len(pixels) - validation_size(len(pixels), config.validation_fraction)
    if train_count <= latent_dim:  # the density needs more codes than dimensions: say so before training
        raise UserError(f"{data_label}: {train_count} training images (besides {len(pixels) - train_count} held "
                        f"out) are too few for {latent_dim}-dimensional codes; use more images or a "
                        f"smaller --latent-dim (below {train_count})")
    with exact_math(device), flush_denormals():
        result = train_autoencoder(pixels, arch, config, device, on_step=on_step, on_epoch=on_epoch,
                                   save_checkpoint=save_checkpoint, resume_from=resume_from)
    if not distributed.is_main():
        return None
    # in the memory layout `load_model` gives it: trained channels_last, it computes other last bits, and the
    # default thresholds would rest on numbers that `score` does not give for the same images
    model = result.model.to(memory_format=torch.contiguous_format)
    fit_indices = np.setdiff1d(result.train_indices, result.rejected)
    if len(fit_indices) <= latent_dim:  # as the check before training, now that outliers are known
        discard_checkpoint()
        raise UserError(f"{data_label}: robust training left out {len(result.rejected)} of "
                        f"{len(result.train_indices)} training images as likely outliers, and the "
                        f"{len(fit_indices)} kept are too few for {latent_dim}-dimensional codes; use more "
                        f"images, a smaller --latent-dim (below {len(fit_indices)}) or --no-robust")
    density_indices = density_sample(fit_indices, config.density_codes, config.seed)
    with exact_math(device):
        fit_images = pixels[torch.from_numpy(fit_indices)]
        codes, _ = encode_all(model, pixels[torch.from_numpy(density_indices)], device, "mse")
        if config.error in SCALED_MEASURES:
            model.error_scale.copy_(residual_scale(model, fit_images, device, config.error))
    try:
        density = (GridDensity.fit(codes.double().numpy(), grid * grid, radius=config.code_radius) if grid > 1
                   else KernelDensity.fit(codes.double().numpy(), radius=config.code_radius))
    except ValueError as exc:
        discard_checkpoint()
        raise UserError(f"{data_label}: cannot fit the density ({exc})") from None
    detector = Detector(model, density, None, error_measure=config.error, shift_radius=config.shift_radius,
                        device=device)
    held_out_errors, held_out_codes = detector.encode_views(pixels[torch.from_numpy(result.validation_indices)])
    validation = detector.measure_codes(held_out_errors, held_out_codes)
    detector.thresholds = default_thresholds(validation, config.target_fpr)
    return FittedDetector(detector, result, validation, density_indices, held_out_codes)


def density_sample(kept: np.ndarray, most: int, seed: int) -> np.ndarray:
    """The kept images whose codes the density holds: all of them, or above `most`, a sample drawn with the
    training seed (sorted, as the kept images are), so the density's cost per query stays bounded."""
    if len(kept) <= most:
        return kept
    return np.sort(np.random.default_rng(seed).choice(kept, size=most, replace=False))


def _read_checkpoint(path: Path, identity: dict) -> dict:
    try:
        content = store.read_bytes(path, store.FILE_LIMIT, "a checkpoint")
    except FileNotFoundError:
        raise UserError(f"{path}: no checkpoint to resume from") from None
    try:
        state = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise UserError(f"{path}: cannot read checkpoint ({first_line(exc)})") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not an aadetect checkpoint")
    if state.get("identity") != identity:
        raise UserError(f"{path}: checkpoint is from other data or settings; start afresh without --resume")
    return state


# ------------------------------------------------------------------------------------------ calibrate

def calibrate(model: str | Path, good: str | Path, anomalous: str | Path | None = None, *,
              objective: str = "balanced-accuracy", target_fpr: float | None = None, one_class: bool = False,
              device: str = "auto", reporter: Reporter | None = None) -> ModelCard:
    """Choose the thresholds from labelled samples and rewrite the model's card; returns the card.

    With anomalous samples (unless `one_class`), the training codes that look like them are first left
    out of the density and join the samples' kernel mixture (`aadetect.lookalikes`); each image is then
    also tested by its log-odds of being of their kind. The held-out images `train` kept join the good
    side of the search. Each calibration starts from the model as trained.

    >>> from aadetect import calibrate
    >>> card = calibrate("model", "labelled/good", "labelled/bad", device="cpu")
    >>> card.calibration.good_count, card.calibration.anomalous_count, card.thresholds.calibrated
    (12, 12, True)
    """
    reporter = reporter or Reporter()
    if objective not in OBJECTIVES:
        raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if target_fpr is not None:
        check_fraction("--target-fpr", target_fpr)
    model_dir, device = Path(model), resolve_device(device)
    with store.writing(model_dir):  # the card read here is the one replaced: no other writer in between
        stored = store.read_model(model_dir, device, as_trained=True)
        card, detector = stored.card, Detector.of(stored, device)
        check_writable(model_dir / store.CARD_FILE)  # rewritten at the end: find out before measuring
        good_pixels = read_samples(good, detector, reporter, "good")
        anomalous_pixels = read_samples(anomalous, detector, reporter, "anomalous") if anomalous else None
        kind = None
        # a code grid's density is one KDE per position: no kind of anomaly to learn there (docs/how-it-works.md)
        if anomalous_pixels is not None and not one_class and isinstance(detector.trained_density, KernelDensity):
            kind = learn_kind(detector, good_pixels, anomalous_pixels, reporter)
            detector = detector.with_kind(kind)
        good_measured = detector.measure(good_pixels)
        anomalous_measured = measure_anomalous(detector, anomalous_pixels) if anomalous_pixels is not None else None
        held_out = detector.measure_codes(*store.load_held_out(model_dir, card)) if anomalous_measured else None
        if target_fpr is None and anomalous_measured is None:  # recorded as the budget the model was trained for
            target_fpr = card.settings.target_fpr
        result = choose_thresholds(card.thresholds, good_measured, anomalous_measured, held_out=held_out,
                                   objective=objective, target_fpr=target_fpr, default_fpr=card.settings.target_fpr)
        for warning in result.warnings:
            reporter.warn(warning)
        calibration = Calibration(
            created=now(), objective=objective, target_fpr=target_fpr, good_count=len(good_measured),
            anomalous_count=len(anomalous_measured) if anomalous_measured else 0, good_path=str(Path(good).resolve()),
            anomalous_path=str(Path(anomalous).resolve()) if anomalous else None, metrics=result.metrics,
            warnings=result.warnings, lookalike_codes=list(kind.lookalikes) if kind else [], anomalies_file=None)
        calibrated = dataclasses.replace(card, thresholds=result.thresholds, calibration=calibration)
        calibrated = store.save_calibration(model_dir, card, calibrated, kind.centres if kind else None)
    if kind and kind.lookalikes:
        reporter.info(f"left {len(kind.lookalikes)} of the {card.density.n_codes} training images out of the "
                      f"density: they look like the anomalous samples (listed in {model_dir / store.LOOKALIKES_FILE})")
    return calibrated


def read_samples(path: str | Path, detector: Detector, reporter: Reporter, label: str) -> torch.Tensor:
    """A folder of labelled samples, decoded as `score` decodes them; every one must be readable: a few
    samples set both thresholds, and one silently missing would move them."""
    refs = find_images(path)
    with reporter.progress(f"reading {label} samples", total=len(refs)) as advance:
        pixels, _, unreadable = load_images(refs, detector.image_size, detector.channels, on_batch=advance)
    if unreadable:
        raise UserError(f"{unreadable_summary(unreadable)}; the card is unchanged")
    return pixels


def learn_kind(detector: Detector, good_pixels, anomalous_pixels, reporter: Reporter) -> AnomalyKind:
    """The anomalous samples' kind, from the samples' codes for the unmoved images (the first view; the
    density's training codes are those of the unmoved images too)."""
    trained = detector.trained_density
    anomalous_codes, good_codes = (detector.encode_views(pixels)[1][0].astype(np.float64)
                                   for pixels in (anomalous_pixels, good_pixels))
    with reporter.progress("looking for lookalikes", total=trained.n_codes) as advance:
        return learn_anomaly_kind(trained, anomalous_codes, good_codes, on_codes=advance)


def measure_anomalous(detector: Detector, pixels) -> Measurements:
    """The anomalous samples' numbers, each one's log-odds with its own kernel left out of the kind's mixture."""
    measured = detector.measure(pixels)
    if detector.mixture is None:
        return measured
    left_out = left_out_log_odds(detector, detector.encode_views(pixels)[1])
    return Measurements(measured.reconstruction_error, measured.log_density, left_out)


# ------------------------------------------------------------------------------------------- evaluate

@dataclass(frozen=True)
class ScoredImages:
    """The readable images of one labelled folder, in the order found, with their scores."""

    folder: str
    refs: list[ImageRef]
    scores: Scores


@dataclass(frozen=True)
class Evaluation:
    """`evaluate`'s report with what its numbers came from: the model's card and detector, and each side's
    images and scores (what `aadetect.report` draws)."""

    report: dict
    model: str
    card: ModelCard
    detector: Detector
    good: ScoredImages
    anomalous: ScoredImages


def evaluate(model: str | Path, good: str | Path, anomalous: str | Path, *, masks: str | Path | None = None,
             device: str = "auto", reporter: Reporter | None = None) -> dict:
    """Ranking quality of each signal and decision quality at the card's thresholds, on labelled images:
    the same dict as `aadetect evaluate --format json`. With `masks` (a folder holding each anomalous
    image's defect mask at the same path as under `anomalous`), also how well the anomaly maps point at
    the defects: `pixel_auroc`, over `masked_images` anomalous images and every good one.

    >>> from aadetect import evaluate
    >>> report = evaluate("model", "labelled/good", "labelled/bad", device="cpu")
    >>> sorted(report["auroc"]), report["n_good"]
    (['combined', 'density', 'lookalike', 'reconstruction'], 12)
    """
    return evaluation(model, good, anomalous, masks=masks, device=device, reporter=reporter).report


def evaluation(model: str | Path, good: str | Path, anomalous: str | Path, *, masks: str | Path | None = None,
               device: str = "auto", reporter: Reporter | None = None) -> Evaluation:
    """`evaluate`, keeping each image's scores, and the card and detector that gave them."""
    reporter = reporter or Reporter()
    device = resolve_device(device)
    stored = store.read_model(Path(model), device)  # card and detector from the same generation of the folder
    detector = Detector.of(stored, device)
    good_refs, anomalous_refs = find_images(good), find_images(anomalous)  # both found before either is scored
    with_maps = masks is not None
    good_scored, good_unreadable, good_maps = measure_folder(detector, good, good_refs, reporter, "good",
                                                             maps=with_maps)
    anomalous_scored, anomalous_unreadable, anomalous_maps = measure_folder(
        detector, anomalous, anomalous_refs, reporter, "anomalous", maps=with_maps)
    localisation = {} if masks is None else localisation_report(Path(masks), Path(anomalous), good_maps,
                                                                anomalous_maps, reporter)
    pairs = signals(good_scored.scores, anomalous_scored.scores)
    counts = confusion(good_scored.scores.anomaly, anomalous_scored.scores.anomaly)
    rates = decision_metrics(**counts)
    report = {
        "auroc": {name: auroc(*pair) for name, pair in pairs.items()},
        "auprc": {name: average_precision(*pair) for name, pair in pairs.items()},
        **{name: float(value) for name, value in rates.items()},
        "confusion": counts,
        "n_good": len(good_scored.refs),
        "n_anomalous": len(anomalous_scored.refs),
        "unreadable": good_unreadable + anomalous_unreadable,
        "thresholds_calibrated": detector.thresholds.calibrated,
        **localisation,
    }
    return Evaluation(report, str(model), stored.card, detector, good_scored, anomalous_scored)


def signals(good: Scores, anomalous: Scores) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each signal's (good, anomalous) values, turned so that higher means more anomalous: what the
    report's AUROC and AUPRC rank by."""
    return {
        "reconstruction": (good.reconstruction_error, anomalous.reconstruction_error),
        "density": (-good.log_density, -anomalous.log_density),
        **({"lookalike": (good.anomaly_log_odds, anomalous.anomaly_log_odds)}
           if good.anomaly_log_odds is not None else {}),
        "combined": (good.score, anomalous.score),
    }


def localisation_report(masks: Path, anomalous: Path, good_maps: list, anomalous_maps: list,
                        reporter: Reporter) -> dict:
    """`pixel_auroc` of the maps against the masks of the anomalous images that have one (said on stderr
    when some have none)."""
    masked, missing = [], 0
    for ref, anomaly_map, _ in anomalous_maps:
        try:
            masked.append((anomaly_map, read_mask(mask_path(masks, anomalous, ref))))
        except FileNotFoundError:
            missing += 1
    if not masked:
        raise UserError(f"{masks}: holds no mask for any of the anomalous images (each at the same path as "
                        f"under {anomalous})")
    if missing:
        reporter.warn(f"{missing} anomalous image(s) have no mask under {masks}: left out of the pixel AUROC")
    good = [(anomaly_map, size) for _, anomaly_map, size in good_maps]
    return {"pixel_auroc": pixel_auroc(good, masked), "masked_images": len(masked)}


def measure_folder(detector: Detector, path: str | Path, refs: list[ImageRef], reporter: Reporter,
                   label: str, *, maps: bool = False) -> tuple[ScoredImages, list[str], list]:
    """Scores of the images found in `path`, as `score` gives them: the readable images with their scores,
    the unreadable files' messages and, with `maps`, each image's (ref, anomaly map, own size)."""
    scored, rows, unreadable, drawn = [], [], [], []
    with reporter.progress(f"scoring {label}", total=len(refs)) as advance:
        for ref, row, error in detector.score_images(refs, maps=maps):
            advance(1)
            if error is not None:
                reporter.warn(error)
                unreadable.append(error)
                continue
            scored.append(ref)
            rows.append(row)
            if maps:
                drawn.append((ref, row.pop("anomaly_map"), row.pop("image_size")))
    if not rows:
        raise UserError(f"{path}: none of the {len(refs)} images could be read")
    column = lambda key, dtype=np.float64: np.array([row[key] for row in rows], dtype=dtype)  # noqa: E731
    odds = column("anomaly_log_odds") if rows[0]["anomaly_log_odds"] is not None else None
    scores = Scores(column("reconstruction_error"), column("log_density"), odds, score=column("score"),
                    anomaly=column("anomaly", bool), reason=column("reason", str))
    return ScoredImages(str(path), scored, scores), unreadable, drawn


def unreadable_summary(errors: list[str]) -> str:
    """One line for many unreadable files: the count and the first file's own message."""
    return f"{len(errors)} unreadable image{'s' if len(errors) > 1 else ''} (first: {errors[0]})"
