"""``ditrt train``: how the built-in assets were made (reproducible, CPU)."""

from __future__ import annotations

from pathlib import Path

import click

from ditrt.cli import main


@main.group()
def train():
    """Re-train the built-in DiT or the evaluator's classifier."""


@train.command("dit")
@click.option("--steps", default=2000, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: the packaged built-in weights.")
def train_dit_cmd(steps, seed, out):
    """Train the built-in digits DiT (about 40 minutes on 2 CPU cores)."""
    from ditrt.models.builtin import BUILTIN_DIT
    from ditrt.training import DiTTrainConfig, train_dit

    path = train_dit(DiTTrainConfig(steps=steps, seed=seed), out or BUILTIN_DIT)
    click.echo(f"wrote {path}")


@train.command("classifier")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Default: the packaged classifier weights.")
def train_classifier_cmd(out):
    """Train the evaluator's digit classifier (under a minute)."""
    from ditrt.quality.classifier import WEIGHTS
    from ditrt.training import ClassifierTrainConfig, train_classifier

    meta = train_classifier(ClassifierTrainConfig(), out or WEIGHTS)
    click.echo(f"wrote {out or WEIGHTS} (held-out accuracy {meta['holdout_accuracy']:.4f})")
