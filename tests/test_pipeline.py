"""The folder-free library core: training from images in memory gives the model `train` writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aadetect.store import read_card
from aadetect.config import TrainConfig
from aadetect.errors import UserError
from aadetect.images import find_images, load_images
from aadetect.pipeline import fit_detector
from aadetect.scoring import Detector

from conftest import SIZE


def test_fit_detector_in_memory_gives_the_model_train_writes(dataset, model_dir):
    pixels, _, _ = load_images(find_images(dataset["train"]), SIZE, 1)
    fitted = fit_detector(pixels, TrainConfig(epochs=3, image_size=SIZE, seed=0, device="cpu"))
    probe = torch.cat([load_images(find_images(dataset[name]), SIZE, 1)[0] for name in ("good", "anomalous")])

    in_memory = fitted.detector.measure(probe)
    from_folder = Detector.load(model_dir, device="cpu").measure(probe)
    for name in ("reconstruction_error", "log_density", "anomaly_log_odds"):
        np.testing.assert_array_equal(getattr(in_memory, name), getattr(from_folder, name))
    assert len(fitted.training.rejected) == read_card(model_dir).data.rejected_count
    assert len(fitted.validation) == read_card(model_dir).data.validation_count
    # the default thresholds rest on the held-out images' numbers as `score` gives them, within its 5% budget
    held_out = pixels[torch.from_numpy(fitted.training.validation_indices)]
    np.testing.assert_array_equal(fitted.detector.measure(held_out).log_density, fitted.validation.log_density)
    assert fitted.detector.predict(held_out).sum() <= 0.05 * len(held_out)
    assert fitted.detector.predict(load_images(find_images(dataset["anomalous"]), SIZE, 1)[0]).mean() > 0.5


@pytest.mark.parametrize("pixels", [np.zeros((20, 1, 16, 16), np.uint8), torch.zeros(20, 1, 16, 16),
                                    torch.zeros(20, 16, 16, dtype=torch.uint8)], ids=["numpy", "float", "3-d"])
def test_fit_detector_says_what_pixels_it_takes(pixels):
    with pytest.raises(UserError, match=r"^the images: training takes uint8 pixels"):
        fit_detector(pixels, TrainConfig(epochs=1, image_size=16, device="cpu"))
