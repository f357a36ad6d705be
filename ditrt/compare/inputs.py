"""Real DiT inputs for comparisons: noisy samples of a float sampling run at chosen steps, with
valid labels (cond and null class), saved in Polygraphy's input-file format (a JSON list of feed
dicts) so that ``polygraphy run --load-inputs`` can use them too."""

from __future__ import annotations

import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch

from ditrt.contracts.recipe import CalibrationSettings
from ditrt.diffusion.recording import record_calibration_inputs

Feed = dict[str, np.ndarray]


@contextmanager
def quiet_polygraphy():
    """Polygraphy prints its log to stdout: keep it to errors and send those to stderr, so that stdout
    carries only the command's own output (``--json``: one JSON object)."""
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.ERROR
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        G_LOGGER.module_severity = old


def record_feeds(model, *, steps: str = "50", timesteps: int = 5, samples: int = 4, seed: int = 1234, pixel_space: bool = False,
                 device: str = "cpu") -> list[Feed]:  # fmt: skip
    """Inputs ``{"x", "t", "y"}`` seen by the float model (on ``device``) at ``timesteps`` steps of a sampling run."""
    settings = CalibrationSettings(steps=steps, timesteps=timesteps, samples=samples, seed=seed)
    batches = record_calibration_inputs(model, settings, device=device, pixel_space=pixel_space)
    return [feed(x, t, y) for x, t, y in batches]


def feed(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> Feed:
    return {"x": x.float().numpy(), "t": t.float().numpy(), "y": y.long().numpy()}


def save_feeds(feeds: list[Feed], path: Path) -> Path:
    from polygraphy.json import save_json

    from ditrt.contracts.files import atomic_write

    with quiet_polygraphy():
        return atomic_write(Path(path), lambda tmp: save_json(feeds, str(tmp), description="ditrt comparison inputs"))


def load_feeds(path: Path) -> list[Feed]:
    from polygraphy.json import load_json

    from ditrt.contracts.errors import ArtifactError

    try:
        with quiet_polygraphy():
            feeds = load_json(str(path), description="ditrt comparison inputs")
    except Exception as e:
        raise ArtifactError(f"{path} is not a Polygraphy input file ({str(e).splitlines()[0]}); save one with --save-inputs") from None
    return [dict(f) for f in feeds]
