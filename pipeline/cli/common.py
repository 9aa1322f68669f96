"""What the `resnet-pipe` commands share: one-line errors with exit code 2, and tables."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.config import JobError, load_job
from pipeline.data.index import DatasetError

USAGE_ERROR = 2


def fail(message: str) -> None:
    """The error on stderr, then exit 2: bad input, nothing started."""
    click.echo(f"error: {message}", err=True)
    sys.exit(USAGE_ERROR)


def check_prepared(root: str | Path):
    """The prepared dataset's index; exits 2 with the reason when there is none."""
    from pipeline.data.index import load_index

    try:
        return load_index(root)
    except DatasetError as e:
        fail(str(e))


def load_job_or_fail(name: str, overrides: tuple[str, ...]):
    """The job file `name` with `overrides` applied; exits 2 with the reason when it does not load."""
    try:
        return load_job(name, overrides)
    except JobError as e:
        fail(str(e))


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
