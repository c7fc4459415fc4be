"""Refreshing a view after a batch with work in proportion to what changed.

Each view remembers what it was built from: the id and a digest of every released resource it
read (``release_state.view_sources``) and a digest of its ViewDefinition
(``release_state.view_definitions``). A refresh compares them with the release as it is now:

- resources new or changed since (a batch, a re-run batch, the k-anonymity step rewriting a
  Patient, a patient no longer withheld) are run through the view again;
- resources gone (erased, withheld) lose their rows;
- every other row is kept as it was.

A changed ViewDefinition, a view never built, or no bookkeeping at all rebuilds the view in full.
The new rows are scanned in full (every canary, a patient's own birth date in their rows); the
kept rows were scanned when they were published, and each distinct value of their text columns
is scanned again against every canary known now (a patient new to the release whose name stood
in an older row is found there too). A patient's own birth date is searched only in that
patient's rows, so it is not among the distinct values: the kept rows of every patient with a
Patient resource in a vault batch ingested (or ingested again) since the view was last scanned
(a corrected birth date, a Patient arriving after their other resources) are searched again for
that patient's birth date as the vault holds it now, even when none of the view's own resources
changed. The view records which batch runs its scan covered
(``release_state.view_batches``: a batch id and a digest of the batch's position, ingest time
and report, and of the settings it was de-identified under; no patient, no PHI): a batch
ingested again keeps its records' vault positions, so the highest position seen would not tell
it apart, and a batch de-identified again under other leak-scan rules (an upgrade's) has its
patients' kept rows searched under those rules too, as a new ingest of it would. A view
without that record (built before it existed) has every patient's kept rows searched for their
birth date once.

The table and its Parquet file are published atomically (:mod:`pipelines.publish`). A refresh
changes the table in place (the rows of changed and gone resources deleted, the new ones
inserted) and writes its bookkeeping in the same transaction, so a crash leaves both as they were
and the next refresh redoes the same resources and re-checks the same patients; a full build
publishes a new table and writes the bookkeeping after, with the same effect. A scan that finds
a leak publishes nothing and records nothing, so the next refresh scans the same rows again.

A leak found in the rows a view *kept* (a patient's own birth date in a kept row, or a distinct
value of the kept rows, when the new rows scanned clean) is in the published table already:
the view is withdrawn (its Parquet file deleted, then its table dropped and its bookkeeping
cleared, in one transaction), so nothing reads it, and the next refresh builds it in full and
publishes it only once its scan passes. A leak in the new rows alone leaves the published view
as it was.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import orjson

from deid.kanon import released_filter
from deid.leakscan import CanarySet, LeakScanResult
from deid.release import merged_scans, scan_column_values, scan_released_table
from deid.released_table import ensure_resource_digests
from deid.staging import LEDGER_TABLE
from fhirlake.viewdef import ViewDefinition, write_view_table
from pipelines.parallel import on_cursors
from pipelines.publish import TableChange, publish_in_place, transaction
from pipelines.views.tables import (
    ROW_ORDER,
    VIEWS_SCHEMA,
    ViewRunResult,
    released_resources,
    run_view_over_release,
    view_result,
)
from pipelines.workdir import RELEASE_STATE_SCHEMA, Workdir
from vault.catalog import has_table
from vault.keys import fsync_dir
from vault.warehouse import BATCH_DIGEST_SQL

# the schema the erasure plan purges by patient_id (pipelines.workdir)
STATE_SCHEMA = RELEASE_STATE_SCHEMA
SOURCES = f"{STATE_SCHEMA}.view_sources"
DEFINITIONS = f"{STATE_SCHEMA}.view_definitions"
# per view, the vault batch runs its last scan covered: a batch ingested again after it (another
# ingest time and report) brings its Patients' birth dates to be searched in their kept rows
BATCHES = f"{STATE_SCHEMA}.view_batches"
# Bumped when the view runner changes what it writes for the same definition and resources.
# 2: rows in the order of the pseudonyms (views.tables.ROW_ORDER); a view written before kept
# its rows, in the source's order, through every incremental refresh
RUNNER_VERSION = "2"


@dataclass(frozen=True)
class _Scratch:
    """Work tables of one view's refresh, dropped when the refresh ends. The digest of every
    released resource (``current``, the large one) is a temporary table: a regular one is
    written through the database file and took four to six times as long (0.18-0.57 s against
    0.06-0.09 s for 190,000 Observations). The others are regular tables in ``release_state``:
    a cursor streaming the changed resources is a second connection, which cannot see another
    connection's temporary tables, and they are small."""

    view: str

    @property
    def current(self) -> str:
        # the temporary catalog of the connection that staged it (only that one reads it)
        return f"temp.main.{self.view}__current"

    @property
    def changed(self) -> str:
        return f"{STATE_SCHEMA}.{self.view}__changed"

    @property
    def removed(self) -> str:
        return f"{STATE_SCHEMA}.{self.view}__removed"

    @property
    def batches(self) -> str:
        return f"{STATE_SCHEMA}.{self.view}__batches"

    @property
    def recheck(self) -> str:
        return f"{STATE_SCHEMA}.{self.view}__recheck"

    def drop(self, con: duckdb.DuckDBPyConnection) -> None:
        for table in (self.current, self.changed, self.removed, self.batches, self.recheck):
            con.execute(f"DROP TABLE IF EXISTS {table}")


