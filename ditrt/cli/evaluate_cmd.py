"""``ditrt evaluate``: the quality of a sample set (also sharded: ``torchrun --nproc_per_node N -m ditrt evaluate ...``)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ditrt.cli import main
from ditrt.cli.options import device_option, json_option

_path = click.Path(path_type=Path)


@main.command()
@click.argument("samples", type=_path)
@click.option("--reference", type=_path, default=None, help="samples.npz made with the same seeds and labels (paired PSNR).")
@click.option("--reference-batch", type=_path, default=None,
              help="ADM reference batch .npz (arr_0 uint8 (N, H, W, 3), e.g. VIRTUAL_imagenet256_labeled.npz) for FID and precision/recall.")
@click.option("--reference-stats", type=_path, default=None,
              help="Reference statistics FILE (.npz): read when it exists, else computed from --reference-batch and written there.")
@click.option("--adm-stats", is_flag=True,
              help="FID against the reference batch's precomputed mu/sigma (made by the ADM evaluator's TensorFlow Inception).")
@click.option("--inception", type=_path, default=None,
              help="Local StyleGAN2-ADA metrics Inception TorchScript file inception-2015-12-05.pt [default: $DITRT_INCEPTION]; never downloaded.")
@device_option
@click.option("--batch-size", default=100, show_default=True, type=int,
              help="Images per Inception call (the same value gives the same numbers on 1 or N processes).")
@json_option
@click.option("--save", type=_path, default=None, help="Also write the JSON object to this FILE.")  # fmt: skip
def evaluate(samples, reference, reference_batch, reference_stats, adm_stats, inception, device, batch_size, as_json, save):
    """Quality of a sample set: digits (FD with its floor, class accuracy) or RGB images (FID, IS,
    precision/recall with a local Inception file), and paired PSNR against --reference."""
    from ditrt.cli.options import resolve_device
    from ditrt.contracts.files import atomic_write, check_writable
    from ditrt.distributed import process_group
    from ditrt.quality.report import evaluate_samples

    if save is not None:
        check_writable(save, what="--save")
    device = resolve_device(device)
    with process_group(device) as world:
        result = evaluate_samples(samples, reference, inception=inception, reference_batch=reference_batch, reference_stats=reference_stats,
                                  adm_stats=adm_stats, device=world.device(device), batch_size=batch_size, world=world, progress=True)  # fmt: skip
    if result is None:  # not the main rank of a torchrun world
        return
    if save is not None:
        atomic_write(save, lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
    if as_json:
        click.echo(json.dumps(result))
    elif result["evaluator"] == "digits":
        _digits_table(result, reference)
    else:
        _inception_table(result, reference)


def _digits_table(result: dict, reference) -> None:
    click.echo(f"FD              {result['fd']:.3f}   (floor {result['fd_floor']:.3f}: two halves of the real digits)")
    click.echo(f"class accuracy  {result['class_accuracy']:.4f}   ({result['num_samples']} samples)")
    if result["psnr_db"] is not None:
        click.echo(f"paired PSNR     {result['psnr_db']:.2f} dB against {reference}")


_ROWS = [("fid", "FID", ".3f"), ("inception_score", "Inception Score", ".3f"), ("precision", "precision", ".4f"),
         ("recall", "recall", ".4f"), ("sfid", "sFID", ""), ("lpips", "LPIPS", ""), ("psnr_db", "paired PSNR (dB)", ".2f")]  # fmt: skip


def _inception_table(result: dict, reference) -> None:
    h, w = result["resolution"]
    click.echo(f"{result['num_samples']} samples {h}x{w}, Inception {result['inception'] or '-'}, {result['world_size']} process(es)")
    if result["reference_batch"] or result["reference_statistics"]:
        click.echo(f"reference: {result['reference_batch'] or '-'} ({result['num_reference']} images), statistics {result['reference_statistics']}")
    for key, name, fmt in _ROWS:
        value = result[key]
        shown = "absent" if value is None else format(value, fmt)
        why = result["absent"].get(key, "")
        if key == "inception_score" and value is not None:
            why = f"{result['inception_score_splits']} split(s)"
        if key == "psnr_db" and value is not None:
            why = f"against {reference}"
        click.echo(f"{name:<18}{shown:>10}   {why}".rstrip())
    for note in result["notes"]:
        click.echo(f"note: {note}")
