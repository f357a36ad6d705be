"""Fixtures: the trained built-in model and its calibration inputs, recorded once per session. The random
DiTs (TINY and the built-in shape), their absmax recipes and exported graphs are the suite's
(tests/conftest.py: ``models``, ``recipes``, ``exported``), shared with the runtime, compare and CLI tests."""

from __future__ import annotations

import pytest
import torch

from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.models.builtin import load_model

#: Calibration of the trained built-in model in the parity and method-export tests.
BUILTIN_SETTINGS = CalibrationSettings(steps="50", timesteps=8, samples=8)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def builtin():
    """The trained built-in model (calibration copies it; nothing here changes it)."""
    return load_model("builtin")


@pytest.fixture(scope="session")
def batches(builtin):
    """Its calibration inputs under :data:`BUILTIN_SETTINGS`, recorded once per session."""
    torch.set_num_threads(1)
    return record_calibration_inputs(builtin, BUILTIN_SETTINGS, pixel_space=True)