@dataclass(frozen=True)
class ViewRefresh:
    """A refreshed view: the run's result, and how much of it was new."""

    result: ViewRunResult
    mode: str  # "full", "incremental" or "unchanged"
    resources_changed: int
    resources_removed: int
    # patients with a Patient in a batch ingested since the view was last scanned: their kept
    # rows searched again for their own birth date
    patients_rechecked: int = 0
    # a leak found in the rows the view kept: the published view was taken down
    withdrawn: bool = False


def definition_digest(view: ViewDefinition) -> str:
    """A digest of the ViewDefinition as loaded (and of the runner's version)."""
    document = orjson.dumps(view.document, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(RUNNER_VERSION.encode() + b"\0" + document).hexdigest()


def ensure_state_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA}")
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {SOURCES} "
        "(view VARCHAR NOT NULL, id VARCHAR NOT NULL, patient_id VARCHAR, digest UBIGINT NOT NULL)"
    )
    _digests_as_numbers(con)
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {DEFINITIONS} (view VARCHAR PRIMARY KEY, digest VARCHAR)"
    )
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {BATCHES} "
        "(view VARCHAR NOT NULL, batch_id VARCHAR NOT NULL, digest UBIGINT NOT NULL)"
    )


def _digests_as_numbers(con: duckdb.DuckDBPyConnection) -> None:
    """Bookkeeping written when the digests were text (the same hash, written in decimal) keeps
    its values as numbers: no view is rebuilt for it."""
    ((kind,),) = con.execute(
        "SELECT data_type FROM duckdb_columns() WHERE database_name = current_database() "
        "AND schema_name = ? AND table_name = ? AND column_name = 'digest'",
        list(SOURCES.split(".")),
    ).fetchall()
    if kind != "UBIGINT":
        con.execute(
            f"ALTER TABLE {SOURCES} ALTER digest SET DATA TYPE UBIGINT "
            "USING CAST(digest AS UBIGINT)"
        )


def _stage_current_sources(
    con: duckdb.DuckDBPyConnection, scratch: _Scratch, resource_type: str
) -> None:
    """Table ``scratch.current``: id, patient and digest of every released resource of the
    view's type now (only released patients' resources: :func:`deid.kanon.released_filter`)."""
    released = released_filter(con)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {scratch.current} AS "
        # the digest each writer of the release keeps beside the text (deid.released_table)
        "SELECT id, patient_id, digest FROM deid_resources "
        f"WHERE resource_type = ? AND {released}",
        [resource_type],
    )


