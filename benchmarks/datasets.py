"""Benchmark data: IDX reading and deterministic PNG split folders.

The splits are written the way a user would have them on disk: folders of
PNG images, one image per file, no labels in the file names. A small
``split.json`` next to the folders records which source images went where
(indices into the official train/test sets and their labels), so results can
be traced back; the detector under test is only ever given the image folders.

Layout of one split::

    SPLIT/train/good/          training images of the normal class (minus calibration)
                               (+ contaminating images for the contamination protocol)
    SPLIT/calibrate/good/      n_cal normal training images not trained on
    SPLIT/calibrate/anomalous/ n_cal anomalous training images not trained on
    SPLIT/test/good/           official test images of the normal class
    SPLIT/test/anomalous/      official test images of the anomalous class(es)
    SPLIT/split.json           manifest (parameters, indices, labels, counts)

Everything is selected with a seeded ``numpy.random.Generator`` and written
with Pillow without metadata, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Version of the split layout/selection; bump when the selection rule changes
#: so that cached split folders are rewritten.
SPLIT_FORMAT = 1

IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

DATASETS = ("mnist", "fashion")

CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}

# IDX type codes -> numpy big-endian dtypes
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


# --------------------------------------------------------------------- IDX I/O


def _read_maybe_gzip(path: Path) -> bytes:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        return gzip.decompress(raw)
    return raw


def parse_idx(data: bytes) -> np.ndarray:
    """Parse the bytes of an IDX file into a numpy array (native byte order)."""
    if len(data) < 4:
        raise ValueError("not an IDX file: shorter than its 4-byte magic")
    zero1, zero2, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero1 != 0 or zero2 != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"not an IDX file: bad magic {data[:4].hex()}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError("truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[type_code]
    count = int(np.prod(shape, dtype=np.int64))
    expected = header + count * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"IDX size mismatch: {len(data)} bytes, expected {expected} for shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gzipped or not, into a numpy array."""
    return parse_idx(_read_maybe_gzip(Path(path)))


def encode_idx(arr: np.ndarray) -> bytes:
    """Encode a numpy array as IDX bytes (inverse of :func:`parse_idx`)."""
    arr = np.asarray(arr)
    key = (arr.dtype.kind, arr.dtype.itemsize)
    codes = {(dt.kind, dt.itemsize): code for code, dt in _IDX_DTYPES.items()}
    if key not in codes:
        raise ValueError(f"dtype {arr.dtype} has no IDX type code")
    code = codes[key]
    dt = _IDX_DTYPES[code]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dt.newbyteorder(">"), copy=False).tobytes()


def write_idx(path: str | os.PathLike, arr: np.ndarray, *, compress: bool | None = None) -> None:
    """Write an IDX file; gzipped when ``compress`` (default: path ends in .gz)."""
    path = Path(path)
    data = encode_idx(arr)
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{stem}(.gz) not found in {folder}; run benchmarks/fetch_data.sh first"
    )


@dataclass
class Dataset:
    """A train/test image classification set: uint8 images (N,28,28), labels (N,)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    def __post_init__(self) -> None:
        for part in ("train", "test"):
            x = getattr(self, f"{part}_images")
            y = getattr(self, f"{part}_labels")
            if x.dtype != np.uint8 or x.ndim != 3:
                raise ValueError(f"{part} images must be uint8 (N,H,W), got {x.dtype} {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise ValueError(f"{part} labels must be (N,) matching images, got {y.shape}")


def load_idx_folder(folder: str | os.PathLike, name: str = "") -> Dataset:
    """Load the four standard IDX files (gzipped or not) from ``folder``."""
    folder = Path(folder)
    parts = {key: read_idx(_find_idx(folder, stem)) for key, stem in IDX_STEMS.items()}
    return Dataset(
        name=name or folder.name,
        train_images=parts["train_images"].astype(np.uint8, copy=False),
        train_labels=parts["train_labels"].astype(np.int64),
        test_images=parts["test_images"].astype(np.uint8, copy=False),
        test_labels=parts["test_labels"].astype(np.int64),
    )


def load_dataset(name: str, cache: str | os.PathLike) -> Dataset:
    """Load ``mnist`` or ``fashion`` from the cache written by fetch_data.sh."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    return load_idx_folder(Path(cache) / name, name=name)


