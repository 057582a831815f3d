"""Settings a library user can pass but the CLI does not expose are refused up front, not mid-training."""

from __future__ import annotations

import math

import pytest

from aadetect.config import TrainConfig
from aadetect.errors import UserError
from aadetect.pipeline import train


@pytest.mark.parametrize("setting, named", [
    ({"patience": 0}, "patience"),
    ({"patience": -3}, "patience"),
    ({"reject_z": -1.0}, "reject_z"),
    ({"reject_z": 0.0}, "reject_z"),
    ({"reject_z": math.nan}, "reject_z"),
    ({"learning_rate": math.nan}, "learning rate"),
    ({"learning_rate": math.inf}, "learning rate"),
    ({"learning_rate": 0.0}, "learning rate"),
    ({"shift_radius": 3}, "--shift-radius"),
    ({"shift_radius": -1}, "--shift-radius"),
    ({"extra_convs": 5}, "--extra-convs"),
])
def test_unworkable_settings_are_refused_before_any_image_is_read(tmp_path, setting, named):
    model_dir = tmp_path / "model"
    with pytest.raises(UserError, match=named):
        # the data folder does not exist: the settings must be judged first
        train(tmp_path / "no-such-folder", model_dir, TrainConfig(device="cpu", **setting))
    assert not model_dir.exists()


def test_the_defaults_and_edge_values_that_work_are_accepted():
    TrainConfig()
    TrainConfig(patience=1, reject_z=0.5, learning_rate=1e-6)
    TrainConfig(shift_radius=0, extra_convs=0)
    TrainConfig(shift_radius=2, extra_convs=4)
