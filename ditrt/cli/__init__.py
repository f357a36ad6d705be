"""The ``ditrt`` command line: a thin shim over the library verbs.

User mistakes (:class:`ditrt.contracts.errors.DitrtError`) become one line on stderr and exit code 2;
heavy optional imports happen inside the commands so ``ditrt --help`` works anywhere.
"""

from __future__ import annotations

import logging
import sys

import click

from ditrt import __version__
from ditrt.contracts.errors import DitrtError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DitrtError as e:
            click.echo(f"ditrt: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("ditrt: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ditrt")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ditrt: DiT checkpoints to quantized TensorRT engines, and the samplers that run them."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


from ditrt.cli import (  # noqa: F401, E402  (registers the commands)
    build_cmd,
    calibrate_cmd,
    compare_cmd,
    evaluate_cmd,
    export_cmd,
    pipeline_cmd,
    sample_cmd,
    train_cmd,
)
