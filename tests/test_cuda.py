"""The CUDA path end to end; skipped where no GPU exists (CI has none)."""

from __future__ import annotations

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
