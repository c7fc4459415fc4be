"""Watch the landing folder: each new or changed batch becomes a partition and a run."""

import json
from pathlib import Path

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from pipelines.jobs import batch_job
from pipelines.partitions import batch_partitions
from pipelines.resources import LandingResource
from vault.landing import discover_batches


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
