"""Every command through the real CLI, on tiny generated images."""

from __future__ import annotations

import csv
import io
import json
import warnings

import numpy as np
import pytest
import yaml

from aadetect.card import ModelCard
from aadetect.metrics import auroc
from aadetect.scoring import CPU_SCORE_BATCH
from conftest import SIZE, TRAIN_ARGS, blob_images, invoke, jsonl, write_pngs


def test_help_and_version():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "calibrate", "score", "evaluate", "demo"):
        assert command in result.stdout
    version = invoke("--version")
    assert version.exit_code == 0 and version.stdout.startswith("aadetect ")


def test_train_writes_a_complete_card(model_dir, dataset):
    card_text = (model_dir / "card.yaml").read_text()
    raw = yaml.safe_load(card_text)
    card = ModelCard.from_yaml(card_text)
    assert card.data.image_count == 120
    assert card.data.validation_count == 12
    assert card.architecture.channels == 1 and card.architecture.image_size == SIZE
    assert card.settings.epochs == 3 and card.settings.seed == 0
    assert card.thresholds.calibrated is False
    assert card.density.n_codes == 108 - card.data.rejected_count
    assert card.settings.code_radius == "sqrt"
    assert len(card.data.sha256) == 64
    assert raw["files"]["weights.pt"] == card.files["weights.pt"]
    # round trip: what we write is what we read
    assert ModelCard.from_yaml(card.to_yaml()) == card
    assert len((model_dir / "validation.txt").read_text().splitlines()) == 12


def test_the_default_error_is_scaled_by_the_kept_training_images(model_dir, dataset):
    """The default (ssim) error's per-pixel divisor comes from the images the KDE is fitted on, after training."""
    import torch

    from aadetect.images import find_images, load_images
    from aadetect.model import residual_scale
    from aadetect.scoring import Detector

    card = ModelCard.from_yaml((model_dir / "card.yaml").read_text())
    assert card.settings.error == "ssim"
    left_out = set()
    for name in ("validation.txt", "rejected.txt"):
        left_out |= set((model_dir / name).read_text().splitlines())
    kept = [ref for ref in find_images(dataset["train"]) if ref.name not in left_out]
    assert len(kept) == card.density.n_codes
    detector = Detector.load(model_dir, "cpu")
    pixels = load_images(kept, SIZE, 1)[0]
    expected = residual_scale(detector.model, pixels, "cpu", "ssim")
    assert torch.allclose(detector.model.error_scale, expected, rtol=1e-5, atol=0)
    assert expected.std() > 0.05 * expected.mean()  # not a constant: pixels differ in how well they are rebuilt


def test_score_formats_and_exit_codes(model_dir, dataset):
    good = sorted(dataset["good"].iterdir())
    result = invoke("score", "--model", model_dir, "--format", "jsonl", *good)
    rows = jsonl(result.stdout)
    assert [row["path"] for row in rows] == [str(p) for p in good]
    assert set(rows[0]) == {"path", "reconstruction_error", "log_density", "anomaly_log_odds", "score", "anomaly", "reason",
                            "peak_x", "peak_y", "heatmap", "error"}
    for row in rows:
        assert row["anomaly"] == (row["score"] > 0)
        assert row["reason"] in {"none", "reconstruction", "density", "both"}
    assert result.exit_code == (1 if any(r["anomaly"] for r in rows) else 0)

    as_csv = invoke("score", "--model", model_dir, "--format", "csv", *good)
    parsed = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [float(r["score"]) for r in parsed] == [r["score"] for r in rows]
    assert [r["anomaly"] for r in parsed] == [json.dumps(r["anomaly"]) for r in rows]  # true/false, as in JSON

    anomalous = invoke("score", "--model", model_dir, "--format", "jsonl", dataset["anomalous"])
    assert anomalous.exit_code == 1
    assert sum(r["anomaly"] for r in jsonl(anomalous.stdout)) >= 10


