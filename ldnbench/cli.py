"""Command-line interface: parses options and calls library functions, nothing else.

Every command lives in one section below, grouped by the library module it calls.
"""

from __future__ import annotations

import sys

import click

from ldnbench import __version__
from ldnbench.errors import UserError


class _Group(click.Group):
    """Turns :class:`UserError` into one line on stderr and a non-zero exit (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ldnbench")
def main() -> None:
    """Train, evaluate, compare and dissect Ladder-style DenseNet segmentation models."""


# --- models: zoo, flops (ldnbench.models) ------------------------------------------------------


# --- datasets: datasets, datasets check, synth (ldnbench.data) -----------------------------------


# --- evaluation: eval, score (ldnbench.evaluate) -------------------------------------------------


# --- training: train (ldnbench.train) ------------------------------------------------------------


# --- studies and reports: cross, prune, export, demo (ldnbench.studies, ldnbench.report) ---------


# --- benchmarks: bench memory, bench speed (ldnbench.bench) --------------------------------------
