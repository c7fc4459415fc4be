"""Checks of feature tables: shape for metadata, the opted-out rule re-derived straight from
``views.consent`` (not from the temp views the build used), and the PHI leak scan.

Feature rows are checked before they are published (:func:`check_feature_rows`: a full build's
staged table, an incremental refresh's rows of the patients it computed again), and the
published tables after (:func:`check_published_table`: every distinct value against the
canaries known now, and the opted-out rule); a table that fails after publication is withdrawn
(:func:`pipelines.features.refresh.withdraw_feature_tables`)."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from deid.leakscan import CanarySet, LeakScanResult
from deid.release import scan_column_values, scan_released_table
from pipelines.features.cohort import opted_out_sql, view_as_built
from pipelines.features.tables import FEATURES_SCHEMA


@dataclass(frozen=True)
class TableShape:
    rows: int
    patients: int
    columns: list[tuple[str, str]]


def table_shape(con: duckdb.DuckDBPyConnection, name: str) -> TableShape:
    table = f"{FEATURES_SCHEMA}.{name}"
    columns = [(str(c), str(t)) for c, t, *_ in con.execute(f"DESCRIBE {table}").fetchall()]
    ((rows, patients),) = con.execute(
        f"SELECT count(*), count(DISTINCT patient_id) FROM {table}"
    ).fetchall()
    return TableShape(int(rows), int(patients), columns)


def _has_consent_view(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(
        con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'views' AND table_name = 'consent'"
        ).fetchall()[0][0]
    )


def _opted_out(con: duckdb.DuckDBPyConnection) -> str:
    """The opted-out rule over ``views.consent`` as it was built (columns it lacks read NULL)."""
    return opted_out_sql(view_as_built(con, "consent"))


def opted_out_count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    """Rows of opted-out patients in ``table`` (a trusted name); must be 0."""
    if not _has_consent_view(con):
        return 0
    ((rows,),) = con.execute(
        f"SELECT count(*) FROM {table} WHERE patient_id IN ({_opted_out(con)})"
    ).fetchall()
    return int(rows)


def opted_out_known(con: duckdb.DuckDBPyConnection) -> int:
    """Opted-out patients the release knows of (from ``views.consent``)."""
    if not _has_consent_view(con):
        return 0
    ((known,),) = con.execute(f"SELECT count(*) FROM ({_opted_out(con)})").fetchall()
    return int(known)


@dataclass(frozen=True)
class FeatureRowsCheck:
    """The leak scan and the opted-out rule over some feature rows; passed when the scan is
    clean and no row belongs to an opted-out patient."""

    scan: LeakScanResult
    opted_out_rows: int

    @property
    def passed(self) -> bool:
        return self.scan.passed and self.opted_out_rows == 0


def check_feature_rows(
    con: duckdb.DuckDBPyConnection, canaries: CanarySet, table: str
) -> FeatureRowsCheck:
    """Feature rows before they are published (``table``, trusted: a full build's staged table,
    or the rows an incremental refresh computed again): every distinct combination of their
    text scanned (a patient's own birth date in that patient's rows), opted-out patients
    counted."""
    scan = scan_released_table(con, canaries, table, id_column="patient_id", distinct_rows=True)
    return FeatureRowsCheck(scan, opted_out_count(con, table))


def check_published_table(
    con: duckdb.DuckDBPyConnection, canaries: CanarySet, name: str
) -> FeatureRowsCheck:
    """A published feature table after a refresh that kept rows: each distinct value of its
    text columns against every canary known now (a patient new to the release is found in a
    kept row too), and the opted-out rule over every row. Its rows were scanned in full before
    they were published; pseudonyms are not text anyone wrote and are not scanned again."""
    table = f"{FEATURES_SCHEMA}.{name}"
    scan = scan_column_values(con, canaries, table, skip_columns=("patient_id",))
    return FeatureRowsCheck(scan, opted_out_count(con, table))
