"""Stage ``feast``: the Feast registry (``feast apply`` of feature_repo) and the online store
(incremental materialisation). Both wait for the feature tables, whose checks are blocking: a
table that failed its PHI or opt-out check never reaches Feast."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from pipelines.assets.features import FEATURE_ASSET_KEYS
from pipelines.features.resources import FeastStoreResource
from pipelines.resources import WarehouseResource


@asset(group_name="feast", deps=FEATURE_ASSET_KEYS)
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


@asset(group_name="feast", deps=["feast_registry", *FEATURE_ASSET_KEYS])
def feast_online_store(
    context: AssetExecutionContext, warehouse: WarehouseResource, feast_store: FeastStoreResource
) -> MaterializeResult:
    """Materialise feature rows newer than the last run into the SQLite online store."""
    report = feast_store.materialize(warehouse.workdir)
    context.log.info(f"feast materialize-incremental to {report.end:%Y-%m-%d %H:%M} UTC")
    return MaterializeResult(
        metadata={
            "end": report.end.isoformat(),
            "seconds": report.seconds,
            "entities_online": MetadataValue.json(report.entities_online),
            "patients_online": max(report.entities_online.values(), default=0),
        }
    )
