"""The per-batch assets and the job that materialises them for one landing batch (partition).

Listed once here: the code location, the landing sensor and the local runner all take the
batch stage from this list, so an asset added to it runs everywhere a batch runs."""

from dagster import AssetsDefinition, AssetSelection, define_asset_job

from pipelines.assets.deid import deid_resources
from pipelines.assets.ingest import ingest, landing_batch

# per batch (partitioned): landing → ingest → de-identification
BATCH_ASSETS: list[AssetsDefinition] = [landing_batch, ingest, deid_resources]

batch_job = define_asset_job(
    "ingest_batch_job",
    selection=AssetSelection.assets(*BATCH_ASSETS),
    description="Materialise every stage for one landing batch.",
)
