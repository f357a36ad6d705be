"""Option definitions shared by the commands, and the conventions every command follows.

- ``--out`` is a FOLDER for commands that write several files (``calibrate``, ``sample``,
  ``pipeline``) and a FILE for commands that write one artifact (``export``: the ``.onnx``;
  ``build``: the ``.plan``, its sidecar ``.plan.json`` beside it). Each command checks it before
  any work (:func:`ditrt.contracts.files.check_writable`): a file given where a folder is written,
  an existing folder given where a file is written, or a path under a regular file is refused.
- ``--steps`` always means the sampling run's schedule (250, 100, 50 DDPM steps, or ddim50);
  ``--calib-steps`` is the schedule of the run that records the calibration inputs.
- ``--batch-size`` counts images per sampler call (classifier-free guidance doubles the network batch).
- ``--device`` (auto, cpu or cuda[:N]) is on every command that computes; auto is cuda when torch
  sees a GPU. ``export`` traces on the CPU only and says so for cuda.
- ``--workspace`` is in MiB on the command line; :func:`mib_to_bytes` is the one conversion to the
  library's bytes.
- ``--json`` (``check``, ``export``, ``build``, ``evaluate``, ``pipeline``, ...) prints exactly one
  JSON object on stdout; progress and messages go to stderr.
- Every option has help text, every option is validated before the expensive work, and a user
  mistake is one line ``ditrt: error: ...`` with exit code 2; Ctrl-C is ``ditrt: interrupted``, exit 130.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ditrt.contracts.errors import ConfigError

MIB = 1 << 20


def parse_classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"--classes must be comma-separated class ids such as 0,3,7, got {text!r}") from None


def resolve_device(device: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu; refuse cuda without one and anything else."""
    import torch

    if device != "auto" and device != "cpu" and not is_cuda_device(device):
        raise ConfigError(f"--device takes auto, cpu or cuda[:N], got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or install a CUDA build of torch")
    return device


def is_cuda_device(device: str) -> bool:
    """``cuda`` or ``cuda:N``."""
    head, sep, index = device.partition(":")
    return head == "cuda" and (not sep or index.isdigit())


def mib_to_bytes(mib: int | None) -> int | None:
    """``--workspace`` MiB -> the bytes :class:`ditrt.contracts.profile.BuildConfig` takes (None stays None)."""
    return None if mib is None else int(mib) * MIB


def emit_json(obj) -> None:
    """The one JSON object of a ``--json`` command, on stdout."""
    click.echo(json.dumps(obj))


def say(as_json: bool):
    """How a command reports progress: stdout normally, stderr under ``--json`` (stdout holds the JSON)."""
    return (lambda text: click.echo(text, err=True)) if as_json else click.echo


model_option = click.option(
    "--model", "model_spec", default="builtin", show_default=True, help="'builtin' or a checkpoint: official .pt, .safetensors, diffusers folder."
)


def checkpoint_options(f):
    """What a checkpoint's shapes cannot say: ``config_name``, ``num_classes``, ``num_heads`` keywords
    (pass them to ``load_model(spec, config=..., num_classes=..., num_heads=...)`` with :func:`load_options`)."""
    f = click.option("--num-heads", type=click.IntRange(min=1), default=None,
                     help="Attention heads of a checkpoint that records no config (shapes do not show them).")(f)  # fmt: skip
    f = click.option("--num-classes", type=click.IntRange(min=1), default=None,
                     help="Classes of a checkpoint that records no config (its label table has one more row with a null class).")(f)  # fmt: skip
    return click.option("--config", "config_name", default=None,
                        help="Named DiT config (e.g. DiT-XL/2) of a checkpoint that records none.")(f)  # fmt: skip


def load_options(config_name=None, num_classes=None, num_heads=None) -> dict:
    """The keyword arguments :func:`ditrt.models.builtin.load_model` takes from :func:`checkpoint_options`."""
    return {"config": config_name, "num_classes": num_classes, "num_heads": num_heads}


device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] (auto: cuda when torch sees a GPU).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout (messages go to stderr).")
workspace_option = click.option(
    "--workspace", type=click.IntRange(min=1), default=None, help="TensorRT builder workspace limit in MiB [default: TensorRT's]."
)


def steps_option(default: str = "250"):
    return click.option("--steps", default=default, show_default=True,
                        help="Sampling schedule of the sampling run: 250, 100, 50 (DDPM steps) or ddim50 (DDIM).")  # fmt: skip


def batch_size_option(default: int = 256):
    return click.option("--batch-size", default=default, show_default=True, type=int,
                        help="Images per sampler call (guidance doubles the network batch).")  # fmt: skip


def out_folder_option(writes: str):
    """``--out`` of a command that writes several files into a folder (``writes`` says which)."""
    return click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
                        help=f"Output FOLDER (created if missing): {writes}.")  # fmt: skip


def out_file_option(what: str):
    """``--out`` of a command that writes one artifact file (``what`` says which)."""
    return click.option("--out", "out_path", required=True, type=click.Path(path_type=Path),
                        help=f"Output FILE: {what}.")  # fmt: skip
