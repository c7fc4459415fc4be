"""Stage, scan, then publish one batch of ``deid_resources``.

The batch is de-identified into staging tables of its own, the PHI leak scan runs over the
staged rows, and only when it passes are they swapped into ``deid_resources`` and
``deid_errors`` (the batch's previous rows replaced) in one transaction. A failed scan drops the
staging tables: the previous release of the batch stays as it was and nothing of the failed one
is ever in a released table.

The batch's Patient resources go in without their quasi-identifiers, which are kept in
``release_quasi_identifiers``: the release-wide k-anonymity step
(:func:`deid.kanon.build_k_anonymous_release`) writes them back generalised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import date
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from deid.kanon import QUASI_DDL, QUASI_TABLE, generalised_patient, record_quasi_identifiers
from deid.leakscan import LeakScanResult
from deid.policy import Policy
from deid.release import (
    DEID_DDL,
    DEID_ERRORS_DDL,
    DeidReport,
    deidentify_batch,
    scan_released_batch,
)
from vault.keys import KeyProvider


@dataclass(frozen=True)
class BatchRelease:
    report: DeidReport
    scan: LeakScanResult
    published: bool


def staging_tables(batch_id: str) -> tuple[str, str]:
    """Staging names of one batch (released, withheld): batch ids are not SQL identifiers,
    and two batches never share a name."""
    tag = hashlib.sha256(batch_id.encode()).hexdigest()[:16]
    return f"deid_stage_{tag}", f"deid_stage_{tag}_errors"


def _strip_staged_patients(con: duckdb.DuckDBPyConnection, batch_id: str, stage: str) -> None:
    """Record the staged Patients' quasi-identifiers, then remove them from the staged rows."""
    rows = con.execute(
        f"SELECT id, resource FROM {stage} WHERE resource_type = 'Patient'"
    ).fetchall()
    patients = [(pid, orjson.loads(resource)) for pid, resource in rows]
    con.execute(f"DELETE FROM {QUASI_TABLE} WHERE batch_id = ?", [batch_id])
    record_quasi_identifiers(con, ((pid, batch_id, r) for pid, r in patients))
    stripped = pa.table(
        {
            "id": pa.array([pid for pid, _ in patients], pa.string()),
            "resource": pa.array(
                [orjson.dumps(generalised_patient(r, None, 0)).decode() for _, r in patients],
                pa.string(),
            ),
        }
    )
    con.register("stripped_patients", stripped)
    try:
        con.execute(
            f"UPDATE {stage} SET resource = s.resource::JSON FROM stripped_patients s "
            f"WHERE {stage}.resource_type = 'Patient' AND {stage}.id = s.id"
        )
    finally:
        con.unregister("stripped_patients")


def _swap_batch(con: duckdb.DuckDBPyConnection, batch_id: str, stage: str, errors: str) -> None:
    """Replace the batch's released and withheld rows with the staged ones, atomically."""
    con.execute(DEID_DDL)
    con.execute(DEID_ERRORS_DDL)
    con.execute(QUASI_DDL)
    con.execute("BEGIN TRANSACTION")
    try:
        _strip_staged_patients(con, batch_id, stage)
        for target, source in (("deid_resources", stage), ("deid_errors", errors)):
            con.execute(f"DELETE FROM {target} WHERE batch_id = ?", [batch_id])
            con.execute(f"INSERT INTO {target} SELECT * FROM {source}")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def publish_batch(
    con: duckdb.DuckDBPyConnection,
    provider: KeyProvider,
    batch_id: str,
    policy: Policy,
    *,
    today: date | None = None,
    **options: Any,
) -> BatchRelease:
    """De-identify a batch into staging, scan it, and publish it only when the scan passes.
    ``options`` go to :func:`deid.release.deidentify_batch` as they are."""
    stage, errors = staging_tables(batch_id)
    try:
        report = deidentify_batch(
            con,
            provider,
            batch_id,
            policy,
            today=today,
            target=stage,
            errors_target=errors,
            **options,
        )
        scan = scan_released_batch(con, provider, batch_id, table=stage)
        if scan.passed:
            _swap_batch(con, batch_id, stage, errors)
        return BatchRelease(report, scan, scan.passed)
    finally:
        for table in (stage, errors):
            con.execute(f"DROP TABLE IF EXISTS {table}")
