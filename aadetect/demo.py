"""The whole job on built-in data: generated cell images, then train, calibrate and evaluate."""

from __future__ import annotations

from pathlib import Path

from aadetect.config import TrainConfig
from aadetect.errors import UserError
from aadetect.progress import Reporter

DEMO_IMAGE_SIZE = 48  # generated images; the model sees them at 32 px
DEMO_TRAIN_IMAGES = 1500
DEMO_EPOCHS = 20


def demo_config(seed: int = 0, epochs: int = DEMO_EPOCHS) -> TrainConfig:
    """Settings sized so the demo finishes in a couple of minutes on two CPU cores."""
    return TrainConfig(seed=seed, device="cpu", epochs=epochs, image_size=32)


def run_demo(out: str | Path, *, seed: int = 0, epochs: int = DEMO_EPOCHS, train_images: int = DEMO_TRAIN_IMAGES,
             reporter: Reporter | None = None) -> dict:
    """Write the demo images under `out`, train a model there and return the test-split evaluation."""
    from aadetect.pipeline import calibrate, evaluate, train
    from aadetect.synthetic import write_demo_dataset
    from aadetect.training import validation_size

    reporter = reporter or Reporter()
    config = demo_config(seed, epochs)  # checked before any image is written
    # the KDE needs more codes than dimensions, with room for the images robust training leaves out
    latent_dim = config.resolved(config.image_size).latent_dim
    fewest = next(n for n in range(1, 100_000)
                  if n - validation_size(n, config.validation_fraction) >= 3 * latent_dim // 2)
    if train_images < fewest:
        raise UserError(f"--train-images must be at least {fewest} (1.5 times the {latent_dim} latent "
                        f"dimensions, plus the held-out images), got {train_images}")
    out = Path(out)
    folders = write_demo_dataset(out / "data", seed=seed, size=DEMO_IMAGE_SIZE, n_train=train_images)
    reporter.info(f"demo images written under {out / 'data'}")
    model_dir = out / "model"
    train(folders["train"], model_dir, config, reporter=reporter)
    calibrate(model_dir, folders["calibrate_good"], folders["calibrate_anomalous"], device="cpu", reporter=reporter)
    report = evaluate(model_dir, folders["test_good"], folders["test_anomalous"],
                      masks=out / "data" / "masks" / "test_anomalous", device="cpu", reporter=reporter)
    reporter.info(f"model: {model_dir}   data: {out / 'data'}   "
                  f"(try: aadetect score --model {model_dir} {folders['test_anomalous']})")
    return report
