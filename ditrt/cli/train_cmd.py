"""``ditrt train``: how the built-in assets were made (reproducible, CPU)."""

from __future__ import annotations

from pathlib import Path

import click

from ditrt.cli import main


@main.group()
def train():
    """Re-train the built-in DiT or the evaluator's classifier."""


@train.command("dit")
@click.option("--steps", default=2000, show_default=True, type=int, help="Optimizer steps (training iterations, not sampling steps).")
@click.option("--batch-size", default=128, show_default=True, type=int, help="Training images per optimizer step.")
@click.option("--lr", default=3e-4, show_default=True, type=float, help="AdamW peak learning rate.")
@click.option("--warmup", default=100, show_default=True, type=int, help="Linear learning-rate warm-up steps.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the initialisation, batches and noise.")
@click.option("--init", type=click.Path(path_type=Path, exists=True), default=None, help="Continue from these weights.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output FILE (.safetensors) [default: the packaged built-in weights].")
def train_dit_cmd(steps, batch_size, lr, warmup, seed, init, out):
    """Train the built-in digits DiT on 2 CPU cores (see the README for the two stages)."""
    from ditrt.contracts.errors import ConfigError
    from ditrt.contracts.files import check_writable
    from ditrt.models.builtin import BUILTIN_DIT
    from ditrt.training import DiTTrainConfig, train_dit

    for name, value in (("--steps", steps), ("--batch-size", batch_size), ("--warmup", warmup)):
        if value <= 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    if not lr > 0:
        raise ConfigError(f"--lr must be a positive learning rate, got {lr}")
    check_writable(out or BUILTIN_DIT)
    config = DiTTrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup, seed=seed, init=str(init) if init else None)
    path = train_dit(config, out or BUILTIN_DIT)
    click.echo(f"wrote {path}")


@train.command("classifier")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output FILE (.safetensors) [default: the packaged classifier weights].")
def train_classifier_cmd(out):
    """Train the evaluator's digit classifier (under a minute)."""
    from ditrt.contracts.files import check_writable
    from ditrt.quality.classifier import WEIGHTS
    from ditrt.training import ClassifierTrainConfig, train_classifier

    check_writable(out or WEIGHTS)
    meta = train_classifier(ClassifierTrainConfig(), out or WEIGHTS)
    click.echo(f"wrote {out or WEIGHTS} (held-out accuracy {meta['holdout_accuracy']:.4f})")
