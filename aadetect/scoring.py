"""Scoring: a trained model, its density and its thresholds turned into per-image decisions.

`Detector` follows PyOD's BaseDetector where it fits: `decision_function` (higher is
more anomalous), `predict` (the OR rule) and the thresholds it applies.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from aadetect.card import CARD_FILE, DENSITY_FILE, WEIGHTS_FILE, ModelCard, Thresholds, read_card
from aadetect.config import SCALED_MEASURES
from aadetect.errors import UserError, first_line
from aadetect.images import ImageRef, ImagesOnDisk, iterate_batches, materialize
from aadetect.parallel import piece_pool

# Every forward pass sees a batch of exactly this many images (the last one padded), so an
# image gets bit-identical numbers whether it is scored alone or inside a large folder. On the
# CPU a small piece costs no throughput (each runs on one thread, several at once) and keeps
# `score one.png` quick; a GPU wants bigger pieces to be worth a launch.
CPU_SCORE_BATCH = 8
GPU_SCORE_BATCH = 32
DECODE_BATCH = 128  # images decoded at a time while the pool measures the ones before


@dataclass
class Measurements:
    """What the detector measured on a set of images. `anomaly_log_odds` (the log-odds that an image is
    of the labelled anomalous kind rather than good, `aadetect.lookalikes`) only where the model was
    calibrated with anomalous samples."""

    reconstruction_error: np.ndarray
    log_density: np.ndarray
    anomaly_log_odds: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.reconstruction_error)


@dataclass
class Scores:
    """Per-image numbers for a set of images, as arrays of equal length."""

    reconstruction_error: np.ndarray
    log_density: np.ndarray
    score: np.ndarray
    anomaly: np.ndarray
    reason: np.ndarray
    anomaly_log_odds: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.score)

    def row(self, i: int) -> dict:
        odds = None if self.anomaly_log_odds is None else float(self.anomaly_log_odds[i])
        return {"reconstruction_error": float(self.reconstruction_error[i]), "log_density": float(self.log_density[i]),
                "anomaly_log_odds": odds, "score": float(self.score[i]), "anomaly": bool(self.anomaly[i]),
                "reason": str(self.reason[i])}


def decide(reconstruction_error: np.ndarray, log_density: np.ndarray, thresholds: Thresholds,
           anomaly_log_odds: np.ndarray | None = None) -> Scores:
    """The OR rule. `score` is the larger threshold-normalised excess: positive exactly when the rule fires.

    The reconstruction excess is measured in log units (errors are right-skewed), the density's
    in log-density units; each is divided by its robust spread on held-out good images. A model
    calibrated with anomalous samples also flags images whose log-odds of being of their kind pass
    its cut ("lookalike"); that cut sits as far above the held-out good images as the density's
    lies below them, so it is a second test on the density's side of the rule, at the same rarity.
    """
    with np.errstate(divide="ignore"):  # a zero error is -inf below any threshold: never flagged by it
        log_ratio = np.log(reconstruction_error) - np.log(thresholds.reconstruction)
    reconstruction_excess = log_ratio / thresholds.reconstruction_scale
    density_excess = (thresholds.density - log_density) / thresholds.density_scale
    too_different = reconstruction_excess > 0
    too_unlikely = density_excess > 0
    looks_anomalous = np.zeros_like(too_unlikely)
    if thresholds.anomaly_log_odds is not None:
        if anomaly_log_odds is None:
            raise ValueError("these thresholds compare images with anomalous samples: their anomaly_log_odds "
                             "are needed")
        odds_excess = (anomaly_log_odds - thresholds.anomaly_log_odds) / thresholds.anomaly_odds_scale
        looks_anomalous = odds_excess > 0
        density_excess = np.maximum(density_excess, odds_excess)
    score = np.maximum(reconstruction_excess, density_excess)
    reason = np.select([too_different & (too_unlikely | looks_anomalous), too_different, too_unlikely,
                        looks_anomalous], ["both", "reconstruction", "density", "lookalike"], "none")
    return Scores(reconstruction_error, log_density, score, too_different | too_unlikely | looks_anomalous, reason,
                  anomaly_log_odds)


class Detector:
    """A trained autoencoder (its adversarial prior is optional) with its latent KDE and decision thresholds.

    `anomalies`: the labelled anomalous samples' kernel mixture (`aadetect.lookalikes`), where the model
    was calibrated with them; each image's log-odds of being of their kind is then measured too.
    """

    def __init__(self, model, density, thresholds: Thresholds, error_measure: str, device: str = "cpu",
                 shift_radius: int = 0, anomalies=None):
        import torch

        self.model = model.to(device).eval()
        self.density = density
        self.anomalies = anomalies
        self.thresholds = thresholds
        self.error_measure = error_measure
        self.device = device
        self.shift_radius = shift_radius
        self.batch_size = CPU_SCORE_BATCH if torch.device(device).type == "cpu" else GPU_SCORE_BATCH
        self.image_size = model.arch.image_size
        self.channels = model.arch.channels

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", *, as_trained: bool = False) -> Detector:
        """The model as calibrated; `as_trained`: its density whole and no anomalies, to calibrate afresh."""
        from aadetect.devices import resolve_device

        model_dir = Path(model_dir)
        card = read_card(model_dir)
        device = resolve_device(device)
        trained = load_density(model_dir, card, without_lookalikes=False)
        density = trained if as_trained else _without_lookalikes(model_dir, card, trained)
        anomalies = None if as_trained else load_anomalies(model_dir, card, trained)
        thresholds = card.thresholds
        if as_trained:  # nothing to measure the odds with
            thresholds = dataclasses.replace(thresholds, anomaly_log_odds=None, anomaly_odds_scale=None,
                                             anomaly_odds_centre=None)
        return cls(load_model(model_dir, card, device), density, thresholds, card.error_measure, device,
                   card.density.shift_radius, anomalies)

    def measure(self, pixels) -> Measurements:
        """Reconstruction error and KDE log-density (and log-odds, with anomalies) for uint8 images
        (N, C, S, S) (a tensor or numpy array)."""
        pixels = self._checked_pixels(pixels)
        size = self.batch_size
        if len(pixels) == 0:
            return Measurements(np.empty(0), np.empty(0), None if self.anomalies is None else np.empty(0))
        with piece_pool(self.device) as (pool, _):
            return joined(list(pool.map(lambda start: self._measure_batch(pixels[start:start + size]),
                                         range(0, len(pixels), size))))

    def encode_views(self, pixels) -> tuple[np.ndarray, np.ndarray]:
        """Reconstruction errors (N,) and the codes of every view the density scores (views, N, d),
        float32 as the encoder gives them: what `log_densities` needs to measure the images again
        against another density (held-out images at calibration, a sample left out of its own mixture)."""
        pixels = self._checked_pixels(pixels)
        size, parts = self.batch_size, []
        for start in range(0, len(pixels), size):
            errors, codes = self._encode_batch(pixels[start:start + size])
            parts.append((errors, codes.cpu().numpy()))
        if not parts:
            return np.empty(0), np.empty(((2 * self.shift_radius + 1) ** 2, 0, self.model.arch.latent_dim))
        return np.concatenate([errors for errors, _ in parts]), np.concatenate([codes for _, codes in parts], axis=1)

    def log_densities(self, view_codes, anomalies=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Log-density (mean density over the views) and, with `anomalies` (default: the detector's),
        the log-odds of the anomalous kind, for codes (views, N, d) as `encode_views` gives them."""
        import torch

        anomalies = self.anomalies if anomalies is None else anomalies
        view_codes = torch.as_tensor(view_codes)
        views, count = view_codes.shape[:2]

        def view_mean(kde) -> torch.Tensor:
            log_density = torch.from_numpy(kde.log_density(view_codes.reshape(views * count, -1).double(),
                                                           device=self.device))
            return log_density.view(views, count).logsumexp(0) - math.log(views)

        log_density = view_mean(self.density)
        odds = None if anomalies is None else (view_mean(anomalies) - log_density).numpy()
        return log_density.numpy(), odds

    def _checked_pixels(self, pixels):
        """Images as the model takes them, or a plain error: float pixels in [0, 1] would otherwise be
        divided by 255 again and score nonsense, and a wrong shape fail deep inside torch."""
        import torch

        expected = (self.channels, self.image_size, self.image_size)
        wanted = f"uint8 pixels (0-255) shaped (N, {', '.join(map(str, expected))}), as load_images gives"
        if isinstance(pixels, ImagesOnDisk):  # decoded on demand, at the size it was made for
            if (pixels.channels, pixels.size) != (self.channels, self.image_size):
                raise UserError(f"images must be {wanted}; got images read at {pixels.channels} channel(s) "
                                f"and {pixels.size} px")
            return pixels
        if isinstance(pixels, np.ndarray):
            with warnings.catch_warnings():  # a read-only (memory-mapped) array is fine: pixels are only read
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        if not isinstance(pixels, torch.Tensor):
            raise UserError(f"images must be {wanted} (a tensor or numpy array); got {type(pixels).__name__}"
                            " (for files, use score_images(find_images(path)))")
        if pixels.dtype != torch.uint8:
            raise UserError(f"images must be {wanted}; got {str(pixels.dtype).removeprefix('torch.')}")
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise UserError(f"images must be {wanted}; got shape {tuple(pixels.shape)}")
        return pixels

    def _encode_batch(self, pixels, *, padded: bool = False):
        """One forward pass, on exactly `batch_size` images (the last batch padded with black ones):
        the errors (count,) and the codes of every view (views, count, d), or of the padded batch.

        With a shift radius, the density is scored over the image's small translations
        (`shifted_views`), so a good image drawn a pixel off-centre is not held against it; the
        reconstruction error is the unmoved image's.
        """
        import torch

        from aadetect.devices import exact_math
        from aadetect.model import reconstruction_error, shifted_views, to_input

        with torch.inference_mode(), exact_math(self.device):  # thread-local: entered in the worker
            chunk = materialize(pixels)
            count, size = len(chunk), self.batch_size
            if count < size:
                chunk = torch.cat([chunk, chunk.new_zeros((size - count, *chunk.shape[1:]))])
            images = to_input(chunk, self.device)
            codes = self.model.encoder(shifted_views(images, self.shift_radius))  # the unmoved images first
            reconstruction = self.model.decoder(codes[:size])
            errors = reconstruction_error(reconstruction, images, self.error_measure, self.model.error_scale)
            codes = codes.view(len(codes) // size, size, -1)
            return errors[:count].double().cpu().numpy(), codes if padded else codes[:, :count]

    def _measure_batch(self, pixels) -> Measurements:
        """`_encode_batch`, then the densities over the whole padded batch, so that an image gets the same
        numbers alone or in a folder."""
        import torch

        from aadetect.devices import exact_math

        errors, codes = self._encode_batch(pixels, padded=True)
        with torch.inference_mode(), exact_math(self.device):
            log_density, odds = self.log_densities(codes)
        count = len(errors)
        return Measurements(errors, log_density[:count], None if odds is None else odds[:count])

    def score(self, pixels) -> Scores:
        return decided(self.measure(pixels), self.thresholds)

    def decision_function(self, pixels) -> np.ndarray:
        return self.score(pixels).score

    def predict(self, pixels) -> np.ndarray:
        return self.score(pixels).anomaly

    def score_images(self, refs: list[ImageRef], *, workers: int | None = None
                     ) -> Iterator[tuple[ImageRef, dict | None, str | None]]:
        """Stream (ref, numbers, error) in input order.

        This thread decodes (worker processes do for big inputs where there are cores to spare)
        while the pool measures the batches decoded before, a few ahead, so memory stays flat.
        Until the stream ends, torch runs on one thread in this thread too (see `piece_pool`).
        """
        refs = _checked_refs(refs)
        on_gpu = str(self.device).startswith("cuda")
        if workers is None:
            workers = decoding_workers(len(refs), DECODE_BATCH, on_gpu)
        with piece_pool(self.device) as (pool, threads):
            pending: deque = deque()  # (batch, futures), oldest first
            size = self.batch_size
            for batch in iterate_batches(refs, self.image_size, self.channels, batch_size=DECODE_BATCH,
                                         workers=workers, pin_memory=on_gpu):
                pixels = batch.pixels if batch.pixels is not None else ()
                pending.append((batch, [pool.submit(self._measure_batch, pixels[start:start + size])
                                        for start in range(0, len(pixels), size)]))
                # wait for the oldest batch only while the newer ones give every thread two pieces,
                # so the pool keeps working while this thread decodes the next batch
                while len(pending) > 1 and sum(len(futures) for _, futures in list(pending)[1:]) >= 2 * threads:
                    yield from self._rows(refs, *pending.popleft())
            while pending:
                yield from self._rows(refs, *pending.popleft())

    def _rows(self, refs: list[ImageRef], batch, futures: list) -> Iterator[tuple[ImageRef, dict | None, str | None]]:
        rows: dict[int, tuple[dict | None, str | None]] = {i: (None, message) for i, message in batch.errors}
        if futures:
            scores = decided(joined([future.result() for future in futures]), self.thresholds)
            rows.update((index, (scores.row(k), None)) for k, index in enumerate(batch.indices))
        for index in sorted(rows):
            yield refs[index], *rows[index]


def _checked_refs(refs) -> list[ImageRef]:
    """A plain error for a folder name or paths where ImageRefs belong (a deep AttributeError otherwise)."""
    if isinstance(refs, (str, os.PathLike)):
        got = type(refs).__name__
    else:
        refs = list(refs)
        stray = next((ref for ref in refs if not isinstance(ref, ImageRef)), None)
        if stray is None:
            return refs
        got = f"a {type(stray).__name__} among them"
    raise UserError(f"score_images takes ImageRefs, as find_images(path) returns; got {got}")


def joined(parts: list[Measurements | None]) -> Measurements:
    """One set of measurements from several (None ones skipped); log-odds only where every part has them."""
    parts = [part for part in parts if part is not None]
    if not parts:
        return Measurements(np.empty(0), np.empty(0))
    odds = [part.anomaly_log_odds for part in parts]
    return Measurements(np.concatenate([part.reconstruction_error for part in parts]),
                        np.concatenate([part.log_density for part in parts]),
                        None if any(o is None for o in odds) else np.concatenate(odds))


def decided(measured: Measurements, thresholds: Thresholds) -> Scores:
    """`decide` on what `measure` gives."""
    return decide(measured.reconstruction_error, measured.log_density, thresholds, measured.anomaly_log_odds)


def decoding_workers(count: int, batch_size: int, on_gpu: bool) -> int:
    """Decoding processes for scoring `count` images.

    On the CPU the model needs the cores too: on two cores, worker processes gained nothing
    (with one batch per thread, 69-70% of the model's own speed with one or two of them,
    69% decoding in this process), so processes start at three cores, two at most. On a GPU
    decoding is the limit, so up to eight.
    """
    if count < 4 * batch_size:
        return 0
    cpus = os.cpu_count() or 1
    return min(8, cpus) if on_gpu else (0 if cpus <= 2 else 2)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked_file(model_dir: Path, name: str, card: ModelCard) -> Path:
    path = model_dir / name
    if not path.is_file():
        raise UserError(f"{path}: missing from the model folder")
    expected = card.files.get(name)
    if expected is None:  # every card lists both files: a missing entry is damage too
        raise UserError(f"{path}: the card lists no checksum for it (damaged card?)")
    if sha256_file(path) != expected:
        raise UserError(f"{path}: does not match the card's checksum (damaged, or from another model)")
    return path


def load_model(model_dir: Path, card: ModelCard, device: str):
    """Rebuild the networks from the card, then load the weights without unpickling code."""
    import pickle

    import torch

    from aadetect.config import Architecture
    from aadetect.model import AdversarialAutoencoder

    path = _checked_file(model_dir, WEIGHTS_FILE, card)
    arch_info = card.architecture
    arch = Architecture(arch_info.image_size, arch_info.channels, arch_info.latent_dim,
                        tuple(arch_info.widths), arch_info.discriminator_width, arch_info.extra_convs)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused to load (not a plain tensor file: {first_line(exc, 120)})") from None
    except Exception as exc:
        raise UserError(f"{path}: cannot read weights ({first_line(exc, 160)})") from None
    if isinstance(state, dict) and "error_scale" not in state and card.error_measure not in SCALED_MEASURES:
        state["error_scale"] = torch.ones(arch.channels, arch.image_size, arch.image_size)  # cards before it
    try:
        model = AdversarialAutoencoder(arch)
        keys = model.load_state_dict(state, strict=False)  # wrong shapes still raise
        problems = [f"missing {name}" for name in keys.missing_keys] + [f"unexpected {name}" for name in keys.unexpected_keys]
    except Exception as exc:  # torch's first line is only a header; the line after it names the tensor
        details = [line.strip() for line in str(exc).splitlines() if line.strip()]
        problems = [details[1][:160] if len(details) > 1 else first_line(exc, 160)]
    if problems:
        listed = ", ".join(problems[:3]) + (", ..." if len(problems) > 3 else "")
        raise UserError(f"{path}: weights do not fit the card's architecture ({listed})")
    return model


def load_density(model_dir: Path, card: ModelCard, *, without_lookalikes: bool = True):
    """The trained density, less the codes calibration found to look like the anomalous samples
    (`without_lookalikes=False`: all of them, for calibrating afresh)."""
    from aadetect.density import KernelDensity

    path = _checked_file(model_dir, DENSITY_FILE, card)
    try:
        density = KernelDensity.load(path)
    except ValueError as exc:  # its message names the file
        raise UserError(str(exc)) from None
    if density.dim != card.architecture.latent_dim:
        raise UserError(f"{path}: codes have {density.dim} dimensions, the card says {card.architecture.latent_dim}")
    if density.radius != card.density.radius:
        raise UserError(f"{path}: the density's code radius is {density.radius}, the card says {card.density.radius}")
    if density.n_codes != card.density.n_codes:
        raise UserError(f"{path}: holds {density.n_codes} codes, the card says {card.density.n_codes}")
    return _without_lookalikes(model_dir, card, density) if without_lookalikes else density


def _without_lookalikes(model_dir: Path, card: ModelCard, trained):
    if not (card.calibration and card.calibration.lookalike_codes):
        return trained
    try:
        return trained.without(card.calibration.lookalike_codes)
    except ValueError as exc:  # e.g. a hand-edited list that leaves a latent dimension constant
        raise UserError(f"{model_dir / CARD_FILE}: calibration.lookalike_codes leave no usable density "
                        f"({exc})") from None


def load_anomalies(model_dir: Path, card: ModelCard, trained):
    """The labelled anomalous samples' kernel mixture that calibration saved, with the training codes it
    found to look like them (`trained`: the density as trained), or None."""
    name = card.calibration.anomalies_file if card.calibration else None
    if name is None:
        return None
    path = _checked_file(model_dir, name, card)
    try:
        centres = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
    except Exception as exc:  # numpy raises many types for damaged files
        raise UserError(f"{path}: cannot read the anomalous samples' codes ({first_line(exc, 160)})") from None
    if centres.ndim != 2 or centres.shape[1] != trained.dim or not len(centres) or not np.isfinite(centres).all():
        raise UserError(f"{path}: the anomalous samples' codes must be finite, shaped (n, {trained.dim}); "
                        f"got {centres.shape}")
    from aadetect.lookalikes import anomaly_mixture

    return anomaly_mixture(trained, centres, card.calibration.lookalike_codes)


def load_held_out(model_dir: Path, card: ModelCard) -> tuple[np.ndarray, np.ndarray] | None:
    """The held-out images' reconstruction errors (n,) and codes in every view (views, n, d), as `train`
    saved them; None for a model trained before they were saved."""
    name = card.data.held_out_file
    if name is None:
        return None
    path = _checked_file(model_dir, name, card)
    try:
        with np.load(path, allow_pickle=False) as saved:
            errors, view_codes = np.asarray(saved["reconstruction_error"]), np.asarray(saved["view_codes"])
    except Exception as exc:  # numpy raises many types for damaged files
        raise UserError(f"{path}: cannot read the held-out images' codes ({first_line(exc, 160)})") from None
    views = (2 * card.density.shift_radius + 1) ** 2
    expected = (views, card.data.validation_count, card.architecture.latent_dim)
    if view_codes.shape != expected or errors.shape != expected[1:2] or not (
            np.isfinite(view_codes).all() and np.isfinite(errors).all()):
        raise UserError(f"{path}: expected finite codes shaped {expected} and as many errors; got "
                        f"{view_codes.shape} and {errors.shape}")
    return errors.astype(np.float64), view_codes
