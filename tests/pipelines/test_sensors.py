"""The landing sensor: complete folders only, the warehouse ledger, bounded retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    DagsterRunStatus,
    SensorResult,
    build_sensor_context,
)
from dagster._core.storage.dagster_run import DagsterRun

import deid.methods as deid_methods
from deid.staging import LEDGER_DDL
from pipelines import sensors
from pipelines.definitions import build_resources
from pipelines.landing_ledger import current_settings
from pipelines.resources import LandingResource
from pipelines.run import settled_batches
from pipelines.sensors import (
    ATTEMPT_TAG,
    BATCH_TAG,
    DEID_RESOURCES,
    FINGERPRINT_TAG,
    _load_cursor,
    landing_sensor,
)
from pipelines.workdir import Workdir
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.landing import discover_batches
from vault.read import read_resource
from vault.warehouse import BATCH_DIGEST_SQL

PATIENT = b'{"resourceType": "Patient", "id": "p1", "gender": "female"}\n'
# the settings a batch is published under today (the research profile, as the sensor's resource)
SETTINGS = current_settings("research")


def _landing(tmp_path: Path, ready: bool = True) -> Path:
    batch = tmp_path / "landing" / "export-1"
    batch.mkdir(parents=True)
    (batch / "data.ndjson").write_bytes(PATIENT)
    if ready:
        (batch / "_READY").write_bytes(b"")
    return tmp_path / "landing"


def _tick(
    tmp_path: Path,
    instance: DagsterInstance,
    cursor: str | None = None,
    later: float = 0.0,
    **landing: object,
) -> SensorResult:
    """One tick of the sensor; ``later``: seconds from now the tick runs at (a file's change
    time cannot be set back, so a quiet period is passed by moving the sensor's clock on)."""
    resources = build_resources(str(tmp_path / "work"), str(tmp_path / "landing"))
    landing_resource = LandingResource(path=str(tmp_path / "landing"), **landing)  # type: ignore[arg-type]
    clock = SimpleNamespace(time=lambda: time.time() + later)
    # the warehouse resource has a run's set-up and tear-down: a context manager
    with (
        build_sensor_context(
            instance=instance,
            cursor=cursor,
            resources={
                "landing": landing_resource,
                "warehouse": resources["warehouse"],
                "deid_settings": resources["deid_settings"],
            },
        ) as context,
        mock.patch.object(sensors, "time", clock),
    ):
        result = landing_sensor(context)
    assert isinstance(result, SensorResult)
    return result


def _tick_on(
    day: date, tmp_path: Path, instance: DagsterInstance, cursor: str | None = None
) -> SensorResult:
    """A tick at noon UTC of ``day``, as the sensor's clock and the day's rules read it."""
    moment = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    with mock.patch.object(deid_methods, "utcnow", lambda: moment):
        return _tick(tmp_path, instance, cursor)


@pytest.fixture
def instance() -> DagsterInstance:
    return DagsterInstance.ephemeral()


def test_new_complete_batch_is_registered_and_requested(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    _landing(tmp_path)
    first = _tick(tmp_path, instance)
    assert [r.partition_key for r in first.run_requests] == ["export-1"]
    assert first.dynamic_partitions_requests[0].partition_keys == ["export-1"]
    assert first.run_requests[0].tags[ATTEMPT_TAG] == "1"
    # not done before its run succeeded: the next tick waits for it, requests nothing
    again = _tick(tmp_path, instance, first.cursor)
    assert again.run_requests == []
    assert again.skip_reason and "queued" in (again.skip_reason.skip_message or "")


def test_incomplete_folder_waits_for_marker_or_quiet_period(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    landing = _landing(tmp_path, ready=False)
    waiting = _tick(tmp_path, instance, quiet_seconds=60)
    assert waiting.run_requests == []
    assert "waiting for _READY" in (waiting.skip_reason.skip_message or "")  # type: ignore[union-attr]
    past = time.time() - 120
    for path in [landing / "export-1", landing / "export-1" / "data.ndjson"]:
        os.utime(path, (past, past))  # a copy keeping older times: not quiet yet
    assert _tick(tmp_path, instance, quiet_seconds=60).run_requests == []
    quiet = _tick(tmp_path, instance, later=120, quiet_seconds=60)
    assert [r.partition_key for r in quiet.run_requests] == ["export-1"]


def test_batch_in_the_ledger_is_not_ingested_again(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    _landing(tmp_path)
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb")
    try:
        # a batch ingested before fingerprints were recorded: done when its ingest completed
        # after its files last changed
        con.execute(
            "INSERT INTO batches (batch_id, seq, ingested_at, report) "
            "VALUES ('export-1', 1, now(), '{}')"
        )
        con.execute("INSERT INTO source_files VALUES ('export-1', 0, 'f0', 'ndjson', 60, 1)")
    finally:
        con.close()
    # ingested, but its run stopped before de-identification: not done
    assert [r.partition_key for r in _tick(tmp_path, instance).run_requests] == ["export-1"]
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb")
    try:
        con.execute(LEDGER_DDL)
        con.execute(
            "INSERT INTO deid_batches BY NAME SELECT batch_id, "
            f"{BATCH_DIGEST_SQL} AS vault_digest, "
            "? AS settings, now() AS published_at "
            "FROM batches",
            [SETTINGS],
        )
    finally:
        con.close()
    result = _tick(tmp_path, instance)  # empty cursor: a sensor turned on after `ehr run`
    assert result.run_requests == []
    assert "already ingested" in (result.skip_reason.skip_message or "")  # type: ignore[union-attr]
    assert _load_cursor(result.cursor)["export-1"].done

    # a sub-folder it held then, unread then (its times older than the ingest): read now, so
    # the batch has more data files than its ingest read, and is run again
    nested = tmp_path / "landing" / "export-1" / "fhir"
    nested.mkdir()
    (nested / "more.ndjson").write_bytes(PATIENT)
    past = time.time() - 3600
    for path in (nested / "more.ndjson", nested, nested.parent):
        os.utime(path, (past, past))
    again = _tick(tmp_path, instance, later=120)  # after the quiet period
    assert [r.partition_key for r in again.run_requests] == ["export-1"]


def test_a_batch_whose_files_changed_with_older_times_is_ingested_again(
    tmp_path: Path, instance: DagsterInstance, key_file: Path, materialize_batch: Any
) -> None:
    """A corrected export copied over the first with its files' own, older times (``cp -p``,
    ``tar`` and ``unzip`` keep them): every file and the folder are older than the ingest, so
    their times alone say done. The folder's fingerprint (names, sizes, times) says changed:
    the sensor and ``ehr run`` run the batch again, and the vault gets the correction."""
    landing = _landing(tmp_path)
    assert materialize_batch(landing, "export-1").success
    settled = _tick(tmp_path, instance)  # empty cursor: the ledger alone says done
    assert settled.run_requests == []
    assert "already ingested" in (settled.skip_reason.skip_message or "")  # type: ignore[union-attr]

    data = landing / "export-1" / "data.ndjson"
    data.write_bytes(PATIENT.replace(b"female", b"male"))  # rewritten in place
    past = time.time() - 30 * 86400
    os.utime(data, (past, past))
    (batch,) = discover_batches(landing)
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb", read_only=True)
    try:
        ((ingested_at,),) = con.execute("SELECT epoch(ingested_at) FROM batches").fetchall()
    finally:
        con.close()
    times = [p.stat().st_mtime for p in (batch.path, *batch.path.iterdir())]
    assert max(times) < ingested_at  # by time, nothing changed since

    # the marker of the first delivery, older than the file copied since: the batch waits for
    # the copy to be quiet, as the copy may still be going
    copying = _tick(tmp_path, instance, settled.cursor)
    assert copying.run_requests == []
    assert "_READY is older than a file changed since" in (
        copying.skip_reason.skip_message or ""  # type: ignore[union-attr]
    )
    changed = _tick(tmp_path, instance, settled.cursor, later=120)
    assert [r.partition_key for r in changed.run_requests] == ["export-1"]
    assert settled_batches(Workdir(tmp_path / "work"), [batch], "research") == {}
    assert materialize_batch(landing, "export-1").success
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb", read_only=True)
    try:
        patient = read_resource(con, FileKeyProvider.load(key_file), "Patient", "p1")
    finally:
        con.close()
    assert patient is not None and patient["gender"] == "male"
    assert _tick(tmp_path, instance).run_requests == []  # done again, as the folder is now


def _record_run(instance: DagsterInstance, tags: dict[str, str], status: DagsterRunStatus) -> None:
    instance.add_run(DagsterRun(job_name="ingest_batch_job", status=status, tags=tags))


def _record_deid(instance: DagsterInstance, key: str) -> None:
    """The materialization of the batch's de-identification, as its successful run records."""
    instance.report_runless_asset_event(AssetMaterialization("deid_resources", partition=key))


def test_failed_run_is_retried_with_backoff_and_bounded(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    _landing(tmp_path)
    cursor = _tick(tmp_path, instance).cursor
    for attempt in (1, 2):
        assert _tick(tmp_path, instance, cursor).run_requests == []  # run not finished yet
        request_tags = {BATCH_TAG: "export-1", ATTEMPT_TAG: str(attempt)}
        state = _load_cursor(cursor)["export-1"]
        request_tags[FINGERPRINT_TAG] = state.fingerprint
        _record_run(instance, request_tags, DagsterRunStatus.FAILURE)
        waiting = _tick(tmp_path, instance, cursor, retry_backoff_seconds=3600)
        assert waiting.run_requests == [] and "retry in" in (
            waiting.skip_reason.skip_message or ""  # type: ignore[union-attr]
        )
        retry = _tick(tmp_path, instance, cursor, retry_backoff_seconds=0, max_retries=1)
        if attempt == 1:
            assert retry.run_requests[0].tags[ATTEMPT_TAG] == "2"
            cursor = retry.cursor
        else:  # max_retries=1: the second failure is final, and says so
            assert retry.run_requests == []
            assert "not retried again" in (retry.skip_reason.skip_message or "")  # type: ignore[union-attr]


def test_successful_run_marks_the_batch_done(tmp_path: Path, instance: DagsterInstance) -> None:
    _landing(tmp_path)
    first = _tick(tmp_path, instance)
    state = _load_cursor(first.cursor)["export-1"]
    tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: state.fingerprint, ATTEMPT_TAG: "1"}
    _record_run(instance, tags, DagsterRunStatus.SUCCESS)
    done = _tick(tmp_path, instance, first.cursor)
    assert done.run_requests == [] and _load_cursor(done.cursor)["export-1"].done
    # a changed folder is a new version of the batch: run again (its marker written again)
    (tmp_path / "landing" / "export-1" / "more.ndjson").write_bytes(PATIENT)
    os.utime(tmp_path / "landing" / "export-1" / "_READY")
    changed = _tick(tmp_path, instance, done.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["export-1"]


def test_a_file_still_arriving_in_a_sub_folder_keeps_the_batch_waiting(
    tmp_path: Path, instance: DagsterInstance, materialize_batch: Any
) -> None:
    """The quiet period counts the batch's sub-folders' files too; once quiet, the batch's run
    reads them, and its reconciliation counts every record."""
    batch = tmp_path / "landing" / "export-2"
    (batch / "fhir").mkdir(parents=True)
    (batch / "fhir" / "Patient.ndjson").write_bytes(PATIENT)
    past = time.time() - 600
    for path in (batch, batch / "fhir"):
        os.utime(path, (past, past))
    os.utime(batch / "fhir" / "Patient.ndjson")  # written just now
    waiting = _tick(tmp_path, instance, quiet_seconds=60)
    assert waiting.run_requests == []
    assert "waiting for _READY" in (waiting.skip_reason.skip_message or "")  # type: ignore[union-attr]
    quiet = _tick(tmp_path, instance, later=120, quiet_seconds=60)
    assert [r.partition_key for r in quiet.run_requests] == ["export-2"]

    result = materialize_batch(tmp_path / "landing", "export-2")
    (check,) = [
        c for c in result.get_asset_check_evaluations() if c.check_name == "records_reconcile"
    ]
    assert check.passed and check.metadata["records_in"].value == 1


def _ingested(tmp_path: Path, key: str, published: bool = True) -> None:
    """Record ``key`` in the warehouse's ledgers as ingested and (``published``) de-identified."""
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb")
    try:
        con.execute(
            "INSERT INTO batches (batch_id, seq, ingested_at, report) VALUES (?, 1, now(), '{}')",
            [key],
        )
        con.execute(LEDGER_DDL)
        if not published:
            return
        con.execute(
            "INSERT INTO deid_batches BY NAME SELECT batch_id, "
            f"{BATCH_DIGEST_SQL} AS vault_digest, "
            "? AS settings, now() AS published_at "
            "FROM batches WHERE batch_id = ?",
            [SETTINGS, key],
        )
    finally:
        con.close()


def test_a_batch_gone_before_it_was_ingested_has_its_partition_removed(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """A folder renamed or deleted after the sensor registered it: its partition, never
    materialised, would hold back every asset that reads all batches. Removed when nothing of
    it was ingested and no run of it is going; kept otherwise."""
    _landing(tmp_path)  # export-1 is on disk
    _ingested(tmp_path, "ingested-then-deleted")
    instance.add_dynamic_partitions(
        "batches", ["export-1", "renamed", "running", "ingested-then-deleted"]
    )
    _record_run(instance, {BATCH_TAG: "running"}, DagsterRunStatus.STARTED)
    # the sensor requested "renamed" (its state in the cursor), then its folder went away
    cursor = '{"renamed": {"fingerprint": "fp", "attempt": 1, "done": false, "retry_at": 0.0}}'
    result = _tick(tmp_path, instance, cursor)
    removed = [
        key
        for request in result.dynamic_partitions_requests
        if type(request).__name__ == "DeleteDynamicPartitionsRequest"
        for key in request.partition_keys
    ]
    assert removed == ["renamed"]
    assert "renamed" not in _load_cursor(result.cursor)
    assert [r.partition_key for r in result.run_requests] == ["export-1"]
    # once the run of "running" ended without ingesting anything, it goes too
    for run in instance.get_runs():
        if run.tags.get(BATCH_TAG) == "running":
            instance.report_run_failed(run)
    later = _tick(tmp_path, instance, result.cursor)
    gone = [
        key
        for request in later.dynamic_partitions_requests
        if type(request).__name__ == "DeleteDynamicPartitionsRequest"
        for key in request.partition_keys
    ]
    assert gone == ["renamed", "running"]  # the instance still has "renamed": not applied here


def _removed(result: SensorResult) -> list[str]:
    return [
        key
        for request in result.dynamic_partitions_requests
        if type(request).__name__ == "DeleteDynamicPartitionsRequest"
        for key in request.partition_keys
    ]


def test_a_batch_gone_after_its_ingest_but_before_its_release_is_de_identified_once(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """A folder renamed or deleted under its run once the ingest had read it (or after its
    de-identification failed): the vault holds its rows, so its partition stays, and the tick
    says it went after its ingest, not before. That partition holds the release back, and the
    same files dropped under a new name are recorded as repeats of those rows: its
    de-identification alone (its folder is not read) is requested, once for that ingest."""
    (tmp_path / "landing").mkdir()
    _ingested(tmp_path, "ingested-not-published", published=False)
    instance.add_dynamic_partitions("batches", ["ingested-not-published", "never-ingested"])
    result = _tick(tmp_path, instance)
    assert _removed(result) == ["never-ingested"]
    (request,) = result.run_requests
    assert request.partition_key == "ingested-not-published"
    assert request.asset_selection == [AssetKey("deid_resources")]
    # its run queued: not requested again; then failed: the operator's, and the tick says so
    _record_run(instance, dict(request.tags), DagsterRunStatus.STARTED)
    waiting = _tick(tmp_path, instance, result.cursor)
    message = waiting.skip_reason.skip_message or ""  # type: ignore[union-attr]
    assert waiting.run_requests == []
    assert "batch ingested-not-published: folder gone after its ingest" in message
    assert "ingested-not-published: folder gone before" not in message
    (run,) = instance.get_runs()
    instance.report_run_failed(run)
    failed = _tick(tmp_path, instance, waiting.cursor)
    assert failed.run_requests == []
    assert "materialise deid_resources of its partition" in (
        failed.skip_reason.skip_message or ""  # type: ignore[union-attr]
    )


def test_a_batch_gone_after_its_release_that_another_run_takes_out_is_de_identified_again(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """A batch whose folder went away after its ingest, de-identified from the vault by the run
    the sensor requested for it, then taken out of the de-identification ledger by another
    batch's run (its publication changed what a conditional reference of it names): it is
    de-identified again, as a batch whose folder is there is, and as `ehr run` does it. Before,
    the request was made once per ingest: the tick said its run "ended SUCCESS without
    publishing it" and asked for a launch from the UI, and its released rows kept what the
    references named before."""
    (tmp_path / "landing").mkdir()
    _ingested(tmp_path, "cleaned", published=False)
    instance.add_dynamic_partitions("batches", ["cleaned"])
    first = _tick(tmp_path, instance)
    (request,) = first.run_requests
    _record_run(instance, dict(request.tags), DagsterRunStatus.SUCCESS)
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb")
    try:
        con.execute(
            "INSERT INTO deid_batches BY NAME SELECT batch_id, "
            f"{BATCH_DIGEST_SQL} AS vault_digest, ? AS settings, now() AS published_at "
            "FROM batches WHERE batch_id = 'cleaned'",
            [SETTINGS],
        )
        published = _tick(tmp_path, instance, first.cursor)
        assert published.run_requests == []
        con.execute("DELETE FROM deid_batches WHERE batch_id = 'cleaned'")  # taken out
    finally:
        con.close()
    again = _tick(tmp_path, instance, published.cursor)
    (second,) = again.run_requests
    assert second.partition_key == "cleaned"
    assert second.asset_selection == [AssetKey("deid_resources")]
    assert second.run_key != request.run_key
    # once per taking out: its run queued, nothing more is requested
    _record_run(instance, dict(second.tags), DagsterRunStatus.STARTED)
    assert _tick(tmp_path, instance, again.cursor).run_requests == []


def test_a_marker_older_than_a_file_changed_since_does_not_count(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """A marker left from an earlier delivery, or written before the copy ended: the batch
    waits until the marker is touched again (or the quiet period passes)."""
    landing = _landing(tmp_path)
    marker = landing / "export-1" / "_READY"
    past = time.time() - 3600
    os.utime(marker, (past, past))
    time.sleep(0.05)  # file times are taken from a clock of a few milliseconds' steps
    os.utime(landing / "export-1" / "data.ndjson")  # still being written
    waiting = _tick(tmp_path, instance, quiet_seconds=60)
    assert waiting.run_requests == []
    assert "_READY is older than a file changed since" in (
        waiting.skip_reason.skip_message or ""  # type: ignore[union-attr]
    )
    os.utime(marker)  # touched again once the copy is done
    ready = _tick(tmp_path, instance, quiet_seconds=60)
    assert [r.partition_key for r in ready.run_requests] == ["export-1"]


def test_a_marker_dated_ahead_of_this_clock_does_not_count_over_files_copied_after_it(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """A copy keeping the source's times (`rsync -a`, `cp -p`, `unzip`) from a host whose clock
    runs ahead (or a zip's local times from a zone east of here) dates the marker, copied first,
    after the files copied later: read by the later of the two times, it counted as written
    last, and the batch was requested while it was still being copied (a 42-file copy at a
    file every 1.5 s, the marker ten minutes ahead: three runs requested and failed before it
    ended). A time set ahead by a program is no change here: the change time says when."""
    landing = _landing(tmp_path)
    marker = landing / "export-1" / "_READY"
    ahead = time.time() + 600
    os.utime(marker, (ahead, ahead))
    time.sleep(0.05)  # file times are taken from a clock of a few milliseconds' steps
    more = landing / "export-1" / "more.ndjson"
    more.write_bytes(PATIENT)  # copied after the marker, keeping its source's time
    os.utime(more, (ahead - 60, ahead - 60))
    waiting = _tick(tmp_path, instance, quiet_seconds=60)
    assert waiting.run_requests == []
    assert "_READY is older than a file changed since" in (
        waiting.skip_reason.skip_message or ""  # type: ignore[union-attr]
    )
    # the quiet period counts from when the files changed here, not from their times ahead
    quiet = _tick(tmp_path, instance, later=61, quiet_seconds=60)
    assert [r.partition_key for r in quiet.run_requests] == ["export-1"]


def test_a_marker_renamed_into_place_counts_at_once(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """An exporter that writes the marker under a temporary name and renames it (an atomic
    writer): the rename changes the folder's own time after the marker's, which is not a file
    changed since."""
    landing = _landing(tmp_path, ready=False)
    batch = landing / "export-1"
    past = time.time() - 3600
    os.utime(batch / "data.ndjson", (past, past))
    written = batch / ".READY.tmp"
    written.write_text("")
    os.utime(written, (past + 60, past + 60))
    written.rename(batch / "_READY")  # the folder's time is now, after the marker's
    assert batch.stat().st_mtime > (batch / "_READY").stat().st_mtime
    ready = _tick(tmp_path, instance, quiet_seconds=3600)
    assert [r.partition_key for r in ready.run_requests] == ["export-1"]


def test_a_marker_copied_with_its_time_before_the_rest_of_the_folder_does_not_count(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """``cp -a``, ``rsync -a`` (which copies ``_READY`` before lower-case names such as
    ``practitioners.json``), ``tar`` and ``unzip`` keep each file's time from the source, where
    the marker was written last: by modification times, a marker copied early is newer than
    every file copied after it. The times a copy cannot set back say the files came later."""
    batch = tmp_path / "landing" / "export-1"
    batch.mkdir(parents=True)
    written = time.time() - 3600  # when the export was written at the source
    (batch / "data.ndjson").write_bytes(PATIENT)
    os.utime(batch / "data.ndjson", (written, written))
    (batch / "_READY").write_bytes(b"")
    os.utime(batch / "_READY", (written + 60, written + 60))  # written last at the source
    time.sleep(0.05)  # file times are taken from a clock of a few milliseconds' steps
    (batch / "practitioners.json").write_bytes(b'{"resourceType": "Bundle", "type": "batch"}')
    os.utime(batch / "practitioners.json", (written + 30, written + 30))  # copied after it
    waiting = _tick(tmp_path, instance, quiet_seconds=60)
    assert waiting.run_requests == []
    assert "_READY is older than a file changed since" in (
        waiting.skip_reason.skip_message or ""  # type: ignore[union-attr]
    )
    # once the copy is over: the quiet period, or the marker touched
    quiet = _tick(tmp_path, instance, later=120, quiet_seconds=60)
    assert [r.partition_key for r in quiet.run_requests] == ["export-1"]
    os.utime(batch / "_READY")
    ready = _tick(tmp_path, instance, quiet_seconds=60)
    assert [r.partition_key for r in ready.run_requests] == ["export-1"]


@pytest.mark.parametrize("folder", [".tmp", "_staging", ".tmp/part"])
def test_a_file_written_in_a_hidden_or_underscore_sub_folder_keeps_the_batch_waiting(
    tmp_path: Path, instance: DagsterInstance, folder: str
) -> None:
    """rsync's ``--temp-dir`` or a staging folder: not read, but a file still being written
    there means the copy is not done."""
    landing = _landing(tmp_path, ready=False)
    batch = landing / "export-1"
    (batch / folder).mkdir(parents=True)
    (batch / folder / "big.ndjson").write_bytes(PATIENT)
    past = time.time() - 600
    for path in (batch, batch / "data.ndjson", *(batch / folder).parents, batch / folder):
        if path.is_relative_to(batch):
            os.utime(path, (past, past))
    waiting = _tick(tmp_path, instance, quiet_seconds=60)
    assert waiting.run_requests == []
    assert "waiting for _READY" in (waiting.skip_reason.skip_message or "")  # type: ignore[union-attr]
    quiet = _tick(tmp_path, instance, later=120, quiet_seconds=60)
    assert [r.partition_key for r in quiet.run_requests] == ["export-1"]


def test_touching_the_marker_after_the_last_failed_retry_starts_a_new_round(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """Once the retries are spent, a folder dropped again with the same files (``cp -a``) has
    the same fingerprint; touching its marker retries it, with a new round of retries."""
    landing = _landing(tmp_path)
    marker = landing / "export-1" / "_READY"
    cursor = _tick(tmp_path, instance).cursor
    fingerprint = _load_cursor(cursor)["export-1"].fingerprint

    def failed(attempt: int) -> None:
        tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: fingerprint, ATTEMPT_TAG: str(attempt)}
        _record_run(instance, tags, DagsterRunStatus.FAILURE)

    failed(1)
    spent = _tick(tmp_path, instance, cursor, max_retries=0)
    assert spent.run_requests == []
    assert "not retried again" in (spent.skip_reason.skip_message or "")  # type: ignore[union-attr]
    assert "touch _READY" in (spent.skip_reason.skip_message or "")  # type: ignore[union-attr]
    # a re-drop keeping the marker's old time changes nothing
    still = _tick(tmp_path, instance, spent.cursor, max_retries=0)
    assert still.run_requests == []
    os.utime(marker)  # touched after the last failure
    retried = _tick(tmp_path, instance, still.cursor, max_retries=0)
    assert [r.tags[ATTEMPT_TAG] for r in retried.run_requests] == ["2"]
    failed(2)
    again = _tick(tmp_path, instance, retried.cursor, max_retries=0)
    assert again.run_requests == []
    assert "failed 2 times, not retried again" in (
        again.skip_reason.skip_message or ""  # type: ignore[union-attr]
    )


def test_a_tick_with_every_batch_ingested_says_so(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    _landing(tmp_path)
    first = _tick(tmp_path, instance)
    state = _load_cursor(first.cursor)["export-1"]
    tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: state.fingerprint, ATTEMPT_TAG: "1"}
    _record_run(instance, tags, DagsterRunStatus.SUCCESS)
    _tick(tmp_path, instance, first.cursor)  # marks it done
    idle = _tick(tmp_path, instance, _tick(tmp_path, instance, first.cursor).cursor)
    assert idle.skip_reason is not None
    assert idle.skip_reason.skip_message == "1 batch already ingested, nothing new"


def test_a_tick_with_nothing_new_and_no_folder_gone_leaves_the_warehouse_closed(
    tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 15 s: a tick that has nothing to look up must not open the warehouse, which a
    run starting at that moment may be opening to write (DuckDB admits one writer process and
    no reader beside it)."""
    import pipelines.sensors as sensors

    _landing(tmp_path)
    instance.add_dynamic_partitions("batches", ["export-1"])
    first = _tick(tmp_path, instance)
    state = _load_cursor(first.cursor)["export-1"]
    tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: state.fingerprint, ATTEMPT_TAG: "1"}
    _record_run(instance, tags, DagsterRunStatus.SUCCESS)
    _record_deid(instance, "export-1")
    done = _tick(tmp_path, instance, first.cursor)

    def opened(_: object) -> None:
        raise AssertionError("the warehouse was opened")

    monkeypatch.setattr(sensors, "ingested_batches", opened)
    idle = _tick(tmp_path, instance, done.cursor)
    assert idle.run_requests == [] and idle.dynamic_partitions_requests == []


def _publish_all(wh: Path) -> None:
    """De-identification's ledger rows for every ingested batch, as a published run leaves."""
    con = warehouse.connect(wh)
    try:
        con.execute(LEDGER_DDL)
        con.execute("DELETE FROM deid_batches")
        con.execute(
            "INSERT INTO deid_batches BY NAME SELECT batch_id, "
            f"{BATCH_DIGEST_SQL} AS vault_digest, "
            "? AS settings, now() AS published_at "
            "FROM batches WHERE ingested_at IS NOT NULL",
            [SETTINGS],
        )
    finally:
        con.close()


def test_a_batch_given_a_row_by_another_batchs_ingest_is_run_again(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """Batch b repeats a's Patient p1 (its copy dropped as unchanged). When a's folder loses
    p1 and a's run succeeds, b's ledger holds p1 now (vault.ingest hands the row over): the
    sensor's next tick runs b again, though b's folder did not change, so that b's release
    holds p1; the tick after that, with b's run done, requests nothing."""
    land = tmp_path / "landing"
    p2 = b'{"resourceType": "Patient", "id": "p2", "gender": "male"}\n'
    for name, files in (
        ("a", {"p1.ndjson": PATIENT, "p2.ndjson": p2}),
        ("b", {"p1.ndjson": PATIENT}),
    ):
        (land / name).mkdir(parents=True)
        for file, data in files.items():
            (land / name / file).write_bytes(data)
        (land / name / "_READY").write_bytes(b"")
    wh = tmp_path / "work" / "warehouse.duckdb"
    wh.parent.mkdir(parents=True)

    def ingest(key: str) -> None:
        source = {b.key: b for b in discover_batches(land)}[key]
        ingest_batch(wh, key, source.path, key_provider, workers=1, fingerprint=source.fingerprint)

    ingest("a")
    ingest("b")
    _publish_all(wh)
    settled = _tick(tmp_path, instance)
    assert settled.run_requests == []
    (land / "a" / "p1.ndjson").unlink()
    os.utime(land / "a" / "_READY")  # the marker written again after the change
    changed = _tick(tmp_path, instance, settled.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["a"]
    ingest("a")  # the run of a: ingest, then de-identification
    _publish_all_but(wh, "b")
    _record_run(instance, changed.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    after = _tick(tmp_path, instance, changed.cursor)
    assert [r.partition_key for r in after.run_requests] == ["b"]
    state = _load_cursor(after.cursor)["b"]
    assert (state.done, state.rerun) == (False, 1)
    _publish_all(wh)  # b's run de-identified it again
    _record_run(instance, after.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    final = _tick(tmp_path, instance, after.cursor)
    assert final.run_requests == []
    assert all(s.done for s in _load_cursor(final.cursor).values())
    con = warehouse.connect(wh, read_only=True)
    try:
        assert read_resource(con, key_provider, "Patient", "p1") is not None
    finally:
        con.close()


def _publish_all_but(wh: Path, left: str) -> None:
    """The ledger rows as a's run leaves them: a published from its new state, b's row still
    the one of b's own run (before a's ingest changed b's ledger)."""
    con = warehouse.connect(wh)
    try:
        con.execute("DELETE FROM deid_batches WHERE batch_id <> ?", [left])
        con.execute(
            "INSERT INTO deid_batches BY NAME SELECT batch_id, "
            f"{BATCH_DIGEST_SQL} AS vault_digest, "
            "? AS settings, now() AS published_at "
            "FROM batches WHERE batch_id <> ?",
            [SETTINGS, left],
        )
    finally:
        con.close()


def test_a_batch_whose_materializations_were_wiped_is_run_again(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """Wiping deid_resources in the UI (Dagster wipes a partitioned asset whole) leaves the
    partition of a done batch unmaterialised while the vault and the release hold it:
    automation waits while any partition is missing, so the next batch's release would be
    held back for good while every tick said nothing was new. The sensor runs the batch again
    (once: nothing more while that run goes, nothing after it succeeded)."""
    _landing(tmp_path)
    instance.add_dynamic_partitions("batches", ["export-1"])
    first = _tick(tmp_path, instance)
    state = _load_cursor(first.cursor)["export-1"]
    tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: state.fingerprint, ATTEMPT_TAG: "1"}
    _record_run(instance, tags, DagsterRunStatus.SUCCESS)
    _record_deid(instance, "export-1")
    done = _tick(tmp_path, instance, first.cursor)
    idle = _tick(tmp_path, instance, done.cursor)
    assert idle.run_requests == []
    instance.wipe_assets([AssetKey("deid_resources")])
    wiped = _tick(tmp_path, instance, idle.cursor)
    assert [r.partition_key for r in wiped.run_requests] == ["export-1"]
    again = _tick(tmp_path, instance, wiped.cursor)
    assert again.run_requests == []  # its run not finished yet
    _record_run(instance, wiped.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    _record_deid(instance, "export-1")
    settled = _tick(tmp_path, instance, _tick(tmp_path, instance, again.cursor).cursor)
    assert settled.run_requests == []
    assert _load_cursor(settled.cursor)["export-1"].done


def test_a_done_batch_with_no_partition_here_is_not_run_again(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """A batch done whose partition this instance does not hold (ingested by `ehr run` under
    another Dagster instance, or its partition deleted in the UI) holds no release back: it
    is not run again."""
    _landing(tmp_path)
    first = _tick(tmp_path, instance)
    state = _load_cursor(first.cursor)["export-1"]
    tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: state.fingerprint, ATTEMPT_TAG: "1"}
    _record_run(instance, tags, DagsterRunStatus.SUCCESS)
    done = _tick(tmp_path, instance, first.cursor)
    assert _tick(tmp_path, instance, done.cursor).run_requests == []


def _two_batches_ingested(tmp_path: Path, key_provider: FileKeyProvider) -> Path:
    """Batches a and b in the landing folder, both ingested; the warehouse's path."""
    land = tmp_path / "landing"
    for name, patient in (("a", PATIENT), ("b", PATIENT.replace(b"p1", b"p2"))):
        (land / name).mkdir(parents=True)
        (land / name / "data.ndjson").write_bytes(patient)
        (land / name / "_READY").write_bytes(b"")
    wh = tmp_path / "work" / "warehouse.duckdb"
    wh.parent.mkdir(parents=True)
    for source in discover_batches(land):
        ingest_batch(
            wh, source.key, source.path, key_provider, workers=1, fingerprint=source.fingerprint
        )
    return wh


def _unsettle(wh: Path, key: str) -> None:
    """The ledger as a later batch's de-identification leaves it when it changed what the
    batch's conditional references name (deid.staging._unsettle_changed_targets): the batch
    is no longer published from the vault's state of it."""
    _publish_all(wh)
    con = warehouse.connect(wh)
    try:
        con.execute("DELETE FROM deid_batches WHERE batch_id = ?", [key])
    finally:
        con.close()


def test_a_batch_taken_out_of_the_ledger_by_a_batch_finished_in_the_same_tick_is_run_again(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """Two batches dropped together, both runs ended between two ticks, and b's publication
    took a out of the de-identification ledger (b changed what a's conditional references
    name): a is run again, as `ehr run` does in the same run, or the release kept a's
    references resolved as they were before b came. It was not: only the batches finished in
    an earlier tick were looked at."""
    wh = _two_batches_ingested(tmp_path, key_provider)
    first = _tick(tmp_path, instance)
    assert sorted(r.partition_key for r in first.run_requests) == ["a", "b"]
    _unsettle(wh, "a")
    for request in first.run_requests:
        _record_run(instance, request.tags, DagsterRunStatus.SUCCESS)
        _record_deid(instance, str(request.partition_key))
    after = _tick(tmp_path, instance, first.cursor)
    assert [r.partition_key for r in after.run_requests] == ["a"]
    assert _load_cursor(after.cursor)["a"].rerun == 1
    # its folder as ingested, its vault rows stand: de-identified again, not ingested again
    assert after.run_requests[0].asset_selection == [DEID_RESOURCES]
    _publish_all(wh)  # a's run published it again
    _record_run(instance, after.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    _record_deid(instance, "a")
    settled = _tick(tmp_path, instance, _tick(tmp_path, instance, after.cursor).cursor)
    assert settled.run_requests == []
    assert all(s.done for s in _load_cursor(settled.cursor).values())


def test_a_batch_whose_patient_reference_names_another_patient_since_is_ingested_again(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """A batch taken out of the de-identification ledger whose conditional reference to a
    Patient names another patient since (deid.staging.refiled_batches, read with the ledger)
    runs its whole job: ingest filed its records under the Patient the reference named. One
    whose vault rows stand is de-identified alone; a retry after a failed run is judged as the
    request was: the whole job while the reference names another patient."""
    wh = _two_batches_ingested(tmp_path, key_provider)
    _publish_all(wh)
    settled = _tick(tmp_path, instance)
    _unsettle(wh, "a")
    _record_deid(instance, "b")
    with mock.patch("pipelines.landing_ledger.refiled_batches", return_value={"a"}):
        refiled = _tick(tmp_path, instance, settled.cursor)
    assert [(r.partition_key, r.asset_selection) for r in refiled.run_requests] == [("a", None)]
    _record_run(instance, refiled.run_requests[0].tags, DagsterRunStatus.FAILURE)
    with mock.patch("pipelines.landing_ledger.refiled_batches", return_value={"a"}):
        failed = _tick(tmp_path, instance, refiled.cursor)  # its back-off starts
        retried = _tick(tmp_path, instance, failed.cursor, later=3600)
    batch_runs = [r for r in retried.run_requests if r.partition_key is not None]
    assert [(r.partition_key, r.asset_selection) for r in batch_runs] == [("a", None)]


def test_a_batch_taken_out_of_the_ledger_by_a_backfill_is_run_again(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """Batches done in the sensor's cursor are run again by runs it did not request (a
    backfill of every partition, a partition launched from the UI): when one of those took a
    batch out of the de-identification ledger, the next tick runs that batch again. Nothing
    is requested while no batch was de-identified since the ledger was last read."""
    wh = _two_batches_ingested(tmp_path, key_provider)
    _publish_all(wh)
    settled = _tick(tmp_path, instance)  # empty cursor: the ledger says both are done
    assert settled.run_requests == []
    idle = _tick(tmp_path, instance, settled.cursor)
    assert idle.run_requests == []
    _unsettle(wh, "a")  # the backfill's run of b took a out of the ledger
    for key in ("a", "b"):
        _record_deid(instance, key)
    after = _tick(tmp_path, instance, idle.cursor)
    assert [r.partition_key for r in after.run_requests] == ["a"]
    _publish_all(wh)
    _record_run(instance, after.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    _record_deid(instance, "a")
    settled_again = _tick(tmp_path, instance, _tick(tmp_path, instance, after.cursor).cursor)
    assert settled_again.run_requests == []


def test_a_release_left_behind_is_requested_by_the_sensor_once(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """The landing sensor's own tick requests release_job beside its batches' runs (the
    condition itself: tests/pipelines/test_missed_release.py)."""
    _landing(tmp_path)
    first = _tick(tmp_path, instance)
    tags = dict(first.run_requests[0].tags)
    assert first.run_requests[0].job_name == "ingest_batch_job"
    _record_run(instance, tags, DagsterRunStatus.SUCCESS)
    _record_deid(instance, "export-1")
    # no release run came (the automation sensor's tick missed it): a minute on, one is asked
    assert _tick(tmp_path, instance, first.cursor).run_requests == []
    done = _tick(tmp_path, instance, first.cursor, later=sensors.RELEASE_GRACE_SECONDS)
    (release,) = done.run_requests
    assert release.job_name == "release_job" and release.partition_key is None
    assert sensors.RELEASE_REQUESTED_KEY in (done.cursor or "")
    assert _tick(tmp_path, instance, done.cursor, later=120).run_requests == []


def _ledger_shows_published(tmp_path: Path, fingerprint: str) -> None:
    """The warehouse's ledgers as a successful run of the batch leaves them: ingested from the
    folder with ``fingerprint``, then de-identified from that ingest."""
    con = warehouse.connect(tmp_path / "work" / "warehouse.duckdb")
    try:
        con.execute(
            "INSERT INTO batches (batch_id, seq, ingested_at, report, source_fingerprint) "
            "VALUES ('export-1', 1, now(), '{}', ?)",
            [fingerprint],
        )
    finally:
        con.close()
    _publish_all(tmp_path / "work" / "warehouse.duckdb")


@pytest.mark.parametrize("spent", [True, False])
def test_a_failed_batch_run_again_from_the_ui_is_done_and_not_ingested_twice(
    tmp_path: Path, instance: DagsterInstance, spent: bool
) -> None:
    """A batch whose run failed, fixed and run again by the operator from the UI (the partition
    launched, or backfilled: no sensor tags) while its retries were spent (the skip reason
    says to do so) or while it waited for its next retry: the ledger shows it done, so the
    sensor neither keeps saying it failed nor ingests it again (on a touched marker, or when
    the back-off ends)."""
    landing = _landing(tmp_path)
    instance.add_dynamic_partitions("batches", ["export-1"])
    first = _tick(tmp_path, instance)
    fingerprint = _load_cursor(first.cursor)["export-1"].fingerprint
    tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: fingerprint, ATTEMPT_TAG: "1"}
    _record_run(instance, tags, DagsterRunStatus.FAILURE)
    limits: dict[str, int] = {"max_retries": 0} if spent else {"retry_backoff_seconds": 3600}
    failed = _tick(tmp_path, instance, first.cursor, **limits)
    message = failed.skip_reason.skip_message or ""  # type: ignore[union-attr]
    assert failed.run_requests == []
    assert ("not retried again" if spent else "retry in") in message
    # the operator's run from the UI: ingested and de-identified, no sensor tags
    _ledger_shows_published(tmp_path, fingerprint)
    _record_deid(instance, "export-1")
    after = _tick(tmp_path, instance, failed.cursor, **limits)
    message = after.skip_reason.skip_message or ""  # type: ignore[union-attr]
    assert after.run_requests == []
    assert "not retried again" not in message and "retry in" not in message
    assert "already ingested (warehouse ledger)" in message
    assert "1 batch already ingested" in message
    assert _load_cursor(after.cursor)["export-1"].done
    # neither the marker touched (as the old skip reason said) nor the back-off ended runs it
    os.utime(landing / "export-1" / "_READY")
    assert _tick(tmp_path, instance, after.cursor, retry_backoff_seconds=0).run_requests == []


def test_a_failed_batch_de_identified_from_the_ui_waits_while_the_warehouse_is_busy(
    tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tick after a run from the UI de-identified a batch whose own run failed meets the
    warehouse open for writing in another process (the release that de-identification started):
    the ledger cannot be read, so the batch waits for the next tick rather than being retried
    (ingested again) once its back-off is over."""
    _landing(tmp_path)
    instance.add_dynamic_partitions("batches", ["export-1"])
    first = _tick(tmp_path, instance)
    fingerprint = _load_cursor(first.cursor)["export-1"].fingerprint
    tags = {BATCH_TAG: "export-1", FINGERPRINT_TAG: fingerprint, ATTEMPT_TAG: "1"}
    _record_run(instance, tags, DagsterRunStatus.FAILURE)
    failed = _tick(tmp_path, instance, first.cursor, retry_backoff_seconds=60)
    assert "retry in" in (failed.skip_reason.skip_message or "")  # type: ignore[union-attr]
    _ledger_shows_published(tmp_path, fingerprint)
    _record_deid(instance, "export-1")
    monkeypatch.setattr(warehouse, "BUSY_WAIT_SECONDS", 0.5)
    path = str(tmp_path / "work" / "warehouse.duckdb")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys; c = duckdb.connect({path!r}); "
            "print('open', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        busy = _tick(tmp_path, instance, failed.cursor, later=61, retry_backoff_seconds=60)
    finally:
        holder.communicate("", timeout=30)
    assert [r for r in busy.run_requests if r.partition_key == "export-1"] == []
    assert not _load_cursor(busy.cursor)["export-1"].done
    free = _tick(tmp_path, instance, busy.cursor, later=62, retry_backoff_seconds=60)
    assert [r for r in free.run_requests if r.partition_key == "export-1"] == []
    assert _load_cursor(free.cursor)["export-1"].done


def test_folders_that_are_no_batch_are_counted_in_the_tick_until_they_hold_data(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """Idle folders are counted by what they hold, never named: an exporter's folder named
    after a patient (here holding only a PDF) would otherwise be written into every tick."""
    landing = tmp_path / "landing"
    for folder in ("empty", "marker-only", "fhir-xml", "Marblethorpe Quintavious"):
        (landing / folder).mkdir(parents=True)
    (landing / "marker-only" / "_READY").write_bytes(b"")
    (landing / "fhir-xml" / "Patient.xml").write_bytes(b"<Patient/>")
    (landing / "fhir-xml" / "_READY").write_bytes(b"")
    (landing / "Marblethorpe Quintavious" / "letter.pdf").write_bytes(b"%PDF-1.4")
    tick = _tick(tmp_path, instance)
    assert tick.run_requests == []
    said = (tick.skip_reason.skip_message or "").split("; ")  # type: ignore[union-attr]
    assert said == [
        "4 folders (names not shown) hold no FHIR data file (.json, .ndjson, .json.gz, "
        ".ndjson.gz) to read, not a batch (not read: not a FHIR data file extension: 2, not a "
        "data file (export metadata): 2)"
    ]
    for name in ("Marblethorpe", "Quintavious", "marker-only", "fhir-xml", "empty"):
        assert name not in (tick.skip_reason.skip_message or "")  # type: ignore[union-attr]
    # the export's data arrives, the marker written last: the folder is a batch
    (landing / "marker-only" / "data.ndjson").write_bytes(PATIENT)
    os.utime(landing / "marker-only" / "_READY")
    later = _tick(tmp_path, instance, tick.cursor)
    assert [r.partition_key for r in later.run_requests] == ["marker-only"]


def test_a_batch_that_cannot_be_listed_waits_and_the_others_are_requested(
    tmp_path: Path, instance: DagsterInstance, refuse_listing: Any
) -> None:
    """One folder an exporter left unreadable (a per-patient sub-folder with other
    permissions) stopped every tick, so no batch was ingested while it stayed. It now waits
    alone: the others are requested, the tick names it by its key (no name below it), its
    partition is kept, and once it can be read it is requested like any new batch."""
    landing = _landing(tmp_path)  # export-1, complete
    late = landing / "export-2"
    secret = late / "Quillfeather_Marisol"
    secret.mkdir(parents=True)
    (secret / "data.ndjson").write_bytes(PATIENT)
    (late / "_READY").write_bytes(b"")
    instance.add_dynamic_partitions("batches", ["export-2"])  # registered by an earlier tick
    allow = refuse_listing(secret)
    ticks: list[Any] = []
    real_evaluate = sensors.evaluate_landing

    def evaluate(*args: Any) -> Any:
        ticks.append(real_evaluate(*args))
        return ticks[-1]

    with mock.patch.object(sensors, "evaluate_landing", evaluate):
        result = _tick(tmp_path, instance)
        assert [r.partition_key for r in result.run_requests] == ["export-1"]
        assert _removed(result) == []
        (reason,) = [r for r in ticks[-1].reasons if "export-2" in r]
        assert reason.startswith("batch export-2: a folder 1 level down in the batch")
        assert reason.endswith(
            "(the other batches are read; this one is tried again at every tick)"
        )
        assert "Quillfeather" not in reason and str(tmp_path) not in reason
        assert "export-2" not in _load_cursor(result.cursor)

        allow()  # the permissions mended, and the marker written again after it
        (late / "_READY").write_bytes(b"")
        later = _tick(tmp_path, instance, result.cursor)
    assert [r.partition_key for r in later.run_requests] == ["export-2"]


def test_a_batch_a_new_day_releases_otherwise_is_de_identified_again_alone(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """Batch a holds a birth date of 1937, over the age limit from 1 January 2027 (the limit
    counts calendar years: its ledger row's stable_until), b none. Ticks on 31 December request
    nothing; the first tick of 1 January reads the ledger again, with no run of any batch
    since, and requests a's de-identification alone (its ingest holds: the day never changes
    it), b nothing; once a is published again the next ticks, and the next day's, request
    nothing. The sensor never read the ledger for a new day: a was released as of 31 December
    for good."""
    wh = _two_batches_ingested(tmp_path, key_provider)
    _publish_all(wh)
    over_from = date(1937 + 90, 1, 1)  # the reference: the year of her 90th birthday
    con = warehouse.connect(wh)
    try:
        con.execute("UPDATE deid_batches SET stable_until = ? WHERE batch_id = 'a'", [over_from])
    finally:
        con.close()

    def tick(day: date, cursor: str | None = None) -> SensorResult:
        return _tick_on(day, tmp_path, instance, cursor)

    eve = over_from - timedelta(days=1)
    settled = tick(eve)
    assert settled.run_requests == []
    assert tick(eve, settled.cursor).run_requests == []
    new_day = tick(over_from, settled.cursor)
    assert [(r.partition_key, r.asset_selection) for r in new_day.run_requests] == [
        ("a", [DEID_RESOURCES])
    ]
    _publish_all(wh)  # a's run published it again, its rows now holding on no day
    _record_run(instance, new_day.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    _record_deid(instance, "a")
    done = tick(over_from, tick(over_from, new_day.cursor).cursor)
    assert done.run_requests == []
    assert all(state.done for state in _load_cursor(done.cursor).values())
    assert tick(over_from + timedelta(days=1), done.cursor).run_requests == []


def test_a_batch_published_under_other_settings_is_de_identified_again_alone(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """Batch a was published under other settings (an earlier version's leak-scan or release
    rules), b under today's. The sensor's first tick after the change, with the cursor of
    ticks made before it, reads the ledger again and requests a's de-identification alone (its
    ingest holds), b nothing; once a is published under today's settings, nothing more. The
    sensor took a batch published under any settings for done: new rules never reached the
    batches released before them in the UI path."""
    wh = _two_batches_ingested(tmp_path, key_provider)
    _publish_all(wh)
    settled = _tick(tmp_path, instance)
    assert settled.run_requests == []
    con = warehouse.connect(wh)
    try:
        con.execute("UPDATE deid_batches SET settings = 'an earlier version' WHERE batch_id = 'a'")
    finally:
        con.close()
    # the cursor was written under other settings: the ledger is read again at once
    older = json.loads(settled.cursor or "{}")
    older[sensors.LEDGER_DAY_KEY] = sensors._ledger_read_on(
        sensors.today_utc().toordinal(), "0" * 64
    )
    changed = _tick(tmp_path, instance, json.dumps(older))
    assert [(r.partition_key, r.asset_selection) for r in changed.run_requests] == [
        ("a", [DEID_RESOURCES])
    ]
    _publish_all(wh)  # a's run published it under today's settings
    _record_run(instance, changed.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    _record_deid(instance, "a")
    done = _tick(tmp_path, instance, _tick(tmp_path, instance, changed.cursor).cursor)
    assert done.run_requests == []
    assert all(state.done for state in _load_cursor(done.cursor).values())


def test_a_fresh_cursor_de_identifies_alone_a_batch_ingested_as_its_folder_is_but_not_published(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """Batch a was ingested from its folder as it is now but not published from that ingest (a
    run stopped between the two, or a later batch took it out of the de-identification
    ledger), b is published. A tick with no cursor (the sensor's cursor reset, a new
    instance) requests a's de-identification alone, from its vault rows, as ``ehr run`` does
    it (``pipelines.run.released_otherwise``), and b nothing. It requested a's whole run: a
    new ingest, which seals the whole vault again and counts an erased patient's records,
    still in the folder, as quarantined again."""
    wh = _two_batches_ingested(tmp_path, key_provider)
    _unsettle(wh, "a")
    fresh = _tick(tmp_path, instance)
    assert [(r.partition_key, r.asset_selection) for r in fresh.run_requests] == [
        ("a", [DEID_RESOURCES])
    ]


def test_a_failed_de_identification_alone_is_retried_alone(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """Batch a was published under other settings (an earlier version's rules): the sensor
    requests its de-identification alone. That run fails (a worker killed, the warehouse
    full): its retry is the de-identification alone again, from the vault rows that still
    stand, not the batch's whole run. The retry ingested a again."""
    wh = _two_batches_ingested(tmp_path, key_provider)
    _publish_all(wh)
    con = warehouse.connect(wh)
    try:
        con.execute("UPDATE deid_batches SET settings = 'an earlier version' WHERE batch_id = 'a'")
    finally:
        con.close()
    first = _tick(tmp_path, instance)
    assert [(r.partition_key, r.asset_selection) for r in first.run_requests] == [
        ("a", [DEID_RESOURCES])
    ]
    _record_run(instance, first.run_requests[0].tags, DagsterRunStatus.FAILURE)
    retry = _tick(tmp_path, instance, first.cursor, retry_backoff_seconds=0)
    assert [(r.partition_key, r.asset_selection) for r in retry.run_requests] == [
        ("a", [DEID_RESOURCES])
    ]
    assert retry.run_requests[0].tags[ATTEMPT_TAG] == "2"


def test_a_batch_whose_folder_is_gone_is_de_identified_again_at_each_new_year(
    tmp_path: Path, instance: DagsterInstance, key_provider: FileKeyProvider
) -> None:
    """Batch a was published, then its folder removed (the landing folder cleaned once
    ingested: the vault holds its rows, its partition is kept). Its rows hold until 1 January
    2027: that day's tick requests its de-identification alone, from the vault, and once it is
    published again (holding until 1 January 2028) nothing more; the next new year's tick
    requests it again. The second request was refused: a de-identification of that ingest had
    run (successfully), and the tick said it had ended without publishing, a's rows of 2027
    left as released for good."""
    wh = _two_batches_ingested(tmp_path, key_provider)
    instance.add_dynamic_partitions("batches", ["a", "b"])
    _record_deid(instance, "a")
    _record_deid(instance, "b")

    def holds_until(year: int) -> None:
        _publish_all(wh)
        con = warehouse.connect(wh)
        try:
            con.execute(
                "UPDATE deid_batches SET stable_until = ? WHERE batch_id = 'a'", [date(year, 1, 1)]
            )
        finally:
            con.close()

    def tick(day: date, cursor: str | None = None) -> SensorResult:
        return _tick_on(day, tmp_path, instance, cursor)

    holds_until(2027)
    import shutil

    shutil.rmtree(tmp_path / "landing" / "a")
    eve = tick(date(2026, 12, 31))
    assert eve.run_requests == []
    cursor = eve.cursor
    for year in (2027, 2028):
        new_year = tick(date(year, 1, 1), cursor)
        assert [(r.partition_key, r.asset_selection) for r in new_year.run_requests] == [
            ("a", [DEID_RESOURCES])
        ], new_year.skip_reason
        _record_run(instance, dict(new_year.run_requests[0].tags), DagsterRunStatus.SUCCESS)
        _record_deid(instance, "a")
        holds_until(year + 1)  # its run published it again
        after = tick(date(year, 1, 2), new_year.cursor)
        assert after.run_requests == []
        cursor = after.cursor


def test_a_folder_back_as_it_was_at_an_earlier_run_is_requested_under_a_new_run_key(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """A file added to a batch done, then taken out again: the folder's fingerprint is the one
    of its first run. Dagster drops a request whose run key the sensor used before, and that
    old run's success must not stand for the folder as it is now (the vault holds the later
    delivery)."""
    batch = _landing(tmp_path) / "export-1"
    first = _tick(tmp_path, instance)
    _record_run(instance, first.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    cursor = _tick(tmp_path, instance, first.cursor).cursor
    (batch / "more.ndjson").write_bytes(PATIENT.replace(b"p1", b"p2"))
    os.utime(batch / "_READY")
    added = _tick(tmp_path, instance, cursor)
    _record_run(instance, added.run_requests[0].tags, DagsterRunStatus.SUCCESS)
    cursor = _tick(tmp_path, instance, added.cursor).cursor
    (batch / "more.ndjson").unlink()
    os.utime(batch / "_READY")
    removed = _tick(tmp_path, instance, cursor)
    assert [r.partition_key for r in removed.run_requests] == ["export-1"]
    used = {first.run_requests[0].run_key, added.run_requests[0].run_key}
    assert removed.run_requests[0].run_key not in used
    # its run not recorded yet: it waits for it, the first run's success does not stand for it
    waiting = _tick(tmp_path, instance, removed.cursor)
    assert not _load_cursor(waiting.cursor)["export-1"].done
    assert "queued" in (waiting.skip_reason.skip_message or "")  # type: ignore[union-attr]


def test_a_batch_dropped_again_as_it_was_when_its_run_failed_is_requested_at_once(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    """A folder moved away while its run was queued (the run fails, the partition goes), then
    moved back: its files as at that failed run. Its request is made under a new run key, and
    the next tick waits for that run, rather than take the old failure for it (a retry after
    the back-off, and a failure reported that the new drop never had)."""
    landing = _landing(tmp_path)
    first = _tick(tmp_path, instance)
    _record_run(instance, first.run_requests[0].tags, DagsterRunStatus.FAILURE)
    instance.add_dynamic_partitions("batches", ["export-1"])  # as the sensor's request does
    (landing / "export-1").rename(tmp_path / "away")
    gone = _tick(tmp_path, instance, first.cursor)
    assert "export-1" not in _load_cursor(gone.cursor)
    (tmp_path / "away").rename(landing / "export-1")
    again = _tick(tmp_path, instance, gone.cursor)
    assert [r.partition_key for r in again.run_requests] == ["export-1"]
    assert again.run_requests[0].run_key != first.run_requests[0].run_key
    waiting = _tick(tmp_path, instance, again.cursor, retry_backoff_seconds=3600)
    message = waiting.skip_reason.skip_message or ""  # type: ignore[union-attr]
    assert "queued" in message and "failed" not in message
    assert waiting.asset_events == []  # no failure of the landed batches check
