"""The one Dagster code location of the platform."""

from __future__ import annotations

from dagster import AssetsDefinition, Definitions

from pipelines.assets.deid import released_patients
from pipelines.assets.feast import feast_online_store, feast_registry
from pipelines.assets.features import feature_tables
from pipelines.assets.models import model_assets
from pipelines.assets.views import view_assets
from pipelines.features.resources import FeastStoreResource
from pipelines.jobs import BATCH_ASSETS, batch_job
from pipelines.resources import (
    DeidSettings,
    IngestSettings,
    KeyProviderResource,
    LandingResource,
    WarehouseResource,
    default_landing,
    default_workdir,
)
from pipelines.sensors import landing_sensor


def build_resources(
    workdir: str | None = None,
    landing: str | None = None,
    key_file: str | None = None,
    workers: int = 0,
) -> dict[str, object]:
    """Resources for a workdir and landing folder; defaults come from EHR_* variables."""
    return {
        "warehouse": WarehouseResource(workdir=workdir or default_workdir()),
        "landing": LandingResource(path=landing or default_landing()),
        "keys": KeyProviderResource(key_file=key_file),
        "ingest_settings": IngestSettings(workers=workers),
        "deid_settings": DeidSettings(),
        "feast_store": FeastStoreResource(),
    }


# per batch (partitioned): landing → ingest → de-identification, see pipelines.jobs
batch_assets: list[AssetsDefinition] = BATCH_ASSETS
# over the whole release, after the batches: k-anonymous patients, views, features, Feast, model
release_assets: list[AssetsDefinition] = [
    released_patients,
    *view_assets,
    feature_tables,
    feast_registry,
    feast_online_store,
    *model_assets,
]
all_assets: list[AssetsDefinition] = batch_assets + release_assets

defs = Definitions(
    assets=all_assets,
    jobs=[batch_job],
    sensors=[landing_sensor],
    resources=build_resources(),
)