def _stage_vault_batches(con: duckdb.DuckDBPyConnection, scratch: _Scratch) -> None:
    """Table ``scratch.batches``: each batch of the vault now, with a digest of its position,
    ingest time and report (a batch ingested again, with other content at the same positions,
    has another) and of the settings it was last de-identified under (``deid_batches``: a
    batch de-identified again under other leak-scan rules, an upgrade's, without a new ingest,
    has another too); read from the small ``batches`` and ``deid_batches`` tables, nothing
    decrypted."""
    # a release without its vault (tests of the views alone)
    if not has_table(con, "batches"):
        con.execute(f"CREATE OR REPLACE TABLE {scratch.batches} (batch_id VARCHAR, digest UBIGINT)")
        return
    settings = "d.settings" if has_table(con, LEDGER_TABLE) else "NULL"
    ledger = f"LEFT JOIN {LEDGER_TABLE} d USING (batch_id)" if settings != "NULL" else ""
    con.execute(
        f"CREATE OR REPLACE TABLE {scratch.batches} AS "
        f"SELECT batch_id, hash({BATCH_DIGEST_SQL}, {settings}) AS digest FROM batches {ledger}"
    )


def _stage_recheck(con: duckdb.DuckDBPyConnection, scratch: _Scratch) -> tuple[int, int]:
    """Table ``scratch.recheck``: the patients (pseudonyms) with a Patient row in a batch the
    view's last scan did not cover (every batch when nothing was recorded); how many such
    batches and patients there are."""
    batches = [
        str(b)
        for (b,) in con.execute(
            f"SELECT b.batch_id FROM {scratch.batches} b "
            f"ANTI JOIN (SELECT batch_id, digest FROM {BATCHES} WHERE view = ?) s "
            "ON s.batch_id = b.batch_id AND s.digest = b.digest",
            [scratch.view],
        ).fetchall()
    ]
    if not batches or not has_table(con, "phi_vault"):
        con.execute(f"CREATE OR REPLACE TABLE {scratch.recheck} (patient_id VARCHAR)")
        return len(batches), 0
    # a Patient row's patient_key is its own resource key: the pseudonym the views' patient_id
    # holds and the canaries keep the birth date under
    con.execute(
        f"CREATE OR REPLACE TABLE {scratch.recheck} AS "
        "SELECT DISTINCT patient_key AS patient_id FROM phi_vault "
        "WHERE resource_type = 'Patient' AND patient_key IS NOT NULL "
        "AND batch_id IN (SELECT unnest(?::VARCHAR[]))",
        [batches],
    )
    ((count,),) = con.execute(f"SELECT count(*) FROM {scratch.recheck}").fetchall()
    return len(batches), int(count)


def _stage_differences(con: duckdb.DuckDBPyConnection, scratch: _Scratch) -> tuple[int, int]:
    """Tables ``scratch.changed`` (ids new or changed since the view's build) and
    ``scratch.removed`` (ids it was built from that are no longer released); their sizes."""
    con.execute(
        f"""
        CREATE OR REPLACE TABLE {scratch.changed} AS
        SELECT c.id FROM {scratch.current} c
        ANTI JOIN (SELECT id, digest FROM {SOURCES} WHERE view = ?) s
            ON s.id = c.id AND s.digest = c.digest
        """,
        [scratch.view],
    )
    con.execute(
        f"""
        CREATE OR REPLACE TABLE {scratch.removed} AS
        SELECT s.id FROM (SELECT id FROM {SOURCES} WHERE view = ?) s
        ANTI JOIN {scratch.current} c ON c.id = s.id
        """,
        [scratch.view],
    )
    ((changed,),) = con.execute(f"SELECT count(*) FROM {scratch.changed}").fetchall()
    ((removed,),) = con.execute(f"SELECT count(*) FROM {scratch.removed}").fetchall()
    return int(changed), int(removed)


