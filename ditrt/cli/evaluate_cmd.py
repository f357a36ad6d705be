"""``ditrt evaluate``: the quality of a sample set."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import json_option


@main.command()
@click.argument("samples", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None, help="samples.npz made with the same seeds and labels.")
@json_option
@click.option("--save", type=click.Path(path_type=Path), default=None, help="Also write the JSON object to this FILE.")
def evaluate(samples, reference, as_json, save):
    """Quality of a digits sample set: FD (with its floor), class accuracy, paired PSNR."""
    from ditrt.contracts.files import atomic_write, check_writable
    from ditrt.quality.report import evaluate_samples

    if save is not None:
        check_writable(save, what="--save")
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
