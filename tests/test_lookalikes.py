"""Calibration leaves out of the density the training images that look like the anomalous samples, and
compares every image with the samples' kind."""

import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import TRAIN_ARGS, blob_images, invoke, jsonl, write_pngs

from aadetect.card import Cut, OddsScale, Thresholds
from aadetect.density import KernelDensity
from aadetect.lookalikes import MAX_CLAIMED, AnomalyKind, find_lookalikes, left_out_log_odds
from aadetect.scoring import Detector, Measurements, decide
from aadetect.store import read_card


def codes_with_hidden_cluster(seed: int = 0):
    """300 good codes around the origin and 8 hidden anomalies in a tight cluster far from them."""
    rng = np.random.default_rng(seed)
    good = rng.normal(0, 1, size=(300, 3))
    hidden = rng.normal(4, 0.3, size=(8, 3))
    return np.concatenate([good, hidden]), np.arange(300, 308), rng


def test_a_hidden_cluster_is_claimed_and_the_good_codes_are_not():
    codes, hidden, rng = codes_with_hidden_cluster()
    density = KernelDensity.fit(codes)
    anomalous_samples = rng.normal(4, 0.3, size=(5, 3))
    good_samples = rng.normal(0, 1, size=(5, 3))
    assert find_lookalikes(density, anomalous_samples, good_samples).tolist() == hidden.tolist()


def test_nothing_is_claimed_when_the_anomalies_claim_a_good_sample():
    codes, _, rng = codes_with_hidden_cluster()
    density = KernelDensity.fit(codes)
    anomalous_samples = rng.normal(4, 0.3, size=(5, 3))
    good_samples = np.concatenate([rng.normal(0, 1, size=(4, 3)), rng.normal(4, 0.3, size=(1, 3))])
    assert len(find_lookalikes(density, anomalous_samples, good_samples)) == 0


def test_anomalies_inside_the_good_cloud_claim_at_most_a_tenth():
    codes, _, rng = codes_with_hidden_cluster()
    density = KernelDensity.fit(codes)
    claimed = find_lookalikes(density, rng.normal(0, 1, size=(10, 3)), rng.normal(4, 1, size=(5, 3)))
    assert len(claimed) <= MAX_CLAIMED * len(codes)


def test_a_density_without_codes_keeps_its_kernel():
    codes, hidden, rng = codes_with_hidden_cluster()
    density = KernelDensity.fit(codes)
    smaller = density.without(hidden)
    queries = rng.normal(0, 1.5, size=(7, 3))
    direct = KernelDensity(codes[:300], density.covariance, density.bandwidth, density.factor)
    assert smaller.n_codes == 300
    np.testing.assert_array_equal(smaller.log_density(queries), direct.log_density(queries))
    assert not np.array_equal(smaller.log_density(queries), density.log_density(queries))


def dark_blobs(count: int, seed: int) -> np.ndarray:
    """The anomaly of these tests: negatives of the good blobs."""
    return 255 - blob_images(count, seed)


@pytest.fixture(scope="module")
def contaminated_model(dataset, tmp_path_factory):
    """A model trained (without robust training) on the good blobs with 8 dark ones hidden among them, and
    a folder of other dark blobs, labelled anomalous."""
    root = tmp_path_factory.mktemp("contaminated")
    train = write_pngs(root / "train", blob_images(120, seed=1))
    write_pngs(root / "planted", dark_blobs(8, seed=4))
    for i in range(8):
        (root / "planted" / f"img_{i:03d}.png").rename(train / f"planted_{i}.png")
    model = root / "model"
    assert invoke("train", train, "--out", model, "--no-robust", "--latent-dim", "4", *TRAIN_ARGS).exit_code == 0
    return model, train, write_pngs(root / "anomalous", dark_blobs(12, seed=5))


def calibrated_copy(contaminated_model, dataset, folder):
    """A copy of the contaminated model (the module's fixture stays as it is), calibrated with its samples."""
    model, _, anomalous = contaminated_model
    shutil.copytree(model, folder)
    assert invoke("calibrate", "--model", folder, "--good", dataset["good"], "--anomalous", anomalous).exit_code == 0
    return folder, anomalous


