"""Stage ``feast``: the Feast registry (``feast apply`` of feature_repo, skipped when nothing it
reads changed) and the online store (the latest row of every patient up to the release's data
end, written where it changed). Both wait for the feature tables, whose checks are blocking: a
table that failed its PHI or opt-out check never reaches Feast."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    MaterializeResult,
    MetadataValue,
    asset,
)

from deid.leakscan import LeakScanResult
from pipelines.assets.checks import RELEASE_CANARIES, leak_scan_result
from pipelines.assets.deid import FOLLOWS_THE_VIEWS, RELEASE_INPUT, built_from_upstream
from pipelines.assets.features import FEATURE_ASSET_KEYS
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.features.cohort import released_cohort
from pipelines.features.online_scan import scan_online_store
from pipelines.features.online_sync import OnlineSyncReport
from pipelines.features.resources import FeastStoreResource
from pipelines.resources import WarehouseResource
from vault.keys import KeyProvider


@asset(
    group_name="feast",
    deps=[RELEASE_INPUT, *FEATURE_ASSET_KEYS],
    kinds={"feast"},
    automation_condition=FOLLOWS_THE_VIEWS,
    pool=WAREHOUSE_POOL,
)
def feast_registry(
    context: AssetExecutionContext, warehouse: WarehouseResource, feast_store: FeastStoreResource
) -> MaterializeResult:
    """Apply the Feast repo: entities, feature views over the feature Parquet, services.
    Skipped when the registry was applied from the same repo files, rendered configuration,
    data paths and feast version (a digest recorded beside the registry)."""
    report = feast_store.apply(warehouse.workdir)
    done = "feast apply" if report.applied else "feast apply skipped"
    context.log.info(
        f"{done} ({report.reason}): {report.feature_views} feature views, "
        f"{report.features} features in {report.seconds:.1f}s"
    )
    return MaterializeResult(
        tags=built_from_upstream(context, context.asset_key),
        metadata={
            "entities": report.entities,
            "feature_views": report.feature_views,
            "feature_services": report.feature_services,
            "features": report.features,
            "seconds": report.seconds,
            "applied": report.applied,
            "reason": report.reason,
            "digest": report.digest[:12],
        },
    )


ONLINE_STORE = AssetKey("feast_online_store")
ONLINE_STORE_SPEC = AssetSpec(
    ONLINE_STORE,
    group_name="feast",
    deps=[RELEASE_INPUT, "feast_registry", *FEATURE_ASSET_KEYS],
    kinds={"feast", "sqlite"},
    automation_condition=FOLLOWS_THE_VIEWS,
    description="Bring the SQLite online store to the latest feature row of every released "
    "patient, however old, up to the release's data end: only the rows that changed since the "
    "last run are written and patients no longer released are deleted (the full materialisation "
    "on a first run or after a new apply). The leak scan reads back the rows written.",
)
ONLINE_STORE_SCAN = AssetCheckSpec(
    "phi_leak_scan",
    asset=ONLINE_STORE,
    blocking=True,
    description="No name, identifier, address, phone or email of any patient, and no "
    "patient's own birth date, appears among the values served online.",
)


@dataclass(frozen=True)
class OnlineStoreRefresh:
    """What a sync of the online store did, the released cohort's size and the leak scan of
    the rows it wrote."""

    report: OnlineSyncReport
    cohort: int
    scan: LeakScanResult


def refresh_online_store(
    con: duckdb.DuckDBPyConnection,
    workdir: str,
    feast_store: FeastStoreResource,
    provider: KeyProvider,
    run_id: str | None = None,
    sealed: bool = True,
) -> OnlineStoreRefresh:
    """Sync the online store with the feature tables and scan the rows it wrote (every row
    after a full load); unchanged rows were scanned when they were written, and every value they
    hold is in a feature table scanned this release. ``con`` is the warehouse, opened for
    writing: it keeps the snapshot of what is online and the canaries' vault."""
    report = feast_store.sync_online(con, workdir)
    canaries = RELEASE_CANARIES.get(con, provider, run_id, sealed=sealed)
    cohort = len(released_cohort(con))
    online_db = Path(feast_store.data(workdir)) / "online_store.db"
    scan = scan_online_store(online_db, canaries, only=report.written)
    return OnlineStoreRefresh(report, cohort, scan)


def online_store_results(
    context: AssetExecutionContext, refresh: OnlineStoreRefresh
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """The online store's materialisation (counts and dates, no values) and its leak scan."""
    report = refresh.report
    context.log.info(
        f"feast online store ({report.mode}, {report.reason}): {report.rows_written} rows "
        f"written, {report.rows_deleted} deleted, {report.rows_unchanged} unchanged, latest "
        f"rows up to {report.end:%Y-%m-%d} (data end)"
    )
    online = max(report.entities_online.values(), default=0)
    yield MaterializeResult(
        asset_key=ONLINE_STORE,
        tags=built_from_upstream(context, ONLINE_STORE),
        metadata={
            "end": report.end.isoformat(),
            "seconds": report.seconds,
            "mode": report.mode,
            "reason": report.reason,
            "rows_written": report.rows_written,
            "rows_deleted": report.rows_deleted,
            "rows_unchanged": report.rows_unchanged,
            "entities_online": MetadataValue.json(report.entities_online),
            "patients_online": online,
            # released, not opted-out patients the store cannot answer for (0 expected: every
            # patient with data has a latest row)
            "released_patients": refresh.cohort,
            "released_patients_not_online": max(refresh.cohort - online, 0),
        },
    )
    yield leak_scan_result(ONLINE_STORE, refresh.scan)
