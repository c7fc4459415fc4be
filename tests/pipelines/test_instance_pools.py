"""The `warehouse` pool of the UI's instance against the runs that do not go through its queue."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from dagster import DagsterInstance, asset, materialize

from pipelines.assets.ingest import WAREHOUSE_POOL

REPO_ROOT = Path(__file__).resolve().parents[2]


@asset(pool=WAREHOUSE_POOL)
def warehouse_step() -> int:
    return 1


def test_a_run_outside_the_queue_never_waits_for_a_warehouse_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ehr run` and the release `ehr forget` runs execute in-process on the UI's instance
    (DAGSTER_HOME set) and hold the warehouse file from their first write to their end. A UI
    run's step holding the pool's slot waits for that file; had the in-process run's next step
    waited for the slot, both waited until the UI run's step gave up (five minutes) and failed."""
    shutil.copy(REPO_ROOT / ".dagster_home" / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    instance = DagsterInstance.get()
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default(WAREHOUSE_POOL)
    # a step of a run the UI launched, waiting for the warehouse file with the slot held
    claim = storage.claim_concurrency_slot(WAREHOUSE_POOL, "ui-run", "deid_resources")
    assert claim.is_claimed
    finished = threading.Event()

    def run_in_process() -> None:
        if materialize([warehouse_step], instance=instance).success:
            finished.set()

    threading.Thread(target=run_in_process, daemon=True).start()
    assert finished.wait(60), "the in-process run waited for the UI run's warehouse slot"
