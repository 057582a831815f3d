"""Tests for the procedural blood-cell generator used by the offline demo."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from aadetect.synthetic import draw_cells, write_demo_dataset


def _luma(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float64).mean(axis=-1)


def _cell_mask(images: np.ndarray) -> np.ndarray:
    """The stained cell: pixels clearly darker than the light background, with row gaps filled
    (so that a pale centre still counts as cell)."""
    luma = _luma(images)
    border = np.concatenate(
        [luma[:, :2, :].reshape(len(luma), -1), luma[:, -2:, :].reshape(len(luma), -1)], axis=1
    )
    background = np.median(border, axis=1)[:, None, None]
    dark = luma < background - 15
    from_left = np.maximum.accumulate(dark, axis=2)
    from_right = np.maximum.accumulate(dark[:, :, ::-1], axis=2)[:, :, ::-1]
    return from_left & from_right


# --- shape, dtype, arguments ----------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32, 48, 64])
@pytest.mark.parametrize("anomalous", [False, True])
def test_shape_and_dtype(size, anomalous):
    images = draw_cells(3, anomalous=anomalous, size=size, seed=5)
    assert images.shape == (3, size, size, 3)
    assert images.dtype == np.uint8


def test_zero_count_gives_empty_batch():
    images = draw_cells(0, anomalous=False)
    assert images.shape == (0, 48, 48, 3)
    assert images.dtype == np.uint8


@pytest.mark.parametrize("kwargs", [{"count": -1}, {"size": 4}, {"seed": -3}])
def test_bad_arguments_raise(kwargs):
    args = {"count": 2, "size": 48, "seed": 0} | kwargs
    with pytest.raises(ValueError):
        draw_cells(args["count"], anomalous=False, size=args["size"], seed=args["seed"])


# --- determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("anomalous", [False, True])
def test_same_seed_is_byte_identical(anomalous):
    a = draw_cells(12, anomalous=anomalous, seed=42)
    b = draw_cells(12, anomalous=anomalous, seed=42)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("anomalous", [False, True])
def test_different_seed_differs(anomalous):
    a = draw_cells(12, anomalous=anomalous, seed=1)
    b = draw_cells(12, anomalous=anomalous, seed=2)
    # Every image must differ, not just one of them.
    assert all(not np.array_equal(x, y) for x, y in zip(a, b))


def test_prefix_is_independent_of_count():
    short = draw_cells(4, anomalous=True, seed=9)
    long = draw_cells(10, anomalous=True, seed=9)
    assert np.array_equal(short, long[:4])


# --- good cells look like varied stained cells ----------------------------------------------


def test_good_cells_are_pink_purple_on_light_background():
    images = draw_cells(40, anomalous=False, seed=3).astype(np.float64)
    corners = images[:, :3, :3].reshape(40, -1, 3).mean(axis=1)
    centres = images[:, 20:28, 20:28].reshape(40, -1, 3).mean(axis=1)
    # light, nearly neutral background
    assert (corners.mean(axis=1) > 190).all()
    assert (corners.max(axis=1) - corners.min(axis=1) < 30).all()
    # stained cell: darker than the background (a pale centre only a little) ...
    contrast = corners.mean(axis=1) - centres.mean(axis=1)
    assert contrast.min() > 3
    assert contrast.mean() > 25
    # ... and pink/purple: red clearly above green, blue at least as high as green
    assert (centres[:, 0] > centres[:, 1] + 15).all()
    assert (centres[:, 2] > centres[:, 1] - 3).all()
    assert (centres[:, [0, 2]].mean(axis=1) > centres[:, 1] + 15).all()


def test_good_cells_vary_in_size_colour_and_position():
    images = draw_cells(60, anomalous=False, seed=11)
    mask = _cell_mask(images)
    area = mask.reshape(60, -1).mean(axis=1)
    # radius 30-42 % of the side -> area fraction ~0.28-0.55; expect a real spread
    assert 0.2 < area.min() and area.max() < 0.65
    assert area.max() - area.min() > 0.12
    centroids = np.array([np.argwhere(m).mean(axis=0) for m in mask])  # (row, col) per cell
    assert centroids.std(axis=0).min() > 0.8  # position jitter of a pixel or more
    assert np.abs(centroids - 24).max() < 10  # ... but the cell stays roughly centred
    cell_colour = np.array([img[m].mean(axis=0) for img, m in zip(images, mask)])
    assert cell_colour.std(axis=0).min() > 4  # stain colour varies per channel
    # no two good cells are the same template
    flat = images.reshape(60, -1).astype(np.int16)
    diffs = np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=2)
    assert diffs[~np.eye(60, dtype=bool)].min() > 3


# --- anomalies are local dark defects inside the cell ------------------------------------------


def test_anomalous_cells_are_good_cells_plus_local_defects():
    n = 80
    good = draw_cells(n, anomalous=False, seed=21)
    bad = draw_cells(n, anomalous=True, seed=21)
    diff = np.abs(bad.astype(np.int16) - good.astype(np.int16)).max(axis=-1)
    changed = diff > 10
    frac = changed.reshape(n, -1).mean(axis=1)
    # every anomalous image carries a visible defect ...
    assert (diff.reshape(n, -1).max(axis=1) > 60).all()
    assert (frac > 0.003).all()
    # ... that is small: a few % of the image at most
    assert frac.max() < 0.15
    assert frac.mean() < 0.05
    # the defect lies inside the cell and is darker than the cell there
    cell = _cell_mask(good)
    assert (changed & ~cell).sum() <= 0.02 * changed.sum()
    assert (_luma(bad)[changed] < _luma(good)[changed]).mean() > 0.95


def test_anomaly_brightness_shift_is_small_compared_with_natural_variation():
    good = draw_cells(100, anomalous=False, seed=31)
    bad = draw_cells(100, anomalous=True, seed=32)
    good_mean = _luma(good).reshape(100, -1).mean(axis=1)
    bad_mean = _luma(bad).reshape(100, -1).mean(axis=1)
    shift = good_mean.mean() - bad_mean.mean()
    assert shift > 0  # defects are dark
    assert shift < 0.5 * good_mean.std()


def test_anomalous_cells_have_dark_purple_pixels_that_good_cells_lack():
    good = draw_cells(60, anomalous=False, seed=41).astype(np.int16)
    bad = draw_cells(60, anomalous=True, seed=42).astype(np.int16)

    def dark_purple(images):
        r, g, b = images[..., 0], images[..., 1], images[..., 2]
        return ((r + g + b) / 3 < 110) & (b > g + 25)

    good_counts = dark_purple(good).reshape(60, -1).sum(axis=1)
    bad_counts = dark_purple(bad).reshape(60, -1).sum(axis=1)
    assert (good_counts == 0).mean() > 0.95
    assert (bad_counts >= 3).mean() > 0.95


# --- writing the demo dataset ---------------------------------------------------------------


EXPECTED_SPLITS = ["train", "calibrate_good", "calibrate_anomalous", "test_good", "test_anomalous"]


def _digest_tree(paths: dict) -> dict:
    return {
        (name, f.name): hashlib.sha256(f.read_bytes()).hexdigest()
        for name, folder in paths.items()
        for f in sorted(folder.iterdir())
    }


def test_write_demo_dataset_layout_and_counts(tmp_path):
    paths = write_demo_dataset(tmp_path / "demo", seed=3, size=32, n_train=7, n_calibrate=2, n_test=4)
    assert sorted(paths) == sorted(EXPECTED_SPLITS)
    expected = {"train": 7, "calibrate_good": 2, "calibrate_anomalous": 2, "test_good": 4, "test_anomalous": 4}
    for name, folder in paths.items():
        assert folder.is_dir()
        assert folder.parent == tmp_path / "demo"
        files = sorted(folder.iterdir())
        assert [f.name for f in files] == [f"cell_{i:05d}.png" for i in range(expected[name])]
        for f in files:
            with Image.open(f) as im:
                assert im.format == "PNG"
                assert im.mode == "RGB"
                assert im.size == (32, 32)


def test_write_demo_dataset_is_deterministic_and_seed_dependent(tmp_path):
    kwargs = dict(size=32, n_train=5, n_calibrate=2, n_test=3)
    first = _digest_tree(write_demo_dataset(tmp_path / "a", seed=1, **kwargs))
    second = _digest_tree(write_demo_dataset(tmp_path / "b", seed=1, **kwargs))
    other = _digest_tree(write_demo_dataset(tmp_path / "c", seed=2, **kwargs))
    assert first == second
    assert set(first.values()).isdisjoint(other.values())


def test_write_demo_dataset_replaces_leftovers_of_a_larger_run(tmp_path):
    write_demo_dataset(tmp_path, seed=0, size=32, n_train=6, n_calibrate=1, n_test=1)
    (tmp_path / "train" / "notes.txt").write_text("keep me")
    paths = write_demo_dataset(tmp_path, seed=0, size=32, n_train=3, n_calibrate=1, n_test=1)
    assert sorted(f.name for f in paths["train"].glob("*.png")) == [f"cell_{i:05d}.png" for i in range(3)]
    assert (tmp_path / "train" / "notes.txt").read_text() == "keep me"


def test_write_demo_dataset_splits_do_not_repeat_images(tmp_path):
    paths = write_demo_dataset(tmp_path, seed=0, size=32, n_train=20, n_calibrate=5, n_test=10)
    digests = list(_digest_tree(paths).values())
    assert len(digests) == 20 + 2 * 5 + 2 * 10
    assert len(set(digests)) == len(digests)
    # the PNG pixels round-trip exactly to what draw_cells produces for some seed
    with Image.open(paths["test_anomalous"] / "cell_00000.png") as im:
        pixels = np.asarray(im)
    assert pixels.dtype == np.uint8 and pixels.shape == (32, 32, 3)
    with Image.open(paths["test_good"] / "cell_00000.png") as im:
        good_first = np.asarray(im)
    assert not np.array_equal(pixels, good_first)


# --- cost --------------------------------------------------------------------------------------


def test_import_is_light():
    code = "import sys, aadetect.synthetic; print(sorted(m for m in ('torch', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- defect masks ----------------------------------------------------------------------


def test_the_masks_cover_exactly_where_the_defects_changed_the_good_twin():
    """An anomalous cell is its good twin (same seed) plus defects: the twins differ inside the mask only."""
    from aadetect.synthetic import draw_cells_and_masks

    anomalous, masks = draw_cells_and_masks(12, anomalous=True, size=48, seed=7)
    good, no_masks = draw_cells_and_masks(12, anomalous=False, size=48, seed=7)
    assert np.array_equal(anomalous, draw_cells(12, anomalous=True, size=48, seed=7)) and not no_masks.any()
    changed = (np.abs(anomalous.astype(int) - good.astype(int)) > 0.05 * 255 + 1).any(axis=-1)
    assert changed.any(axis=(1, 2)).all() and not (changed & ~masks).any()
    assert (0.002 < masks.mean(axis=(1, 2))).all() and (masks.mean(axis=(1, 2)) < 0.25).all()


def test_the_demo_writes_a_mask_for_each_anomalous_image(tmp_path):
    paths = write_demo_dataset(tmp_path / "demo", seed=3, size=32, n_train=2, n_calibrate=2, n_test=3)
    for split in ("calibrate_anomalous", "test_anomalous"):
        masks = tmp_path / "demo" / "masks" / split
        assert sorted(f.name for f in masks.iterdir()) == sorted(f.name for f in paths[split].iterdir())
        for mask in masks.iterdir():
            with Image.open(mask) as im:
                values = np.asarray(im)
            assert im.mode == "L" and im.size == (32, 32) and set(np.unique(values)) == {0, 255}
    assert not (tmp_path / "demo" / "masks" / "test_good").exists()
