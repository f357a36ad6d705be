"""The ``ditrt`` command line: a thin shim over the library verbs.

User mistakes (:class:`ditrt.contracts.errors.DitrtError`) become one line on stderr and exit code 2;
heavy optional imports happen inside the commands so ``ditrt --help`` works anywhere.
"""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import contextmanager

import click

from ditrt import __version__
from ditrt.contracts.errors import DitrtError


class _Interrupt:
    """The SIGINT handler a command runs under: the first Ctrl-C raises KeyboardInterrupt, repeats are
    ignored so that the cleanup (temp files, a partial output folder) finishes; the command then exits
    130 with one line. Whatever exception surfaces after the first Ctrl-C (a library may wrap the
    KeyboardInterrupt in its own error) is the interrupt, never a traceback."""

    def __init__(self):
        self.fired = False

    def __call__(self, signum, frame):
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt

    @contextmanager
    def installed(self):
        try:
            previous = signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread: leave signals alone
            yield self
            return
        try:
            yield self
        finally:
            if not self.fired:  # after a Ctrl-C the process is exiting with Ctrl-C ignored
                signal.signal(signal.SIGINT, previous)


def _interrupted():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while exiting adds nothing
    click.echo("ditrt: interrupted", err=True)
    sys.exit(130)


class _Group(click.Group):
    def invoke(self, ctx):
        interrupt = _Interrupt()
        with interrupt.installed():
            try:
                return super().invoke(ctx)
            except KeyboardInterrupt:
                _interrupted()
            except DitrtError as e:
                if interrupt.fired:
                    _interrupted()
                click.echo(f"ditrt: error: {e}", err=True)
                sys.exit(e.exit_code)
            except Exception:
                if interrupt.fired:
                    _interrupted()
                raise


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
