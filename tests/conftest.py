"""Tiny real data sets and models shared by the tests (16 px images, 2-3 epochs, fixed seeds)."""

from __future__ import annotations

import os

# Tests run many small models side by side; one intra-op thread each avoids OpenMP threads
# spinning against each other on small CI machines (subprocesses inherit this too).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from aadetect.cli import app  # noqa: E402

SIZE = 16
REPO = Path(__file__).resolve().parents[1]


def benchmark_module(name: str):
    """benchmarks/NAME.py, imported by path: benchmarks/ is not part of the installed package, and the tests
    must not depend on the working directory."""
    key = f"_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def blob_images(count: int, seed: int, anomalous: bool = False) -> np.ndarray:
    """Soft round blobs of varied position and width; anomalies carry a bright 4x4 square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:SIZE, :SIZE]
    images = []
    for _ in range(count):
        cy, cx = rng.uniform(6, 10, size=2)
        width = rng.uniform(2.5, 4.0)
        image = 40 + 150 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * width ** 2))
        image += rng.normal(0, 4, size=image.shape)
        if anomalous:
            top, left = rng.integers(0, SIZE - 4, size=2)
            image[top:top + 4, left:left + 4] = 255
        images.append(np.clip(image, 0, 255).astype(np.uint8))
    return np.stack(images)


def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img_{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_pngs(root / "train", blob_images(120, seed=1)),
        "good": write_pngs(root / "good", blob_images(12, seed=2)),
        "anomalous": write_pngs(root / "anomalous", blob_images(12, seed=3, anomalous=True)),
    }


def invoke(*args: str, input: str | bytes | None = None):
    """Run the CLI in-process; stdout and stderr kept apart as a shell would."""
    runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


TRAIN_ARGS = ("--epochs", "3", "--image-size", str(SIZE), "--seed", "0", "--device", "cpu", "--quiet")


@pytest.fixture(scope="session")
def model_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "model"
    result = invoke("train", dataset["train"], "--out", out, *TRAIN_ARGS)
    assert result.exit_code == 0, result.stderr
    return out


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.split("\n") if line.strip()]  # JSON may hold U+2028