def test_calibrate_lists_the_hidden_anomalies_and_score_matches_evaluate(contaminated_model, dataset):
    model, train, anomalous = contaminated_model
    result = invoke("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", anomalous,
                    "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = yaml.safe_load(result.stdout)
    card = read_card(model)
    listed = (model / "lookalikes.txt").read_text().splitlines()
    assert report["lookalikes"] == len(card.calibration.lookalike_codes) == len(listed) > 0
    fitted = (model / "density_images.txt").read_text().splitlines()
    assert len(fitted) == card.density.n_codes
    assert [fitted[i] for i in card.calibration.lookalike_codes] == listed
    # the hidden anomalies that training fitted the density on, found from the labelled ones, and nothing else
    assert set(listed) == {name for name in fitted if "planted_" in name}
    assert Detector.load(model, "cpu").density.n_codes == card.density.n_codes - len(listed)

    rows = jsonl(invoke("score", anomalous, "--model", model, "--format", "jsonl").stdout)
    pixels = torch.from_numpy(dark_blobs(12, seed=5))[:, None]
    measured = Detector.load(model, "cpu").measure(pixels)
    assert [row["log_density"] for row in rows] == measured.log_density.tolist()
    assert [row["anomaly_log_odds"] for row in rows] == measured.anomaly_log_odds.tolist()
    (anomalies,) = model.glob("anomalies-*.npy")
    assert card.calibration.anomalies_file == anomalies.name and anomalies.name in card.files
    assert report["thresholds"]["anomaly_log_odds"] == card.thresholds.odds_cut

    one_class = invoke("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", anomalous,
                       "--one-class", "--format", "json")
    assert yaml.safe_load(one_class.stdout)["lookalikes"] == 0
    card = read_card(model)
    assert card.calibration.lookalike_codes == [] and card.calibration.anomalies_file is None
    assert card.thresholds.anomaly_log_odds is None and not any(name.startswith("anomalies-") for name in card.files)
    assert (model / "lookalikes.txt").read_text() == ""
    # the replaced card's file stays for a `score` that read that card a moment ago, until the next calibration
    assert [path.name for path in model.glob("anomalies-*.npy")] == [anomalies.name]
    detector = Detector.load(model, "cpu")
    assert detector.density.n_codes == card.density.n_codes and detector.mixture is None
    assert {row["anomaly_log_odds"] for row in jsonl(invoke("score", anomalous, "--model", model,
                                                            "--format", "jsonl").stdout)} == {None}
    assert invoke("calibrate", "--model", model, "--good", dataset["good"], "--one-class").exit_code == 0
    assert not list(model.glob("anomalies-*.npy"))


def test_a_card_with_impossible_lookalike_codes_is_refused(contaminated_model, dataset, tmp_path):
    damaged, anomalous = calibrated_copy(contaminated_model, dataset, tmp_path / "damaged")
    card = yaml.safe_load((damaged / "card.yaml").read_text())
    card["calibration"]["lookalike_codes"] = [0, card["density"]["n_codes"]]
    (damaged / "card.yaml").write_text(yaml.safe_dump(card))
    result = invoke("score", anomalous, "--model", damaged)
    assert result.exit_code != 0
    assert "calibration.lookalike_codes must be distinct code numbers" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_clear_cluster_larger_than_a_tenth_is_not_claimed():
    """More than a tenth of the codes like the anomalies: the anomalies are the good images' own kind."""
    rng = np.random.default_rng(3)
    codes = np.concatenate([rng.normal(0, 1, size=(30, 3)), rng.normal(5, 0.2, size=(4, 3))])
    density = KernelDensity.fit(codes)
    assert len(find_lookalikes(density, rng.normal(5, 0.2, size=(3, 3)), rng.normal(0, 1, size=(3, 3)))) == 0
    fewer = KernelDensity.fit(codes[:33])  # 3 of 33 are within a tenth
    assert find_lookalikes(fewer, rng.normal(5, 0.2, size=(3, 3)), rng.normal(0, 1, size=(3, 3))).tolist() == [30, 31, 32]


def test_an_isolated_hidden_anomaly_is_claimed():
    """Its own kernel outweighs every other code's by far (as in 32 dimensions): the rest must still count."""
    rng = np.random.default_rng(5)
    hidden = np.full((1, 32), 8.0)
    codes = np.concatenate([rng.normal(0, 1, size=(300, 32)), hidden])
    density = KernelDensity.fit(codes)
    # the anomalies are far from it too (kernel ~e^-50 of its peak), but the good codes far further (~e^-180)
    anomalous = hidden + np.resize([1.5, -1.5], 32) + rng.normal(0, 0.05, size=(3, 32))
    assert find_lookalikes(density, anomalous, rng.normal(0, 1, size=(5, 32))).tolist() == [300]


def test_a_hidden_anomaly_present_twice_is_claimed_twice():
    """Each copy is evidence for the other once claimed, not for the good side (nor is the pair claimed and
    released by turns)."""
    codes, _, rng = codes_with_hidden_cluster()
    hidden = np.full((1, 3), 5.0)
    density = KernelDensity.fit(np.concatenate([codes[:300], hidden, hidden]))
    # one anomaly at a kernel of e^-5.3 from the pair: a bare majority against one copy among 301 codes
    offset = np.linalg.cholesky(density.covariance) @ np.array([1.0, 0.0, 0.0]) * np.sqrt(10.6)
    assert find_lookalikes(density, hidden + offset, rng.normal(0, 1, size=(5, 3))).tolist() == [300, 301]


def test_evaluate_ranks_new_anomalies_of_the_samples_kind_by_their_odds(contaminated_model, dataset, tmp_path):
    model, _, anomalous = contaminated_model
    fresh = write_pngs(tmp_path / "fresh", dark_blobs(40, seed=9))
    assert invoke("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", anomalous).exit_code == 0
    report = yaml.safe_load(invoke("evaluate", "--model", model, "--good", dataset["good"], "--anomalous", fresh,
                                   "--format", "json").stdout)
    assert report["auroc"]["lookalike"] > 0.9
    rows = jsonl(invoke("score", fresh, "--model", model, "--format", "jsonl").stdout)
    assert all(np.isfinite(row["anomaly_log_odds"]) and row["anomaly"] == (row["score"] > 0) for row in rows)


def test_a_model_with_the_samples_kind_scores_no_images_as_no_rows(contaminated_model, dataset, tmp_path):
    copy, _ = calibrated_copy(contaminated_model, dataset, tmp_path / "copy")
    detector = Detector.load(copy, "cpu")
    scores = detector.score(np.zeros((0, 1, detector.image_size, detector.image_size), np.uint8))
    assert len(scores) == 0 and scores.anomaly_log_odds.shape == (0,)


def test_a_reader_of_the_replaced_card_still_finds_its_files(contaminated_model, dataset, tmp_path):
    """`score` read the card just before `calibrate` replaced it: the files that card names are still there."""
    from aadetect.store import load_anomaly_kind, load_density

    copy, anomalous = calibrated_copy(contaminated_model, dataset, tmp_path / "copy")
    before = read_card(copy)
    some = tmp_path / "some"
    some.mkdir()
    for path in sorted(anomalous.iterdir())[:4]:  # other samples: other centres, another file
        shutil.copy(path, some)
    assert invoke("calibrate", "--model", copy, "--good", dataset["good"], "--anomalous", some).exit_code == 0
    assert read_card(copy).calibration.anomalies_file != before.calibration.anomalies_file
    assert load_anomaly_kind(copy, before, load_density(copy, before)).mixture is not None


def test_calibrating_twice_with_the_same_samples_gives_the_same_card(contaminated_model, dataset, tmp_path):
    model, _, anomalous = contaminated_model
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    args = ("--good", dataset["good"], "--anomalous", anomalous)
    assert invoke("calibrate", "--model", copy, *args).exit_code == 0
    first = read_card(copy)
    assert invoke("calibrate", "--model", copy, *args).exit_code == 0
    again = read_card(copy)
    assert (first.thresholds, first.files, first.calibration.anomalies_file) == (
        again.thresholds, again.files, again.calibration.anomalies_file)
    assert len(list(copy.glob("anomalies-*.npy"))) == 1


def test_a_damaged_anomalies_file_or_held_out_file_is_a_one_line_error(contaminated_model, dataset, tmp_path):
    damaged, anomalous = calibrated_copy(contaminated_model, dataset, tmp_path / "damaged")
    (anomalies,) = damaged.glob("anomalies-*.npy")
    anomalies.write_bytes(anomalies.read_bytes()[:-8])
    result = invoke("score", anomalous, "--model", damaged)
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert f"{anomalies}: does not match the card's checksum" in result.stderr
    (damaged / "held_out.npz").write_bytes(b"not a zip file")
    result = invoke("calibrate", "--model", damaged, "--good", dataset["good"], "--anomalous", anomalous)
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert "held_out.npz: does not match the card's checksum" in result.stderr


def test_a_card_whose_odds_threshold_has_no_anomalies_file_is_refused(contaminated_model, dataset, tmp_path):
    damaged, anomalous = calibrated_copy(contaminated_model, dataset, tmp_path / "damaged")
    card = yaml.safe_load((damaged / "card.yaml").read_text())
    for edit, message in ((lambda c: c["calibration"].update(anomalies_file=None), "go together"),
                          (lambda c: c["calibration"].update(anomalies_file="../anomalies-x.npy"), "a file name")):
        edited = yaml.safe_load(yaml.safe_dump(card))
        edit(edited)
        (damaged / "card.yaml").write_text(yaml.safe_dump(edited))
        result = invoke("score", anomalous, "--model", damaged)
        assert result.exit_code != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_each_sample_is_measured_without_its_own_kernel():
    """The left-out log-odds are those of a mixture without the sample's own kernel, computed directly."""
    from scipy.special import logsumexp

    from aadetect.config import Architecture
    from aadetect.model import AdversarialAutoencoder

    rng = np.random.default_rng(2)
    density = KernelDensity.fit(rng.normal(0, 1, size=(200, 4)))
    # fewer than the dimensions (the mixture borrows the kernel), and exactly the samples' own codes below
    centres = rng.normal(3, 0.5, size=(3, 4)).astype(np.float32).astype(np.float64)
    torch.manual_seed(0)
    detector = Detector(AdversarialAutoencoder(Architecture.for_images(8, 1, 4, extra_convs=0)), density, None,
                        error_measure="mse", shift_radius=0, kind=AnomalyKind.of(density, [], centres))
    view_codes = centres[None].astype(np.float32)  # one view of the three samples

    def log_mean_kernel(queries, points):
        whitened = np.linalg.solve(np.linalg.cholesky(density.covariance), (queries[:, None] - points[None]).reshape(
            -1, 4).T).T.reshape(len(queries), len(points), 4)
        log_peak = -0.5 * np.linalg.slogdet(2 * np.pi * density.covariance)[1]
        return logsumexp(-0.5 * (whitened ** 2).sum(-1), axis=1) - np.log(len(points)) + log_peak

    queries = view_codes[0].astype(np.float64)
    expected = [log_mean_kernel(queries[i:i + 1], np.delete(centres, i, 0))[0]
                - log_mean_kernel(queries[i:i + 1], density.codes)[0] for i in range(3)]
    np.testing.assert_allclose(left_out_log_odds(detector, view_codes), expected, rtol=1e-9)
    with_own = detector.log_densities(view_codes)[1]
    assert (with_own > left_out_log_odds(detector, view_codes)).all()


def test_the_odds_test_sits_on_the_density_side_at_the_same_height():
    thresholds = Thresholds(calibrated=True, method="test", reconstruction=Cut(1.0, 1.0, math.log(2.0)),
                            density=Cut(0.0, 1.0, 3.0), anomaly_log_odds=OddsScale(-5.0, 2.0))
    assert (thresholds.reconstruction_cut, thresholds.density_cut, thresholds.odds_cut) == pytest.approx((2.0, -3.0, 1.0))
    errors, log_density = np.array([1.0, 1.0, 1.0, 5.0]), np.array([0.0, -4.0, 0.0, 0.0])
    odds = np.array([0.0, 0.0, 3.0, 3.0])
    scores = decide(Measurements(errors, log_density, odds), thresholds)
    assert scores.reason.tolist() == ["none", "density", "lookalike", "both"]
    assert scores.anomaly.tolist() == [False, True, True, True]
    assert scores.score[2] == pytest.approx((3.0 - 1.0) / 2.0)  # the odds' excess in its own scale
    with pytest.raises(ValueError, match="anomaly_log_odds"):
        decide(Measurements(errors, log_density), thresholds)


def test_one_anomalous_sample_cleans_the_density_but_makes_no_mixture(contaminated_model, dataset, tmp_path):
    """Left out of its own mixture, a lone sample would leave nothing to compare with."""
    model, _, anomalous = contaminated_model
    copy, one = tmp_path / "copy", tmp_path / "one"
    shutil.copytree(model, copy)
    one.mkdir()
    shutil.copy(sorted(anomalous.iterdir())[0], one)
    assert invoke("calibrate", "--model", copy, "--good", dataset["good"], "--anomalous", one).exit_code == 0
    card = read_card(copy)
    assert card.calibration.anomalies_file is None and card.thresholds.anomaly_log_odds is None
    assert not any(name.startswith("anomalies-") for name in card.files)
    table = invoke("evaluate", "--model", copy, "--good", dataset["good"], "--anomalous", anomalous).stdout
    assert "lookalike" not in table and "density" in table


def test_the_evaluate_table_ranks_by_every_signal_the_model_has(contaminated_model, dataset):
    model, _, anomalous = contaminated_model
    assert invoke("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", anomalous).exit_code == 0
    table = invoke("evaluate", "--model", model, "--good", dataset["good"], "--anomalous", anomalous).stdout
    assert all(signal in table for signal in ("reconstruction", "density", "lookalike", "combined"))
