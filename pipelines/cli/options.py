"""Options shared by the ``ehr`` commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from pipelines.workdir import Workdir

if TYPE_CHECKING:
    import duckdb

workdir_option = click.option(
    "--workdir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    callback=lambda _ctx, _param, value: Workdir.of(value),
    help="work directory (default: EHR_WORKDIR or data/work)",
)


IN_USE = (
    "the warehouse at {path} is in use by another process: stop pipeline runs and the "
    "Dagster UI, then run the command again"
)


@contextmanager
def existing_warehouse(
    workdir: Workdir, *, read_only: bool, wait: bool = False
) -> Iterator[duckdb.DuckDBPyConnection]:
    """An existing warehouse only: the commands never create an empty one, and a missing or
    busy one is named in a usage error, not a traceback. With ``wait``, waits while another
    process has it open (:func:`vault.warehouse.connect_when_free`)."""
    import duckdb

    from vault import warehouse

    path = workdir.warehouse
    if not path.exists():
        raise click.ClickException(f"no warehouse at {path}")
    try:
        if wait:
            con = warehouse.connect_when_free(path, read_only=read_only)
        else:
            con = warehouse.connect(path, read_only=read_only)
    except duckdb.IOException as exc:
        raise click.ClickException(IN_USE.format(path=path)) from exc
    try:
        yield con
    finally:
        con.close()