def test_score_exit_zero_when_all_normal(model_dir, dataset):
    rows = jsonl(invoke("score", "--model", model_dir, "--format", "jsonl", dataset["good"]).stdout)
    normal = [r["path"] for r in rows if not r["anomaly"]]
    assert normal, "the tiny model should accept most good images"
    result = invoke("score", "--model", model_dir, "--format", "jsonl", *normal)
    assert result.exit_code == 0


def test_score_unreadable_input_exit_two_but_scores_the_rest(model_dir, dataset, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    good = sorted(dataset["good"].iterdir())[0]
    result = invoke("score", "--model", model_dir, "--format", "jsonl", good, broken, tmp_path / "missing.png")
    assert result.exit_code == 2
    rows = jsonl(result.stdout)
    assert [r["path"] for r in rows] == [str(good), str(broken), str(tmp_path / "missing.png")]
    assert rows[0]["error"] is None and rows[0]["score"] is not None
    assert "not a recognised image" in rows[1]["error"] and rows[1]["score"] is None
    assert "no such file" in rows[2]["error"]
    assert "Traceback" not in result.stderr
    assert str(broken) in result.stderr


def test_unreadable_input_is_named_on_stderr_even_when_quiet(model_dir, dataset, tmp_path):
    broken = write_pngs(tmp_path / "good", blob_images(2, seed=2)) / "broken.png"
    broken.write_text("not an image")
    scored = invoke("score", "--model", model_dir, "--format", "jsonl", "--quiet", broken)
    evaluated = invoke("evaluate", "--model", model_dir, "--good", broken.parent, "--anomalous", dataset["anomalous"],
                       "--format", "json", "--quiet")
    assert scored.exit_code == evaluated.exit_code == 2
    assert len(scored.stderr.splitlines()) == 1
    assert scored.stderr.startswith(f"aadetect: error: {broken}: not a recognised image")
    assert evaluated.stderr.splitlines()[-1].startswith(f"aadetect: error: 1 unreadable image (first: {broken}: ")
    assert json.loads(evaluated.stdout)["n_good"] == 2


def test_a_small_folder_holds_out_enough_images_for_usable_default_thresholds(tmp_path):
    folder = write_pngs(tmp_path / "small", blob_images(12, seed=1))
    result = invoke("train", folder, "--out", tmp_path / "m", "--latent-dim", "4", *TRAIN_ARGS)
    assert result.exit_code == 0, result.stderr
    assert "rest on only 5 held-out images" in result.stderr
    card = ModelCard.from_yaml((tmp_path / "m" / "card.yaml").read_text())
    assert card.data.validation_count == 5
    # one held-out image had no spread: scales of 1e-6, and 4 of these 12 good images flagged
    assert card.thresholds.reconstruction.scale > 0.01 and card.thresholds.density.scale > 0.01
    rows = jsonl(invoke("score", "--model", tmp_path / "m", "--format", "jsonl", folder).stdout)
    assert sum(row["anomaly"] for row in rows) <= 1


def test_score_reads_paths_from_stdin(model_dir, dataset):
    good = sorted(dataset["good"].iterdir())[:3]
    result = invoke("score", "--model", model_dir, "--format", "jsonl", "-", input="\n".join(map(str, good)) + "\n")
    assert [r["path"] for r in jsonl(result.stdout)] == [str(p) for p in good]
    nul = invoke("score", "--model", model_dir, "--format", "jsonl", "--null", "-",
                 input="\0".join(map(str, good)))
    assert jsonl(nul.stdout) == jsonl(result.stdout)


def test_stdin_paths_with_spaces_unicode_and_newlines(model_dir, dataset, tmp_path):
    import shutil

    source = sorted(dataset["good"].iterdir())[0]
    names = [tmp_path / "with space.png", tmp_path / "ünïcødé 画像.png", tmp_path / "new\nline.png"]
    for name in names:
        shutil.copy(source, name)
    by_line = invoke("score", "--model", model_dir, "--format", "jsonl", "-",
                     input="".join(f"{n}\n" for n in names[:2]))
    assert [r["path"] for r in jsonl(by_line.stdout)] == [str(n) for n in names[:2]]
    by_nul = invoke("score", "--model", model_dir, "--format", "jsonl", "--null", "-",
                    input="\0".join(map(str, names)) + "\0")
    rows = jsonl(by_nul.stdout)
    assert [r["path"] for r in rows] == [str(n) for n in names]
    assert len({r["score"] for r in rows}) == 1 and rows[0]["error"] is None


def test_file_names_are_printed_as_they_are_never_as_markup(model_dir, dataset, tmp_path):
    import shutil

    folder = tmp_path / "a["  # with the file below, the path holds "[/bad]": a closing tag to rich
    folder.mkdir()
    shutil.copy(sorted(dataset["good"].iterdir())[0], folder / "[bold]y.png")
    (folder / "bad].png").write_text("not an image")
    table = invoke("score", "--model", model_dir, folder)
    assert table.exit_code == 2
    assert str(folder / "[bold]y.png") in table.stdout and str(folder / "bad].png") in table.stdout
    report = invoke("evaluate", "--model", model_dir, "--good", folder, "--anomalous", dataset["anomalous"],
                    "--format", "json")
    assert report.exit_code == 2 and str(folder / "bad].png") in report.stderr  # measured, but input was bad
    assert [entry for entry in json.loads(report.stdout)["unreadable"] if "bad].png" in entry]


def test_stdin_lines_are_split_at_newlines_only(model_dir, dataset, tmp_path):
    import shutil

    name = tmp_path / "file\u2028with\x1cseparators.png"
    shutil.copy(sorted(dataset["good"].iterdir())[0], name)
    result = invoke("score", "--model", model_dir, "--format", "jsonl", "-", input=f"{name}\r\n")
    assert [r["path"] for r in jsonl(result.stdout)] == [str(name)]


def test_train_into_the_current_folder(dataset, tmp_path, monkeypatch):
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    result = invoke("train", dataset["train"], "--out", ".", *TRAIN_ARGS)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "empty" / "card.yaml").is_file()