def _record_sources(
    con: duckdb.DuckDBPyConnection, scratch: _Scratch, digest: str, *, full: bool
) -> None:
    """What the published view was built from (within the caller's transaction)."""
    name = scratch.view
    if full:
        con.execute(f"DELETE FROM {SOURCES} WHERE view = ?", [name])
        con.execute(
            f"INSERT INTO {SOURCES} SELECT ?, id, patient_id, digest FROM {scratch.current}",
            [name],
        )
    else:
        con.execute(
            f"DELETE FROM {SOURCES} WHERE view = ? AND "
            f"(id IN (SELECT id FROM {scratch.changed}) "
            f"OR id IN (SELECT id FROM {scratch.removed}))",
            [name],
        )
        con.execute(
            f"INSERT INTO {SOURCES} SELECT ?, c.id, c.patient_id, c.digest "
            f"FROM {scratch.current} c SEMI JOIN {scratch.changed} x ON x.id = c.id",
            [name],
        )
    con.execute(f"INSERT OR REPLACE INTO {DEFINITIONS} VALUES (?, ?)", [name, digest])
    _record_batches(con, scratch)


def _record_batches(con: duckdb.DuckDBPyConnection, scratch: _Scratch) -> None:
    """The vault batches the view's scan covered (within the caller's transaction)."""
    con.execute(f"DELETE FROM {BATCHES} WHERE view = ?", [scratch.view])
    con.execute(
        f"INSERT INTO {BATCHES} SELECT ?, batch_id, digest FROM {scratch.batches}",
        [scratch.view],
    )


def _record_full_build(con: duckdb.DuckDBPyConnection, scratch: _Scratch, digest: str) -> None:
    """The bookkeeping of a full build, in one transaction."""
    with transaction(con):
        _record_sources(con, scratch, digest, full=True)


def _needs_full_build(
    con: duckdb.DuckDBPyConnection, view: ViewDefinition, workdir: Path, digest: str
) -> bool:
    """No table, no Parquet file, or no record of the definition it was built with (or another
    one): the view is built in full."""
    found = con.execute(f"SELECT digest FROM {DEFINITIONS} WHERE view = ?", [view.name]).fetchone()
    parquet = Workdir(Path(workdir)).views / f"{view.name}.parquet"
    return (
        not has_table(con, view.name, VIEWS_SCHEMA)
        or not parquet.exists()
        or found is None
        or found[0] != digest
    )


def _prepare(con: duckdb.DuckDBPyConnection) -> None:
    """What the refreshes would otherwise each write before they read (two writers of one
    catalog entry or row conflict): the bookkeeping tables, and the release's resource digests
    of a release written before them."""
    ensure_state_tables(con)
    ensure_resource_digests(con)


def refresh_view(
    con: duckdb.DuckDBPyConnection, view: ViewDefinition, workdir: Path, canaries: CanarySet
) -> ViewRefresh:
    """Bring ``views.<name>`` and its Parquet file up to date with the release, rebuilding
    only the rows of resources that changed; published only when the leak scan passes."""
    _prepare(con)
    return _refresh_prepared(con, view, workdir, canaries)


def _refresh_prepared(
    con: duckdb.DuckDBPyConnection, view: ViewDefinition, workdir: Path, canaries: CanarySet
) -> ViewRefresh:
    started = time.perf_counter()
    digest = definition_digest(view)
    scratch = _Scratch(view.name)
    try:
        _stage_current_sources(con, scratch, view.resource)
        _stage_vault_batches(con, scratch)
        if _needs_full_build(con, view, workdir, digest):
            result = run_view_over_release(
                con, view, workdir, check=lambda c, t: scan_released_table(c, canaries, t)
            )
            if result.published:
                _record_full_build(con, scratch, digest)
            ((count,),) = con.execute(f"SELECT count(*) FROM {scratch.current}").fetchall()
            return ViewRefresh(result, "full", int(count), 0)
        changed, removed = _stage_differences(con, scratch)
        new_batches, rechecked = _stage_recheck(con, scratch)
        if not changed and not removed:
            result = _recheck_unchanged(
                con, view, scratch, workdir, canaries, started, record=bool(new_batches)
            )
            if not result.published:  # every hit is in a row the published view holds
                withdraw_view(con, view, workdir)
            return ViewRefresh(result, "unchanged", 0, 0, rechecked, not result.published)
        result, kept_rows_leak = _publish_changes(
            con, view, scratch, workdir, canaries, started, digest
        )
        if kept_rows_leak:
            withdraw_view(con, view, workdir)
        return ViewRefresh(result, "incremental", changed, removed, rechecked, kept_rows_leak)
    finally:
        scratch.drop(con)


