"""Using aadetect from Python: train, calibrate, then score arrays or files directly.

Run from the repository root:  python examples/library.py
It uses the built-in generated cell images, so it needs no data of its own.
"""

from pathlib import Path
import tempfile

from aadetect import Detector, TrainConfig, calibrate, evaluate, train
from aadetect.images import find_images, load_images
from aadetect.synthetic import write_demo_dataset


def walk_through(work: Path) -> None:
    """Every step on generated cells, in a scratch folder."""
    folders = write_demo_dataset(work / "data", seed=1, n_train=600, n_calibrate=15, n_test=50)

    # 1. Train: one typed config object, the same one the CLI builds and the card records.
    card = train(folders["train"], work / "model", TrainConfig(epochs=10, image_size=32, device="cpu"))
    print("trained on", card.data.image_count, "images;", card.data.rejected_count, "rejected")

    # 2. Calibrate both thresholds from a few labelled samples.
    card = calibrate(work / "model", folders["calibrate_good"], folders["calibrate_anomalous"])
    print("thresholds:", card.thresholds.reconstruction_cut, card.thresholds.density_cut)

    # 3. Score decoded images directly (PyOD-style: decision_function / predict).
    detector = Detector.load(work / "model", device="cpu")
    pixels, refs, unreadable = load_images(find_images(folders["test_anomalous"]), detector.image_size,
                                           detector.channels)
    scores = detector.score(pixels)
    for ref, score, reason in list(zip(refs, scores.score, scores.reason))[:5]:
        print(f"{ref.name}: score {score:+.2f} ({reason})")
    print("flagged", int(detector.predict(pixels).sum()), "of", len(refs), "anomalous test images")

    # 4. Or stream files (decoded in worker processes for large folders), row by row.
    for ref, row, error in detector.score_images(find_images(folders["test_good"])[:3]):
        print(ref.name, row if error is None else error)

    # 5. Evaluate on labelled folders: the same numbers `aadetect evaluate --format json` prints.
    report = evaluate(work / "model", folders["test_good"], folders["test_anomalous"])
    print("AUROC", report["auroc"], "balanced accuracy", round(report["balanced_accuracy"], 3))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="aadetect-example-") as work:  # removed afterwards
        walk_through(Path(work))
