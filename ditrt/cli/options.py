"""Option parsing shared by several commands."""

from __future__ import annotations

import click

from ditrt.contracts.errors import ConfigError


def parse_classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--classes must be comma-separated class ids such as 0,3,7, got {text!r}") from None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or install a CUDA build of torch")
    return device


model_option = click.option(
    "--model", "model_spec", default="builtin", show_default=True, help="'builtin' or a checkpoint: official .pt, .safetensors, diffusers folder."
)
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