def test_training_in_process_leaves_float_handling_as_it_was(model_dir):
    import torch

    # model_dir was trained in this process; denormals flushed to zero there must not leak out
    assert (torch.tensor([1e-310], dtype=torch.float64) * 1.0).item() > 0


def test_score_table_is_on_stdout(model_dir, dataset):
    result = invoke("score", "--model", model_dir, dataset["good"])
    assert "reconstruction_error" in result.stdout
    assert result.exit_code in (0, 1)


def test_score_and_evaluate_agree(model_dir, dataset):
    scores = {}
    for label in ("good", "anomalous"):
        scores[label] = jsonl(invoke("score", "--model", model_dir, "--format", "jsonl", dataset[label]).stdout)
    report = json.loads(invoke("evaluate", "--model", model_dir, "--good", dataset["good"], "--anomalous",
                               dataset["anomalous"], "--format", "json").stdout)
    column = lambda label, key: np.array([r[key] for r in scores[label]])  # noqa: E731
    assert report["auroc"]["combined"] == auroc(column("good", "score"), column("anomalous", "score"))
    assert report["auroc"]["reconstruction"] == auroc(column("good", "reconstruction_error"),
                                                      column("anomalous", "reconstruction_error"))
    assert report["auroc"]["density"] == auroc(-column("good", "log_density"), -column("anomalous", "log_density"))
    assert report["confusion"]["fp"] == int(column("good", "anomaly").sum())
    assert report["confusion"]["tp"] == int(column("anomalous", "anomaly").sum())
    assert report["n_good"] == 12 and report["n_anomalous"] == 12
    for key in ("auprc", "balanced_accuracy", "f1", "tpr", "fpr"):
        assert key in report
    assert report["auroc"]["combined"] > 0.9  # a bright square is easy to spot