def refresh_views(
    con: duckdb.DuckDBPyConnection,
    views: Sequence[ViewDefinition],
    workdir: Path,
    canaries: CanarySet,
) -> Iterator[tuple[ViewDefinition, ViewRefresh]]:
    """``refresh_view`` for each view; yields each view with its refresh in the order given,
    then raises the first failure (every view's refresh is a transaction of its own, on its
    own table and its own rows of the bookkeeping, so one failing leaves the others whole).

    Views built in full run one after the other: their work is the FHIRPath runner, Python
    that holds the interpreter's lock, and two such threads took 44 s where one took 34 s
    (1,000 patients). Views refreshed in place run side by side on cursors of ``con``
    (:mod:`pipelines.parallel`), the views over the most resources first: their work is half
    DuckDB, which a second thread overlaps (2.0-2.3 s down to 1.4-1.7 s after a 1 % batch)."""
    # what the refreshes would otherwise create at the same moment (two creations of one
    # catalog entry conflict): the schemas, the bookkeeping tables, the compiled canaries
    _prepare(con)
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {VIEWS_SCHEMA}")
    canaries.compile()
    resources = _resources_by_type(con)
    yield from on_cursors(
        con,
        lambda cursor, view: _refresh_prepared(cursor, view, workdir, canaries),
        views,
        size=lambda view: resources.get(view.resource, 0),
        alone=lambda view: _needs_full_build(con, view, workdir, definition_digest(view)),
    )


