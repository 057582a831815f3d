"""The whole scoring path as one ONNX graph (`aadetect export --format onnx`), for runtimes without torch.

`ScoringGraph` computes, from uint8 pixels (N, C, S, S) of any batch size, what `Detector` computes
for them: each image's reconstruction error, log-density (and log-odds of the labelled anomalous kind,
where the model was calibrated with anomalous samples), the OR rule's score, decision and reason, and
the anomaly map with its reconstruction part (which breaks ties when the map's peak is looked for).
Decoding and resizing stay outside: the graph takes the pixels `aadetect.images.decode` gives.

Every number is computed as `Detector._measure_batch`, `decide` and `anomaly_maps` compute it: the
networks in float32, the kernel density in float64 with the kernels whitened once (the queries by the
Cholesky factor's inverse, a product in place of a triangular solve), the maps in float32. The
thresholds are constants of the graph, so an export reflects one card: a later calibration makes it
stale (`aadetect.store` checks this before a graph is run).

`onnx_engine` runs the file without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aadetect import store
from aadetect.atomic import check_writable
from aadetect.card import EXPORT_FORMATS, Export, ModelCard, Thresholds
from aadetect.config import worst_cell_count
from aadetect.density import GridDensity, map_radius
from aadetect.errors import UserError
from aadetect.model import flat_codes, pixel_error, pooled_error, shifted_views
from aadetect.onnx_engine import INPUT, OUTPUTS, REASONS
from aadetect.scoring import FAR_BELOW, Detector

OPSET = 18


class _Kernels(nn.Module):
    """One Gaussian KDE, or one per position of a code grid (P of them), as float64 buffers: the kernel
    centres whitened (P, n, d), their halved squared norms (P, 1, n), the centre and the inverse Cholesky
    factor that whiten a query, and the log normaliser (P, 1)."""

    def __init__(self, codes: np.ndarray, covariances: np.ndarray):
        super().__init__()
        codes = torch.from_numpy(np.asarray(codes, dtype=np.float64))  # (P, n, d)
        chol = torch.linalg.cholesky(torch.from_numpy(np.asarray(covariances, dtype=np.float64)))  # (P, d, d)
        centre = codes.mean(1, keepdim=True)
        whitened = torch.linalg.solve_triangular(chol, (codes - centre).transpose(1, 2), upper=False).transpose(1, 2)
        identity = torch.eye(chol.shape[-1], dtype=torch.float64).expand_as(chol)
        inverse = torch.linalg.solve_triangular(chol, identity, upper=False)
        n, d = codes.shape[1:]
        log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        self.register_buffer("centres", whitened.contiguous())
        self.register_buffer("halved_norms", 0.5 * whitened.square().sum(2)[:, None, :])
        self.register_buffer("centre", centre)
        self.register_buffer("whitening", inverse.transpose(1, 2).contiguous())  # q @ L^-T
        self.register_buffer("log_norm", (math.log(n) + 0.5 * (d * math.log(2.0 * math.pi) + log_det))[:, None])

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """Log-densities (P, m) of queries (P, m, d), already mapped by the code radius."""
        whitened = torch.matmul(queries - self.centre, self.whitening)
        exponent = torch.matmul(whitened, self.centres.transpose(1, 2)) - self.halved_norms
        exponent = (exponent - 0.5 * whitened.square().sum(2, keepdim=True)).clamp(max=0.0)
        top = exponent.amax(2, keepdim=True)
        return torch.log(torch.exp(exponent - top).sum(2)) + top[..., 0] - self.log_norm


class ScoringGraph(nn.Module):
    """A detector's scoring path, from uint8 pixels to its numbers and maps (see the module's docstring)."""

    def __init__(self, detector):
        super().__init__()
        model = detector.model.to("cpu").eval()
        self.encoder, self.decoder = model.encoder, model.decoder
        self.register_buffer("error_scale", model.error_scale.detach().clone())
        self.measure, self.shift_radius = detector.error_measure, detector.shift_radius
        self.size, self.grid = model.arch.image_size, model.arch.code_grid
        density = detector.density
        self.radius = density.radius
        state = density.state_dict()
        local = isinstance(density, GridDensity)
        self.local = local
        self.latent = model.arch.latent_dim
        self.kernels = _Kernels(state["codes"] if local else state["codes"][None],
                                state["covariance"] if local else state["covariance"][None])
        mixture = detector.mixture
        self.odds = mixture is not None and detector.thresholds.anomaly_log_odds is not None
        if self.odds:
            mixture_state = mixture.state_dict()
            self.mixture = _Kernels(mixture_state["codes"][None], mixture_state["covariance"][None])
        self.lowest = worst_cell_count(self.grid ** 2)
        thresholds: Thresholds = detector.thresholds
        self.log_reconstruction_cut = math.log(thresholds.reconstruction_cut)
        self.reconstruction_scale = thresholds.reconstruction.scale
        self.density_cut, self.density_scale = thresholds.density_cut, thresholds.density.scale
        if self.odds:
            self.odds_cut, self.odds_scale = thresholds.odds_cut, thresholds.anomaly_log_odds.scale
        self.register_buffer("taps", torch.tensor([1, 4, 6, 4, 1], dtype=torch.float32) / 16)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(name for name in OUTPUTS if self.odds or name != "anomaly_log_odds")

    def forward(self, pixels: torch.Tensor):
        images = pixels.float() / 255.0
        views = shifted_views(images, self.shift_radius)
        codes = self.encoder(views)
        count = images.shape[0]
        reconstruction = self.decoder(codes[:count])
        per_pixel = pixel_error(reconstruction, images, self.measure, self.error_scale)  # (N, S, S)
        errors = pooled_error(per_pixel, self.measure, self.grid).double()
        rows = flat_codes(codes).double()
        if self.local:  # one view: each position's codes against that position's kernels
            queries = map_radius(rows.reshape(count, self.grid ** 2, self.latent), self.radius).transpose(0, 1)
            cells = self.kernels(queries).transpose(0, 1)  # (N, P)
            log_density = torch.topk(cells, self.lowest, dim=1, largest=False).values.mean(1)
            local = cells.reshape(count, self.grid, self.grid)
        else:
            queries = map_radius(rows, self.radius)[None]  # (1, views * N, d), view by view
            log_density = self._view_mean(self.kernels(queries)[0])
            local = log_density[:, None, None]
        outputs = {"reconstruction_error": errors, "log_density": log_density}
        # the OR rule (scoring.decide), in float64
        reconstruction_excess = (torch.log(errors) - self.log_reconstruction_cut) / self.reconstruction_scale
        density_excess = (self.density_cut - log_density) / self.density_scale
        too_different, too_unlikely = reconstruction_excess > 0, density_excess > 0
        verdicts = (self.density_cut - local) / self.density_scale  # each code's, for the map
        if self.odds:
            odds = self._view_mean(self.mixture(queries)[0]) - log_density
            outputs["anomaly_log_odds"] = odds
            odds_excess = (odds - self.odds_cut) / self.odds_scale
            looks_anomalous = odds_excess > 0
            density_excess = torch.maximum(density_excess, odds_excess)
            verdicts = torch.maximum(verdicts, odds_excess[:, None, None])
        else:
            looks_anomalous = torch.zeros_like(too_unlikely)
        outputs["score"] = torch.maximum(reconstruction_excess, density_excess)
        outputs["anomaly"] = too_different | too_unlikely | looks_anomalous
        reason = torch.where(looks_anomalous, REASONS.index("lookalike"), REASONS.index("none"))
        reason = torch.where(too_unlikely, REASONS.index("density"), reason)
        reason = torch.where(too_different, REASONS.index("reconstruction"), reason)
        reason = torch.where(too_different & (too_unlikely | looks_anomalous), REASONS.index("both"), reason)
        outputs["reason"] = reason
        outputs["anomaly_map"], outputs["reconstruction_map"] = self._maps(per_pixel.float(), verdicts.float())
        return tuple(outputs[name] for name in self.outputs)

    def _view_mean(self, log_density: torch.Tensor) -> torch.Tensor:
        """The mean density over the views (views * N,) -> (N,), as `Detector.log_densities` takes it."""
        views = (2 * self.shift_radius + 1) ** 2
        per_view = log_density.reshape(views, -1)
        top = per_view.amax(0, keepdim=True)
        return torch.log(torch.exp(per_view - top).sum(0)) + top[0] - math.log(views)

    def _blurred(self, values: torch.Tensor) -> torch.Tensor:
        """`scoring.blurred` of (N, S, S): the 5-tap binomial filter down the columns, then along the rows."""
        size = values.shape[-1]
        padded = torch.cat([values[:, :1].expand(-1, 2, -1), values, values[:, -1:].expand(-1, 2, -1)], dim=1)
        values = sum(padded[:, k:k + size] * self.taps[k] for k in range(5))
        padded = torch.cat([values[:, :, :1].expand(-1, -1, 2), values, values[:, :, -1:].expand(-1, -1, 2)], dim=2)
        return sum(padded[:, :, k:k + size] * self.taps[k] for k in range(5))

    def _maps(self, per_pixel: torch.Tensor, density: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`scoring.anomaly_maps`: the map (N, S, S) and its reconstruction part, float32."""
        reconstruction = ((torch.log(per_pixel) - np.float32(self.log_reconstruction_cut))
                          / np.float32(self.reconstruction_scale)).clamp(min=FAR_BELOW)
        grid, size = self.grid, self.size
        cell = size // grid
        cells = self._blurred(reconstruction).reshape(-1, grid, cell, grid, cell)
        worst = cells.amax(dim=(2, 4))[:, None]  # (N, 1, G, G)
        around = nn.functional.max_pool2d(worst, 3, stride=1, padding=1)[:, 0]
        worst_seen = nn.functional.pad(around, (1, 1, 1, 1))
        steepness = nn.functional.pad(density.clamp(min=1.0), (1, 1, 1, 1), value=1.0)
        verdict = nn.functional.pad(density, (1, 1, 1, 1), value=-math.inf)
        drawn = None
        for dy in range(3):
            for dx in range(3):
                seen = (slice(None), slice(dy, dy + grid), None, slice(dx, dx + grid), None)
                candidate = verdict[seen] - steepness[seen] * (worst_seen[seen] - cells)
                drawn = candidate if drawn is None else torch.maximum(drawn, candidate)
        return torch.maximum(reconstruction, drawn.reshape(-1, size, size)), reconstruction