def test_calibrate_writes_thresholds_into_the_card(model_dir, dataset, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    result = invoke("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", dataset["anomalous"],
                    "--format", "json", "--quiet")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    card = ModelCard.from_yaml((model / "card.yaml").read_text())
    assert card.thresholds.calibrated is True
    assert card.thresholds.reconstruction_cut == report["thresholds"]["reconstruction"]
    assert card.calibration.good_count == 12 and card.calibration.anomalous_count == 12
    assert card.calibration.objective == "balanced-accuracy"
    assert card.calibration.metrics["balanced_accuracy"] >= 0.9
    assert card.calibration.warnings == []
    # decisions at the new thresholds reproduce the calibration metrics
    evaluation = json.loads(invoke("evaluate", "--model", model, "--good", dataset["good"], "--anomalous",
                                   dataset["anomalous"], "--format", "json").stdout)
    assert evaluation["balanced_accuracy"] == card.calibration.metrics["balanced_accuracy"]


def test_calibrate_warns_with_few_samples_and_honours_target_fpr(model_dir, dataset, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(dataset["good"].iterdir())[:5]:
        shutil.copy(path, few / path.name)
    result = invoke("calibrate", "--model", model, "--good", few, "--target-fpr", "0.2", "--format", "json")
    assert result.exit_code == 0
    card = ModelCard.from_yaml((model / "card.yaml").read_text())
    assert any("only 5 good samples" in w for w in card.calibration.warnings)
    assert card.calibration.metrics["fpr"] <= 0.2
    assert "warning" in result.stderr


def test_calibrating_on_good_samples_alone_keeps_the_models_own_budget(model_dir, dataset, tmp_path):
    """A model trained for a 25% false-positive budget (a library setting) is recalibrated for 25%, not
    for the class default of 5%; a budget given on the command line still wins."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    card_file = model / "card.yaml"
    card_file.write_text(card_file.read_text().replace("target_fpr: 0.05", "target_fpr: 0.25", 1))
    assert invoke("calibrate", "--model", model, "--good", dataset["good"]).exit_code == 0
    card = ModelCard.from_yaml(card_file.read_text())
    assert card.calibration.target_fpr == 0.25 and "target FPR 0.25" in card.thresholds.method
    assert 0.05 < card.calibration.metrics["fpr"] <= 0.25  # 3 of 12: the budget is used, not the default's 0
    assert invoke("calibrate", "--model", model, "--good", dataset["good"], "--target-fpr", "0.1").exit_code == 0
    assert ModelCard.from_yaml(card_file.read_text()).calibration.target_fpr == 0.1

    card_file.write_text(card_file.read_text().replace("target_fpr: 0.25", "target_fpr: lots", 1))
    result = invoke("calibrate", "--model", model, "--good", dataset["good"])
    assert result.exit_code == 2
    assert "training.settings.target_fpr must be float, got 'lots'" in result.stderr


def test_default_model_dir(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AADETECT_MODEL", raising=False)
    assert invoke("train", dataset["train"], *TRAIN_ARGS).exit_code == 0
    assert (tmp_path / "aadetect-model" / "card.yaml").exists()
    result = invoke("score", "--format", "jsonl", sorted(dataset["good"].iterdir())[0])
    assert result.exit_code in (0, 1) and len(jsonl(result.stdout)) == 1
    monkeypatch.setenv("AADETECT_MODEL", str(tmp_path / "elsewhere"))
    missing = invoke("score", sorted(dataset["good"].iterdir())[0])
    assert missing.exit_code == 2 and "elsewhere" in missing.stderr


def test_adversarial_option_trains_and_scores(tmp_path, dataset, model_dir):
    out = tmp_path / "aae"
    result = invoke("train", dataset["train"], "--out", out, "--adversarial", *TRAIN_ARGS)
    assert result.exit_code == 0, result.stderr
    card = ModelCard.from_yaml((out / "card.yaml").read_text())
    assert card.settings.adversarial is True and card.training.final_losses["discriminator"] > 0
    default = ModelCard.from_yaml((model_dir / "card.yaml").read_text())
    assert default.settings.adversarial is False and default.training.final_losses["discriminator"] == 0
    rows = jsonl(invoke("score", "--model", out, "--format", "jsonl", dataset["anomalous"]).stdout)
    assert len(rows) == 12 and all(row["anomaly"] == (row["score"] > 0) for row in rows)


def test_train_on_npz_array(tmp_path, dataset):
    array = tmp_path / "good.npz"
    np.savez(array, images=blob_images(60, seed=5))
    out = tmp_path / "model"
    result = invoke("train", array, "--out", out, *TRAIN_ARGS)
    assert result.exit_code == 0, result.stderr
    card = ModelCard.from_yaml((out / "card.yaml").read_text())
    assert card.data.image_count == 60 and card.architecture.channels == 1
    scored = invoke("score", "--model", out, "--format", "jsonl", dataset["anomalous"])
    assert len(jsonl(scored.stdout)) == 12


def test_same_seed_same_scores(dataset, tmp_path, model_dir):
    out = tmp_path / "again"
    assert invoke("train", dataset["train"], "--out", out, *TRAIN_ARGS).exit_code == 0
    first = invoke("score", "--model", model_dir, "--format", "jsonl", dataset["anomalous"]).stdout
    second = invoke("score", "--model", out, "--format", "jsonl", dataset["anomalous"]).stdout
    assert first == second
    assert (out / "weights.pt").read_bytes() == (model_dir / "weights.pt").read_bytes()


def test_single_image_scores_equal_batch_scores(model_dir, dataset):
    """Both from the first piece of images and from the last, partly padded one."""
    batch = jsonl(invoke("score", "--model", model_dir, "--format", "jsonl", dataset["anomalous"]).stdout)
    assert len(batch) > CPU_SCORE_BATCH
    for row in (batch[5], batch[-1]):
        alone = jsonl(invoke("score", "--model", model_dir, "--format", "jsonl", row["path"]).stdout)
        assert alone[0] == row


def test_scores_do_not_depend_on_the_thread_count(tmp_path):
    """Each batch of images runs on one thread, whole batches go to the threads: the same bits on any machine.

    64x64 colour images, where one batch on two threads gave other bits than on one.
    """
    import torch

    from aadetect.card import Cut, Thresholds
    from aadetect.config import Architecture
    from aadetect.density import KernelDensity
    from aadetect.images import find_images
    from aadetect.model import AdversarialAutoencoder
    from aadetect.scoring import Detector

    torch.manual_seed(0)
    model = AdversarialAutoencoder(Architecture.for_images(64, 3, 8, extra_convs=0)).eval()
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, (70, 3, 64, 64), dtype=np.uint8))  # pieces, the last partial
    write_pngs(tmp_path / "images", pixels.permute(0, 2, 3, 1).numpy())
    with torch.inference_mode():
        codes, _ = model(pixels.float() / 255)
    density = KernelDensity.fit(codes.double().numpy(), radius="sqrt")
    thresholds = Thresholds(calibrated=False, method="test", reconstruction=Cut(1.0, 1.0, 0.0), density=Cut(0.0, 1.0, 0.0), anomaly_log_odds=None)
    detector = Detector(model, density, thresholds, error_measure="mse", shift_radius=0)
    refs = find_images(tmp_path / "images")
    before, runs = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append((detector.measure(pixels), [row for _, row, _ in detector.score_images(refs)]))
            assert torch.get_num_threads() == threads  # given back as it was
    finally:
        torch.set_num_threads(before)
    measured, rows = runs[0]
    errors, densities = measured.reconstruction_error, measured.log_density
    assert [row["reconstruction_error"] for row in rows] == errors.tolist()
    assert [row["log_density"] for row in rows] == densities.tolist()
    for other, other_rows in runs[1:]:
        assert other.reconstruction_error.tobytes() == errors.tobytes() and other.log_density.tobytes() == densities.tobytes()
        assert other_rows == rows


def test_streaming_over_several_decode_batches_keeps_order_and_numbers(tmp_path):
    """Several decoded batches in flight at once (two threads): every row, in input order, with measure's numbers."""
    import torch

    from aadetect.card import Cut, Thresholds
    from aadetect.config import Architecture
    from aadetect.density import KernelDensity
    from aadetect.images import find_images
    from aadetect.model import AdversarialAutoencoder
    from aadetect.scoring import DECODE_BATCH, Detector

    torch.manual_seed(0)
    model = AdversarialAutoencoder(Architecture.for_images(8, 1, 4, extra_convs=0)).eval()
    count = 2 * DECODE_BATCH + 37  # three decode batches, the last partial
    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (count, 1, 8, 8), dtype=np.uint8))
    np.save(tmp_path / "images.npy", pixels[:, 0].numpy())
    with torch.inference_mode():
        codes, _ = model(pixels.float() / 255)
    density = KernelDensity.fit(codes.double().numpy(), radius="sqrt")
    thresholds = Thresholds(calibrated=False, method="test", reconstruction=Cut(1.0, 1.0, 0.0), density=Cut(0.0, 1.0, 0.0), anomaly_log_odds=None)
    detector = Detector(model, density, thresholds, error_measure="mse", shift_radius=1)
    refs = find_images(tmp_path / "images.npy")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        measured = detector.measure(pixels)
        errors, densities = measured.reconstruction_error, measured.log_density
        streamed = list(detector.score_images(refs))
    finally:
        torch.set_num_threads(before)
    assert [ref for ref, _, _ in streamed] == refs
    assert all(error is None for _, _, error in streamed)
    assert [row["reconstruction_error"] for _, row, _ in streamed] == errors.tolist()
    assert [row["log_density"] for _, row, _ in streamed] == densities.tolist()


