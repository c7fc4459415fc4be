"""Watch the landing folder: each new or changed batch becomes a partition and a run."""

import json
from pathlib import Path

from dagster import (
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    sensor,
)

from pipelines.partitions import batch_partitions
from pipelines.resources import LandingResource
from vault.landing import discover_batches

batch_job = define_asset_job(
    "ingest_batch_job",
    selection=AssetSelection.groups("ingest", "deid") - AssetSelection.assets("released_patients"),
    description="Materialise every stage for one landing batch.",
)


@sensor(job=batch_job, minimum_interval_seconds=30, default_status=DefaultSensorStatus.STOPPED)
def landing_sensor(context: SensorEvaluationContext, landing: LandingResource) -> SensorResult:
    """Register one dynamic partition per arriving batch and request its run."""
    seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
    batches = discover_batches(Path(landing.path))
    new_keys = [b.key for b in batches if b.key not in seen]
    changed = [b for b in batches if seen.get(b.key) != b.fingerprint]
    requests = [
        RunRequest(partition_key=b.key, run_key=f"{b.key}:{b.fingerprint}") for b in changed
    ]
    cursor = json.dumps({**seen, **{b.key: b.fingerprint for b in batches}}, sort_keys=True)
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[batch_partitions.build_add_request(new_keys)]
        if new_keys
        else [],
        cursor=cursor,
    )
