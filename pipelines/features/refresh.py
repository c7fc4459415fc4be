"""Refreshing the feature tables after a batch with work in proportion to the patients whose
data changed.

A patient's feature rows depend on that patient's view rows and on two things shared by all:
the release's data end (rows stop there, heartbeat rows run up to it) and the feature
definitions (the SQL, value sets, lab codes). The refresh records a digest of each patient's
view rows (``release_state.feature_sources``) and the shared inputs
(``release_state.feature_builds``). When the shared inputs are the same, only the patients whose
digest changed (or who are new, or gone) are computed again, with the same SQL restricted to
them and the data end pinned, and their rows replace the old ones; every other row is kept.
When a definition changed, every table is built in full.

When the data end moved, a later data end adds rows (window edges, birthdays, heartbeats) to
patients whose data did not change, and an earlier one takes rows away: those patients are
computed again with the changed ones, and no other. Which ones: every build computes each
patient's rows :data:`HORIZON_DAYS` past the data end and publishes them cut at it (a row's
values never depend on where the rows end, :func:`pipelines.features.tables.extend_rows_end`);
the first row after the end is when that patient's rows next change
(``release_state.feature_next_changes``, with the horizon it was computed to). A data end moved
later, to T, computes again the patients whose next change is at or before T (or whose horizon
ends before it); one moved earlier, to T, those with a published row after T. Every other
patient's rows are the same at either end, so only the rows of the patients the move touches
are computed again: a day's batch moves the data end a day, and touches the patients with a
window edge, birthday or heartbeat on that day.

A full build publishes each table atomically (:func:`pipelines.publish.publish_table`) and writes
the bookkeeping after all five. A refresh changes the five tables in place (the changed patients'
rows deleted and computed again) and writes the bookkeeping and the Parquet files in the same
transaction (:func:`pipelines.publish.publish_in_place`). Either way a crash only makes the next
refresh redo the same patients.

Given a check (the leak scan and the opted-out rule, :mod:`pipelines.features.checks`), rows are
published only when it passes over them: a full build checks each staged table, a refresh the
changed patients' new rows of every table before its transaction (nothing is published when one
fails). A published table that fails a later check is withdrawn
(:func:`withdraw_feature_tables`): Feast's offline source never keeps serving it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import astuple, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from pipelines.features.cohort import opted_out_sql, timestamptz_sql
from pipelines.features.tables import (
    FEATURE_TABLES,
    FEATURES_SCHEMA,
    LAB_MEASURES,
    LAB_UNITS,
    VIEW_COLUMNS,
    FeatureBuild,
    build_feature_tables_report,
    extend_rows_end,
    feature_build,
    feature_encounters_sql,
    horizon_table,
    parquet_path,
    prepare_sources,
    prepared_data_end,
    register_lab_codes,
    table_sql,
    up_to_data_end,
)
from pipelines.features.valuesets import ValueSet, load_valuesets, register_code_table
from pipelines.parallel import on_cursors
from pipelines.patient_digests import PatientDigests
from pipelines.publish import (
    CheckOutcome,
    PublishCheck,
    TableChange,
    publish_in_place,
    transaction,
)
from pipelines.workdir import RELEASE_STATE_SCHEMA
from vault.catalog import multiset_digest_sql
from vault.keys import fsync_dir

# the schema the erasure plan purges by patient_id (pipelines.workdir)
STATE_SCHEMA = RELEASE_STATE_SCHEMA
# per-patient digests of the view rows each patient's feature rows were computed from
DIGESTS = PatientDigests("feature")
BUILDS = f"{STATE_SCHEMA}.feature_builds"
CURRENT = DIGESTS.current
CHANGED = DIGESTS.changed
# when each patient's rows next change as the data end moves later (the first row after the
# data end, computed up to ``horizon``; NULL: none before it)
NEXT_CHANGES = f"{STATE_SCHEMA}.feature_next_changes"
_NEXT_CHANGES_NEW = f"{STATE_SCHEMA}.feature_next_changes_new"
# how far past the data end rows are computed to know it: more than a heartbeat's interval
# (HEARTBEAT_DAYS), so every patient with rows has a next change within it
HORIZON_DAYS = 400
# Bumped when the feature SQL changes in a way its text does not show.
# 2: src_medication_request reads the code of a Medication resource a request references.
# 3: a date coarser than a day is known from its end on the patient's shifted time line.
FEATURES_VERSION = "3"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class FeatureRefresh:
    """A refreshed set of feature tables: the build's counts, and how much of it was new."""

    build: FeatureBuild
    mode: str  # "full", "incremental" or "unchanged"
    patients_changed: int
    patients_removed: int
    # of the patients changed, those computed again only because the data end moved
    patients_data_end_moved: int = 0

    @property
    def held_back(self) -> set[str]:
        """Tables whose rows this refresh computed and did not publish: a full build's tables
        whose check failed; every table after a refresh whose check failed for any (a refresh
        publishes the changed patients' rows of all five tables or of none)."""
        unpublished = set(self.build.unpublished)
        return set(FEATURE_TABLES) if unpublished and self.mode != "full" else unpublished


