"""Data-parallel training: `torchrun --nproc_per_node=2 -m aadetect train` on the CPU (gloo), and the
gathering behind the robust rule, checked against one process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

from conftest import SIZE, TRAIN_ARGS, blob_images, jsonl, write_pngs

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

# the tests' usual settings, with progress on (only rank 0 may show it) and epochs enough to stop a run
# between its first checkpoint and its end
ARGS = (*(a for a in TRAIN_ARGS[2:] if a != "--quiet"), "--epochs", "6")


def torchrun(*args, processes: int = 2, wait: bool = True):
    """`torchrun --standalone -m aadetect ARGS` with this Python's torch, on the loopback interface."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "aadetect", *map(str, args)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aadetect", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp-data")
    hidden = blob_images(4, seed=5, anomalous=True)  # hidden in the training folder: robust training finds them
    return {"train": write_pngs(root / "train", np.concatenate([blob_images(76, seed=1), hidden])),
            "anomalous": write_pngs(root / "anomalous", blob_images(12, seed=3, anomalous=True))}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp-models") / "model"
    return out, torchrun("train", data["train"], "--out", out, *ARGS, "--list-rejected")


def test_two_processes_train_one_model_that_rank_zero_writes(trained, data):
    out, result = trained
    assert result.returncode == 0, result.stderr
    card = yaml.safe_load((out / "card.yaml").read_text())
    assert card["training"]["world_size"] == 2
    # the ranks' weights were compared before rank 0 wrote them (distributed.check_same_weights): it wrote
    rejected = result.stdout.split()  # --list-rejected, printed once: by rank 0
    assert sorted(Path(name).name for name in rejected) == [f"img_{i:03d}.png" for i in range(76, 80)]
    assert result.stderr.count("model written to") == 1  # the other rank reports nothing
    assert sorted(path.name for path in out.parent.iterdir()) == ["model"]  # no lock or checkpoint left
    scored = run_cli("score", "--model", out, "--format", "jsonl", data["anomalous"])
    assert scored.returncode == 1, scored.stderr  # anomalies found
    assert sum(row["anomaly"] for row in jsonl(scored.stdout)) >= 10


def test_one_process_under_torchrun_trains_the_plain_model(dataset, model_dir, tmp_path):
    result = torchrun("train", dataset["train"], "--out", tmp_path / "model", *TRAIN_ARGS, processes=1)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load((tmp_path / "model" / "card.yaml").read_text())["training"]["world_size"] == 1
    for name in ("weights.pt", "density.npz", "held_out.npz"):  # bit for bit: the split, losses and rule reduce
        assert (tmp_path / "model" / name).read_bytes() == (model_dir / name).read_bytes()


def test_resume_under_torchrun_matches_an_uninterrupted_run(trained, data, tmp_path):
    straight, _ = trained
    resumed, checkpoint = tmp_path / "resumed", tmp_path / "resumed.checkpoint.pt"
    process = torchrun("train", data["train"], "--out", resumed, *ARGS, wait=False)
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # torchrun stops its workers
    process.wait(timeout=60)
    assert checkpoint.exists() and not resumed.exists(), "stopped too late to test a resume"
    result = torchrun("train", data["train"], "--out", resumed, *ARGS, "--resume")
    assert result.returncode == 0, result.stderr
    assert not checkpoint.exists()
    first, second = (torch.load(model / "weights.pt", weights_only=True) for model in (straight, resumed))
    assert all(torch.equal(first[name], second[name]) for name in first)


# ------------------------------------------------------------------ the robust rule over two processes

def shared_numbers(count: int = 83, dim: int = 6):
    """Codes and errors of `count` images, a few far out, and the images kept so far."""
    generator = torch.Generator().manual_seed(7)
    codes = torch.randn(count, dim, generator=generator)
    errors = torch.rand(count, generator=generator) * 0.01 + 0.01
    codes[[3, 40, 41]] += 12.0
    errors[[10, 77]] *= 30
    kept = torch.ones(count, dtype=torch.bool)
    kept[[3, 10]] = False
    return codes, errors, kept


def tiny_model():
    from aadetect.config import Architecture
    from aadetect.model import AdversarialAutoencoder

    torch.manual_seed(0)
    return AdversarialAutoencoder(Architecture.for_images(SIZE, 1, 4, 0, 1)).eval()


def one_rank(rank: int, size: int, port: int, out: str) -> None:
    """One of two processes: gather, judge, average and compare, as training does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    from aadetect import distributed
    from aadetect.config import Architecture
    from aadetect.training import encode_shared, find_outliers, judge_outliers

    codes, errors, kept = shared_numbers()
    share = distributed.share(len(codes))
    gathered = distributed.gather_rows(codes[share], len(codes)), distributed.gather_rows(errors[share], len(codes))
    judged = judge_outliers(*gathered, kept, 3.0, Architecture.for_images(SIZE, 1, 6, 0, 1))
    model = tiny_model()
    images = torch.from_numpy(np.concatenate([blob_images(60, seed=1), blob_images(3, seed=4, anomalous=True)]))
    encoded = encode_shared(model, images[:, None], "cpu", "mse")
    found = find_outliers(model, images[:, None], "cpu", "mse", 3.0, torch.ones(len(images), dtype=torch.bool))
    batch_norm = model.encoder.features[1]
    batch_norm.running_mean.fill_(float(rank))
    distributed.average_batch_norm(model)
    distributed.check_same_weights(model)  # the same now: passes
    with torch.no_grad():
        model.decoder.features[0].weight[0, 0, 0, 0] += rank  # one weight differs on rank 1
    try:
        distributed.check_same_weights(model)
        caught = None
    except RuntimeError as error:
        caught = str(error)
    torch.save({"gathered": gathered, "judged": judged, "encoded": encoded, "found": found,
                "running_mean": batch_norm.running_mean.clone(), "caught": caught}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_gathered_rule_is_the_one_process_rule_on_all_images(tmp_path):
    from aadetect.config import Architecture
    from aadetect.training import encode_all, find_outliers, judge_outliers

    torch.multiprocessing.spawn(one_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]

    codes, errors, kept = shared_numbers()
    alone = judge_outliers(codes, errors, kept, 3.0, Architecture.for_images(SIZE, 1, 6, 0, 1))
    assert alone[[40, 41, 77]].all()  # something to find (3 and 10 were already left out of the neighbours)
    images = torch.from_numpy(np.concatenate([blob_images(60, seed=1), blob_images(3, seed=4, anomalous=True)]))
    model = tiny_model()
    found = find_outliers(model, images[:, None], "cpu", "mse", 3.0, torch.ones(len(images), dtype=torch.bool))
    encoded = encode_all(model, images[:, None], "cpu", "mse")
    for rank in ranks:
        assert torch.equal(rank["gathered"][0], codes) and torch.equal(rank["gathered"][1], errors)  # in order
        assert torch.equal(rank["judged"], alone)
        assert torch.equal(rank["found"], found)
        for shared, single in zip(rank["encoded"], encoded):
            torch.testing.assert_close(shared, single)
        assert torch.equal(rank["running_mean"], torch.full_like(rank["running_mean"], 0.5))
        assert rank["caught"] is not None and "different weights" in rank["caught"]
