"""The one Dagster code location of the platform."""

from __future__ import annotations

import gc
import warnings

from dagster import (
    AssetsDefinition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    in_process_executor,
)

from pipelines.assets.deid import release_input
from pipelines.assets.freshness import online_store_freshness
from pipelines.features.resources import FeastStoreResource
from pipelines.jobs import (
    BATCH_ASSETS,
    RELEASE_ASSETS,
    RELEASE_AUTOMATION,
    RELEASE_RUN_TAGS,
    RELEASE_SELECTION,
    batch_job,
    release_job,
)
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
from vault.keys import refuse_key_shaped_path

# Feast's DuckDB offline store goes through ibis, which calls a DuckDB method DuckDB deprecated:
# nothing this project can act on, printed once per retrieval in every run. Every process that
# runs assets (code server, run workers, `ehr run`) loads this module first.
warnings.filterwarnings(
    "ignore", message=r"fetch_arrow_table\(\) is deprecated", category=DeprecationWarning
)


def build_resources(
    workdir: str | None = None,
    landing: str | None = None,
    key_file: str | None = None,
    workers: int = 0,
) -> dict[str, object]:
    """Resources for a workdir and landing folder; defaults come from EHR_* variables.

    A ``key_file`` becomes the key resource's config, which Dagster stores with every run (the
    job's snapshot): one that looks like a key (pasted into ``ehr run --key-file``) is refused
    here, before any run is made (:func:`vault.keys.refuse_key_shaped_path`)."""
    if key_file is not None:
        refuse_key_shaped_path(key_file, "the key file given (--key-file)")
    return {
        "warehouse": WarehouseResource(workdir=workdir or default_workdir()),
        "landing": LandingResource(path=landing or default_landing()),
        "keys": KeyProviderResource(key_file=key_file),
        "ingest_settings": IngestSettings(workers=workers),
        "deid_settings": DeidSettings(),
        "feast_store": FeastStoreResource(),
    }


# per batch (partitioned) and over the whole release, see pipelines.jobs
batch_assets: list[AssetsDefinition] = BATCH_ASSETS
release_assets: list[AssetsDefinition] = RELEASE_ASSETS
all_assets: list[AssetsDefinition] = batch_assets + release_assets
# what one release run executes, launched by Dagster (release_job, the automation) or by `ehr
# run`, `ehr forget` and the bench: the release assets, then the online store's freshness check
release_run: list[AssetsDefinition] = [*release_assets, online_store_freshness]

# The release follows the batches through declarative automation: every release asset is eager
# (updated once any dependency was, when none is missing or in progress), and this sensor is on
# by default. Chosen over a job the landing sensor requests because it also covers batches run
# by a backfill, a manual launch or `ehr run`, and a failed batch (a missing partition) holds
# the release back instead of publishing a partial one. One tick requests the whole stale chain
# as one run, executed in-process like release_job.
release_automation = AutomationConditionSensorDefinition(
    RELEASE_AUTOMATION,
    target=RELEASE_SELECTION,
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=15,
    description="Brings the release up to date after every batch (eager automation).",
    run_tags=RELEASE_RUN_TAGS,
)

defs = Definitions(
    assets=[*all_assets, release_input],
    asset_checks=[online_store_freshness],
    jobs=[batch_job, release_job],
    sensors=[landing_sensor, release_automation],
    resources=build_resources(),
    # runs the automation sensor launches use the code location's executor
    executor=in_process_executor,
)

# What is loaded by now (Dagster, Feast, pandas, DuckDB's and Arrow's modules, these definitions)
# lives as long as the process. Frozen, it is left out of every later collection, which would
# otherwise walk its ~270,000 objects each time: in a run worker's 1,000-patient release after a
# 1 % batch, collections took 0.53-0.62 s in all, and 0.30 s with it frozen. Objects made after
# this point are collected as before.
gc.freeze()
