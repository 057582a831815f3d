"""Nothing lost, nothing hung: the model folder under concurrency, full disks and hostile files.

Each test runs the real CLI in a subprocess under a memory limit and a timeout, so that a regression
fails here instead of hanging CI or exhausting the machine.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SIZE, TRAIN_ARGS, blob_images, invoke, write_pngs

MEMORY_MB = 1500  # torch's libraries and a tiny model need far less; a blow-up meets it at once
TIMEOUT = 90


def limited() -> None:
    limit = MEMORY_MB << 20
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def run(*args, stdin: bytes | None = None, timeout: float = TIMEOUT, stdout=subprocess.PIPE):
    """`aadetect ARGS` in a subprocess with at most MEMORY_MB of data; a hang fails the test at `timeout`."""
    return subprocess.run([sys.executable, "-m", "aadetect", *map(str, args)], input=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=timeout, preexec_fn=limited,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_line_error(result, *fragments: str) -> None:
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("aadetect: error:")]
    assert lines and all(len(line) <= 500 for line in lines), stderr[:2000]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def card_of(model: Path) -> dict:
    return yaml.safe_load((model / "card.yaml").read_text())


def edit_card(model: Path, change) -> None:
    card = card_of(model)
    change(card)
    (model / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


@pytest.fixture
def model(model_dir, tmp_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    return copy


# ---- 1. retraining never deletes what is not the model's -------------------------------------------------

def test_retraining_refuses_a_folder_that_holds_the_users_files(model, dataset):
    shutil.copytree(dataset["train"], model / "imgs")
    (model / "NOTES.txt").write_text("mine")
    before = (model / "card.yaml").read_bytes()
    for data, fragment in ((dataset["train"], "holds 'NOTES.txt' and 1 more, which is not part of an aadetect model"),
                           (model / "imgs", "lies inside")):
        one_line_error(run("train", data, "--out", model, *TRAIN_ARGS), fragment)
        assert (model / "NOTES.txt").read_text() == "mine" and len(list((model / "imgs").iterdir())) == 120
        assert (model / "card.yaml").read_bytes() == before


# ---- 2. writers take turns; a clean-up deletes only what no card in force names --------------------------

def test_calibrations_at_once_leave_a_model_that_scores(model, dataset, tmp_path):
    sample_sets = []
    for i in range(3):  # other samples: other centres, other anomalies files
        folder = tmp_path / f"bad{i}"
        write_pngs(folder, blob_images(4 + i, seed=30 + i, anomalous=True))
        sample_sets.append(folder)
    command = [sys.executable, "-m", "aadetect", "calibrate", "--model", str(model), "--good", str(dataset["good"]),
               "--quiet", "--device", "cpu"]
    for _ in range(2):
        runs = [subprocess.Popen([*command, "--anomalous", str(folder)], stderr=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, preexec_fn=limited) for folder in sample_sets]
        assert [process.wait(timeout=TIMEOUT) for process in runs] == [0, 0, 0]
        scored = run("score", "--model", model, "--format", "jsonl", dataset["anomalous"])
        assert scored.returncode in (0, 1), scored.stderr.decode()
        assert len(list(model.glob("anomalies-*.npy"))) <= 2  # the card in force's and the one before it
    assert not list(model.parent.glob(".model.lock"))


def test_a_second_writer_is_told_who_holds_the_model(model, dataset):
    from aadetect import store

    with store.writing(model.resolve()):  # this process holds it, as a training would
        result = subprocess.run([sys.executable, "-c", "from aadetect import store, pipeline; store.LOCK_WAIT_SECONDS "
                                 f"= 0.5; pipeline.calibrate({str(model)!r}, {str(dataset['good'])!r})"],
                                capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=limited)
    assert "another aadetect is writing this model" in result.stderr


# ---- 3. a reader gets one whole generation -----------------------------------------------------------------

def test_a_reader_that_meets_a_retraining_reads_the_new_model(model, dataset, tmp_path, monkeypatch):
    from aadetect import store
    from aadetect.scoring import Detector

    other = tmp_path / "other"
    assert invoke("train", dataset["train"], "--out", other, *TRAIN_ARGS, "--seed", "1").exit_code == 0
    read_card, swapped = store.read_card, []

    def read_then_swap(folder):  # the card of one generation, then every other file of the next
        card = read_card(folder)
        if not swapped:
            swapped.append(True)
            shutil.rmtree(model)
            shutil.copytree(other, model)
        return card

    monkeypatch.setattr(store, "read_card", read_then_swap)
    detector = Detector.load(model, "cpu")
    assert detector.thresholds == read_card(other).thresholds


# ---- 4. the exit says whether the change happened ----------------------------------------------------------

def test_a_report_that_cannot_be_written_does_not_hide_the_change(model, dataset):
    before = (model / "card.yaml").read_bytes()
    with open("/dev/full", "wb") as full:
        result = run("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", dataset["anomalous"],
                     stdout=full)
    assert result.returncode == 0 and b"its report could not be" in result.stderr
    assert (model / "card.yaml").read_bytes() != before
    with open("/dev/full", "wb") as full:
        result = run("train", dataset["train"], "--out", model, *TRAIN_ARGS, "--list-rejected", "--epochs", "4",
                     stdout=full)
    assert result.returncode == 0 and card_of(model)["training"]["settings"]["epochs"] == 4


def test_a_calibration_that_fails_changes_nothing(model, dataset, tmp_path):
    bad = write_pngs(tmp_path / "bad", blob_images(3, seed=5, anomalous=True))
    (bad / "broken.png").write_bytes(b"not a png")
    before = {path.name: path.read_bytes() for path in model.iterdir()}
    one_line_error(run("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", bad), "broken.png")
    assert {path.name: path.read_bytes() for path in model.iterdir()} == before


# ---- 5. FIFOs and other files that are not regular ---------------------------------------------------------

def test_fifos_are_error_rows_never_a_hang(model, dataset, tmp_path):
    folder = tmp_path / "incoming"
    shutil.copytree(dataset["good"], folder)
    os.mkfifo(folder / "pipe.png")
    os.mkfifo(tmp_path / "alone.png")
    os.mkfifo(tmp_path / "images.npy")
    result = run("score", "--model", model, "--format", "jsonl", tmp_path / "alone.png", folder,
                 tmp_path / "images.npy", "/dev/urandom")
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 2 and len(rows) == 1 + 13 + 1 + 1
    errors = {Path(row["path"]).name: row["error"] for row in rows if row["error"]}
    assert set(errors) == {"alone.png", "pipe.png", "images.npy", "urandom"}
    assert all("not a regular file" in error for error in errors.values())

    training = tmp_path / "training"
    shutil.copytree(dataset["train"], training)
    os.mkfifo(training / "pipe.png")
    result = run("train", training, "--out", tmp_path / "m2", *TRAIN_ARGS)
    assert result.returncode == 0 and b"pipe.png: not a regular file" in result.stderr


# ---- 6. model files are read only when regular, and within a size fitting each ---------------------------------

FUZZ = r"""
import hashlib, json, os, random, shutil, signal, sys, time
from pathlib import Path
import yaml
from typer.testing import CliRunner
from aadetect.cli import app

