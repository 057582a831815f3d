"""Anomaly maps drawn over the images they describe.

A map is in threshold units, the score's: 0 is the threshold, 1 is one robust spread of
good images past it. The colour table covers one fixed range of those units, so a colour
means the same on every image and every model, and the threshold is a visible step: below
it faint blues fading to nothing, at it a jump to yellow, then orange and dark red.

Only numpy and Pillow: the table is built here from a few anchors.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

__all__ = ["COLOUR_TABLE", "MAP_RANGE", "HeatmapFolder", "colour_indices", "heatmap_png", "in_original", "overlay",
           "peak_position", "resized_map", "write_heatmap"]

MAP_RANGE = (-3.0, 3.0)  # threshold units from the first to the last colour of the table
TABLE_SIZE = 256
# (threshold units, red, green, blue, opacity 0-255); the two anchors at 0 make the threshold a step
_ANCHORS = np.array([
    (-3.0, 49, 54, 149, 0),
    (-0.01, 116, 173, 209, 80),
    (0.0, 254, 224, 144, 150),
    (1.0, 253, 174, 97, 170),
    (2.0, 244, 109, 67, 190),
    (3.0, 165, 0, 38, 215),
], dtype=np.float64)


def _table() -> np.ndarray:
    """TABLE_SIZE RGBA colours, entry i for the units at the centre of bin i of MAP_RANGE."""
    low, high = MAP_RANGE
    centres = low + (np.arange(TABLE_SIZE) + 0.5) * (high - low) / TABLE_SIZE
    columns = [np.interp(centres, _ANCHORS[:, 0], _ANCHORS[:, k]) for k in range(1, 5)]
    return np.rint(np.stack(columns, axis=1)).astype(np.uint8)


COLOUR_TABLE = _table()


def colour_indices(units: np.ndarray) -> np.ndarray:
    """Each value's entry in COLOUR_TABLE; values past the range take the end colours. The threshold (0)
    falls on a bin edge, so every value below it is drawn in a colour of its own side."""
    low, high = MAP_RANGE
    bins = np.floor((np.asarray(units, dtype=np.float64) - low) / (high - low) * TABLE_SIZE)
    return np.clip(np.nan_to_num(bins, nan=0.0), 0, TABLE_SIZE - 1).astype(np.intp)


def resized_map(anomaly_map: np.ndarray, width: int, height: int) -> np.ndarray:
    """The map (S, S) stretched to the image's own size, as the image was squeezed to the model's."""
    from PIL import Image

    values = np.ascontiguousarray(anomaly_map, dtype=np.float32)
    if values.shape == (height, width):
        return values
    return np.asarray(Image.fromarray(values, mode="F").resize((width, height), Image.Resampling.BILINEAR))


def overlay(image, anomaly_map: np.ndarray):
    """The image (a Pillow image, any mode) in RGB at its own size, with the map's colours over it."""
    from PIL import Image

    base = image.convert("RGB")
    colours = COLOUR_TABLE[colour_indices(resized_map(anomaly_map, *base.size))]
    layer = Image.fromarray(colours, mode="RGBA")
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def in_original(position: tuple[int, int], model_size: int, width: int, height: int) -> tuple[int, int]:
    """A model pixel's (x, y) in the original image's pixels: its centre, carried back through the resize."""
    def back(index: int, original: int) -> int:
        return int(min(original - 1, max(0, math.floor((index + 0.5) * original / model_size))))

    return back(position[0], width), back(position[1], height)


def peak_position(anomaly_map: np.ndarray, reconstruction_part: np.ndarray) -> tuple[int, int]:
    """(column, row) of the map's highest point, found on the map a little blurred (a defect's error is
    highest along its edges, where the two images differ most in structure: the blur brings the peak in
    to the defect itself). Among equal values, the worst-rebuilt pixel, then the first in row order."""
    smooth = blurred(anomaly_map).ravel()
    highest = np.flatnonzero(smooth == smooth.max())
    if len(highest) > 1:  # a density drawn flat over the image: where it is rebuilt worst
        worst = blurred(reconstruction_part).ravel()[highest]
        highest = highest[worst == worst.max()]
    row, column = np.unravel_index(int(highest[0]), anomaly_map.shape)
    return int(column), int(row)


def blurred(values: np.ndarray) -> np.ndarray:
    """Values (..., H, W) smoothed by a 5-tap binomial filter (about a Gaussian of 1 pixel), edges repeated."""
    taps = BINOMIAL.astype(values.dtype)
    for axis in (values.ndim - 2, values.ndim - 1):
        pad = [(2, 2) if k == axis else (0, 0) for k in range(values.ndim)]
        values = np.lib.stride_tricks.sliding_window_view(np.pad(values, pad, mode="edge"), 5, axis=axis) @ taps
    return values


BINOMIAL = np.array([1, 4, 6, 4, 1]) / 16


def heatmap_png(image, anomaly_map: np.ndarray) -> bytes:
    """The overlay as PNG bytes (no timestamps or other metadata, so the same map gives the same file)."""
    buffer = io.BytesIO()
    overlay(image, anomaly_map).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def write_heatmap(path: Path, image, anomaly_map: np.ndarray) -> None:
    """Write the overlay to `path` atomically: a reader sees the old file or the whole new one."""
    from aadetect.atomic import write_bytes_atomic

    write_bytes_atomic(Path(path), heatmap_png(image, anomaly_map))


class HeatmapFolder:
    """Where one run's heatmaps go: `<name>.heatmap.png` for each image (an array's i-th image:
    `<name>-<i>`), `<name>~2.heatmap.png` and so on for a name met again in the same run."""

    SUFFIX = ".heatmap.png"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.taken: set[str] = set()

    def path_for(self, ref) -> Path:
        stem = Path(ref.path).stem if ref.index is None else f"{Path(ref.path).stem}-{ref.index}"
        name, count = stem, 1
        while name in self.taken:
            count += 1
            name = f"{stem}~{count}"
        self.taken.add(name)
        return self.folder / f"{name}{self.SUFFIX}"

    def write(self, ref, anomaly_map: np.ndarray) -> Path:
        """Draw the image's map over it, read afresh at its own size, and write it; the path written."""
        from aadetect.images import original_image

        path = self.path_for(ref)
        write_heatmap(path, original_image(ref), anomaly_map)
        return path
