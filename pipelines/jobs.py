"""The asset lists and jobs of the platform: per batch (one landing batch, a partition) and over
the whole release.

Listed once here: the code location, the landing sensor, the release automation and the local
runner all take their stages from these lists, so an asset added to one runs everywhere that
stage runs."""

from dagster import AssetsDefinition, AssetSelection, define_asset_job, in_process_executor

from pipelines.assets.deid import deid_resources, released_patients
from pipelines.assets.feast import feast_registry
from pipelines.assets.features import feature_tables
from pipelines.assets.ingest import ingest, landing_batch
from pipelines.assets.models import readmission_labels, readmission_model
from pipelines.assets.serving import online_store_and_training_set
from pipelines.assets.views import view_assets

# per batch (partitioned): landing → ingest → de-identification
BATCH_ASSETS: list[AssetsDefinition] = [landing_batch, ingest, deid_resources]
# over the whole release, after the batches: k-anonymous patients, views, features, Feast, model
RELEASE_ASSETS: list[AssetsDefinition] = [
    released_patients,
    *view_assets,
    feature_tables,
    feast_registry,
    readmission_labels,
    # the online store and the training set, side by side in one step
    online_store_and_training_set,
    readmission_model,
]
RELEASE_SELECTION = AssetSelection.assets(*RELEASE_ASSETS)

# Both jobs run their steps in the run's own process: every step reads or writes the one DuckDB
# file, so steps run one after another anyway, and a process per step cost ~11 s of start-up
# each (a UI release took 7x `ehr run`).
batch_job = define_asset_job(
    "ingest_batch_job",
    selection=AssetSelection.assets(*BATCH_ASSETS),
    description="Materialise every stage for one landing batch.",
    executor_def=in_process_executor,
)

# A release run that fails or whose process dies (killed, the machine rebooted) is run again,
# twice at most, by the daemon (``run_retries`` in .dagster_home/dagster.yaml): automation
# would not request it again until the next batch, and every release step is safe to re-run.
# Batch runs are retried by the landing sensor instead (with back-off), so only release runs
# carry the tag.
RELEASE_RUN_TAGS = {"dagster/max_retries": "2"}
# The automation sensor that brings the release up to date after every batch (see
# pipelines.definitions); the landing sensor reads whether an operator stopped it
RELEASE_AUTOMATION = "release_automation"

release_job = define_asset_job(
    "release_job",
    selection=RELEASE_SELECTION,
    description="Rebuild the release (k-anonymous patients, views, features, Feast, model) from "
    "every batch in the vault. The release_automation sensor does this after each batch.",
    executor_def=in_process_executor,
    tags=RELEASE_RUN_TAGS,
)