pristine, work, good, anomalous = map(Path, sys.argv[1:5])
rng = random.Random(0)


def resign(model, name):  # the card vouches for the damaged file: its parsing is what is tested
    card = yaml.safe_load((model / "card.yaml").read_text())
    card["files"][name] = hashlib.sha256((model / name).read_bytes()).hexdigest()
    (model / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


def mutate(path, count):
    data = bytearray(path.read_bytes())
    text = path.suffix == ".yaml"  # YAML's own characters reach the parser; other bytes stop at UTF-8
    for _ in range(count):
        data[rng.randrange(len(data))] = rng.choice(b" :-[]{}&*!|>'%@#,.0123456789eaz\n") if text else rng.randrange(256)
    path.write_bytes(bytes(data))


def damages(name):
    for i in range(4):
        yield f"{name}: {2 ** i} random bytes", lambda m, i=i: mutate(m / name, 2 ** i), False
        yield f"{name}: {2 ** i} random bytes, re-signed", lambda m, i=i: mutate(m / name, 2 ** i), name != "card.yaml"
    yield f"{name}: cut in half", lambda m: (m / name).write_bytes((m / name).read_bytes()[: (m / name).stat().st_size // 2]), False
    yield f"{name}: one byte", lambda m: (m / name).write_bytes((m / name).read_bytes()[:1]), name != "card.yaml"
    for device in ("/dev/zero", "/dev/urandom"):
        yield f"{name}: a link to {device}", lambda m, d=device: ((m / name).unlink(), (m / name).symlink_to(d)), False
    yield f"{name}: a FIFO", lambda m: ((m / name).unlink(), os.mkfifo(m / name)), False


def timed_out(*_):
    raise TimeoutError("hung")


signal.signal(signal.SIGALRM, timed_out)
for name in ("card.yaml", "density.npz", "held_out.npz", "weights.pt"):
    for case, damage, sign in damages(name):
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(pristine, work)
        damage(work)
        if sign:
            resign(work, name)
        command = (["calibrate", "--good", str(good), "--anomalous", str(anomalous)] if name == "held_out.npz"
                   else ["score", str(good)])
        started = time.monotonic()
        signal.alarm(20)
        try:
            result = CliRunner().invoke(app, [*command, "--model", str(work), "--quiet"], catch_exceptions=False)
            outcome = {"exit": result.exit_code, "traceback": "Traceback" in result.stderr,
                       "stderr": result.stderr[-300:]}
        except BaseException as exc:
            outcome = {"exit": None, "traceback": True, "stderr": repr(exc)[:300]}
        finally:
            signal.alarm(0)
        print(json.dumps({"case": case, "seconds": round(time.monotonic() - started, 2), **outcome}), flush=True)
"""


def test_fuzzed_model_folders_fail_cleanly(model, dataset, tmp_path):
    """Mutated, cut, re-signed (the card vouching for the damage, so its parsing is tested), or replaced by
    a device or a FIFO: every model file, every way, ends in a one-line error or a clean score, at once."""
    result = subprocess.run([sys.executable, "-c", FUZZ, str(model), str(tmp_path / "work"), str(dataset["good"]),
                             str(dataset["anomalous"])], capture_output=True, text=True, timeout=240,
                            preexec_fn=limited, env={**os.environ, "OMP_NUM_THREADS": "1"})
    outcomes = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(outcomes) == 4 * 13, result.stderr[-3000:]
    bad = [outcome for outcome in outcomes if outcome["exit"] not in (0, 1, 2) or outcome["traceback"]]
    assert not bad, bad
    devices = [outcome for outcome in outcomes if "a link to" in outcome["case"] or "FIFO" in outcome["case"]]
    assert all(outcome["exit"] == 2 and "not a regular file" in outcome["stderr"] for outcome in devices), devices


def test_score_streams_an_endless_stdin(model, dataset):
    image = str(sorted(dataset["good"].iterdir())[0]).encode()
    process = subprocess.Popen([sys.executable, "-m", "aadetect", "score", "--model", str(model), "-", "-f", "jsonl"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               preexec_fn=limited)
    stop = threading.Event()

    def feed() -> None:  # never closes stdin: the rows must come all the same
        try:
            while not stop.is_set():
                process.stdin.write((image + b"\n") * 1000)
                process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    timer = threading.Timer(TIMEOUT, process.kill)
    timer.start()
    try:
        rows = [json.loads(process.stdout.readline()) for _ in range(5000)]
    finally:
        stop.set()
        timer.cancel()
        process.kill()
        process.wait()
    assert all(row["error"] is None for row in rows) and len({row["score"] for row in rows}) == 1


def test_a_line_on_stdin_longer_than_any_path_is_refused(model):
    one_line_error(run("score", "--model", model, "-", stdin=b"x" * (1 << 20)), "stdin: a line of over")


# ---- 7. bombs -----------------------------------------------------------------------------------------------

def test_a_billion_laughs_card_is_refused_at_once(model, dataset):
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9))
    (model / "card.yaml").write_text(laughs)
    started = time.monotonic()
    one_line_error(run("score", "--model", model, dataset["good"]), "aliases are not allowed")
    assert time.monotonic() - started < 30
    (model / "card.yaml").write_text("format_version: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n")
    one_line_error(run("score", "--model", model, dataset["good"]), "nested more than")


def test_a_density_that_declares_more_than_the_card_is_refused_before_it_is_read(model, dataset):
    import hashlib
    import zipfile

    # a header declaring 200 million codes over a few kilobytes of data: decompressed, gigabytes
    header = {"descr": "<f8", "fortran_order": False, "shape": (200_000_000, 32)}
    from numpy.lib import format as npy

    member = io_bytes(lambda handle: (npy.write_array_header_1_0(handle, header), handle.write(b"\0" * 4096)))
    with np.load(model / "density.npz") as archive:
        others = {key: archive[key] for key in archive.files if key != "codes"}
    path = model / "density.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("codes.npy", member)
        for key, value in others.items():
            bomb.writestr(f"{key}.npy", io_bytes(lambda handle, value=value: np.save(handle, value)))
    edit_card(model, lambda card: card["files"].update({"density.npz": hashlib.sha256(path.read_bytes()).hexdigest()}))
    one_line_error(run("score", "--model", model, dataset["good"]), "density.npz: codes is shaped (200000000, 32)")


def test_an_image_array_that_declares_millions_of_images_is_refused_before_it_is_read(model, tmp_path):
    import zipfile

    from numpy.lib import format as npy

    header = {"descr": "|u1", "fortran_order": False, "shape": (5_000_000, 28, 28)}
    member = io_bytes(lambda handle: (npy.write_array_header_1_0(handle, header), handle.write(b"\0" * 4096)))
    with zipfile.ZipFile(tmp_path / "many.npz", "w", zipfile.ZIP_DEFLATED) as bomb:
        bomb.writestr("images.npy", member)
    result = run("score", "--model", model, "--format", "jsonl", tmp_path / "many.npz")
    assert result.returncode == 2 and b"GiB decompressed" in result.stderr and b"Traceback" not in result.stderr


def io_bytes(write) -> bytes:
    import io

    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


# ---- 8. exit 2, not 3, for what the user can fix -----------------------------------------------------------------

def test_a_full_disk_while_saving_names_the_file_and_keeps_the_old_model(model, dataset, monkeypatch):
    import errno

    from aadetect import pipeline
    from aadetect.config import TrainConfig
    from aadetect.errors import UserError

    before = {path.name: path.read_bytes() for path in model.iterdir()}
    real = Path.write_bytes

    def full(self, content):
        if self.name == "weights.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, content)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as raised:
        pipeline.train(dataset["train"], model, TrainConfig(epochs=1, image_size=SIZE, device="cpu"))
    assert raised.value.filename == str(model.resolve() / "weights.pt") and raised.value.errno == errno.ENOSPC
    assert not isinstance(raised.value, UserError)
    assert {path.name: path.read_bytes() for path in model.iterdir()} == before


def test_nan_weights_and_absurd_sizes_are_usage_errors(model, dataset):
    import hashlib

    import torch

    state = torch.load(model / "weights.pt", weights_only=True)
    next(value for value in state.values() if value.is_floating_point()).fill_(float("nan"))
    torch.save(state, model / "weights.pt")
    digest = hashlib.sha256((model / "weights.pt").read_bytes()).hexdigest()
    edit_card(model, lambda card: card["files"].update({"weights.pt": digest}))
    one_line_error(run("score", "--model", model, dataset["good"]), "weights.pt: holds NaN")
    one_line_error(run("train", dataset["train"], "--out", model.parent / "m2", "--batch-size",
                       "99999999999999999999"), "--batch-size must be 0 (auto) or between")


# ---- 9. hand edits: every key required, none unknown, file names plain ---------------------------------------

@pytest.mark.parametrize("change, fragment", [
    (lambda card: card["training"]["settings"].pop("shift_radius"), "missing key 'training.settings.shift_radius'"),
    (lambda card: card["training"]["settings"].update(shift_radiuss=1), "unknown key 'training.settings.shift_radiuss'"),
    (lambda card: card["data"].update(held_out_file="../other/held_out.npz"), "unknown key 'data.held_out_file'"),
    (lambda card: card["files"].update({"../other/held_out.npz": "0" * 64}), "files must list exactly"),
    (lambda card: card["thresholds"]["density"].update(scale=1e-300), "scale must be at least"),
])
def test_hand_edits_that_would_change_scores_silently_are_refused(model, dataset, change, fragment):
    edit_card(model, change)
    one_line_error(run("score", "--model", model, dataset["good"]), fragment)


# ---- 10. leftovers and long messages ----------------------------------------------------------------------------

def test_a_killed_writers_temp_files_are_removed_by_the_next_training(model, dataset):
    dead = 2 ** 22 + 12345  # above any pid this machine gives out
    orphan = model.with_name(f".{model.name}.checkpoint.pt.{dead}-abc123.tmp")
    orphan.write_bytes(b"half a checkpoint")
    alive = model.with_name(f".{model.name}.checkpoint.pt.{os.getpid()}-abc123.tmp")
    alive.write_bytes(b"someone else's")
    assert run("train", dataset["train"], "--out", model, *TRAIN_ARGS).returncode == 0
    assert not orphan.exists() and alive.exists()
    alive.unlink()


def test_an_error_about_thousands_of_entries_is_one_short_line(model, tmp_path):
    names = {f"array_{i}": np.zeros((1, 4, 4), np.uint8) for i in range(1000)}
    np.savez(tmp_path / "many.npz", **names)
    result = run("score", "--model", model, "--format", "jsonl", tmp_path / "many.npz")
    assert result.returncode == 2 and len(max(result.stderr.decode().splitlines(), key=len)) <= 500
    assert len(json.loads(result.stdout.decode())["error"]) <= 500


def test_sigterm_during_training_leaves_no_temp_files_behind(dataset, tmp_path):
    out = tmp_path / "model"
    process = subprocess.Popen([sys.executable, "-m", "aadetect", "train", str(dataset["train"]), "--out", str(out),
                                "--epochs", "500", "--image-size", str(SIZE), "--quiet", "--device", "cpu"],
                               stderr=subprocess.DEVNULL, preexec_fn=limited)
    deadline = time.monotonic() + TIMEOUT
    while not out.with_name(out.name + ".checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=TIMEOUT)
    assert run("train", dataset["train"], "--out", out, *TRAIN_ARGS).returncode == 0
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