def _canonical(valuesets: list[ValueSet]) -> str:
    """The value sets as text that is the same in every process: their code sets sorted (a
    frozenset's order follows the process's string hash seed)."""
    return repr(
        sorted(
            tuple(sorted(v) if isinstance(v, frozenset) else v for v in astuple(valueset))
            for valueset in valuesets
        )
    )


def definitions_digest(valuesets: list[ValueSet]) -> str:
    """A digest of what every patient's rows are computed with, beside their own data: the
    opted-out rule too, since a patient it now leaves out may have view rows that never
    changed."""
    text = "\0".join(
        [
            FEATURES_VERSION,
            # which encounters count is set before the tables' SQL, and is as much their rule
            feature_encounters_sql(),
            opted_out_sql("src_consent"),
            *(table_sql(name, _EPOCH, valuesets) for name in FEATURE_TABLES),
            _canonical(valuesets),
            repr(LAB_MEASURES),
            repr(LAB_UNITS),
        ]
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _ensure_state(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA}")
    DIGESTS.ensure(con)
    con.execute(f"CREATE TABLE IF NOT EXISTS {BUILDS} (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {NEXT_CHANGES} "
        "(patient_id VARCHAR, next_change TIMESTAMPTZ, horizon TIMESTAMPTZ)"
    )


def _stage_patient_digests(con: duckdb.DuckDBPyConnection) -> None:
    """``CURRENT``: per patient, an order-independent digest of every view row the feature SQL
    reads (the ``src_*`` views over everyone), each row counted as often as it is there
    (:func:`vault.catalog.multiset_digest_sql`)."""
    parts = [
        f"SELECT {'id' if view == 'patient' else 'patient_id'} AS patient_id, hash(s) AS h "
        f"FROM src_{view} s"
        for view in VIEW_COLUMNS
    ]
    con.execute(
        f"CREATE OR REPLACE TABLE {CURRENT} AS SELECT patient_id, "
        f"{multiset_digest_sql('hash(h, ?)')} AS digest "
        f"FROM ({' UNION ALL '.join(parts)}) WHERE patient_id IS NOT NULL GROUP BY patient_id",
        [FEATURES_VERSION],
    )


def _shared_inputs(
    con: duckdb.DuckDBPyConnection, valuesets: list[ValueSet], shift_days: int
) -> dict[str, str]:
    end = prepared_data_end(con)
    return {
        "data_end": "" if end is None else end.isoformat(),
        "definitions": definitions_digest(valuesets),
        "shift_days": str(shift_days),
        "horizon_days": str(HORIZON_DAYS),
    }


def _recorded(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    return dict(con.execute(f"SELECT key, value FROM {BUILDS}").fetchall())


def _needs_full_build(
    con: duckdb.DuckDBPyConnection,
    out_dir: Path,
    shared: dict[str, str],
    recorded: dict[str, str],
) -> bool:
    """A table or its file is missing, a definition changed since the ``recorded`` build (or
    its record is of another kind), or there is no data end, then or now. A moved data end
    alone is not a reason (see the module doc)."""
    tables = {
        name
        for (name,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = ?", [FEATURES_SCHEMA]
        ).fetchall()
    }
    missing = any(
        name not in tables or not parquet_path(out_dir, name).exists() for name in FEATURE_TABLES
    )

    def definitions(inputs: dict[str, str]) -> dict[str, str]:
        return {key: value for key, value in inputs.items() if key != "data_end"}

    same = definitions(recorded) == definitions(shared)
    return missing or not same or not shared["data_end"] or not recorded.get("data_end")


def _stage_next_changes(
    con: duckdb.DuckDBPyConnection, rows: list[str], patients: str, data_end: datetime
) -> None:
    """``_NEXT_CHANGES_NEW``: for each of ``patients`` (a query of ``patient_id``), the first of
    its ``rows`` (the tables' rows computed :data:`HORIZON_DAYS` past ``data_end``) after the data
    end, and that horizon."""
    end = timestamptz_sql(data_end)
    horizon = timestamptz_sql(data_end + timedelta(days=HORIZON_DAYS))
    later = " UNION ALL ".join(
        f"SELECT patient_id, event_timestamp FROM {table} WHERE event_timestamp > {end}"
        for table in rows
    )
    con.execute(
        f"""
        CREATE OR REPLACE TABLE {_NEXT_CHANGES_NEW} AS
        SELECT p.patient_id, min(h.event_timestamp) AS next_change, {horizon} AS horizon
        FROM ({patients}) p LEFT JOIN ({later}) h ON h.patient_id = p.patient_id
        GROUP BY p.patient_id
        """
    )


def _write_record(con: duckdb.DuckDBPyConnection, shared: dict[str, str], *, full: bool) -> None:
    """The bookkeeping of a build (within the caller's transaction): the digests, when each
    computed patient's rows next change, the shared inputs."""
    DIGESTS.record(con, full=full)
    if full:
        con.execute(f"DELETE FROM {NEXT_CHANGES}")
    else:
        con.execute(
            f"DELETE FROM {NEXT_CHANGES} WHERE patient_id IN (SELECT patient_id FROM {CHANGED})"
        )
    con.execute(f"INSERT INTO {NEXT_CHANGES} SELECT * FROM {_NEXT_CHANGES_NEW}")
    _write_shared(con, shared)


def _write_shared(con: duckdb.DuckDBPyConnection, shared: dict[str, str]) -> None:
    con.execute(f"DELETE FROM {BUILDS}")
    con.executemany(f"INSERT INTO {BUILDS} VALUES (?, ?)", list(shared.items()))


def _add_patients_the_data_end_moves(
    con: duckdb.DuckDBPyConnection, before: datetime, now: datetime
) -> int:
    """Add to ``CHANGED`` the patients (with view rows, not changed already) whose rows differ
    between the data end ``before`` and ``now``: moved later, those whose next change is at or
    before ``now`` or whose horizon ends before it, and any never computed; moved earlier,
    those with a published row after ``now``. How many were added."""
    at = timestamptz_sql(now)
    if now > before:
        moved = (
            f"SELECT patient_id FROM {NEXT_CHANGES} WHERE next_change <= {at} OR horizon < {at} "
            f"UNION SELECT patient_id FROM {CURRENT} "
            f"WHERE patient_id NOT IN (SELECT patient_id FROM {NEXT_CHANGES})"
        )
    elif now < before:
        moved = " UNION ".join(
            f"SELECT patient_id FROM {FEATURES_SCHEMA}.{name} WHERE event_timestamp > {at}"
            for name in FEATURE_TABLES
        )
    else:
        return 0
    ((added,),) = con.execute(
        f"""
        INSERT INTO {CHANGED}
        SELECT DISTINCT patient_id, false FROM ({moved})
        WHERE patient_id IN (SELECT patient_id FROM {CURRENT})
            AND patient_id NOT IN (SELECT patient_id FROM {CHANGED})
        """
    ).fetchall()
    return int(added)


def _record_full_build(
    con: duckdb.DuckDBPyConnection, shared: dict[str, str], data_end: datetime
) -> None:
    """The bookkeeping of a full build, whose rows past the data end are in the temporary
    tables :func:`pipelines.features.tables.horizon_table` of ``con``."""
    rows = [horizon_table(name) for name in FEATURE_TABLES]
    _stage_next_changes(con, rows, f"SELECT patient_id FROM {CURRENT}", data_end)
    with transaction(con):
        _write_record(con, shared, full=True)


def _counts(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, int], dict[str, int]]:
    rows: dict[str, int] = {}
    patients: dict[str, int] = {}
    for name in FEATURE_TABLES:
        ((count, distinct),) = con.execute(
            f"SELECT count(*), count(DISTINCT patient_id) FROM {FEATURES_SCHEMA}.{name}"
        ).fetchall()
        rows[name], patients[name] = int(count), int(distinct)
    return rows, patients


def _new_rows_table(name: str) -> str:
    return f"{STATE_SCHEMA}.feature_new__{name}"


def _horizon_rows_table(name: str) -> str:
    return f"{STATE_SCHEMA}.feature_horizon__{name}"


def _compute_changed_patients(
    con: duckdb.DuckDBPyConnection,
    created: datetime,
    valuesets: list[ValueSet],
    data_end: datetime | None,
    shift_days: int,
) -> None:
    """Each table's rows of the changed patients, by the same SQL over their data only (with
    the data end of the whole release), into ``_new_rows_table(name)``: the five tables side by
    side, each on a cursor of its own with its own restricted sources. Most of each one's time
    is DuckDB planning and running its SQL, which a second thread overlaps."""

    def compute(cursor: duckdb.DuckDBPyConnection, name: str) -> None:
        prepare_sources(cursor, patients=CHANGED, data_end=data_end, shift_days=shift_days)
        extend_rows_end(cursor, HORIZON_DAYS)
        register_code_table(cursor, valuesets)
        register_lab_codes(cursor)
        horizon = _horizon_rows_table(name)
        cursor.execute(
            f"CREATE OR REPLACE TABLE {horizon} AS "
            f"SELECT * FROM ({table_sql(name, created, valuesets)})"
        )
        cursor.execute(
            f"CREATE OR REPLACE TABLE {_new_rows_table(name)} AS {up_to_data_end(horizon)}"
        )

    for _ in on_cursors(con, compute, list(FEATURE_TABLES)):
        pass


def _publish_changed_patients(
    con: duckdb.DuckDBPyConnection,
    out_dir: Path,
    created: datetime,
    valuesets: list[ValueSet],
    shared: dict[str, str],
    check: PublishCheck[CheckOutcome] | None,
    shift_days: int,
) -> dict[str, CheckOutcome]:
    """The changed patients' rows computed again and checked (each table's on a cursor of its
    own); then, when every check passed, in one transaction every table's rows of those
    patients replaced by them, the bookkeeping and the Parquet files. A failed check publishes
    nothing and records nothing: the next refresh computes the same patients again. Returns
    each table's check result (none without ``check``)."""
    data_end = prepared_data_end(con)
    assert data_end is not None  # a refresh without one is a full build
    try:
        _compute_changed_patients(con, created, valuesets, data_end, shift_days)
        _stage_next_changes(
            con,
            [_horizon_rows_table(name) for name in FEATURE_TABLES],
            f"SELECT patient_id FROM {CHANGED} WHERE NOT gone",
            data_end,
        )
        checks: dict[str, CheckOutcome] = {}
        if check is not None:
            rows_check = check  # narrowed to not-None for the nested function

            def check_new_rows(cursor: duckdb.DuckDBPyConnection, name: str) -> CheckOutcome:
                return rows_check(cursor, _new_rows_table(name))

            checks = dict(on_cursors(con, check_new_rows, list(FEATURE_TABLES)))
            if not all(result.passed for result in checks.values()):
                return checks
        changes = [
            TableChange(
                f"{FEATURES_SCHEMA}.{name}",
                parquet_path(out_dir, name),
                (
                    f"DELETE FROM {FEATURES_SCHEMA}.{name} "
                    f"WHERE patient_id IN (SELECT patient_id FROM {CHANGED})",
                    f"INSERT INTO {FEATURES_SCHEMA}.{name} BY NAME "
                    f"SELECT * FROM {_new_rows_table(name)}",
                ),
                compression="zstd",
            )
            for name in FEATURE_TABLES
        ]
        publish_in_place(con, changes, record=lambda c: _write_record(c, shared, full=False))
        return checks
    finally:
        for name in FEATURE_TABLES:
            con.execute(f"DROP TABLE IF EXISTS {_new_rows_table(name)}")
            con.execute(f"DROP TABLE IF EXISTS {_horizon_rows_table(name)}")
        con.execute(f"DROP TABLE IF EXISTS {_NEXT_CHANGES_NEW}")


def withdraw_feature_tables(
    con: duckdb.DuckDBPyConnection, out_dir: Path, names: list[str]
) -> None:
    """Take published feature tables down (a check of a published table failed): each Parquet
    file, Feast's offline source, deleted first, then the tables dropped and the build record
    cleared in one transaction. A crash in between leaves a table without its file; either
    way the next refresh builds every table in full, and publishes each one only when its
    check passes."""
    for name in names:
        parquet_path(out_dir, name).unlink(missing_ok=True)
    fsync_dir(Path(out_dir))
    with transaction(con):
        for name in names:
            con.execute(f"DROP TABLE IF EXISTS {FEATURES_SCHEMA}.{name}")
        con.execute(f"DELETE FROM {BUILDS}")


def refresh_feature_tables(
    con: duckdb.DuckDBPyConnection,
    out_dir: Path,
    *,
    created: datetime | None = None,
    check: PublishCheck[CheckOutcome] | None = None,
    known_by: datetime | None = None,
    shift_days: int = 0,
) -> FeatureRefresh:
    """Bring every feature table (DuckDB and Parquet) up to date with the views, computing
    only the patients whose view rows changed when the shared inputs are the same. With
    ``check``, rows are published only when it passes over them (a full build's staged
    tables one by one, an incremental refresh's rows of the changed patients all together);
    the build's ``checks`` say what it found. ``known_by`` bounds the dates that move the
    data end, ``shift_days`` is the most the release moved a patient's dates
    (:func:`pipelines.features.tables.prepare_sources`)."""
    started = time.perf_counter()
    created = created or datetime.now(UTC)
    valuesets = load_valuesets()
    con.execute("SET TimeZone = 'UTC'")
    _ensure_state(con)
    prepare_sources(con, known_by=known_by, shift_days=shift_days)
    shared = _shared_inputs(con, valuesets, shift_days)
    _stage_patient_digests(con)
    recorded = _recorded(con)
    try:
        if _needs_full_build(con, Path(out_dir), shared, recorded):
            return _full_build(con, Path(out_dir), shared, created, check, known_by, shift_days)
        ((opted_out,),) = con.execute("SELECT count(*) FROM feature_opted_out").fetchall()
        changed, gone = DIGESTS.stage_changed(con)
        moved = _add_patients_the_data_end_moves(
            con,
            datetime.fromisoformat(recorded["data_end"]),
            datetime.fromisoformat(shared["data_end"]),
        )
        mode, checks = "unchanged", {}
        if changed or gone or moved:
            checks = _publish_changed_patients(
                con, Path(out_dir), created, valuesets, shared, check, shift_days
            )
            mode = "incremental"
        elif recorded != shared:  # a data end moved past no patient's next change
            with transaction(con):
                _write_shared(con, shared)
        rows, patients = _counts(con)
        seconds = round(time.perf_counter() - started, 3)
        return FeatureRefresh(
            feature_build(con, rows, patients, int(opted_out), seconds, checks),
            mode,
            changed + moved,
            gone,
            moved,
        )
    finally:
        DIGESTS.drop_scratch(con)


def _full_build(
    con: duckdb.DuckDBPyConnection,
    out_dir: Path,
    shared: dict[str, str],
    created: datetime,
    check: PublishCheck[CheckOutcome] | None,
    known_by: datetime | None,
    shift_days: int,
) -> FeatureRefresh:
    """Every table built in full, its rows computed past the data end to record when each
    patient's rows next change; the bookkeeping written when every table was published."""
    try:
        build = build_feature_tables_report(
            con,
            out_dir,
            created=created,
            check=check,
            known_by=known_by,
            shift_days=shift_days,
            horizon_days=HORIZON_DAYS,
        )
        end = prepared_data_end(con)
        if not build.unpublished and end is not None:
            _record_full_build(con, shared, end)
        else:  # the next refresh builds in full again
            con.execute(f"DELETE FROM {BUILDS}")
    finally:
        for name in FEATURE_TABLES:
            con.execute(f"DROP TABLE IF EXISTS {horizon_table(name)}")
        con.execute(f"DROP TABLE IF EXISTS {_NEXT_CHANGES_NEW}")
    ((count,),) = con.execute(f"SELECT count(*) FROM {CURRENT}").fetchall()
    return FeatureRefresh(build, "full", int(count), 0)
