"""Scoring with the exported graph (`aadetect export --format onnx`) on ONNX Runtime, without torch.

`OnnxDetector.load` reads the card and `model.onnx` from the model folder and checks them first: the card
must record the export, made from the card as it is now (a later calibration makes it stale), and the file
must match the card's checksum. `score_images` then yields the rows `Detector.score_images` yields, from the
same decoding (`aadetect.images.decode_sized`) and the same peak search (`aadetect.heatmaps.peak_position`).

Nothing here imports torch: `aadetect score --engine onnx` runs where only numpy, Pillow and onnxruntime are.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from aadetect import store
from aadetect.errors import UserError, first_line
from aadetect.heatmaps import in_original, peak_position
from aadetect.images import ImageRef, checked_refs, decode_sized

FORMAT = "onnx"
INPUT = "pixels"  # uint8 (N, C, S, S)
OUTPUTS = ("reconstruction_error", "log_density", "anomaly_log_odds", "score", "anomaly", "reason", "anomaly_map",
           "reconstruction_map")  # anomaly_log_odds only for a model calibrated with anomalous samples
REASONS = ("none", "reconstruction", "density", "lookalike", "both")  # the graph's `reason` indexes this
PIECE = 8  # images a run of the graph: each on one thread, several at once (as the torch engine shares its work)
BATCH = 64  # images decoded at a time, while the pieces of the batch before run


class OnnxDetector:
    """A model's exported scoring graph in an ONNX Runtime session, with the card it reflects."""

    def __init__(self, session, card, path: Path, workers: int = 1):
        self.session, self.card, self.path, self.workers = session, card, path, workers
        self.image_size, self.channels = card.architecture.image_size, card.architecture.channels
        self.thresholds = card.thresholds
        self.outputs = [output.name for output in session.get_outputs()]

    @classmethod
    def load(cls, model_dir: str | Path, *, threads: int = 0) -> OnnxDetector:
        """The export in `model_dir`, checked (see the module's docstring); `threads`: how many pieces of a
        batch run at once, each on one thread (0: one per core). On 2 cores that scored 5-15% more images a
        second than one run at a time on ONNX Runtime's own threads."""
        from aadetect.extras import require

        require("onnx", ("onnxruntime",))  # running needs no exporter
        model_dir = Path(model_dir)
        card, content = store.read_export(model_dir, FORMAT)
        path = model_dir / card.export.file
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings are for the graph's author
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        try:
            session = onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own types for a damaged graph
            raise UserError(f"{path}: cannot load the exported graph ({first_line(exc, 160)}); run "
                            f"`aadetect export` again") from None
        inputs = session.get_inputs()
        arch = card.architecture
        if ([i.name for i in inputs] != [INPUT] or inputs[0].type != "tensor(uint8)"
                or list(inputs[0].shape[1:]) != [arch.channels, arch.image_size, arch.image_size]
                or [o.name for o in session.get_outputs()] != card.export.outputs):
            raise UserError(f"{path}: the graph's inputs or outputs are not those of this model's card; run "
                            f"`aadetect export` again")
        return cls(session, card, path, threads or os.cpu_count() or 1)

    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Every output of the graph for uint8 images (N, C, S, S), run in pieces of PIECE images."""
        expected = (self.channels, self.image_size, self.image_size)
        pixels = np.asarray(pixels)
        if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise UserError(f"images must be uint8 pixels (0-255) shaped (N, {', '.join(map(str, expected))}); "
                            f"got {pixels.dtype} shaped {pixels.shape}")
        if len(pixels) == 0:  # the outputs' types and shapes, from one blank image
            return {name: values[:0] for name, values in self.run(np.zeros((1, *expected), np.uint8)).items()}
        def piece(start: int) -> list[np.ndarray]:
            return self.session.run(None, {INPUT: np.ascontiguousarray(pixels[start:start + PIECE])})

        starts = range(0, len(pixels), PIECE)
        if self.workers > 1 and len(starts) > 1:  # a session may run in several threads at once
            with ThreadPoolExecutor(min(self.workers, len(starts))) as pool:
                pieces = list(pool.map(piece, starts))
        else:
            pieces = [piece(start) for start in starts]
        return {name: np.concatenate([piece[k] for piece in pieces]) for k, name in enumerate(self.outputs)}

    def score_images(self, refs, *, maps: bool = False) -> Iterator[tuple[ImageRef, dict | None, str | None]]:
        """(ref, numbers, error) in input order, as `Detector.score_images` yields them: the numbers include
        `peak_x`, `peak_y`; with `maps`, also `anomaly_map` (S, S) in threshold units and `image_size`, the
        image's own (width, height). An image that cannot be read gives its error instead."""
        refs = checked_refs(refs)
        # ONNX Runtime lets go of the GIL: this thread decodes the next batch, and finds the last one's peaks,
        # while a batch runs
        with ThreadPoolExecutor(1) as runner:
            previous = None
            for start in range(0, len(refs) + BATCH, BATCH):
                chunk = refs[start:start + BATCH]
                decoded = [self._decoded(ref) for ref in chunk]
                pixels = [item[0] for item in decoded if not isinstance(item, str)]
                batch = (np.stack(pixels) if pixels
                         else np.zeros((0, self.channels, self.image_size, self.image_size), np.uint8))
                current = (chunk, decoded, runner.submit(self.run, batch)) if chunk else None
                if previous is not None:
                    yield from self._rows(*previous, maps)
                previous = current

    def _decoded(self, ref: ImageRef) -> tuple[np.ndarray, tuple[int, int]] | str:
        try:
            return decode_sized(ref, self.image_size, self.channels)
        except UserError as error:
            return str(error)

    def _rows(self, chunk: list[ImageRef], decoded: list, outputs, maps: bool
              ) -> Iterator[tuple[ImageRef, dict | None, str | None]]:
        outputs = outputs.result()
        k = 0
        for ref, item in zip(chunk, decoded):
            if isinstance(item, str):
                yield ref, None, item
                continue
            yield ref, self._row(outputs, k, item[1], maps), None
            k += 1

    def _row(self, outputs: dict[str, np.ndarray], k: int, size: tuple[int, int], maps: bool) -> dict:
        odds = outputs.get("anomaly_log_odds")
        anomaly_map = outputs["anomaly_map"][k]
        x, y = in_original(peak_position(anomaly_map, outputs["reconstruction_map"][k]), self.image_size, *size)
        row = {"reconstruction_error": float(outputs["reconstruction_error"][k]),
               "log_density": float(outputs["log_density"][k]),
               "anomaly_log_odds": None if odds is None else float(odds[k]), "score": float(outputs["score"][k]),
               "anomaly": bool(outputs["anomaly"][k]), "reason": REASONS[int(outputs["reason"][k])],
               "peak_x": x, "peak_y": y}
        if maps:
            row.update(anomaly_map=anomaly_map, image_size=size)
        return row
