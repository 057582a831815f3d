"""How well anomaly maps point at defects: the pixel-level AUROC against ground-truth masks.

Every pixel of every image counts, at the mask's own resolution: a good image's pixels are all
normal, an anomalous image's are defective where its mask is bright. The maps are stretched to
the masks as the heatmaps stretch them to the images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from aadetect.errors import UserError
from aadetect.heatmaps import resized_map
from aadetect.metrics import auroc

MASK_LEVEL = 128  # a mask pixel at least this bright (0-255) is part of a defect


def read_mask(path: Path) -> np.ndarray:
    """A defect mask as booleans (H, W); any image mode, bright = defective."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) >= MASK_LEVEL
    except FileNotFoundError:
        raise
    except Exception as exc:  # Pillow raises many types on corrupt data
        raise UserError(f"{path}: cannot read the mask ({exc})") from None


def mask_path(masks: Path, anomalous: Path, ref) -> Path:
    """The mask of an image found under `anomalous` (a folder, or the one image): the same path under
    `masks`."""
    if ref.index is not None:
        raise UserError(f"{ref.name}: masks are read for image files, not for images in an array")
    return masks / (ref.path.relative_to(anomalous) if anomalous.is_dir() else ref.path.name)


def pixel_auroc(good: list[tuple[np.ndarray, tuple[int, int]]], anomalous: list[tuple[np.ndarray, np.ndarray]]
                ) -> float:
    """Pixel-level AUROC: map values of defective pixels against those of normal ones. `good`: each good
    image's map and its own (width, height); `anomalous`: each anomalous image's map and mask."""
    normal, defective = [], []
    for anomaly_map, (width, height) in good:
        normal.append(resized_map(anomaly_map, width, height).ravel())
    for anomaly_map, mask in anomalous:
        values = resized_map(anomaly_map, mask.shape[1], mask.shape[0])
        normal.append(values[~mask])
        defective.append(values[mask])
    if not defective or not sum(len(values) for values in defective):
        return float("nan")
    return auroc(np.concatenate(normal), np.concatenate(defective))
