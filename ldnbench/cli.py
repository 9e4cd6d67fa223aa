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


@main.command("export")
@click.option("--results", default="results", show_default=True, help="Folder searched for result records (*.json).")
@click.option("--format", "formats", default="csv,latex,markdown", show_default=True,
              help="Comma list of csv, latex, markdown.")
@click.option("--out", default="leaderboards", show_default=True, help="Folder for tables and figures.")
@click.option("--group-by", default="dataset", show_default=True, type=click.Choice(["dataset", "model", "none"]),
              help="One table per dataset, per model, or a single table.")
@click.option("--with-paper/--no-paper", default=True, show_default=True,
              help="Show the paper's published rows beside your own (marked 'published').")
@click.option("--figures/--no-figures", default=True, show_default=True, help="Also draw figures (PNG and PDF).")
def export_cmd(results, formats, out, group_by, with_paper, figures):
    """Collect result records into leaderboards (CSV with provenance, LaTeX, Markdown) and figures."""
    from ldnbench.report.tables import export

    res = export(results, out, formats, group_by=group_by, with_paper=with_paper, figures=figures)
    for b in res.bad:
        click.echo(f"skipped {b.path}: {b.reason}", err=True)
    if not res.files:
        click.echo(f"no accuracy or benchmark records under {results}; nothing to export")
    for f in res.files:
        click.echo(f"wrote {f}")


# --- benchmarks: bench memory, bench speed (ldnbench.bench) --------------------------------------
