"""Anomaly maps: where a defect is, heatmap files, the pixel AUROC against masks (tiny models, fixed seeds)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from conftest import invoke, jsonl, write_pngs
from PIL import Image

from aadetect.heatmaps import COLOUR_TABLE, MAP_RANGE, colour_indices
from aadetect.images import find_images, load_images
from aadetect.localisation import pixel_auroc
from aadetect.scoring import Detector, anomaly_maps

GRID_SIZE = 32  # the grid model's working size: a 4x4 grid of 8x8-pixel neighbourhoods
ORIGINAL = (48, 40)  # (width, height) of the files: not the model's size, and not square
SQUARE = 12  # side, in original pixels, of the defect planted in a good image


def textures(count: int, seed: int) -> np.ndarray:
    """Soft diagonal stripes of varied phase and contrast with a little noise, at the original size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:ORIGINAL[1], :ORIGINAL[0]]
    images = []
    for _ in range(count):
        phase, contrast = rng.uniform(0, 2 * np.pi), rng.uniform(40, 60)
        image = 110 + contrast * np.sin((x + y) / 3.0 + phase) + rng.normal(0, 3, size=x.shape)
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def planted(images: np.ndarray, seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The images with a bright square each, at a random place; the squares' top-left (x, y)."""
    rng = np.random.default_rng(seed)
    out, corners = images.copy(), []
    for image in out:
        left, top = int(rng.integers(0, ORIGINAL[0] - SQUARE)), int(rng.integers(0, ORIGINAL[1] - SQUARE))
        image[top:top + SQUARE, left:left + SQUARE] = 255
        corners.append((left, top))
    return out, corners


@pytest.fixture(scope="module")
def grid_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    good = textures(8, seed=12)
    defective, corners = planted(textures(8, seed=13), seed=14)
    masks = np.zeros_like(defective)
    for mask, (left, top) in zip(masks, corners):
        mask[top:top + SQUARE, left:left + SQUARE] = 255
    return {"train": write_pngs(root / "train", textures(96, seed=11)), "good": write_pngs(root / "good", good),
            "defective": write_pngs(root / "defective", defective), "masks": write_pngs(root / "masks", masks),
            "corners": corners}


@pytest.fixture(scope="module")
def grid_model(grid_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("grid-model") / "model"
    result = invoke("train", grid_data["train"], "--out", out, "--image-size", GRID_SIZE, "--code-grid", 4,
                    "--latent-dim", 8, "--epochs", 30, "--seed", 0, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    return out


def inside(row: dict, corner: tuple[int, int]) -> bool:
    left, top = corner
    return left <= row["peak_x"] < left + SQUARE and top <= row["peak_y"] < top + SQUARE


def test_a_planted_defect_holds_the_peak_of_a_grid_model(grid_model, grid_data):
    rows = jsonl(invoke("score", "--model", grid_model, "--format", "jsonl", grid_data["defective"]).stdout)
    assert len(rows) == 8
    assert all(inside(row, corner) for row, corner in zip(rows, grid_data["corners"])), \
        [(row["peak_x"], row["peak_y"], corner) for row, corner in zip(rows, grid_data["corners"])]
    assert all(row["anomaly"] for row in rows)
    assert all(row["heatmap"] is None for row in rows)  # none asked for


def test_a_planted_defect_holds_the_peak_of_a_one_code_model(grid_data, tmp_path):
    """With one code for the image, the density is drawn where the image is rebuilt worst."""
    out = tmp_path / "model"
    result = invoke("train", grid_data["train"], "--out", out, "--image-size", GRID_SIZE, "--code-grid", 1,
                    "--epochs", 30, "--seed", 0, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.stderr
    rows = jsonl(invoke("score", "--model", out, "--format", "jsonl", grid_data["defective"]).stdout)
    assert all(inside(row, corner) for row, corner in zip(rows, grid_data["corners"])), \
        [(row["peak_x"], row["peak_y"], corner) for row, corner in zip(rows, grid_data["corners"])]


def test_the_detector_returns_the_maps_that_score_draws(grid_model, grid_data):
    detector = Detector.load(grid_model, "cpu")
    refs = find_images(grid_data["defective"])
    pixels, _, _ = load_images(refs, detector.image_size, detector.channels)
    scores = detector.score(pixels, maps=True)
    maps, _ = anomaly_maps(scores, detector.thresholds)
    assert maps.shape == (8, GRID_SIZE, GRID_SIZE) and scores.density_map.shape == (8, 4, 4)
    # a flagged image's map crosses the threshold somewhere: its number pools its map's worst part
    assert all(maps[k].max() > 0 for k in np.flatnonzero(scores.anomaly))
    # the least likely neighbourhoods make the image's log-density (on a 4x4 grid: the lowest one)
    assert np.array_equal(scores.density_map.reshape(8, -1).min(1), scores.log_density)
    streamed = [row for _, row, _ in detector.score_images(refs, maps=True)]
    assert all(np.array_equal(row["anomaly_map"], maps[k]) for k, row in enumerate(streamed))
    assert [row["score"] for row in streamed] == scores.score.tolist()
    plain = detector.score(pixels)  # without maps: the same numbers, by the path calibration takes
    assert np.array_equal(plain.log_density, scores.log_density) and np.array_equal(plain.score, scores.score)


def test_heatmaps_are_the_original_size_deterministic_and_named_in_the_rows(grid_model, grid_data, tmp_path):
    written = {}
    for run in ("first", "second"):
        result = invoke("score", "--model", grid_model, "--format", "jsonl", "--heatmaps", tmp_path / run,
                        grid_data["defective"], grid_data["good"])
        assert result.exit_code == 1, result.stderr
        rows = jsonl(result.stdout)
        assert [os.path.dirname(row["heatmap"]) for row in rows] == [str(tmp_path / run)] * 16
        written[run] = {os.path.basename(row["heatmap"]): open(row["heatmap"], "rb").read() for row in rows}
    # both folders hold img_000.png etc.: the second of a name is told apart, not overwritten
    assert len(written["first"]) == 16 and "img_000~2.heatmap.png" in written["first"]
    assert written["first"] == written["second"]
    assert sorted(os.listdir(tmp_path / "first")) == sorted(written["first"])  # no temp files left
    with Image.open(tmp_path / "first" / "img_000.heatmap.png") as image:
        assert image.size == ORIGINAL and image.mode == "RGB"


def test_a_heatmap_replaces_the_old_file_whole_or_not_at_all(grid_model, grid_data, tmp_path, monkeypatch):
    folder = tmp_path / "maps"
    folder.mkdir()
    (folder / "img_000.heatmap.png").write_bytes(b"old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("aadetect.atomic.os.replace", fail)
    result = invoke("score", "--model", grid_model, "--heatmaps", folder, grid_data["defective"] / "img_000.png")
    assert result.exit_code == 2
    assert "img_000.heatmap.png: No space left on device" in result.stderr and "Traceback" not in result.stderr
    assert (folder / "img_000.heatmap.png").read_bytes() == b"old"
    assert os.listdir(folder) == ["img_000.heatmap.png"]


def test_the_threshold_is_a_step_of_the_colour_table():
    below, above = colour_indices(np.array([-1e-9, 0.0]))
    assert above == below + 1
    assert COLOUR_TABLE[below][3] < COLOUR_TABLE[above][3]  # more opaque from the threshold on
    assert tuple(COLOUR_TABLE[above][:3]) != tuple(COLOUR_TABLE[below][:3])
    assert colour_indices(np.array([MAP_RANGE[0] - 5, MAP_RANGE[1] + 5, np.nan])).tolist() == [0, 255, 0]


def test_evaluate_measures_the_maps_against_the_masks(grid_model, grid_data):
    result = invoke("evaluate", "--model", grid_model, "--good", grid_data["good"], "--anomalous",
                    grid_data["defective"], "--masks", grid_data["masks"], "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["masked_images"] == 8
    detector = Detector.load(grid_model, "cpu")
    good, defective = ([row for _, row, _ in detector.score_images(find_images(grid_data[name]), maps=True)]
                       for name in ("good", "defective"))
    masks = [np.asarray(Image.open(path)) > 127 for path in sorted(grid_data["masks"].iterdir())]
    expected = pixel_auroc([(row["anomaly_map"], row["image_size"]) for row in good],
                           [(row["anomaly_map"], mask) for row, mask in zip(defective, masks)])
    assert report["pixel_auroc"] == expected
    assert report["pixel_auroc"] > 0.85  # a bright square on stripes: far better than chance (0.5)


def test_evaluate_says_which_masks_are_missing(grid_model, grid_data, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "img_000.png").write_bytes((grid_data["masks"] / "img_000.png").read_bytes())
    result = invoke("evaluate", "--model", grid_model, "--good", grid_data["good"], "--anomalous",
                    grid_data["defective"], "--masks", masks, "--format", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["masked_images"] == 1
    assert "7 anomalous image(s) have no mask" in result.stderr
    result = invoke("evaluate", "--model", grid_model, "--good", grid_data["good"], "--anomalous",
                    grid_data["defective"], "--masks", tmp_path / "nowhere")
    assert result.exit_code == 2 and "holds no mask" in result.stderr
