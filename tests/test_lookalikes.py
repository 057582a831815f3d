"""Calibration leaves out of the density the training images that look like the anomalous samples."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from conftest import TRAIN_ARGS, blob_images, invoke, jsonl, write_pngs

from aadetect.card import read_card
from aadetect.density import KernelDensity
from aadetect.lookalikes import MAX_CLAIMED, find_lookalikes
from aadetect.scoring import Detector


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


def test_calibrate_lists_the_hidden_anomalies_and_score_matches_evaluate(contaminated_model, dataset):
    model, train, anomalous = contaminated_model
    result = invoke("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", anomalous,
                    "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = yaml.safe_load(result.stdout)
    card = read_card(model)
    listed = (model / "lookalikes.txt").read_text().splitlines()
    assert report["lookalikes"] == len(card.calibration.lookalike_codes) == len(listed) > 0
    assert card.format_version == 3  # an aadetect that does not know to leave them out must refuse the card
    fitted = (model / "density_images.txt").read_text().splitlines()
    assert len(fitted) == card.density.n_codes
    assert [fitted[i] for i in card.calibration.lookalike_codes] == listed
    # the hidden anomalies that training fitted the density on, found from the labelled ones, and nothing else
    assert set(listed) == {name for name in fitted if "planted_" in name}
    assert Detector.load(model, "cpu").density.n_codes == card.density.n_codes - len(listed)

    rows = jsonl(invoke("score", anomalous, "--model", model, "--format", "jsonl").stdout)
    pixels = torch.from_numpy(dark_blobs(12, seed=5))[:, None]
    assert [row["log_density"] for row in rows] == Detector.load(model, "cpu").measure(pixels)[1].tolist()

    kept = invoke("calibrate", "--model", model, "--good", dataset["good"], "--anomalous", anomalous,
                  "--keep-lookalikes", "--format", "json")
    assert yaml.safe_load(kept.stdout)["lookalikes"] == 0
    assert read_card(model).calibration.lookalike_codes == []
    assert read_card(model).format_version == 2
    assert (model / "lookalikes.txt").read_text() == ""
    assert Detector.load(model, "cpu").density.n_codes == card.density.n_codes


def test_a_model_folder_without_its_image_list_names_codes_by_number(contaminated_model, dataset, tmp_path):
    model, _, anomalous = contaminated_model
    old = tmp_path / "old"
    shutil.copytree(model, old)
    (old / "density_images.txt").unlink()  # as trained before the list was written
    assert invoke("calibrate", "--model", old, "--good", dataset["good"], "--anomalous", anomalous).exit_code == 0
    listed = (old / "lookalikes.txt").read_text().splitlines()
    assert listed and listed == [f"code {i}" for i in read_card(old).calibration.lookalike_codes]


def test_a_card_with_impossible_lookalike_codes_is_refused(contaminated_model, dataset, tmp_path):
    model, _, anomalous = contaminated_model
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    assert invoke("calibrate", "--model", damaged, "--good", dataset["good"], "--anomalous", anomalous).exit_code == 0
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
