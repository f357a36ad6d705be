"""``ditrt evaluate``: the quality of a sample set."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ditrt.cli import main


@main.command()
@click.argument("samples", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="samples.npz made with the same seeds and labels.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--save", type=click.Path(path_type=Path), default=None, help="Also write the JSON object to this file.")
def evaluate(samples, reference, as_json, save):
    """Quality of a digits sample set: FD (with its floor), class accuracy, paired PSNR."""
    from ditrt.contracts.files import atomic_write
    from ditrt.quality.report import evaluate_samples

    result = evaluate_samples(samples, reference)
    if save is not None:
        atomic_write(save, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"FD              {result['fd']:.3f}   (floor {result['fd_floor']:.3f}: two halves of the real digits)")
    click.echo(f"class accuracy  {result['class_accuracy']:.4f}   ({result['num_samples']} samples)")
    if result["psnr_db"] is not None:
        click.echo(f"paired PSNR     {result['psnr_db']:.2f} dB against {reference}")
