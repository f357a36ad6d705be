"""Shared by the calibration tests: a random DiT of the built-in model's shape and its calibration
inputs from a short float sampling run (each test module gets its own, as before)."""

import pytest

from ditrt.contracts.model_config import CONFIGS
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from tests.conftest import random_dit

SETTINGS = CalibrationSettings(steps="20", timesteps=5, samples=4)


@pytest.fixture(scope="module")
def model():
    return random_dit(CONFIGS["ditrt-digits"], std=0.03)


@pytest.fixture(scope="module")
def batches(model):
    return record_calibration_inputs(model, SETTINGS)
