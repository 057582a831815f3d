"""Bad input, damaged models, interrupted work and concurrent use, tried for real."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from aadetect.card import ModelCard
from aadetect.store import sha256_file
from conftest import SIZE, TRAIN_ARGS, blob_images, invoke, jsonl, write_pngs


def run_cli(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aadetect", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def copy_model(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def edit_card(model: Path, change) -> None:
    card = yaml.safe_load((model / "card.yaml").read_text())
    change(card)
    (model / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aadetect: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- training input -------------------------------------------------------------------------------------------

def test_train_skips_unreadable_files_and_names_them(tmp_path):
    folder = write_pngs(tmp_path / "data", blob_images(40, seed=4))
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not a jpeg")
    result = invoke("train", folder, "--out", tmp_path / "m", *TRAIN_ARGS[:-1])
    assert result.exit_code == 0
    assert "zero.png" in result.stderr and "text.jpg" in result.stderr and "skipped 2" in result.stderr
    card = ModelCard.from_yaml((tmp_path / "m" / "card.yaml").read_text())
    assert card.data.image_count == 40 and len(card.data.skipped) == 2

    strict = invoke("train", folder, "--out", tmp_path / "strict", "--strict", *TRAIN_ARGS)
    assert_one_line_error(strict, "--strict")
    assert not (tmp_path / "strict").exists()


def test_train_with_no_usable_images(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_text("junk")
    assert_one_line_error(invoke("train", folder, "--out", tmp_path / "m", *TRAIN_ARGS), "none of the 3 images")


def test_options_checked_before_any_work(dataset, model_dir):
    assert_one_line_error(invoke("calibrate", "--model", model_dir, "--good", dataset["good"],
                                 "--target-fpr", "1.5"), "--target-fpr")
    assert_one_line_error(invoke("score", "--model", model_dir, "--device", "cuda:3", dataset["good"]), "cuda")


def test_options_that_cannot_work_are_refused_before_training(dataset, tmp_path):
    few = write_pngs(tmp_path / "few", blob_images(20, seed=4))  # 15 for training, 5 held out
    assert_one_line_error(invoke("train", few, "--out", tmp_path / "m", *TRAIN_ARGS, "--latent-dim", "15"),
                          "too few for 15-dimensional codes", "--latent-dim")
    assert_one_line_error(invoke("train", few, "--out", tmp_path / "m", *TRAIN_ARGS, "--seed", str(2 ** 70)),
                          "--seed")
    assert_one_line_error(invoke("demo", "--out", tmp_path / "demo", "--seed", "-1"), "--seed")
    assert_one_line_error(invoke("demo", "--out", tmp_path / "demo", "--epochs", "-1"), "--epochs")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_one_line_error(invoke("train", few, "--out", blocker / "m", *TRAIN_ARGS), str(blocker / "m"),
                          "cannot write there")
    assert not (tmp_path / "m").exists() and not (tmp_path / "demo").exists()
    assert invoke("train", few, "--out", tmp_path / "m", *TRAIN_ARGS, "--latent-dim", "14").exit_code == 0


def test_too_few_images_left_after_robust_training_is_one_line_and_leaves_nothing(tmp_path):
    good = blob_images(30, seed=4)
    stripes = np.full((4, *good.shape[1:]), 255, np.uint8)
    stripes[:, :, ::2] = 0  # unlike any blob: robust training leaves these (and a few blobs) out
    folder = write_pngs(tmp_path / "mixed", np.concatenate([good, stripes]))
    args = [*TRAIN_ARGS, "--epochs", "6", "--latent-dim", "26"]  # 29 train: enough before rejection, not after
    assert_one_line_error(invoke("train", folder, "--out", tmp_path / "m", *args),
                          "robust training left out", "too few for 26-dimensional codes", "--no-robust")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mixed"]  # no model, no checkpoint
    assert invoke("train", folder, "--out", tmp_path / "m", *args, "--latent-dim", "16").exit_code == 0  # as advised


def test_model_files_get_the_usual_permissions(dataset, model_dir, tmp_path):
    """mkstemp and mkdtemp make private files; a model is meant to be read by other users and CI jobs."""
    previous = os.umask(0o022)
    try:
        out = tmp_path / "m"
        assert invoke("train", dataset["train"], "--out", out, *TRAIN_ARGS).exit_code == 0
        assert out.stat().st_mode & 0o777 == 0o755
        assert {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()} == dict.fromkeys(
            ("card.yaml", "weights.pt", "density.npz", "validation.txt", "rejected.txt", "density_images.txt",
             "held_out.npz"), 0o644)
        (out / "card.yaml").chmod(0o664)
        assert invoke("calibrate", "--model", out, "--good", dataset["good"], "--anomalous", dataset["anomalous"],
                      "--quiet").exit_code == 0
        assert (out / "card.yaml").stat().st_mode & 0o777 == 0o664  # a rewritten card keeps its mode
        (anomalies,) = out.glob("anomalies-*.npy")
        for written in ("lookalikes.txt", anomalies.name):
            assert (out / written).stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(previous)


def test_training_through_a_link_keeps_the_link(dataset, model_dir, tmp_path):
    real = copy_model(model_dir, tmp_path)
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    before = sha256_file(real / "card.yaml")
    assert invoke("train", dataset["train"], "--out", link, *TRAIN_ARGS, "--seed", "1").exit_code == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sha256_file(real / "card.yaml") != before  # the new model is where the link points
    assert sorted(path.name for path in tmp_path.iterdir()) == ["current", "model"]  # nothing left beside


def test_training_names_that_are_not_utf8_are_listed_as_their_bytes(tmp_path):
    folder = write_pngs(tmp_path / "data", blob_images(40, seed=4))
    for path in folder.iterdir():  # Linux allows any bytes but / and NUL in a name
        path.rename(folder / os.fsdecode(b"\xff" + os.fsencode(path.name)))
    result = invoke("train", folder, "--out", tmp_path / "m", *TRAIN_ARGS)
    assert result.exit_code == 0, result.stderr
    card = ModelCard.from_yaml((tmp_path / "m" / "card.yaml").read_text())
    held_out = (tmp_path / "m" / "validation.txt").read_bytes().splitlines()
    assert len(held_out) == card.data.validation_count > 0
    assert all(Path(os.fsdecode(line)).is_file() and b"\xff" in line for line in held_out)


def test_closed_stdin_and_bugs_never_exit_1(model_dir, monkeypatch):
    closed = subprocess.run(f'"{sys.executable}" -m aadetect score --model "{model_dir}" - <&-', shell=True,
                            capture_output=True, text=True, timeout=300)
    assert closed.returncode == 2 and "stdin is closed" in closed.stderr and "Traceback" not in closed.stderr

    import aadetect.scoring

    def broken(*args, **kwargs):
        raise RuntimeError("a planted bug")

    monkeypatch.setattr(aadetect.scoring.Detector, "load", broken)
    result = invoke("score", "--model", model_dir, "x.png")
    assert result.exit_code == 3  # not 1, which a CI gate would read as "anomalous"
    assert "a planted bug" in result.stderr and "internal error" in result.stderr.splitlines()[-1]


# ---- damaged models -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, fragment", [
    (lambda card: card.pop("thresholds"), "missing key 'thresholds'"),
    (lambda card: card["thresholds"]["density"].update(height="low"), "thresholds.density.height must be float"),
    (lambda card: card["thresholds"]["reconstruction"].update(centre=float("nan")),
     "thresholds.reconstruction.centre is not a finite"),
    (lambda card: card.update(format_version=99), "card format_version 99 is not this aadetect's (1); retrain"),
    (lambda card: card["architecture"].update(latent_dim="16"), "architecture.latent_dim must be int"),
    (lambda card: card["training"]["settings"].update(error="psnr"), "--error must be one of"),
    (lambda card: card["training"]["settings"].update(code_radius="log"), "--code-radius must be one of"),
    (lambda card: card["training"]["settings"].pop("shift_radius"), "missing key 'training.settings.shift_radius'"),
    (lambda card: card["thresholds"]["density"].update(scale=-1.0), "thresholds.density.scale must be at least 1e-06"),
    (lambda card: card.update(density=None), "card.yaml: density must be a mapping"),
    (lambda card: card.update(preprocessing={}), "unknown key 'preprocessing'"),
    (lambda card: card["data"].update(held_out_file="../other/held_out.npz"), "unknown key 'data.held_out_file'"),
    (lambda card: card["architecture"].update(channels=2), "architecture.channels must be 1 or 3"),
    (lambda card: card["architecture"]["widths"].__setitem__(0, "16"), "architecture.widths[0] must be int, got '16'"),
    (lambda card: card["files"].update({"weights.pt": 7}), "files.weights.pt must be str, got 7"),
    (lambda card: card["architecture"].update(latent_dim=0), "architecture.latent_dim must be positive, got 0"),
])
def test_damaged_card_is_refused(model_dir, dataset, tmp_path, change, fragment):
    model = copy_model(model_dir, tmp_path)
    edit_card(model, change)
    assert_one_line_error(invoke("score", "--model", model, dataset["good"]), f"{model / 'card.yaml'}: ", fragment)


def test_card_that_is_not_yaml(model_dir, dataset, tmp_path):
    model = copy_model(model_dir, tmp_path)
    (model / "card.yaml").write_text("format_version: 1\nthresholds: [unclosed\n")
    assert_one_line_error(invoke("score", "--model", model, dataset["good"]),
                          "not valid YAML at line 3, column 1 (")  # where a hand edit went wrong


@pytest.mark.parametrize("damage, fragment", [
    (lambda model: (model / "weights.pt").unlink(), "missing from the model folder"),
    (lambda model: (model / "density.npz").unlink(), "missing from the model folder"),
    (lambda model: (model / "weights.pt").write_bytes((model / "weights.pt").read_bytes()[:500]), "checksum"),
    (lambda model: edit_card(model, lambda card: card.update(files={})), "files must list exactly"),
])
def test_missing_or_corrupt_files(model_dir, dataset, tmp_path, damage, fragment):
    model = copy_model(model_dir, tmp_path)
    damage(model)
    assert_one_line_error(invoke("score", "--model", model, dataset["good"]), fragment)


def test_calibrate_with_an_unreadable_sample_leaves_the_card_unchanged(model_dir, dataset, tmp_path):
    model = copy_model(model_dir, tmp_path)
    card = (model / "card.yaml").read_bytes()
    good = tmp_path / "good"
    shutil.copytree(dataset["good"], good)
    (good / "broken.png").write_bytes(b"not a png")
    result = invoke("calibrate", "--model", model, "--good", good, "--anomalous", dataset["anomalous"], "--quiet")
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("aadetect: error: 1 unreadable image (first: ") and str(good / "broken.png") in last
    assert last.endswith("the card is unchanged") and "Traceback" not in result.stderr
    assert (model / "card.yaml").read_bytes() == card


def replace_weights(model: Path, write) -> None:
    """Swap in another weights file and re-sign it, so the loader itself must judge the contents."""
    write(model / "weights.pt")
    digest = sha256_file(model / "weights.pt")
    edit_card(model, lambda card: card["files"].update({"weights.pt": digest}))


def test_truncated_weights_with_matching_checksum(model_dir, dataset, tmp_path):
    model = copy_model(model_dir, tmp_path)
    data = (model / "weights.pt").read_bytes()
    replace_weights(model, lambda path: path.write_bytes(data[: len(data) // 2]))
    assert_one_line_error(invoke("score", "--model", model, dataset["good"]), "cannot read weights")


def test_weights_that_do_not_fit_the_architecture(model_dir, dataset, tmp_path):
    import torch

    from aadetect.config import Architecture
    from aadetect.model import AdversarialAutoencoder

    model = copy_model(model_dir, tmp_path)
    other = AdversarialAutoencoder(Architecture.for_images(SIZE, 1, 8, extra_convs=1))  # only the code differs
    replace_weights(model, lambda path: torch.save(other.state_dict(), path))
    assert_one_line_error(invoke("score", "--model", model, dataset["good"]), "do not fit the card's architecture",
                          "size mismatch for encoder.to_code.weight")


class Payload:
    """Unpickling this would run a shell command: the loader must never do it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_without_their_error_scale_are_refused(model_dir, dataset, tmp_path):
    import torch

    model = copy_model(model_dir, tmp_path)

    def without_scale(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        del state["error_scale"]
        torch.save(state, path)

    replace_weights(model, without_scale)
    assert_one_line_error(invoke("score", "--model", model, dataset["good"]), "weights.pt", "error_scale")


def test_a_card_whose_settings_disagree_with_its_files_is_refused(dataset, tmp_path):
    model = tmp_path / "linear"
    settings = ("--code-radius", "linear", "--extra-convs", "0", "--shift-radius", "0")
    assert invoke("train", dataset["train"], "--out", model, *settings, *TRAIN_ARGS).exit_code == 0
    card = ModelCard.from_yaml((model / "card.yaml").read_text())
    assert card.settings.code_radius == "linear" and card.architecture.extra_convs == 0 == card.settings.shift_radius
    edit_card(model, lambda card: card["training"]["settings"].update(code_radius="sqrt"))
    assert_one_line_error(invoke("score", "--model", model, dataset["good"]), "density.npz", "radius is linear")
    edit_card(model, lambda card: card["training"]["settings"].update(code_radius="linear", extra_convs=1))
    assert_one_line_error(invoke("score", "--model", model, dataset["good"]), "disagree on extra_convs")


@pytest.mark.parametrize("contents, reason", [
    (b"not a zip archive", "not a valid .npz archive"),
    (None, "density factor must be a positive finite number"),  # a valid archive with a bad value
])
def test_a_damaged_density_file_is_named_once(model_dir, dataset, tmp_path, contents, reason):
    model = copy_model(model_dir, tmp_path)
    density = model / "density.npz"
    if contents is None:
        with np.load(density) as archive:
            state = {key: archive[key] for key in archive.files}
        np.savez(density, **{**state, "factor": np.float64(-1.0)})
    else:
        density.write_bytes(contents)
    edit_card(model, lambda card: card["files"].update({"density.npz": sha256_file(density)}))
    result = invoke("score", "--model", model, dataset["good"])
    assert_one_line_error(result, reason)
    assert result.stderr.count("density.npz") == 1, result.stderr


def test_malicious_pickle_is_refused_without_running_it(model_dir, dataset, tmp_path):
    import torch

    model = copy_model(model_dir, tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(model / "weights.pt", weights_only=True)
    replace_weights(model, lambda path: torch.save({**state, "evil": Payload(marker)}, path))
    result = invoke("score", "--model", model, dataset["good"])
    assert_one_line_error(result, "refused to load")
    assert not marker.exists()
    torch.load(model / "weights.pt", weights_only=False)  # proof the payload was live
    assert marker.exists()


# ---- interrupted work -----------------------------------------------------------------------------------------

def model_state(model: Path) -> str | None:
    """A fingerprint of a complete model folder, or None if there is none; fails on a mix."""
    if not model.exists():
        return None
    card = ModelCard.from_yaml((model / "card.yaml").read_text())
    for name, digest in card.files.items():
        assert sha256_file(model / name) == digest, f"{name} does not belong to this card"
    return card.created + card.files["weights.pt"]


def test_sigkill_during_training_never_leaves_a_mix(dataset, model_dir, tmp_path):
    model = copy_model(model_dir, tmp_path)
    before = model_state(model)
    args = ["train", dataset["train"], "--out", model, "--epochs", "40", "--image-size", str(SIZE), "--seed", "1",
            "--device", "cpu", "--quiet"]
    outcomes = set()
    for delay in (0.3, 2.0, 4.0, 6.0):
        process = subprocess.Popen([sys.executable, "-m", "aadetect", *map(str, args)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = model_state(model)  # raises if weights, density and card disagree
        outcomes.add("old" if state == before else "new")
        assert state is not None
    leftovers = list(tmp_path.glob(".model.staging-*"))
    assert run_cli("train", dataset["train"], "--out", model, *TRAIN_ARGS).returncode == 0
    assert all(not path.exists() for path in leftovers)  # abandoned staging folders are cleaned up
    calibrate = subprocess.Popen([sys.executable, "-m", "aadetect", "calibrate", "--model", str(model), "--good",
                                  str(dataset["good"]), "--anomalous", str(dataset["anomalous"]), "--quiet"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    calibrate.send_signal(signal.SIGKILL)
    calibrate.wait()
    model_state(model)
    assert "old" in outcomes


def test_resume_matches_an_uninterrupted_run(dataset, tmp_path):
    common = ["--image-size", str(SIZE), "--seed", "3", "--device", "cpu", "--quiet", "--epochs", "12"]
    straight = tmp_path / "straight"
    # the code radius shapes only the KDE fitted after training: changing it does not block a resume
    assert run_cli("train", dataset["train"], "--out", straight, "--code-radius", "linear", *common).returncode == 0

    resumed = tmp_path / "resumed"
    checkpoint = tmp_path / "resumed.checkpoint.pt"
    process = subprocess.Popen([sys.executable, "-m", "aadetect", "train", str(dataset["train"]), "--out",
                                str(resumed), *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists() and not resumed.exists(), "killed too late to test a resume"
    result = run_cli("train", dataset["train"], "--out", resumed, "--resume", "--code-radius", "linear", *common)
    assert result.returncode == 0, result.stderr
    assert not checkpoint.exists()

    first = jsonl(run_cli("score", "--model", straight, "--format", "jsonl", dataset["anomalous"]).stdout)
    second = jsonl(run_cli("score", "--model", resumed, "--format", "jsonl", dataset["anomalous"]).stdout)
    for a, b in zip(first, second, strict=True):
        for key in ("reconstruction_error", "log_density", "score"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5)


def test_resume_refuses_other_settings(dataset, tmp_path):
    out = tmp_path / "m"
    checkpoint = tmp_path / "m.checkpoint.pt"
    assert run_cli("train", dataset["train"], "--out", out, *TRAIN_ARGS).returncode == 0
    assert_one_line_error(invoke("train", dataset["train"], "--out", out, "--resume", *TRAIN_ARGS), "no checkpoint")
    for damaged in (b"garbage", b""):
        checkpoint.write_bytes(damaged)
        assert_one_line_error(invoke("train", dataset["train"], "--out", out, "--resume", *TRAIN_ARGS),
                              "cannot read checkpoint")
    import torch

    torch.save(torch.zeros(2), checkpoint)  # a valid tensor file, but not a checkpoint
    assert_one_line_error(invoke("train", dataset["train"], "--out", out, "--resume", *TRAIN_ARGS),
                          "not an aadetect checkpoint")


def test_file_names_that_are_not_utf8_are_printed_as_their_bytes(model_dir, dataset, tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    name = folder / os.fsdecode(b"\xffx.png")  # Linux allows any bytes but / and NUL
    shutil.copy(sorted(dataset["good"].iterdir())[0], name)
    strict = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    for format in ("jsonl", "table"):
        result = subprocess.run([sys.executable, "-m", "aadetect", "score", "--model", str(model_dir),
                                 "--format", format, str(folder)], capture_output=True, env=strict, timeout=300)
        assert result.returncode in (0, 1), result.stderr.decode(errors="replace")
        assert os.fsencode(name) in result.stdout


def test_a_reader_that_leaves_early_is_not_reported_as_anomalies(model_dir, dataset):
    image = sorted(dataset["good"].iterdir())[0]
    scorer = subprocess.Popen([sys.executable, "-m", "aadetect", "score", "--model", str(model_dir),
                               "--format", "jsonl", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    scorer.stdin.write(f"{image}\n".encode() * 3000)  # far more rows than a pipe buffers
    scorer.stdin.close()
    assert json.loads(scorer.stdout.readline())["path"] == str(image)
    scorer.stdout.close()  # like `| head -1`
    assert scorer.wait(timeout=300) == 141
    assert b"Traceback" not in scorer.stderr.read()


def test_data_fingerprint_does_not_depend_on_how_the_path_is_spelled(dataset, monkeypatch):
    from aadetect.images import find_images
    from aadetect.pipeline import fingerprint

    absolute = dataset["train"].resolve()
    monkeypatch.chdir(absolute.parent)
    relative = Path(absolute.name)
    assert fingerprint(find_images(relative), relative) == fingerprint(find_images(absolute), absolute)
    assert fingerprint(find_images(absolute), absolute) != fingerprint(find_images(dataset["good"]), dataset["good"])


def test_a_failed_final_rename_puts_the_old_model_back(tmp_path, monkeypatch):
    from aadetect import atomic

    old, new = tmp_path / "model", tmp_path / "staging"
    old.mkdir()
    (old / "card.yaml").write_text("old")
    new.mkdir()
    (new / "card.yaml").write_text("new")
    real_rename = os.rename

    def rename(source, target):
        if Path(source) == new:
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError):
        atomic.replace_directory(new, old)
    assert (old / "card.yaml").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---- concurrency ----------------------------------------------------------------------------------------------

def test_concurrent_scores_agree_while_calibrate_rewrites_the_card(model_dir, dataset, tmp_path):
    model = copy_model(model_dir, tmp_path)
    command = [sys.executable, "-m", "aadetect", "score", "--model", str(model), "--format", "jsonl",
               str(dataset["anomalous"]), str(dataset["good"])]
    scorers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    calibrations = 0
    while any(p.poll() is None for p in scorers) or calibrations < 2:
        objective = ("balanced-accuracy", "f1")[calibrations % 2]
        assert invoke("calibrate", "--model", model, "--good", dataset["good"], "--anomalous",
                      dataset["anomalous"], "--objective", objective, "--quiet").exit_code == 0
        calibrations += 1
    outputs = [p.communicate() for p in scorers]
    for out, err in outputs:
        assert "error" not in err
        rows = jsonl(out)
        assert len(rows) == 24 and all(r["error"] is None for r in rows)
    measured = [[(r["reconstruction_error"], r["log_density"]) for r in jsonl(out)] for out, _ in outputs]
    assert measured[0] == measured[1] == measured[2]


# ---- fuzzing --------------------------------------------------------------------------------------------------

def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """Flip, overwrite, cut or splice bytes: the corruptions a disk, a network or a person make."""
    data = bytearray(data)
    kind = rng.integers(4)
    if kind == 0:
        for position in rng.integers(0, len(data), size=rng.integers(1, 20)):
            data[position] ^= 1 << int(rng.integers(8))
    elif kind == 1:
        start = int(rng.integers(0, len(data)))
        data[start:start + int(rng.integers(1, 64))] = rng.integers(0, 256, size=64, dtype=np.uint8).tobytes()
    elif kind == 2:
        data = data[: int(rng.integers(0, len(data)))]
    else:
        start, length = int(rng.integers(0, len(data))), int(rng.integers(1, 200))
        data = data[:start] + data[start + length:] + data[start:start + length]
    return bytes(data)


FUZZ_CASES = int(os.environ.get("AADETECT_FUZZ_CASES", "600"))


def test_fuzzed_images_end_in_a_result_or_one_line_error(model_dir, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2024)
    sources = {}
    for suffix, options in ((".png", {}), (".jpg", {"quality": 90})):
        path = tmp_path / f"source{suffix}"
        Image.fromarray(blob_images(1, seed=9)[0]).resize((48, 48)).save(path, **options)
        sources[suffix] = path.read_bytes()
    folder = tmp_path / "fuzz"
    folder.mkdir()
    for case in range(FUZZ_CASES):
        suffix = (".png", ".jpg")[case % 2]
        (folder / f"case_{case:05d}{suffix}").write_bytes(mutate(sources[suffix], rng))
    result = run_cli("score", "--model", model_dir, "--format", "jsonl", folder, timeout=600)
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 1, 2)
    rows = jsonl(result.stdout)
    assert len(rows) == FUZZ_CASES
    scored = [r for r in rows if r["error"] is None]
    failed = [r for r in rows if r["error"] is not None]
    assert all(np.isfinite(r["score"]) for r in scored)
    assert all("\n" not in r["error"] and r["error"].startswith(r["path"]) for r in failed)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("aadetect: error:")]
    assert len(error_lines) == len(failed)
    print(f"fuzz: {len(rows)} cases, {len(scored)} scored, {len(failed)} refused with a one-line error")


@pytest.mark.parametrize("command", [
    ["score"],  # the default format: a rich table, written at the end
    ["evaluate", "--good", "{good}", "--anomalous", "{anomalous}"],
    ["calibrate", "--good", "{good}", "--anomalous", "{anomalous}"],
])
def test_a_reader_that_leaves_before_a_table_is_not_reported_as_anomalies(model_dir, dataset, command, tmp_path):
    args = [part.format(**{k: str(v) for k, v in dataset.items()}) for part in command]
    if command == ["score"]:
        args.append(str(dataset["anomalous"]))  # every image anomalous: exit 1 unless the exit is the pipe's
    if command[0] == "calibrate":  # it rewrites the card: not the shared model's
        model_dir = Path(shutil.copytree(model_dir, tmp_path / "model"))
    process = subprocess.Popen([sys.executable, "-m", "aadetect", *args, "--model", str(model_dir), "--quiet"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the table is drawn
    if command[0] == "calibrate":  # the card is written: the report is not part of the change, the exit says so
        assert process.wait(timeout=300) == 0 and b"its report could not be" in process.stderr.read()
        return
    assert process.wait(timeout=300) == 141
    assert b"Traceback" not in process.stderr.read()


def test_a_reader_that_leaves_during_a_big_table_is_noticed_under_pythonunbuffered(model_dir, dataset, tmp_path):
    """PYTHONUNBUFFERED=1 (common in CI images) made a write that the pipe took only part of end
    quietly: the rest of the table was lost and the exit said "anomalous"."""
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(p)) for p in sorted(dataset["anomalous"].iterdir())] * 250)
    np.save(tmp_path / "many.npy", pixels)  # 3,000 rows, a table far larger than a pipe buffers
    process = subprocess.Popen([sys.executable, "-m", "aadetect", "score", "--model", str(model_dir), "--quiet",
                                str(tmp_path / "many.npy")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout.readline()  # like `| head -1`, once the table has begun
    process.stdout.close()
    assert process.wait(timeout=300) == 141
    assert b"Traceback" not in process.stderr.read()


def test_training_that_diverges_stops_with_one_line_and_leaves_no_model(dataset, tmp_path):
    """A library user's learning rate of 1e8 made NaN weights; the robust rule's whitening then failed
    with torch's LinAlgError."""
    from aadetect.config import TrainConfig
    from aadetect.errors import UserError
    from aadetect.pipeline import train

    config = TrainConfig(epochs=3, image_size=SIZE, latent_dim=8, device="cpu", learning_rate=1e8)
    with pytest.raises(UserError, match=r"training diverged in epoch \d \(the validation loss became nan\); "
                                        r"lower the learning rate \(1e\+08\)"):
        train(dataset["train"], tmp_path / "model", config)
    assert not (tmp_path / "model").exists()


def test_a_closed_stdout_is_one_line_of_error(model_dir, dataset):
    image = sorted(dataset["good"].iterdir())[0]
    result = subprocess.run([sys.executable, "-m", "aadetect", "score", "--model", str(model_dir), str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300,
                            preexec_fn=lambda: os.close(1))
    assert result.returncode == 2
    assert result.stderr.decode().strip() == ("aadetect: error: standard output is closed "
                                              "(redirect it to a file or /dev/null instead)")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("format", ["csv", "table"])
def test_a_full_disk_on_stdout_is_one_line_of_error(model_dir, dataset, format):
    """Python's own final flush failed again after the message: exit 120 and a traceback fragment."""
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "aadetect", "score", "--model", str(model_dir), "--quiet",
                                 "--format", format, str(dataset["good"])], stdout=full, stderr=subprocess.PIPE,
                                timeout=300)
    assert result.returncode == 2
    assert result.stderr.decode().strip() == "aadetect: error: standard output: No space left on device"


@pytest.mark.parametrize("stdin", [b"img_000.png\0img_001.png\0", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"])
def test_stdin_that_is_not_a_list_of_lines_says_so(model_dir, stdin):
    assert_one_line_error(invoke("score", "--model", model_dir, "-", input=stdin),
                          "stdin holds NUL bytes", "add --null")


@pytest.mark.parametrize("command", ["evaluate", "calibrate"])
def test_a_wrong_second_folder_is_named_before_the_first_is_scored(model_dir, dataset, tmp_path, monkeypatch,
                                                                   command):
    from aadetect import pipeline
    from aadetect.errors import UserError
    from aadetect.scoring import Detector

    def scored(*args, **kwargs):
        raise AssertionError("images were scored before the folders were checked")

    monkeypatch.setattr(Detector, "score_images", scored)
    run = pipeline.evaluate if command == "evaluate" else pipeline.calibrate
    with pytest.raises(UserError, match=f"{tmp_path / 'typo'}: no such file or folder"):
        run(copy_model(model_dir, tmp_path), dataset["good"], tmp_path / "typo")
