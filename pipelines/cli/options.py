"""Options shared by the ``ehr`` commands."""

from __future__ import annotations

from pathlib import Path

import click

from pipelines.workdir import Workdir

workdir_option = click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    callback=lambda _ctx, _param, value: Workdir.of(value),
    help="work directory (default: EHR_WORKDIR or data/work)",
)
