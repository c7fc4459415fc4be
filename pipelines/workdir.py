"""The work directory of a platform run: one type names every path a run writes, and the places
an erasure purges beyond the vault (listed here once, beside the paths they live in)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vault.lifecycle import ErasurePlan, ReleasedTables

# Warehouse tables of the release, erased by patient_id: every table with the column in the
# views, features and models schemas, and the de-identified resources, their withheld-record
# log and the k-anonymous patient table; and the release's bookkeeping of what each table was
# built from (pseudonyms and digests: erased like the rest).
RELEASE_STATE_SCHEMA = "release_state"
RELEASED_TABLES = (
    ReleasedTables(
        "main",
        (
            "deid_resources",
            "deid_errors",
            "released_patients",
            "release_quasi_identifiers",
            "released_patient_inputs",
            "withheld_patients",
        ),
    ),
    ReleasedTables("views"),
    ReleasedTables("features"),
    ReleasedTables("models"),
    ReleasedTables(RELEASE_STATE_SCHEMA),
)

DEFAULT_WORKDIR = Path("data/work")
DEFAULT_LANDING = Path("data/landing")
WORKDIR_ENV = "EHR_WORKDIR"
LANDING_ENV = "EHR_LANDING"


def default_workdir() -> Path:
    """``EHR_WORKDIR`` when set, else ``data/work`` under the current folder."""
    return Path(os.environ.get(WORKDIR_ENV) or DEFAULT_WORKDIR)


def default_landing() -> Path:
    """``EHR_LANDING`` when set, else ``data/landing`` under the current folder."""
    return Path(os.environ.get(LANDING_ENV) or DEFAULT_LANDING)


@dataclass(frozen=True)
class Workdir:
    """Every path of a run under one root folder."""

    root: Path

    @classmethod
    def of(cls, root: str | Path | None = None) -> Workdir:
        """The work directory at ``root``, else the default one (``EHR_WORKDIR`` or data/work)."""
        return cls(Path(root) if root else default_workdir())

    @property
    def warehouse(self) -> Path:
        """The DuckDB warehouse: the vault, the quarantine and the released tables."""
        return self.root / "warehouse.duckdb"

    @property
    def views(self) -> Path:
        """One Parquet file per SQL-on-FHIR view."""
        return self.root / "views"

    @property
    def features(self) -> Path:
        """One Parquet file per feature table (Feast's offline sources)."""
        return self.root / "features"

    @property
    def feast(self) -> Path:
        """Feast's registry, online store (SQLite) and offline staging folder."""
        return self.root / "feast"

    @property
    def online_store(self) -> Path:
        return self.feast / "online_store.db"

    @property
    def models(self) -> Path:
        """Model tables (labels, training sets) as Parquet and one folder per model."""
        return self.root / "models"

    @property
    def dagster_home(self) -> Path:
        """The Dagster instance used when ``DAGSTER_HOME`` is not set."""
        return self.root / "dagster_home"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit" / "audit.log"

    @property
    def summary(self) -> Path:
        """``run_summary.json``: per-stage counts of the last ``ehr run``."""
        return self.root / "run_summary.json"

    @property
    def released_folders(self) -> tuple[Path, ...]:
        """Folders of released Parquet files (every file there is erased by ``patient_id``)."""
        return (self.views, self.features, self.models)

    def erasure_plan(self) -> ErasurePlan:
        """Every place of this workdir that holds released patient rows: the release tables of
        the warehouse, references to the patient in other patients' released resources, the
        released Parquet files, the Feast online store and the models' training records."""
        from pipelines.erasure import (
            ModelTrainingRecord,
            OnlineStore,
            ReleasedParquet,
            ReleasedReferences,
        )

        return ErasurePlan(
            tables=RELEASED_TABLES,
            places=(
                # the patient's own rows go first: the references left are other patients'
                ReleasedParquet(self.released_folders, warehouse=self.warehouse),
                ReleasedReferences(self.warehouse, self.released_folders),
                OnlineStore(self.online_store),
                ModelTrainingRecord(self.models, warehouse=self.warehouse),
            ),
        )
