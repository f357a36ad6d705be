"""The built-in model: a class-conditional DiT trained by ditrt on scikit-learn's digits.

Made by ``ditrt train dit`` (see :mod:`ditrt.training`); the weights ship in the package.
"""

from __future__ import annotations

from pathlib import Path

from ditrt.contracts.errors import CheckpointError
from ditrt.models.dit import DiT

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BUILTIN_DIT = WEIGHTS_DIR / "dit-digits.safetensors"
BUILTIN_NAME = "builtin"


def load_model(spec: str | Path, **options) -> DiT:
    """``"builtin"`` or the path of any checkpoint :func:`ditrt.models.checkpoints.load_dit` reads;
    ``options`` (``config``, ``num_classes``, ``num_heads``) go to ``load_dit`` for a checkpoint and
    are refused for the built-in model, which records its own config."""
    from ditrt.models.checkpoints import load_dit

    if str(spec) == BUILTIN_NAME:
        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
        if given:
            raise CheckpointError(f"the built-in model records its own config; drop {', '.join(given)}")
        if not BUILTIN_DIT.exists():
            raise CheckpointError(f"the built-in weights {BUILTIN_DIT} are missing; reinstall ditrt or run `ditrt train dit`")
        return load_dit(BUILTIN_DIT)
    return load_dit(spec, **options)


def is_pixel_model(model: DiT) -> bool:
    """The built-in digits model works in pixel space ([-1, 1]); official DiTs on VAE latents."""
    return model.config.pixel_space
