"""Scoring: a trained model, its density and its thresholds turned into per-image decisions.

`Detector` follows PyOD's BaseDetector where it fits: `decision_function` (higher is
more anomalous), `predict` (the OR rule) and the thresholds it applies.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from aadetect import store
from aadetect.card import Thresholds
from aadetect.devices import exact_math, resolve_device
from aadetect.errors import UserError
from aadetect.images import ImageRef, ImagesOnDisk, checked_refs, iterate_batches, materialize
from aadetect.density import GridDensity, pooled
from aadetect.heatmaps import blurred, in_original, peak_position
from aadetect.model import flat_codes, pixel_error, pooled_error, shifted_views, to_input
from aadetect.parallel import piece_pool

# Every forward pass sees a batch of exactly this many images (the last one padded), so an
# image gets bit-identical numbers whether it is scored alone or inside a large folder. On the
# CPU a small piece costs no throughput (each runs on one thread, several at once) and keeps
# `score one.png` quick; a GPU wants bigger pieces to be worth a launch.
CPU_SCORE_BATCH = 8
GPU_SCORE_BATCH = 32
DECODE_BATCH = 128  # images decoded at a time while the pool measures the ones before


@dataclass(frozen=True)
class Measurements:
    """What the detector measured on a set of images, as arrays of equal length. `anomaly_log_odds` (the
    log-odds that an image is of the labelled anomalous kind rather than good, `aadetect.lookalikes`)
    only where the model was calibrated with anomalous samples."""

    reconstruction_error: np.ndarray
    log_density: np.ndarray
    anomaly_log_odds: np.ndarray | None = None
    # where asked for (`maps=True`): each pixel's error, whose worst pixels make reconstruction_error (N, S, S),
    # and, for a code grid, each neighbourhood's log-density, whose lowest is log_density (N, G, G)
    reconstruction_map: np.ndarray | None = None
    density_map: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.reconstruction_error)


@dataclass(frozen=True, kw_only=True)
class Scores(Measurements):
    """Measurements with the OR rule's verdict on each image."""

    score: np.ndarray
    anomaly: np.ndarray  # bool
    reason: np.ndarray  # "reconstruction", "density", "lookalike", "both" or "none"

    def row(self, i: int) -> dict:
        odds = None if self.anomaly_log_odds is None else float(self.anomaly_log_odds[i])
        return {"reconstruction_error": float(self.reconstruction_error[i]), "log_density": float(self.log_density[i]),
                "anomaly_log_odds": odds, "score": float(self.score[i]), "anomaly": bool(self.anomaly[i]),
                "reason": str(self.reason[i])}


def decide(measured: Measurements, thresholds: Thresholds) -> Scores:
    """The OR rule. `score` is the larger threshold-normalised excess: positive exactly when the rule fires.

    The reconstruction excess is measured in log units (errors are right-skewed), the density's
    in log-density units; each is divided by its robust spread on held-out good images. A model
    calibrated with anomalous samples also flags images whose log-odds of being of their kind pass
    its cut ("lookalike"); that cut sits as far above the held-out good images as the density's
    lies below them, so it is a second test on the density's side of the rule, at the same rarity.
    """
    with np.errstate(divide="ignore"):  # a zero error is -inf below any threshold: never flagged by it
        log_ratio = np.log(measured.reconstruction_error) - np.log(thresholds.reconstruction_cut)
    reconstruction_excess = log_ratio / thresholds.reconstruction.scale
    density_excess = (thresholds.density_cut - measured.log_density) / thresholds.density.scale
    too_different = reconstruction_excess > 0
    too_unlikely = density_excess > 0
    looks_anomalous = np.zeros_like(too_unlikely)
    if thresholds.anomaly_log_odds is not None:
        if measured.anomaly_log_odds is None:
            raise ValueError("these thresholds compare images with anomalous samples: their anomaly_log_odds "
                             "are needed")
        odds_excess = (measured.anomaly_log_odds - thresholds.odds_cut) / thresholds.anomaly_log_odds.scale
        looks_anomalous = odds_excess > 0
        density_excess = np.maximum(density_excess, odds_excess)
    score = np.maximum(reconstruction_excess, density_excess)
    reason = np.select([too_different & (too_unlikely | looks_anomalous), too_different, too_unlikely,
                        looks_anomalous], ["both", "reconstruction", "density", "lookalike"], "none")
    return Scores(measured.reconstruction_error, measured.log_density, measured.anomaly_log_odds,
                  measured.reconstruction_map, measured.density_map, score=score,
                  anomaly=too_different | too_unlikely | looks_anomalous, reason=reason)


