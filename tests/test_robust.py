"""Robust training: planted outliers in a small contaminated set lose their weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aadetect.config import Architecture, TrainConfig
from aadetect.training import train_autoencoder
from conftest import SIZE, blob_images


def bar_images(count: int, seed: int) -> np.ndarray:
    """A second kind of image, alike among themselves: a cluster the autoencoder could learn to rebuild."""
    rng = np.random.default_rng(seed)
    images = np.full((count, SIZE, SIZE), 40.0) + rng.normal(0, 4, size=(count, SIZE, SIZE))
    for image, row in zip(images, rng.integers(6, 10, size=count)):
        image[row:row + 3, 2:14] += 150
    return np.clip(images, 0, 255).astype(np.uint8)


def contaminated_set(outliers: int = 8, kind: str = "noise"):
    good = blob_images(240, seed=11)
    planted = (np.random.default_rng(12).integers(0, 256, size=(outliers, SIZE, SIZE), dtype=np.uint8)
               if kind == "noise" else bar_images(outliers, seed=5))
    images = torch.from_numpy(np.concatenate([good, planted]))[:, None]
    return images, np.arange(len(good), len(good) + outliers)


@pytest.mark.parametrize("outliers, kind", [(8, "noise"), (14, "bars")])
def test_planted_outliers_are_rejected_and_clean_images_kept(outliers, kind):
    images, planted = contaminated_set(outliers, kind)
    config = TrainConfig(epochs=8, image_size=SIZE, seed=0, patience=100)
    result = train_autoencoder(images, Architecture.for_images(SIZE, 1, 8, extra_convs=0), config, "cpu")
    planted_in_training = np.intersect1d(planted, result.train_indices)
    assert len(planted_in_training) >= 5
    assert set(planted_in_training) <= set(result.rejected)  # every planted outlier loses its weight
    clean_rejected = np.setdiff1d(result.rejected, planted)
    assert len(clean_rejected) <= 0.03 * len(result.train_indices)
    assert result.history[-1]["rejected"] >= len(planted_in_training)


def test_without_robust_nothing_is_rejected():
    images, _ = contaminated_set()
    config = TrainConfig(epochs=3, image_size=SIZE, seed=0, robust=False)
    result = train_autoencoder(images, Architecture.for_images(SIZE, 1, 8, extra_convs=0), config, "cpu")
    assert len(result.rejected) == 0 and result.history[-1]["rejected"] == 0


def test_neighbour_distance_counts_k_others_and_only_kept_ones():
    from aadetect.training import NEIGHBOURS, neighbour_distance

    rng = np.random.default_rng(3)
    cloud = rng.normal(size=(400, 8))
    crowd = np.tile(np.full(8, 12.0), (NEIGHBOURS + 1, 1))  # each has exactly NEIGHBOURS identical others
    too_few = np.tile(np.full(8, -12.0), (NEIGHBOURS, 1))  # one identical other short
    codes = torch.from_numpy(np.concatenate([cloud, crowd, too_few]))
    everyone = torch.ones(len(codes), dtype=torch.bool)
    distance = neighbour_distance(codes, everyone)
    crowd_rows = slice(400, 400 + NEIGHBOURS + 1)
    assert torch.all(distance[crowd_rows] == 0)  # itself is not its own neighbour, the others are
    assert distance[400 + NEIGHBOURS + 1:].min() > distance[:400].max()  # must reach into the cloud

    kept = everyone.clone()
    kept[400:402] = False  # once two of the crowd are left out, the rest no longer have enough close neighbours
    assert distance[:400].max() < neighbour_distance(codes, kept)[402:400 + NEIGHBOURS + 1].min()
