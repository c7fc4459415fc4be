"""Dagster resource of the Feast store: the repo folder and where its registry, online store and
feature Parquet files live."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import duckdb
from dagster import ConfigurableResource
from feast import FeatureStore

from pipelines.features.feast_store import (
    ApplyReport,
    MaterializeReport,
    apply_repo,
    feature_store,
    materialize_incremental,
    materialize_latest,
    missing_online_tables,
    resolve_repo,
)
from pipelines.features.online_sync import OnlineSyncReport, forget_snapshot, sync_online_store
from pipelines.resources import default_workdir


class FeastStoreResource(ConfigurableResource):
    """The Feast repo (``feature_repo``), its data folder (default ``WORKDIR/feast``) and the
    feature Parquet folder the data sources point at (default ``WORKDIR/features``)."""

    repo_path: str = "feature_repo"
    # False (default): the latest row per patient however old, up to the release's data end
    # (a release ends months before now, so [now - TTL, now] would leave most patients without
    # values), written where it changed (pipelines.features.online_sync). True: Feast's
    # incremental run (rows newer than the last run).
    incremental: bool = False
    workdir: str | None = None
    data_dir: str | None = None
    features_dir: str | None = None

    # ``workdir`` arguments below: the warehouse's WORKDIR, used when this resource names none
    # (so the store reads the Parquet files the feature assets wrote).

    def _workdir(self, workdir: str | Path | None) -> Path:
        return Path(self.workdir or workdir or default_workdir())

    @property
    def repo(self) -> Path:
        return resolve_repo(self.repo_path)

    def data(self, workdir: str | Path | None = None) -> Path:
        return Path(self.data_dir) if self.data_dir else self._workdir(workdir) / "feast"

    def features(self, workdir: str | Path | None = None) -> Path:
        if self.features_dir:
            return Path(self.features_dir)
        return self._workdir(workdir) / "features"

    def store(self, workdir: str | Path | None = None) -> FeatureStore:
        return feature_store(self.repo, self.data(workdir), self.features(workdir), create=True)

    def apply(self, workdir: str | Path | None = None, *, force: bool = False) -> ApplyReport:
        """``feast apply``, skipped when the registry holds what it would write."""
        return apply_repo(self.repo, self.data(workdir), self.features(workdir), force=force)

    def materialize(
        self, workdir: str | Path | None = None, end: datetime | None = None
    ) -> MaterializeReport:
        store = self.store(workdir)
        if self.incremental:
            return materialize_incremental(store, end)
        return materialize_latest(store, end)

    def sync_online(
        self,
        con: duckdb.DuckDBPyConnection,
        workdir: str | Path | None = None,
        end: datetime | None = None,
    ) -> OnlineSyncReport:
        """Bring the online store up to the release, writing what changed (see
        :func:`pipelines.features.online_sync.sync_online_store`); ``con`` is the warehouse,
        opened for writing (it keeps the snapshot of what was written)."""
        store = self.store(workdir)
        if missing_online_tables(store):
            # the online tables come from feast apply: a removed online store is recreated
            self.apply(workdir)
            store = self.store(workdir)
        if not self.incremental:
            return sync_online_store(con, store, end)
        done = materialize_incremental(store, end)
        forget_snapshot(con)  # Feast wrote rows the snapshot does not know of
        return OnlineSyncReport(
            mode="feast_incremental",
            reason="incremental: rows newer than Feast's last run",
            end=done.end,
            seconds=done.seconds,
            entities_online=done.entities_online,
        )
