"""The offline study harness gives the numbers the real CLI gives for the same split and settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SIZE, TRAIN_ARGS, benchmark_module, blob_images, invoke, write_pngs

study = benchmark_module("study")


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("splits") / "blobs-s0"
    # 6 negatives hidden among the good blobs, and negatives labelled anomalous: calibration leaves some out
    write_pngs(root / "train" / "good", np.concatenate([blob_images(120, seed=11), 255 - blob_images(6, seed=16)]))
    write_pngs(root / "calibrate" / "good", blob_images(10, seed=12))
    write_pngs(root / "calibrate" / "anomalous", 255 - blob_images(10, seed=13))
    write_pngs(root / "test" / "good", blob_images(30, seed=14))
    write_pngs(root / "test" / "anomalous", blob_images(30, seed=15, anomalous=True))
    return root


def test_study_numbers_are_the_clis(split, tmp_path):
    results = tmp_path / "results"
    assert study.main(["--results", str(results), "measure", "--variant", "base", "--splits", str(split),
                       "--set", f"epochs=3,image_size={SIZE},latent_dim=4,robust=False"]) == 0
    studied = study.evaluate(study.load(results, "base", split.name))
    saved = np.load(results / "base" / f"{split.name}.npz")
    assert len(saved["lookalikes"]) > 0 and "test_good_anomaly_log_odds" in saved and "held_out_log_density" in saved

    model = tmp_path / "model"
    assert invoke("train", split / "train" / "good", "--out", model, "--latent-dim", "4", "--no-robust",
                  *TRAIN_ARGS).exit_code == 0
    assert invoke("calibrate", "--model", model, "--good", split / "calibrate" / "good",
                  "--anomalous", split / "calibrate" / "anomalous").exit_code == 0
    evaluated = json.loads(invoke("evaluate", "--model", model, "--good", split / "test" / "good",
                                  "--anomalous", split / "test" / "anomalous", "--format", "json").stdout)

    for signal in ("combined", "density", "reconstruction"):
        assert studied[signal] == evaluated["auroc"][signal]
    assert "lookalike" in evaluated["auroc"]
    assert studied["balanced_accuracy"] == evaluated["balanced_accuracy"]
    assert 0.5 < studied["combined"] <= 1.0


def test_an_ensemble_averages_its_members_numbers(split, tmp_path):
    results = tmp_path / "results"
    for variant, setting in (("a", "seed=0"), ("b", "seed=0,adversarial=true")):
        study.main(["--results", str(results), "measure", "--variant", variant, "--splits", str(split),
                    "--set", f"epochs=2,image_size={SIZE},{setting}"])
    first, second, both = (study.load(results, name, split.name) for name in ("a", "b", "a+b"))
    for name in study.SETS:
        assert both[name].log_density == pytest.approx((first[name].log_density + second[name].log_density) / 2)
        assert both[name].reconstruction_error == pytest.approx(
            (first[name].reconstruction_error * second[name].reconstruction_error) ** 0.5)
    assert study.load(results, "a+missing", split.name) is None
