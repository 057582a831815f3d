"""The CUDA path end to end; skipped where no GPU exists (CI has none)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

from conftest import SIZE, invoke, jsonl  # noqa: E402


def test_train_and_score_on_cuda_agree_with_cpu_scoring(dataset, tmp_path):
    out = tmp_path / "cuda-model"
    result = invoke("train", dataset["train"], "--out", out, "--epochs", "2", "--image-size", str(SIZE),
                    "--device", "cuda", "--quiet")
    assert result.exit_code == 0, result.stderr
    on_gpu = jsonl(invoke("score", "--model", out, "--device", "cuda", "--format", "jsonl",
                          dataset["anomalous"]).stdout)
    on_cpu = jsonl(invoke("score", "--model", out, "--device", "cpu", "--format", "jsonl",
                          dataset["anomalous"]).stdout)
    for gpu, cpu in zip(on_gpu, on_cpu, strict=True):
        assert gpu["reconstruction_error"] == pytest.approx(cpu["reconstruction_error"], rel=1e-3, abs=1e-6)
        assert gpu["log_density"] == pytest.approx(cpu["log_density"], rel=1e-3, abs=1e-3)


def test_same_seed_on_cuda_gives_the_same_model_and_scores(dataset, tmp_path):
    """The brief's promise on the GPU: same seed, data and device, same weights, same scores."""
    runs = []
    for name in ("first", "second"):
        out = tmp_path / name
        result = invoke("train", dataset["train"], "--out", out, "--epochs", "3", "--image-size", str(SIZE),
                        "--seed", "0", "--device", "cuda", "--quiet")
        assert result.exit_code == 0, result.stderr
        runs.append(out)
    weights = [torch.load(out / "weights.pt", map_location="cpu", weights_only=True) for out in runs]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    scored = [invoke("score", "--model", out, "--device", "cuda", "--format", "jsonl", dataset["anomalous"]).stdout
              for out in runs]
    assert scored[0] == scored[1]


def test_auto_device_trains_on_cuda_and_score_agrees_with_evaluate(dataset, tmp_path):
    from aadetect.card import ModelCard
    from aadetect.metrics import auroc

    out = tmp_path / "auto"
    result = invoke("train", dataset["train"], "--out", out, "--epochs", "2", "--image-size", str(SIZE), "--quiet")
    assert result.exit_code == 0, result.stderr
    assert ModelCard.from_yaml((out / "card.yaml").read_text()).training.device.startswith("cuda")
    scores = {label: jsonl(invoke("score", "--model", out, "--format", "jsonl", dataset[label]).stdout)
              for label in ("good", "anomalous")}
    report = json.loads(invoke("evaluate", "--model", out, "--good", dataset["good"], "--anomalous",
                               dataset["anomalous"], "--format", "json").stdout)
    column = lambda label: [row["score"] for row in scores[label]]  # noqa: E731
    assert report["auroc"]["combined"] == auroc(column("good"), column("anomalous"))