# ------------------------------------------------------------------ PNG output


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a 2-D uint8 array as a grayscale PNG with no metadata chunks."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    buf = io.BytesIO()
    # No pnginfo, no optimize: Pillow then writes only IHDR/IDAT/IEND, and zlib
    # at a fixed level is deterministic.
    Image.fromarray(image, mode="L").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_pngs(folder: Path, images: np.ndarray, indices: np.ndarray, prefix: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for idx in indices:
        name = f"{prefix}{int(idx):05d}.png"
        (folder / name).write_bytes(png_bytes(images[int(idx)]))
        names.append(name)
    return names


def _sorted(a) -> np.ndarray:
    return np.sort(np.asarray(a, dtype=np.int64))


def _class_indices(labels: np.ndarray, classes) -> np.ndarray:
    return np.flatnonzero(np.isin(labels, np.asarray(list(classes))))


# ---------------------------------------------------------------- selection


def oneclass_selection(ds: Dataset, normal_class: int, *, seed: int = 0, n_cal: int = 10) -> dict:
    """Indices for the one-vs-rest split of ``normal_class``.

    train/good: all training images of the class except ``n_cal`` calibration ones;
    calibrate: ``n_cal`` of those held-out class images + ``n_cal`` training images
    of other classes (uniformly at random); test: the official test set.
    """
    rng = np.random.default_rng([seed, SPLIT_FORMAT, 0, int(normal_class)])
    normal = np.flatnonzero(ds.train_labels == normal_class)
    other = np.flatnonzero(ds.train_labels != normal_class)
    if len(normal) <= n_cal or len(other) < n_cal:
        raise ValueError(f"class {normal_class}: not enough training images for {n_cal} calibration images")
    perm = rng.permutation(normal)
    cal_good = perm[:n_cal]
    train_good = perm[n_cal:]
    cal_anom = rng.choice(other, size=n_cal, replace=False)
    return {
        "train_good": _sorted(train_good),
        "train_contamination": _sorted([]),
        "cal_good": _sorted(cal_good),
        "cal_anomalous": _sorted(cal_anom),
        "test_good": np.flatnonzero(ds.test_labels == normal_class),
        "test_anomalous": np.flatnonzero(ds.test_labels != normal_class),
    }


def contamination_count(n_normal: int, alpha: float) -> int:
    """Number m of contaminating images so that m / (n_normal + m) ~= alpha."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    return int(round(alpha * n_normal / (1.0 - alpha)))


def contamination_selection(
    ds: Dataset,
    normal_class: int,
    anomaly_class: int,
    alpha: float,
    *,
    seed: int = 0,
    n_cal: int = 10,
) -> dict:
    """Indices for the contamination protocol (after Beggel et al., ECML-PKDD 2019).

    train/good: all training images of ``normal_class`` except ``n_cal`` calibration
    ones, plus m training images of ``anomaly_class`` with m/(n+m) = alpha;
    calibrate: ``n_cal`` held-out normal + ``n_cal`` anomaly-class training images
    that are not in train/good; test: official test images of the two classes.

    The random order does not depend on alpha: the calibration images are the same
    for every alpha, and the contamination for a smaller alpha is a subset of the
    contamination for a larger one.
    """
    if normal_class == anomaly_class:
        raise ValueError("normal and anomaly class must differ")
    rng = np.random.default_rng([seed, SPLIT_FORMAT, 1, int(normal_class), int(anomaly_class)])
    normal = rng.permutation(np.flatnonzero(ds.train_labels == normal_class))
    anom = rng.permutation(np.flatnonzero(ds.train_labels == anomaly_class))
    cal_good, train_good = normal[:n_cal], normal[n_cal:]
    m = contamination_count(len(train_good), alpha)
    if len(anom) < n_cal + m:
        raise ValueError(f"not enough class-{anomaly_class} images for alpha={alpha}")
    cal_anom, contamination = anom[:n_cal], anom[n_cal:n_cal + m]
    return {
        "train_good": _sorted(train_good),
        "train_contamination": _sorted(contamination),
        "cal_good": _sorted(cal_good),
        "cal_anomalous": _sorted(cal_anom),
        "test_good": np.flatnonzero(ds.test_labels == normal_class),
        "test_anomalous": np.flatnonzero(ds.test_labels == anomaly_class),
    }


# ------------------------------------------------------------------ writing


def _write_split(ds: Dataset, sel: dict, out_dir: Path, params: dict, *, overwrite: bool) -> dict:
    out_dir = Path(out_dir)
    manifest_path = out_dir / "split.json"
    if manifest_path.is_file() and not overwrite:
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and old.get("params") == params and old.get("complete"):
            return old
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)

    # Training folder: normal and contaminating images side by side, named by
    # their index in the official training set so nothing gives the label away.
    train_idx = np.sort(np.concatenate([sel["train_good"], sel["train_contamination"]]))
    _write_pngs(tmp / "train" / "good", ds.train_images, train_idx, "train-")
    _write_pngs(tmp / "calibrate" / "good", ds.train_images, sel["cal_good"], "train-")
    _write_pngs(tmp / "calibrate" / "anomalous", ds.train_images, sel["cal_anomalous"], "train-")
    _write_pngs(tmp / "test" / "good", ds.test_images, sel["test_good"], "test-")
    _write_pngs(tmp / "test" / "anomalous", ds.test_images, sel["test_anomalous"], "test-")

    n_train = len(train_idx)
    manifest = {
        "format": SPLIT_FORMAT,
        "params": params,
        "counts": {
            "train/good": n_train,
            "train/good (contamination)": int(len(sel["train_contamination"])),
            "calibrate/good": int(len(sel["cal_good"])),
            "calibrate/anomalous": int(len(sel["cal_anomalous"])),
            "test/good": int(len(sel["test_good"])),
            "test/anomalous": int(len(sel["test_anomalous"])),
        },
        "contamination_fraction": (len(sel["train_contamination"]) / n_train) if n_train else 0.0,
        "indices": {
            "train/good": train_idx.tolist(),
            "train/contamination": sel["train_contamination"].tolist(),
            "calibrate/good": sel["cal_good"].tolist(),
            "calibrate/anomalous": sel["cal_anomalous"].tolist(),
            "test/good": sel["test_good"].tolist(),
            "test/anomalous": sel["test_anomalous"].tolist(),
        },
        "labels": {
            "calibrate/anomalous": ds.train_labels[sel["cal_anomalous"]].tolist(),
            "test/anomalous": ds.test_labels[sel["test_anomalous"]].tolist(),
        },
        "complete": True,
    }
    (tmp / "split.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.rename(out_dir)
    return manifest


def write_oneclass_split(
    ds: Dataset,
    normal_class: int,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_cal: int = 10,
    overwrite: bool = False,
) -> dict:
    """Write the one-vs-rest split for ``normal_class``; returns the manifest.

    An existing complete split with the same parameters is reused unless
    ``overwrite``.
    """
    params = {
        "protocol": "oneclass", "dataset": ds.name, "normal_class": int(normal_class),
        "seed": int(seed), "n_cal": int(n_cal), "format": SPLIT_FORMAT,
        "n_train_total": int(len(ds.train_labels)), "n_test_total": int(len(ds.test_labels)),
    }
    sel = oneclass_selection(ds, normal_class, seed=seed, n_cal=n_cal)
    return _write_split(ds, sel, Path(out_dir), params, overwrite=overwrite)


def write_contamination_split(
    ds: Dataset,
    normal_class: int,
    anomaly_class: int,
    alpha: float,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_cal: int = 10,
    overwrite: bool = False,
) -> dict:
    """Write the contamination-protocol split; returns the manifest."""
    params = {
        "protocol": "contamination", "dataset": ds.name, "normal_class": int(normal_class),
        "anomaly_class": int(anomaly_class), "alpha": float(alpha), "seed": int(seed),
        "n_cal": int(n_cal), "format": SPLIT_FORMAT,
        "n_train_total": int(len(ds.train_labels)), "n_test_total": int(len(ds.test_labels)),
    }
    sel = contamination_selection(ds, normal_class, anomaly_class, alpha, seed=seed, n_cal=n_cal)
    return _write_split(ds, sel, Path(out_dir), params, overwrite=overwrite)


def oneclass_split_name(dataset: str, normal_class: int, seed: int = 0) -> str:
    return f"{dataset}-oneclass-c{int(normal_class)}-s{int(seed)}"


def contamination_split_name(dataset: str, normal_class: int, anomaly_class: int, alpha: float, seed: int = 0) -> str:
    return f"{dataset}-contam-c{int(normal_class)}v{int(anomaly_class)}-a{alpha:g}-s{int(seed)}"


# ------------------------------------------------------------- reading back


def read_png_folder(folder: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """Read all PNGs of a folder (sorted by name) into a uint8 array (N,H,W)."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not names:
        raise FileNotFoundError(f"no PNG files in {folder}")
    images = []
    for name in names:
        with Image.open(folder / name) as im:
            images.append(np.asarray(im.convert("L"), dtype=np.uint8))
    return np.stack(images), names