def anomaly_maps(measured: Measurements, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """The anomaly map of each image (N, S, S), float32, in the score's threshold units, and its
    reconstruction part alone.

    Each pixel's error is put on the scale `decide` puts the image's error on. Each code's density (one for
    the image, or one per cell of a code grid) is put on the density's scale and drawn at the pixel rebuilt
    worst within what the code sees (the whole image; or its cell and the cells around it, as its
    receptive field reaches past its cell), falling off as the reconstruction does, and faster for a
    stronger verdict (by its own size per unit of error, from 1 up), so that it marks as many pixels as a
    weak one: the density says that something there is unlike the good images, the reconstruction says
    where. The larger of the two is kept. So the map's highest value is the larger of the worst pixel's
    error and the least likely code's density, never below the image's score: an image over a threshold
    shows it somewhere.
    """
    if measured.reconstruction_map is None:
        raise ValueError("these measurements hold no maps: measure with maps=True")
    with np.errstate(divide="ignore"):  # an error of exactly 0 is -inf: far below the threshold
        reconstruction = ((np.log(measured.reconstruction_map.astype(np.float32))
                           - np.float32(np.log(thresholds.reconstruction_cut)))
                          / np.float32(thresholds.reconstruction.scale))
    reconstruction = np.maximum(reconstruction, np.float32(FAR_BELOW))
    count, size = len(reconstruction), reconstruction.shape[-1]
    log_density = (measured.density_map if measured.density_map is not None
                   else measured.log_density[:, None, None])
    density = ((thresholds.density_cut - log_density) / thresholds.density.scale).astype(np.float32)  # (N, G, G)
    if thresholds.anomaly_log_odds is not None and measured.anomaly_log_odds is not None:
        odds = (measured.anomaly_log_odds - thresholds.odds_cut) / thresholds.anomaly_log_odds.scale
        density = np.maximum(density, odds[:, None, None].astype(np.float32))
    grid = density.shape[-1]
    cell = size // grid
    cells = blurred(reconstruction).reshape(count, grid, cell, grid, cell)  # where: the middle of an edge's error
    worst_seen = np.pad(around(cells.max(axis=(2, 4))), ((0, 0), (1, 1), (1, 1)))
    steepness = np.pad(np.maximum(density, np.float32(1)), ((0, 0), (1, 1), (1, 1)), constant_values=1)
    verdict = np.pad(density, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    drawn = np.full(cells.shape, -np.inf, dtype=np.float32)
    for dy, dx in itertools.product(range(3), repeat=2):  # each pixel takes the largest of the codes that see it
        seen = (slice(None), slice(dy, dy + grid), None, slice(dx, dx + grid), None)
        drawn = np.maximum(drawn, verdict[seen] - steepness[seen] * (worst_seen[seen] - cells))
    return np.maximum(reconstruction, drawn.reshape(count, size, size)), reconstruction


def around(values: np.ndarray) -> np.ndarray:
    """The largest of each grid cell's value and its (up to 8) neighbours', for (N, G, G) values."""
    padded = np.pad(values, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2)).max(axis=(3, 4))


FAR_BELOW = -1e6  # threshold units for a pixel rebuilt exactly (log 0): below everything, and finite


class Detector:
    """A trained autoencoder (its adversarial prior is optional) with its latent KDE and decision thresholds.

    `kind`: what calibration learnt from labelled anomalous samples (`aadetect.lookalikes.AnomalyKind`),
    or None for a model calibrated without them. With a kind, the training codes that look like the
    samples are left out of the density, and each image's log-odds of being of their kind is measured too.
    """

    def __init__(self, model, density, thresholds: Thresholds, *, error_measure: str, shift_radius: int,
                 device: str = "cpu", kind=None):

        self.model = model.to(device).eval()
        self.trained_density = density
        self.kind = kind
        self.density = kind.good if kind is not None else density
        self.mixture = kind.mixture if kind is not None else None
        self.thresholds = thresholds
        self.error_measure = error_measure
        self.device = device
        self.shift_radius = shift_radius
        self.batch_size = CPU_SCORE_BATCH if torch.device(device).type == "cpu" else GPU_SCORE_BATCH
        self.image_size = model.arch.image_size
        self.channels = model.arch.channels

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "auto", *, as_trained: bool = False) -> Detector:
        """The model as calibrated; `as_trained`: its density whole and no anomalous kind, to calibrate afresh.

        >>> from aadetect import Detector
        >>> from aadetect.images import find_images, load_images
        >>> detector = Detector.load("model", device="cpu")
        >>> pixels, refs, unreadable = load_images(find_images("labelled/bad"), detector.image_size, detector.channels)
        >>> scores = detector.score(pixels)  # PyOD-style: decision_function(pixels), predict(pixels)
        >>> scores.score.shape, scores.anomaly.dtype.name, unreadable
        ((12,), 'bool', [])
        """
        device = resolve_device(device)
        return cls.of(store.read_model(Path(model_dir), device, as_trained=as_trained), device)

    @classmethod
    def of(cls, stored: store.StoredModel, device: str) -> Detector:
        """The detector of a model read from its folder (`store.read_model`)."""
        card, kind = stored.card, stored.kind
        thresholds = card.thresholds
        if kind is None or kind.mixture is None:  # read as trained: nothing to measure the odds with
            thresholds = dataclasses.replace(thresholds, anomaly_log_odds=None)
        return cls(stored.model, stored.density, thresholds, error_measure=card.settings.error,
                   shift_radius=card.shift_radius, device=device, kind=kind)

    def with_kind(self, kind) -> Detector:
        """The same networks and trained density, with another anomalous kind (None: none)."""
        return Detector(self.model, self.trained_density, self.thresholds, error_measure=self.error_measure,
                        shift_radius=self.shift_radius, device=self.device, kind=kind)

    def measure(self, pixels, *, maps: bool = False) -> Measurements:
        """Reconstruction error and KDE log-density (and log-odds, with anomalies) for uint8 images
        (N, C, S, S) (a tensor or numpy array); with `maps`, their maps too (`anomaly_maps` draws them)."""
        pixels = self._checked_pixels(pixels)
        size = self.batch_size
        if len(pixels) == 0:
            return Measurements(np.empty(0), np.empty(0), None if self.mixture is None else np.empty(0))
        with piece_pool(self.device) as (pool, _):
            return joined(list(pool.map(lambda start: self._measure_batch(pixels[start:start + size], maps=maps),
                                         range(0, len(pixels), size))))

    def encode_views(self, pixels) -> tuple[np.ndarray, np.ndarray]:
        """Reconstruction errors (N,) and the codes of every view the density scores (views, N, d),
        float32 as the encoder gives them: what `log_densities` needs to measure the images again
        against another density (held-out images at calibration, a sample left out of its own mixture)."""
        pixels = self._checked_pixels(pixels)
        size, parts = self.batch_size, []
        for start in range(0, len(pixels), size):
            errors, codes, _ = self._encode_batch(pixels[start:start + size])
            parts.append((errors, codes.cpu().numpy()))
        if not parts:
            return np.empty(0), np.empty(((2 * self.shift_radius + 1) ** 2, 0, self.model.arch.code_numbers))
        return np.concatenate([errors for errors, _ in parts]), np.concatenate([codes for _, codes in parts], axis=1)

    def measure_codes(self, reconstruction_error: np.ndarray, view_codes) -> Measurements:
        """Measurements from what `encode_views` gave (or `train` saved for the held-out images)."""
        return Measurements(reconstruction_error, *self.log_densities(view_codes))

    def log_densities(self, view_codes, mixture=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Log-density (mean density over the views) and, with a mixture of the anomalous kind (default:
        the detector's), the log-odds of that kind, for codes (views, N, d) as `encode_views` gives them."""
        mixture = self.mixture if mixture is None else mixture
        view_codes = torch.as_tensor(view_codes)
        views, count = view_codes.shape[:2]

        def view_mean(kde) -> torch.Tensor:
            log_density = torch.from_numpy(kde.log_density(view_codes.reshape(views * count, -1).double(),
                                                           device=self.device))
            return log_density.view(views, count).logsumexp(0) - math.log(views)

        log_density = view_mean(self.density)
        odds = None if mixture is None else (view_mean(mixture) - log_density).numpy()
        return log_density.numpy(), odds

    def _checked_pixels(self, pixels):
        """Images as the model takes them, or a plain error: float pixels in [0, 1] would otherwise be
        divided by 255 again and score nonsense, and a wrong shape fail deep inside torch."""
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
        the errors (count,), the codes of every view (views, count, d), or of the padded batch, and
        each pixel's error (count, S, S).

        With a shift radius, the density is scored over the image's small translations
        (`shifted_views`), so a good image drawn a pixel off-centre is not held against it; the
        reconstruction error is the unmoved image's.
        """


        with torch.inference_mode(), exact_math(self.device):  # thread-local: entered in the worker
            chunk = materialize(pixels)
            count, size = len(chunk), self.batch_size
            if count < size:
                chunk = torch.cat([chunk, chunk.new_zeros((size - count, *chunk.shape[1:]))])
            images = to_input(chunk, self.device)
            codes = self.model.encoder(shifted_views(images, self.shift_radius))  # the unmoved images first
            reconstruction = self.model.decoder(codes[:size])
            per_pixel = pixel_error(reconstruction, images, self.error_measure, self.model.error_scale)
            errors = pooled_error(per_pixel, self.error_measure, self.model.arch.code_grid)
            codes = flat_codes(codes).view(len(codes) // size, size, -1)
            return (errors[:count].double().cpu().numpy(), codes if padded else codes[:, :count],
                    per_pixel[:count].float().cpu().numpy())

    def _measure_batch(self, pixels, *, maps: bool = False) -> Measurements:
        """`_encode_batch`, then the densities over the whole padded batch, so that an image gets the same
        numbers alone or in a folder."""
        errors, codes, per_pixel = self._encode_batch(pixels, padded=True)
        count = len(errors)
        local = None
        with torch.inference_mode(), exact_math(self.device):
            if maps and isinstance(self.density, GridDensity):  # one view, no mixture: pool the cells once
                cells = self.density.local_log_density(codes[0].double(), device=self.device)  # the padded batch
                log_density, odds = pooled(cells), None
                grid = self.model.arch.code_grid
                local = cells[:count].reshape(count, grid, grid)
            else:
                log_density, odds = self.log_densities(codes)
        return Measurements(errors, log_density[:count], None if odds is None else odds[:count],
                            per_pixel if maps else None, local)

    def _mapped_batch(self, pixels) -> tuple[Measurements, np.ndarray, list[tuple[int, int]]]:
        """`_measure_batch` with maps, and the anomaly maps and their peaks, drawn in the pool's thread: on a
        large image the maps cost about what the networks do."""
        measured = self._measure_batch(pixels, maps=True)
        combined, reconstruction = anomaly_maps(measured, self.thresholds)
        peaks = [peak_position(combined[k], reconstruction[k]) for k in range(len(combined))]
        return dataclasses.replace(measured, reconstruction_map=None, density_map=None), combined, peaks

    def score(self, pixels, *, maps: bool = False) -> Scores:
        """The OR rule's verdict on uint8 images (N, C, S, S); with `maps`, the measurements' maps are kept for
        `anomaly_maps(scores, detector.thresholds)`."""
        return decide(self.measure(pixels, maps=maps), self.thresholds)

    def decision_function(self, pixels) -> np.ndarray:
        return self.score(pixels).score

    def predict(self, pixels) -> np.ndarray:
        return self.score(pixels).anomaly

    def score_images(self, refs: list[ImageRef], *, workers: int | None = None, maps: bool = False
                     ) -> Iterator[tuple[ImageRef, dict | None, str | None]]:
        """Stream (ref, numbers, error) in input order. The numbers include `peak_x`, `peak_y`: where the
        anomaly map is highest, in the image's own pixels; with `maps`, also `anomaly_map` (S, S), in
        threshold units, and `image_size`, the image's own (width, height).

        This thread decodes (worker processes do for big inputs where there are cores to spare)
        while the pool measures the batches decoded before, a few ahead, so memory stays flat.
        Until the stream ends, torch runs on one thread in this thread too (see `piece_pool`).
        """
        refs = checked_refs(refs)
        on_gpu = str(self.device).startswith("cuda")
        if workers is None:
            workers = decoding_workers(len(refs), DECODE_BATCH, on_gpu)
        with piece_pool(self.device) as (pool, threads):
            pending: deque = deque()  # (batch, futures), oldest first
            size = self.batch_size
            for batch in iterate_batches(refs, self.image_size, self.channels, batch_size=DECODE_BATCH,
                                         workers=workers, pin_memory=on_gpu):
                pixels = batch.pixels if batch.pixels is not None else ()
                pending.append((batch, [pool.submit(self._mapped_batch, pixels[start:start + size])
                                        for start in range(0, len(pixels), size)]))
                # wait for the oldest batch only while the newer ones give every thread two pieces,
                # so the pool keeps working while this thread decodes the next batch
                while len(pending) > 1 and sum(len(futures) for _, futures in list(pending)[1:]) >= 2 * threads:
                    yield from self._rows(refs, *pending.popleft(), maps)
            while pending:
                yield from self._rows(refs, *pending.popleft(), maps)

    def _rows(self, refs: list[ImageRef], batch, futures: list, maps: bool
              ) -> Iterator[tuple[ImageRef, dict | None, str | None]]:
        rows: dict[int, tuple[dict | None, str | None]] = {i: (None, message) for i, message in batch.errors}
        if futures:
            pieces = [future.result() for future in futures]
            scores = decide(joined([measured for measured, _, _ in pieces]), self.thresholds)
            combined = [anomaly_map for _, maps_of_piece, _ in pieces for anomaly_map in maps_of_piece]
            peaks = [peak for _, _, peaks_of_piece in pieces for peak in peaks_of_piece]
            for k, index in enumerate(batch.indices):
                x, y = in_original(peaks[k], self.image_size, *batch.sizes[k])
                row = {**scores.row(k), "peak_x": x, "peak_y": y}
                if maps:
                    row.update(anomaly_map=combined[k], image_size=batch.sizes[k])
                rows[index] = (row, None)
        for index in sorted(rows):
            yield refs[index], *rows[index]


def joined(parts: list[Measurements | None]) -> Measurements:
    """One set of measurements from several (None ones skipped); log-odds only where every part has them."""
    parts = [part for part in parts if part is not None]
    if not parts:
        return Measurements(np.empty(0), np.empty(0))

    def together(name: str) -> np.ndarray | None:  # where every part has them
        arrays = [getattr(part, name) for part in parts]
        return None if any(array is None for array in arrays) else np.concatenate(arrays)

    return Measurements(*(together(field.name) for field in dataclasses.fields(Measurements)))


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
