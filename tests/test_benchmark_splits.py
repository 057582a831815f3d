"""The benchmark's IDX reader and split writer (no downloaded data needed)."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import benchmark_module

D = benchmark_module("datasets")

N_CLASSES = 3
N_TRAIN_PER_CLASS = 40
N_TEST_PER_CLASS = 7


def _raw_idx(arr: np.ndarray) -> bytes:
    # Written by hand here (not with the module's encoder) so the reader is
    # checked against the format, not against itself.
    assert arr.dtype == np.uint8
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _make_idx_folder(folder: Path, *, gz: bool, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    arrays = {}
    for part, n in (("train", N_TRAIN_PER_CLASS), ("t10k", N_TEST_PER_CLASS)):
        labels = np.repeat(np.arange(N_CLASSES, dtype=np.uint8), n)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        # make the class visible in the image, like real data would
        images[:, 0, 0] = labels * 50
        arrays[f"{part}-images-idx3-ubyte"] = images
        arrays[f"{part}-labels-idx1-ubyte"] = labels
    for stem, arr in arrays.items():
        data = _raw_idx(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.fixture
def tiny(tmp_path):
    arrays = _make_idx_folder(tmp_path / "tiny", gz=True)
    return D.load_idx_folder(tmp_path / "tiny", name="tiny"), arrays


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


# ------------------------------------------------------------------ IDX reader


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_round_trip(tmp_path, gz):
    arrays = _make_idx_folder(tmp_path / "d", gz=gz)
    ds = D.load_idx_folder(tmp_path / "d")
    np.testing.assert_array_equal(ds.train_images, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.train_labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.test_images, arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (N_CLASSES * N_TRAIN_PER_CLASS, 28, 28)
    assert ds.train_labels.shape == (N_CLASSES * N_TRAIN_PER_CLASS,)


@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_writer_reader_round_trip(tmp_path, name, dtype):
    arr = (np.arange(2 * 3 * 5) - 7).astype(dtype).reshape(2, 3, 5)
    D.write_idx(tmp_path / name, arr)
    back = D.read_idx(tmp_path / name)
    assert back.dtype == np.dtype(dtype) and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_gzip_detected_by_content_not_name(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "plain-name").write_bytes(gzip.compress(_raw_idx(arr)))
    np.testing.assert_array_equal(D.read_idx(tmp_path / "plain-name"), arr)


def test_bad_idx_rejected(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\0" * 8)
    with pytest.raises(ValueError):
        D.read_idx(tmp_path / "bad")
    arr = np.zeros((4, 4), dtype=np.uint8)
    (tmp_path / "short").write_bytes(_raw_idx(arr)[:-1])
    with pytest.raises(ValueError):
        D.read_idx(tmp_path / "short")


# ----------------------------------------------------------------- split writer


def test_oneclass_split_counts_and_content(tiny, tmp_path):
    ds, _ = tiny
    k = 1
    manifest = D.write_oneclass_split(ds, k, tmp_path / "s", seed=0, n_cal=10)
    root = tmp_path / "s"
    counts = {rel: len(_pngs(root / rel)) for rel in
              ("train/good", "calibrate/good", "calibrate/anomalous", "test/good", "test/anomalous")}
    assert counts == {
        "train/good": N_TRAIN_PER_CLASS - 10,
        "calibrate/good": 10,
        "calibrate/anomalous": 10,
        "test/good": N_TEST_PER_CLASS,
        "test/anomalous": (N_CLASSES - 1) * N_TEST_PER_CLASS,
    }
    assert manifest["counts"]["train/good"] == N_TRAIN_PER_CLASS - 10

    idx = manifest["indices"]
    # labels are right, calibration images are never trained on
    assert set(ds.train_labels[idx["train/good"]]) == {k}
    assert set(ds.train_labels[idx["calibrate/good"]]) == {k}
    assert k not in set(ds.train_labels[idx["calibrate/anomalous"]])
    assert not set(idx["train/good"]) & set(idx["calibrate/good"])
    assert set(ds.test_labels[idx["test/good"]]) == {k}
    assert k not in set(ds.test_labels[idx["test/anomalous"]])

    # the PNGs hold exactly the source pixels, and the names give no label away
    from PIL import Image

    for name, i in zip(_pngs(root / "train" / "good"), idx["train/good"]):
        assert name == f"train-{i:05d}.png"
        with Image.open(root / "train" / "good" / name) as im:
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), ds.train_images[i])
    images, names = D.read_png_folder(root / "test" / "anomalous")
    np.testing.assert_array_equal(images, ds.test_images[idx["test/anomalous"]])
    assert json.loads((root / "split.json").read_text())["complete"] is True


def test_split_writer_is_deterministic(tmp_path):
    _make_idx_folder(tmp_path / "a", gz=True)
    _make_idx_folder(tmp_path / "b", gz=False)
    ds_a = D.load_idx_folder(tmp_path / "a", name="tiny")
    ds_b = D.load_idx_folder(tmp_path / "b", name="tiny")
    D.write_oneclass_split(ds_a, 2, tmp_path / "run1", seed=7)
    D.write_oneclass_split(ds_b, 2, tmp_path / "run2", seed=7)
    t1, t2 = _tree(tmp_path / "run1"), _tree(tmp_path / "run2")
    assert len(t1) > 0
    assert t1 == t2  # same file list, byte-identical contents

    D.write_contamination_split(ds_a, 0, 2, 0.1, tmp_path / "c1", seed=3)
    D.write_contamination_split(ds_b, 0, 2, 0.1, tmp_path / "c2", seed=3)
    assert _tree(tmp_path / "c1") == _tree(tmp_path / "c2")

    # another seed selects other calibration images
    D.write_oneclass_split(ds_a, 2, tmp_path / "run3", seed=8)
    assert _pngs(tmp_path / "run3" / "calibrate" / "good") != _pngs(tmp_path / "run1" / "calibrate" / "good")


def test_existing_split_is_reused_and_rewritten_when_params_change(tiny, tmp_path):
    ds, _ = tiny
    D.write_oneclass_split(ds, 0, tmp_path / "s", seed=0)
    marker = tmp_path / "s" / "train" / "good" / "marker.txt"
    marker.write_text("kept")
    D.write_oneclass_split(ds, 0, tmp_path / "s", seed=0)
    assert marker.exists()  # same parameters: nothing rewritten
    D.write_oneclass_split(ds, 0, tmp_path / "s", seed=1)
    assert not marker.exists()  # other parameters: rewritten from scratch


def test_png_has_no_metadata():
    data = D.png_bytes(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) % 251)
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        chunks.append(data[pos + 4:pos + 8])
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.2])
def test_contamination_split_fraction(tmp_path, alpha):
    # big enough that the fraction can be hit closely
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 200)
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    ds = D.Dataset("tiny", images, labels, images[:30], labels[::20])
    manifest = D.write_contamination_split(ds, 0, 2, alpha, tmp_path / "c", seed=0, n_cal=10)
    root = tmp_path / "c"
    idx = manifest["indices"]

    n_train = len(_pngs(root / "train" / "good"))
    n_contam = int(np.sum(ds.train_labels[idx["train/good"]] == 2))
    assert n_contam == len(idx["train/contamination"])
    assert set(ds.train_labels[idx["train/good"]]) <= {0, 2}
    assert np.sum(ds.train_labels[idx["train/good"]] == 0) == 200 - 10
    assert n_train == 190 + n_contam
    assert abs(n_contam / n_train - alpha) <= 0.5 / n_train + 1e-12
    assert manifest["contamination_fraction"] == pytest.approx(n_contam / n_train)

    # calibration: 10 held-out normals + 10 anomaly-class images, none trained on
    assert len(_pngs(root / "calibrate" / "good")) == 10
    assert len(_pngs(root / "calibrate" / "anomalous")) == 10
    assert set(ds.train_labels[idx["calibrate/anomalous"]]) == {2}
    trained = set(idx["train/good"])
    assert not trained & set(idx["calibrate/good"])
    assert not trained & set(idx["calibrate/anomalous"])
    # test: normal class vs the anomaly class only
    assert set(ds.test_labels[idx["test/good"]]) == {0}
    assert set(ds.test_labels[idx["test/anomalous"]]) == {2}


def test_contamination_nested_across_alpha(tiny):
    ds, _ = tiny
    small = D.contamination_selection(ds, 0, 2, 0.1, seed=0, n_cal=5)
    big = D.contamination_selection(ds, 0, 2, 0.3, seed=0, n_cal=5)
    assert set(small["train_contamination"]) < set(big["train_contamination"])
    np.testing.assert_array_equal(small["cal_good"], big["cal_good"])
    np.testing.assert_array_equal(small["cal_anomalous"], big["cal_anomalous"])


# ------------------------------------------------------- harness metric helpers


def test_auroc_mann_whitney():
    O = benchmark_module("oneclass")
    assert O.auroc([0, 1, 2], [3, 4]) == 1.0
    assert O.auroc([3, 4], [0, 1, 2]) == 0.0
    assert O.auroc([1, 1], [1, 1]) == 0.5  # ties count one half
    # brute force over all pairs
    rng = np.random.default_rng(0)
    g, a = rng.integers(0, 5, 30), rng.integers(1, 6, 20)
    pairs = (a[:, None] > g[None, :]).mean() + 0.5 * (a[:, None] == g[None, :]).mean()
    assert O.auroc(g, a) == pytest.approx(pairs)
    assert O.auroc([0.0, 1.0], [np.inf, 2.0]) == 1.0  # infinite scores are extreme, not errors


def test_calibrated_threshold():
    O = benchmark_module("oneclass")
    thr = O.calibrate_threshold([0, 1, 2], [10, 11, 12])
    assert thr == pytest.approx(6.0)  # middle of the gap
    assert O.balanced_accuracy([0, 1, 2], [10, 11, 12], thr) == 1.0
    thr = O.calibrate_threshold([0, 1, 5], [4, 6, 7])
    assert O.balanced_accuracy([0, 1, 5], [4, 6, 7], thr) == pytest.approx(5 / 6)
