"""Stage ``feast``: the Feast registry (``feast apply`` of feature_repo) and the online store
(the latest row of every patient up to the release's data end). Both wait for the feature
tables, whose checks are blocking: a table that failed its PHI or opt-out check never reaches
Feast."""

from collections.abc import Iterator
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from pipelines.assets.checks import RELEASE_CANARIES, leak_scan_result
from pipelines.assets.features import FEATURE_ASSET_KEYS
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.features.cohort import released_cohort
from pipelines.features.online_scan import scan_online_store
from pipelines.features.resources import FeastStoreResource
from pipelines.resources import KeyProviderResource, WarehouseResource


@asset(
    group_name="feast",
    deps=FEATURE_ASSET_KEYS,
    kinds={"feast"},
    automation_condition=AutomationCondition.eager(),
    pool=WAREHOUSE_POOL,
)
def feast_registry(
    context: AssetExecutionContext, warehouse: WarehouseResource, feast_store: FeastStoreResource
) -> MaterializeResult:
    """Apply the Feast repo: entities, feature views over the feature Parquet, services."""
    report = feast_store.apply(warehouse.workdir)
    context.log.info(
        f"feast apply: {report.feature_views} feature views, {report.features} features "
        f"in {report.seconds:.1f}s"
    )
    return MaterializeResult(
        metadata={
            "entities": report.entities,
            "feature_views": report.feature_views,
            "feature_services": report.feature_services,
            "features": report.features,
            "seconds": report.seconds,
        }
    )


@asset(
    group_name="feast",
    deps=["feast_registry", *FEATURE_ASSET_KEYS],
    kinds={"feast", "sqlite"},
    automation_condition=AutomationCondition.eager(),
    # reads the warehouse for the leak scan's canaries: never beside a writer
    pool=WAREHOUSE_POOL,
    check_specs=[
        AssetCheckSpec(
            "phi_leak_scan",
            asset="feast_online_store",
            blocking=True,
            description="No name, identifier, address, phone or email of any patient, and no "
            "patient's own birth date, appears among the values served online.",
        )
    ],
)
def feast_online_store(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    feast_store: FeastStoreResource,
    keys: KeyProviderResource,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Materialise the latest feature row of every patient, however old, up to the release's
    data end into the SQLite online store."""
    report = feast_store.materialize(warehouse.workdir)
    context.log.info(f"feast materialize: latest rows up to {report.end:%Y-%m-%d} (data end)")
    con = warehouse.connect(read_only=True)
    try:
        canaries = RELEASE_CANARIES.get(con, keys.provider())
        cohort = len(released_cohort(con))
    finally:
        con.close()
    online = max(report.entities_online.values(), default=0)
    yield MaterializeResult(
        metadata={
            "end": report.end.isoformat(),
            "seconds": report.seconds,
            "entities_online": MetadataValue.json(report.entities_online),
            "patients_online": online,
            # released, not opted-out patients the store cannot answer for (0 expected: every
            # patient with data has a latest row)
            "released_patients": cohort,
            "released_patients_not_online": max(cohort - online, 0),
        }
    )
    online_db = Path(feast_store.data(warehouse.workdir)) / "online_store.db"
    yield leak_scan_result("feast_online_store", scan_online_store(online_db, canaries))