def onnx_bytes(detector, *, opset: int = OPSET) -> bytes:
    """The detector's `ScoringGraph` as ONNX bytes: uint8 pixels in, a dynamic batch."""
    graph = ScoringGraph(detector).eval()
    arch = detector.model.arch
    example = torch.zeros(2, arch.channels, arch.image_size, arch.image_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # the exporter talks on stdout, which carries `aadetect`'s data only; and its warnings are about torch
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(graph, (example,), path, input_names=[INPUT], output_names=list(graph.outputs),
                          dynamic_shapes={"pixels": {0: batch}}, opset_version=opset, dynamo=True,
                          external_data=False, verbose=False, optimize=True)
        return Path(path).read_bytes()


def export_model(model_dir: str | Path, format: str = "onnx") -> ModelCard:
    """Export the model in `model_dir` as it is calibrated now, into its folder (`model.onnx`), and record
    the export in its card; returns the card. Holds the folder's writer lock: no calibration in between."""
    if format not in EXPORT_FORMATS:
        raise UserError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    model_dir = Path(model_dir)
    with store.writing(model_dir):
        stored = store.read_model(model_dir, "cpu")
        card = stored.card
        check_writable(model_dir / EXPORT_FORMATS[format])  # before the slow part
        detector = Detector.of(stored, "cpu")
        content = onnx_bytes(detector)
        graph_outputs = ScoringGraph(detector).outputs
        arch = card.architecture
        mode = "L" if arch.channels == 1 else "RGB"
        export = Export(
            format=format, file=EXPORT_FORMATS[format], sha256=hashlib.sha256(content).hexdigest(), opset=OPSET,
            card_sha256=store.card_digest(card), exporter=f"torch {torch.__version__}",
            input=(f"{INPUT}: uint8 (N, {arch.channels}, {arch.image_size}, {arch.image_size}), any N; each image "
                   f"decoded as aadetect does (EXIF orientation applied, 16-bit values scaled to 8, alpha dropped), "
                   f"converted to {mode} and resized to {arch.image_size}x{arch.image_size} px with Pillow's "
                   f"bilinear filter (aadetect.images.decode)"),
            outputs=list(graph_outputs))
        return store.save_export(model_dir, card, export, content)
