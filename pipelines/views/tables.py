"""The platform's views: ViewDefinitions from ``fhir/views/`` run over ``deid_resources`` into
DuckDB (schema ``views``) and Parquet (``WORKDIR/views/<name>.parquet``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson

from deid.kanon import released_filter
from fhirlake.viewdef import (
    ViewDefinition,
    duckdb_type,
    load_view,
    write_view_table,
)
from fhirlake.viewdef import (
    iter_fhir_resources as iter_fhir_resources,  # re-exported: readers of FHIR files for views
)
from pipelines.content import views_dir
from pipelines.publish import PublishCheck, publish_checked, publish_table
from pipelines.workdir import Workdir

VIEWS_DIR = views_dir()
VIEWS_SCHEMA = "views"
_FETCH_ROWS = 2_000
# The order a view's rows are written in: by their pseudonyms, which say nothing. Written in the
# order deid_resources holds them (the source's: its files by name, which Synthea writes as the
# patient's name, or an export's records by MRN), the rows of each k-anonymity group stood in
# that order, and a list of the population sorted the same way paired each row with a person.
ROW_ORDER = "patient_id, id"


def view_files(views_dir: Path = VIEWS_DIR) -> list[Path]:
    """The ViewDefinition files of a folder, in name order."""
    return sorted(Path(views_dir).glob("*.json"))


def load_views(views_dir: Path = VIEWS_DIR) -> list[ViewDefinition]:
    return [load_view(path) for path in view_files(views_dir)]


@dataclass
class ViewRunResult:
    name: str
    table: str
    parquet: Path
    rows: int
    resources: int
    patients: int
    columns: list[tuple[str, str]]
    seconds: float
    published: bool = True
    check: Any = None  # what the publish check returned, when one was given


def released_resources(
    con: duckdb.DuckDBPyConnection, resource_type: str, only_ids: str | None = None
) -> Iterator[dict[str, Any]]:
    """De-identified resources of one type, streamed from the warehouse in chunks, without
    those of patients not released (withheld, or with no Patient resource yet); with
    ``only_ids`` (a table with an ``id`` column, a trusted name), only the resources it lists."""
    # patients the k-anonymity step did not release: none of their rows is read
    released = released_filter(con)
    only = f" AND id IN (SELECT id FROM {only_ids})" if only_ids else ""
    cursor = con.cursor()
    try:
        # in the table's order, unsorted: a streamed sort of every resource's text does not fit
        # the warehouse's memory limit (256 MB) at 10,000 patients (620,000 Observations); the
        # view's rows, far narrower, are sorted instead (ROW_ORDER)
        cursor.execute(
            f"SELECT resource FROM deid_resources WHERE resource_type = ? AND {released}{only}",
            [resource_type],
        )
        while chunk := cursor.fetchmany(_FETCH_ROWS):
            for (resource,) in chunk:
                yield orjson.loads(resource)
    finally:
        cursor.close()


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> int:
    found = con.execute(sql, params or []).fetchone()
    return int(found[0]) if found else 0


def run_view_over_release(
    con: duckdb.DuckDBPyConnection,
    view: ViewDefinition,
    workdir: Path,
    check: PublishCheck[Any] | None = None,
) -> ViewRunResult:
    """Replace ``views.<name>`` and its Parquet file with the view over the release. With
    ``check`` (given the connection and the staging table), the view is published only when
    the check's result has ``passed``; the result is in ``ViewRunResult.check``."""
    started = time.perf_counter()
    table = f"{VIEWS_SCHEMA}.{view.name}"
    parquet = Workdir(Path(workdir)).views / f"{view.name}.parquet"
    # the view is built under a scratch name, then published (DuckDB table + Parquet) in one
    # atomic step, so a failed build leaves the previous release of the view in place; its
    # rows in ROW_ORDER, never the source's
    scratch = f"{table}__rows"
    try:
        write_view_table(con, view, released_resources(con, view.resource), scratch)
        source = f"SELECT * FROM {scratch} ORDER BY {ROW_ORDER}"
        if check is None:
            rows, published, outcome = publish_table(con, table, parquet, source), True, None
        else:
            staged = publish_checked(con, table, parquet, source, check)
            rows, published, outcome = staged.rows, staged.published, staged.check
    finally:
        con.execute(f"DROP TABLE IF EXISTS {scratch}")
    return view_result(con, view, workdir, started, published=published, check=outcome, rows=rows)


def view_result(
    con: duckdb.DuckDBPyConnection,
    view: ViewDefinition,
    workdir: Path,
    started: float,
    *,
    published: bool,
    check: Any,
    rows: int | None = None,
) -> ViewRunResult:
    """The result of a view run: counts of the published table (``rows`` when given: the rows
    staged, published or not), the resources of its type, its columns and the time since
    ``started``."""
    table = f"{VIEWS_SCHEMA}.{view.name}"
    if rows is None:
        rows = _count(con, f"SELECT count(*) FROM {table}")
    names = {c.name for c in view.columns}
    patients = 0
    if not published:
        pass  # nothing new is visible: counts of the previous release would mislead
    elif "patient_id" in names:
        patients = _count(con, f"SELECT count(DISTINCT patient_id) FROM {table}")
    elif view.resource == "Patient":
        patients = rows
    return ViewRunResult(
        name=view.name,
        table=table,
        parquet=Workdir(Path(workdir)).views / f"{view.name}.parquet",
        rows=rows,
        resources=_count(
            con, "SELECT count(*) FROM deid_resources WHERE resource_type = ?", [view.resource]
        ),
        patients=int(patients),
        columns=[(c.name, duckdb_type(c)) for c in view.columns],
        seconds=round(time.perf_counter() - started, 3),
        published=published,
        check=check,
    )
