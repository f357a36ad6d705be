"""Fixtures: random DiTs (TINY and the built-in 'ditrt-digits' shape) and their exported graphs,
each exported once per test session (an export takes a few seconds)."""

from __future__ import annotations

import pytest
import torch

from ditrt.contracts.model_config import CONFIGS
from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs
from ditrt.export import export_onnx
from ditrt.models.builtin import load_model
from tests.conftest import TINY, random_dit
from tests.export.recipes import absmax_recipe

CONFIG = {"tiny": TINY, "digits": CONFIGS["ditrt-digits"]}
#: Calibration of the trained built-in model in the parity and method-export tests.
BUILTIN_SETTINGS = CalibrationSettings(steps="50", timesteps=8, samples=8)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models():
    return {name: random_dit(cfg) for name, cfg in CONFIG.items()}


@pytest.fixture(scope="session")
def recipes(models):
    """(model name, precision) -> (recipe, tensors), absmax scales, every Linear quantized."""
    cache = {}

    def get(name: str, precision: str):
        if (name, precision) not in cache:
            cache[name, precision] = absmax_recipe(models[name], precision)
        return cache[name, precision]

    return get


@pytest.fixture(scope="session")
def exported(models, recipes, tmp_path_factory):
    """(model name, precision, dtype) -> path of the exported graph; precision "float" or a recipe's."""
    cache = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str, precision: str = "float", dtype: str = "fp32"):
        key = (name, precision, dtype)
        if key not in cache:
            torch.set_num_threads(1)
            kw = {} if precision == "float" else dict(zip(("recipe", "tensors"), recipes(name, precision)))
            cache[key] = export_onnx(models[name], root / f"{name}-{precision}-{dtype}.onnx", dtype=dtype, **kw)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def builtin():
    """The trained built-in model (calibration copies it; nothing here changes it)."""
    return load_model("builtin")


@pytest.fixture(scope="session")
def batches(builtin):
    """Its calibration inputs under :data:`BUILTIN_SETTINGS`, recorded once per session."""
    torch.set_num_threads(1)
    return record_calibration_inputs(builtin, BUILTIN_SETTINGS, pixel_space=True)