@pytest.mark.parametrize("args, message", [
    (("--epochs", "-1"), "--epochs"),
    (("--latent-dim", "-1"), "--latent-dim"),
    (("--code-grid", "3"), "--code-grid"),
    (("--image-size", "-4"), "--image-size"),
    (("--device", "cuda:7"), "cuda"),
    (("--device", "tpu"), "--device"),
])
def test_train_rejects_bad_options_before_work(dataset, tmp_path, args, message):
    result = invoke("train", dataset["train"], "--out", tmp_path / "m", *args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_train_refuses_to_overwrite_a_data_folder(dataset):
    result = invoke("train", dataset["train"], "--out", dataset["good"], *TRAIN_ARGS)
    assert result.exit_code == 2 and "which is not part of an aadetect model" in result.stderr


def test_train_with_too_few_images(tmp_path):
    from conftest import write_pngs

    folder = write_pngs(tmp_path / "few", blob_images(4, seed=0))
    result = invoke("train", folder, "--out", tmp_path / "m", *TRAIN_ARGS)
    assert result.exit_code == 2 and "only 4 usable images" in result.stderr


def test_list_rejected_prints_paths(dataset, tmp_path):
    from conftest import write_pngs

    folder = tmp_path / "mixed"
    write_pngs(folder / "good", blob_images(100, seed=7))
    write_pngs(folder / "bad", blob_images(3, seed=8, anomalous=True))
    result = invoke("train", folder, "--out", tmp_path / "m", "--list-rejected", *TRAIN_ARGS)
    assert result.exit_code == 0
    listed = result.stdout.splitlines()
    card = ModelCard.from_yaml((tmp_path / "m" / "card.yaml").read_text())
    assert len(listed) == card.data.rejected_count
    assert all(any(name.endswith(f"bad/img_{i:03d}.png") for name in listed) for i in range(3)), listed
    assert (tmp_path / "m" / "rejected.txt").read_text().splitlines() == listed


def test_demo_runs_the_whole_job(tmp_path):
    result = invoke("demo", "--out", tmp_path / "demo", "--epochs", "1", "--train-images", "60", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_good"] == 200 and report["n_anomalous"] == 200
    assert set(report["auroc"]) == {"reconstruction", "density", "lookalike", "combined"}  # calibrated with anomalies
    card = ModelCard.from_yaml((tmp_path / "demo" / "model" / "card.yaml").read_text())
    assert card.thresholds.calibrated and card.data.image_count == 60
    assert str(tmp_path / "demo" / "model") in result.stderr
    # the demo's evaluation is the evaluate command's, number for number
    folders = tmp_path / "demo" / "data"
    again = invoke("evaluate", "--model", tmp_path / "demo" / "model", "--good", folders / "test_good",
                   "--anomalous", folders / "test_anomalous", "--masks", folders / "masks" / "test_anomalous",
                   "--format", "json")
    assert json.loads(again.stdout) == report
    assert report["masked_images"] == 200 and 0.5 < report["pixel_auroc"] <= 1.0  # where, after one epoch


def test_demo_refuses_too_few_training_images_before_writing_any(tmp_path):
    # the old check (at least 20) let 20-37 through, to fail after writing every image and point at
    # an option (--latent-dim) that demo does not have; the minimum now leaves room for rejections
    result = invoke("demo", "--out", tmp_path / "demo", "--epochs", "1", "--train-images", "52")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("aadetect: error: --train-images must be at least 53 (1.5 times the 32 latent "
                                     "dimensions, plus the held-out images), got 52")
    assert not (tmp_path / "demo").exists()


def test_training_from_disk_when_over_the_memory_limit(dataset, tmp_path, model_dir):
    out = tmp_path / "streamed"
    result = invoke("train", dataset["train"], "--out", out, "--memory-limit-mb", "0", *TRAIN_ARGS)
    assert result.exit_code == 0, result.stderr
    assert "reading them from disk" in result.stderr
    # the same pixels in the same order: the same model as training from memory
    assert (out / "weights.pt").read_bytes() == (model_dir / "weights.pt").read_bytes()


def test_the_library_takes_numpy_pixels_and_refuses_float_or_misshaped_ones(model_dir, dataset):
    from aadetect.errors import UserError
    from aadetect.images import ImagesOnDisk, find_images, load_images
    from aadetect.scoring import Detector

    detector = Detector.load(model_dir, "cpu")
    pixels = load_images(find_images(dataset["good"]), SIZE, 1)[0]
    from_tensor = detector.score(pixels)
    from_numpy = detector.score(pixels.numpy())
    np.testing.assert_array_equal(from_numpy.score, from_tensor.score)
    read_only = pixels.numpy().copy()
    read_only.flags.writeable = False  # as np.load(..., mmap_mode="r") gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(detector.score(read_only).score, from_tensor.score)
        codes = np.zeros((3, detector.density.dim))
        codes.flags.writeable = False
        assert np.isfinite(detector.density.log_density(codes)).all()
    for wrong, reason in [(pixels.float() / 255, r"uint8 pixels \(0-255\) shaped \(N, 1, 16, 16\).*got float32"),
                          (pixels[:, :, :8], r"got shape \(12, 1, 8, 16\)"),
                          (pixels[:, 0], r"got shape \(12, 16, 16\)"),
                          (list(pixels.numpy()), r"a tensor or numpy array\); got list"),
                          (str(dataset["good"]), r"got str \(for files, use score_images\(find_images\(path\)\)\)"),
                          (ImagesOnDisk(find_images(dataset["good"]), 8, 1), r"got images read at 1 channel\(s\) and 8 px")]:
        with pytest.raises(UserError, match=reason):
            detector.predict(wrong)


def test_score_images_takes_image_refs_and_says_so_otherwise(model_dir, dataset):
    from aadetect.errors import UserError
    from aadetect.images import find_images
    from aadetect.scoring import Detector

    detector = Detector.load(model_dir, "cpu")
    refs = find_images(dataset["good"])
    assert [ref for ref, _, _ in detector.score_images(iter(refs))] == refs  # any iterable of refs
    path_type = type(refs[0].path).__name__
    for wrong, reason in [(str(dataset["good"]), "got str"),
                          (refs[0].path, f"got {path_type}"),
                          ([ref.path for ref in refs], f"got a {path_type} among them")]:
        with pytest.raises(UserError, match=r"score_images takes ImageRefs, as find_images\(path\) returns; " + reason):
            list(detector.score_images(wrong))


def test_paths_are_echoed_as_given_so_rows_join_back_to_the_input_list(model_dir, dataset, monkeypatch):
    """`find ./incoming | aadetect score -` must give rows whose path is find's line, not Path's shortening."""
    monkeypatch.chdir(dataset["good"].parent)
    folder = dataset["good"].name
    first = sorted(dataset["good"].iterdir())[0].name
    given = [f"./{folder}/{first}", f"{folder}//{first}", f"./{folder}/missing.png"]
    rows = jsonl(invoke("score", "--model", model_dir, "--format", "jsonl", "-", input="\n".join(given) + "\n").stdout)
    assert [row["path"] for row in rows] == given
    assert rows[2]["error"].startswith(f"./{folder}/missing.png: ")
    assert rows[0]["score"] == rows[1]["score"]
    walked = jsonl(invoke("score", "--model", model_dir, "--format", "jsonl", f"./{folder}/").stdout)
    assert walked[0]["path"] == f"./{folder}/{first}" and walked[0]["score"] == rows[0]["score"]


def test_the_table_wraps_long_paths_instead_of_cutting_them():
    """In an 80-column terminal every row of a deep folder showed the same cut prefix."""
    import io

    from rich.console import Console

    from aadetect.cli import score_table

    path = "incoming/line3/camera2/2024-05-01/part-000123-left-side.png"
    row = {"path": path, "reconstruction_error": 0.25, "log_density": 14.2, "score": -1.5, "anomaly": False,
           "reason": "none", "peak_x": 120, "peak_y": 7, "heatmap": None, "error": None}
    unreadable = {"path": "x.png", "error": "x.png: not an image (cannot identify image file)"}
    out = io.StringIO()
    Console(file=out, width=70, no_color=True).print(score_table([row, {**row, **unreadable}]))
    cells = [line.split("│") for line in out.getvalue().splitlines() if line.startswith("│")]
    error_row = next(i for i, cell in enumerate(cells) if cell[1].strip() == "x.png")
    assert "".join(cell[1].strip() for cell in cells[:error_row]) == path
    assert " ".join(cell[-2].strip() for cell in cells[error_row:]).split() == unreadable["error"].split()


def test_the_density_is_averaged_over_the_image_moved_by_a_pixel(model_dir, dataset):
    """The default shift radius 1: the log of the mean KDE density of the image's nine views."""
    import torch
    from scipy.special import logsumexp

    from aadetect.images import find_images, load_images, materialize
    from aadetect.scoring import Detector

    detector = Detector.load(model_dir, "cpu")
    assert detector.shift_radius == 1
    pixels = materialize(load_images(find_images(dataset["anomalous"]), detector.image_size, detector.channels)[0])
    log_density = detector.measure(pixels).log_density
    padded = np.pad(pixels.numpy() / 255.0, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    size = detector.image_size
    per_view = []
    with torch.inference_mode():
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                view = torch.from_numpy(padded[:, :, 1 - dy:1 - dy + size, 1 - dx:1 - dx + size]).float()
                per_view.append(detector.density.log_density(detector.model.encoder(view).double()))
    np.testing.assert_allclose(log_density, logsumexp(per_view, axis=0) - np.log(9), rtol=1e-4)  # float32 batches
    assert np.abs(log_density - per_view[4]).max() > 1e-3  # the moved views count: not the image alone


def test_the_density_holds_at_most_density_codes_a_seeded_sample(model_dir, dataset, tmp_path):
    out = tmp_path / "capped"
    result = invoke("train", dataset["train"], "--out", out, *TRAIN_ARGS, "--density-codes", "40")
    assert result.exit_code == 0, result.stderr
    card = ModelCard.from_yaml((out / "card.yaml").read_text())
    held = (out / "density_images.txt").read_text().splitlines()
    kept = (model_dir / "density_images.txt").read_text().splitlines()  # the same training, uncapped
    assert card.density.n_codes == 40 == len(held) and card.settings.density_codes == 40
    assert set(held) < set(kept) and held == sorted(held, key=kept.index)  # a sample of the kept, in their order
    assert (out / "weights.pt").read_bytes() == (model_dir / "weights.pt").read_bytes()  # the networks: unchanged
    scores = invoke("score", "--model", out, dataset["anomalous"], "--format", "jsonl")
    assert scores.exit_code == 1  # still finds the anomalies