def _resources_by_type(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """How many de-identified resources of each type there are (the type column only)."""
    if not has_table(con, "deid_resources"):
        return {}
    found = con.execute(
        "SELECT resource_type, count(*) FROM deid_resources GROUP BY resource_type"
    ).fetchall()
    return {str(kind): int(count) for kind, count in found}


def _scan_own_birth_dates(
    con: duckdb.DuckDBPyConnection,
    view: ViewDefinition,
    scratch: _Scratch,
    canaries: CanarySet,
    *,
    in_transaction: bool,
    skip_changed: bool,
) -> LeakScanResult:
    """The kept rows of the patients in ``scratch.recheck`` searched for each one's own birth
    date (their other canaries are searched in every distinct value; the rows of changed
    resources, with ``skip_changed``, were scanned in full already). Work in proportion to
    those patients' rows: nothing at all when there are none."""
    births = canaries.birth_dates_only()
    if "patient_id" not in {c.name for c in view.columns}:
        return LeakScanResult(canaries=len(births))  # rows of no patient: no birth date of theirs
    ((count,),) = con.execute(f"SELECT count(*) FROM {scratch.recheck}").fetchall()
    if not count:
        return LeakScanResult(canaries=len(births))
    where = f"patient_id IN (SELECT patient_id FROM {scratch.recheck})"
    if skip_changed:
        where += f" AND id NOT IN (SELECT id FROM {scratch.changed})"
    table = f"{VIEWS_SCHEMA}.{view.name}"
    return scan_released_table(con, births, table, in_transaction=in_transaction, where=where)


def _recheck_unchanged(
    con: duckdb.DuckDBPyConnection,
    view: ViewDefinition,
    scratch: _Scratch,
    workdir: Path,
    canaries: CanarySet,
    started: float,
    *,
    record: bool,
) -> ViewRunResult:
    """A view none of whose resources changed: the rows of the patients in
    ``scratch.recheck`` searched for their own birth date. The view stays as it is; it counts
    as published only when that scan passes, and only then are the batches recorded (with
    ``record``: some batch is new to the view)."""
    scan = merged_scans(
        LeakScanResult(canaries=len(canaries)),
        _scan_own_birth_dates(
            con, view, scratch, canaries, in_transaction=False, skip_changed=False
        ),
    )
    if scan.passed and record:
        with transaction(con):
            _record_batches(con, scratch)
    return view_result(con, view, workdir, started, published=scan.passed, check=scan)


def withdraw_view(con: duckdb.DuckDBPyConnection, view: ViewDefinition, workdir: Path) -> None:
    """Take a published view down: its Parquet file first (a crash after it leaves a table
    without its file, which the next refresh builds in full), then its table and bookkeeping in
    one transaction."""
    parquet = Workdir(Path(workdir)).views / f"{view.name}.parquet"
    if parquet.exists():
        parquet.unlink()
        fsync_dir(parquet.parent)
    with transaction(con):
        con.execute(f"DROP TABLE IF EXISTS {VIEWS_SCHEMA}.{view.name}")
        for state in (SOURCES, DEFINITIONS, BATCHES):
            con.execute(f"DELETE FROM {state} WHERE view = ?", [view.name])


def _publish_changes(
    con: duckdb.DuckDBPyConnection,
    view: ViewDefinition,
    scratch: _Scratch,
    workdir: Path,
    canaries: CanarySet,
    started: float,
    digest: str,
) -> tuple[ViewRunResult, bool]:
    """The view over the changed resources; in one transaction, the rows of changed and
    removed resources deleted, the new rows inserted, the result scanned, the bookkeeping
    written and the Parquet file replaced (rolled back when the scan finds a leak). With the
    result, whether a leak was found in the kept rows (a birth date in a kept row, or a hit
    among the distinct values while the new rows scanned clean)."""
    table = f"{VIEWS_SCHEMA}.{view.name}"
    new_rows = f"{STATE_SCHEMA}.{view.name}__rows"
    try:
        changed = released_resources(con, view.resource, only_ids=scratch.changed)
        write_view_table(con, view, changed, new_rows)
        ((rows,),) = con.execute(f"SELECT count(*) FROM {new_rows}").fetchall()
        statements = (
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {scratch.changed} "
            f"UNION ALL SELECT id FROM {scratch.removed})",
            # appended in ROW_ORDER: the batch's own order is its source's
            f"INSERT INTO {table} BY NAME SELECT * FROM {new_rows} ORDER BY {ROW_ORDER}",
        )

        scans: list[LeakScanResult] = []

        def check(c: duckdb.DuckDBPyConnection) -> LeakScanResult:
            # the new rows in full; the distinct values of every row against today's canaries;
            # the kept rows of patients whose Patient changed against their own birth date
            scans[:] = [
                scan_released_table(c, canaries, new_rows, in_transaction=True),
                scan_column_values(
                    c, canaries, table, skip_columns=_pseudonym_columns(view), in_transaction=True
                ),
                _scan_own_birth_dates(
                    c, view, scratch, canaries, in_transaction=True, skip_changed=True
                ),
            ]
            return merged_scans(*scans)

        parquet = Workdir(Path(workdir)).views / f"{view.name}.parquet"
        scan = publish_in_place(
            con,
            [TableChange(table, parquet, statements)],
            check=check,
            record=lambda c: _record_sources(c, scratch, digest, full=False),
        )
    finally:
        con.execute(f"DROP TABLE IF EXISTS {new_rows}")
    published = scan is not None and scan.passed
    new_rows_scan, values_scan, births_scan = scans
    kept_rows_leak = not published and (
        not births_scan.passed or (not values_scan.passed and new_rows_scan.passed)
    )
    result = view_result(
        con,
        view,
        workdir,
        started,
        published=published,
        check=scan,
        rows=None if published else int(rows),
    )
    return result, kept_rows_leak


def _pseudonym_columns(view: ViewDefinition) -> tuple[str, ...]:
    """Columns that hold the platform's keyed pseudonyms (the row's id, the patient's, and
    references to other resources), never input text."""
    return tuple(c.name for c in view.columns if c.name == "id" or c.name.endswith("_id"))
