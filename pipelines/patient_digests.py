"""Which patients a derived table must compute again: per-patient digests of what it was
computed from, recorded beside it in ``release_state`` (erased by ``ehr forget`` with the
release tables) and compared with the digests of its inputs now.

The feature tables (digests of the view rows their SQL reads) and the training set (digests of
the label and feature rows) keep one :class:`PatientDigests` each, each patient's digest taken
by :func:`vault.catalog.multiset_digest_sql`."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from pipelines.workdir import RELEASE_STATE_SCHEMA


@dataclass(frozen=True)
class PatientDigests:
    """The tables of one derived table's bookkeeping (trusted names in ``release_state``):
    ``sources`` the digests it was computed from, ``current`` the digests of its inputs now
    (staged by the caller: ``patient_id``, ``digest UBIGINT``), ``changed`` the patients new,
    changed (``gone`` false) or gone (``gone`` true) between the two."""

    name: str

    @property
    def sources(self) -> str:
        return f"{RELEASE_STATE_SCHEMA}.{self.name}_sources"

    @property
    def current(self) -> str:
        return f"{RELEASE_STATE_SCHEMA}.{self.name}_current"

    @property
    def changed(self) -> str:
        return f"{RELEASE_STATE_SCHEMA}.{self.name}_changed"

    def ensure(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {RELEASE_STATE_SCHEMA}")
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {self.sources} (patient_id VARCHAR, digest UBIGINT)"
        )

    def stage_changed(self, con: duckdb.DuckDBPyConnection) -> tuple[int, int]:
        """``changed`` from ``current`` and ``sources``; (patients changed, patients gone)."""
        con.execute(
            f"""
            CREATE OR REPLACE TABLE {self.changed} AS
            SELECT c.patient_id, false AS gone FROM {self.current} c
                ANTI JOIN {self.sources} s ON s.patient_id = c.patient_id AND s.digest = c.digest
            UNION ALL
            SELECT s.patient_id, true FROM {self.sources} s
                ANTI JOIN {self.current} c ON c.patient_id = s.patient_id
            """
        )
        ((changed, gone),) = con.execute(
            f"SELECT count(*) FILTER (NOT gone), count(*) FILTER (gone) FROM {self.changed}"
        ).fetchall()
        return int(changed), int(gone)

    def record(self, con: duckdb.DuckDBPyConnection, *, full: bool) -> None:
        """Make ``current`` what was computed from (within the caller's transaction): all of it
        after a full build, the changed patients' digests after a refresh."""
        if full:
            con.execute(f"DELETE FROM {self.sources}")
        else:
            con.execute(
                f"DELETE FROM {self.sources} "
                f"WHERE patient_id IN (SELECT patient_id FROM {self.changed})"
            )
        con.execute(
            f"INSERT INTO {self.sources} SELECT patient_id, digest FROM {self.current}"
            + ("" if full else f" SEMI JOIN {self.changed} USING (patient_id)")
        )

    def drop_scratch(self, con: duckdb.DuckDBPyConnection) -> None:
        con.execute(f"DROP TABLE IF EXISTS {self.current}")
        con.execute(f"DROP TABLE IF EXISTS {self.changed}")
