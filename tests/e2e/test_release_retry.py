"""A release run killed in the middle (SIGKILL of its process, as the kernel's OOM killer or a
reboot would) is run again by the daemon, and the release it leaves is whole: eager automation
does not request a release again until the next batch, so without the retry the release would
stay stale, and flagged only by the yearly freshness policy.

`dagster dev` as a data engineer runs it (tests/e2e/dagster_ui.py): the landing sensor on, a
generated batch dropped, the automation's release run killed once its first step started."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.e2e.dagster_ui import PATIENTS, DagsterUI, _tag, dagster_dev, drop_batch

pytestmark = pytest.mark.e2e

TIMEOUT = 400
_EVENTS = (
    "query($r: ID!) { logsForRun(runId: $r) { ... on EventConnection { events { __typename "
    "... on MessageEvent { message } } } } }"
)
_PID = re.compile(r"pid: (\d+)")


def _release_runs(ui: DagsterUI) -> list[dict[str, Any]]:
    return [r for r in ui.runs() if _tag(r, "ehr/batch") is None]


def _first_release_run_stepping(ui: DagsterUI) -> dict[str, Any]:
    """The automation's release run, once it has started a step, with its process id."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        for run in _release_runs(ui):
            if run["status"] != "STARTED":
                continue
            events = ui.graphql(_EVENTS, {"r": run["runId"]})["logsForRun"]["events"]
            messages = [e.get("message") or "" for e in events]
            pids = [m for m in (_PID.search(x) for x in messages if "process for run" in x) if m]
            stepped = any(e["__typename"] == "ExecutionStepStartEvent" for e in events)
            if pids and stepped:
                return {**run, "pid": int(pids[0].group(1))}
        time.sleep(0.5)
    raise AssertionError(f"no release run started within {TIMEOUT}s: {ui.runs()}")


def _kill_the_first_release_run(ui: DagsterUI) -> dict[str, Any]:
    """Wait for the automation's release run to start a step, then SIGKILL its process."""
    run = _first_release_run_stepping(ui)
    os.kill(run["pid"], signal.SIGKILL)
    return run


def _rebuilt_by_the_landing_sensor(run: dict[str, Any]) -> bool:
    """A release_job run the landing sensor requested for a release left behind."""
    return run["jobName"] == "release_job" and _tag(run, "dagster/sensor_name") == "landing_sensor"


def _wait_for_the_retry(
    ui: DagsterUI, killed: dict[str, Any], or_the_sensor: bool = False
) -> dict[str, Any]:
    """The successful retry of the killed run; with ``or_the_sensor``, or the landing sensor's
    release run after it."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        runs = {r["runId"]: r for r in ui.runs()}
        retries = [r for r in runs.values() if _tag(r, "dagster/parent_run_id") == killed["runId"]]
        if or_the_sensor:
            retries += [r for r in runs.values() if _rebuilt_by_the_landing_sensor(r)]
        done = [r for r in retries if r["status"] == "SUCCESS"]
        if done and runs[killed["runId"]]["status"] == "FAILURE":
            return done[0]
        assert not [r for r in retries if r["status"] in ("FAILURE", "CANCELED")], retries
        time.sleep(3)
    raise AssertionError(f"the killed release run was not run again: {ui.runs()}")


def _count(warehouse: Path, sql: str) -> int:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        ((count,),) = con.execute(sql).fetchall()
        return int(count)
    finally:
        con.close()


def _assert_retried_and_whole(
    ui: DagsterUI, killed: dict[str, Any], or_the_sensor: bool = False
) -> None:
    """The killed run was run again (with ``or_the_sensor``: or the landing sensor rebuilt the
    release), and every patient of the batch is released (k = 1 here), viewed and in the
    features."""
    retry = _wait_for_the_retry(ui, killed, or_the_sensor)
    if not _rebuilt_by_the_landing_sensor(retry):
        assert _tag(retry, "dagster/retry_number") == "1"
    warehouse = ui.workdir / "warehouse.duckdb"
    released = _count(warehouse, "SELECT count(*) FROM released_patients")
    assert released == PATIENTS
    assert _count(warehouse, "SELECT count(*) FROM views.patient") == released
    features = "SELECT count(DISTINCT patient_id) FROM features.patient_demographics"
    assert _count(warehouse, features) > 0


def test_a_killed_release_run_is_run_again_and_the_release_is_whole(tmp_path: Path) -> None:
    with dagster_dev(tmp_path) as ui:
        assert ui.start_sensor("landing_sensor") == "RUNNING"
        drop_batch(ui, tmp_path)
        killed = _kill_the_first_release_run(ui)
        assert _tag(killed, "dagster/max_retries") == "2"
        _assert_retried_and_whole(ui, killed)


# the daemon's run-time limit in this test's instance: past it, a run is failed and run again
MAX_RUNTIME = 60


def _with_max_runtime(settings: str) -> str:
    shipped = "max_runtime_seconds: 14400"
    assert shipped in settings  # the repository's instance settings limit a run's time
    return settings.replace(shipped, f"max_runtime_seconds: {MAX_RUNTIME}")


def test_a_release_run_left_started_by_a_dead_dagster_dev_is_run_again(tmp_path: Path) -> None:
    """The whole of `dagster dev` killed while a release run is going (a reboot): started again,
    the default run launcher cannot ask whether that run's process is alive, so the run stayed
    STARTED for good and every later run queued behind it. The daemon fails a run past the
    instance's `max_runtime_seconds` (a minute here, 4 hours as shipped), the retry runs it
    again, and the release it leaves is whole. Once in a loaded run the daemon started again did
    not run the failed run again (its ``dagster/will_retry`` tag true, no retry, nothing in its
    log): the landing sensor, on since the first start, then rebuilds the release a minute
    after (pipelines.sensors.missed_release), which the test accepts too."""
    with dagster_dev(tmp_path, settings=_with_max_runtime) as ui:
        assert ui.start_sensor("landing_sensor") == "RUNNING"
        drop_batch(ui, tmp_path)
        killed = _first_release_run_stepping(ui)
        os.killpg(ui.process_group, signal.SIGKILL)
    with dagster_dev(tmp_path, again=True) as ui:
        _assert_retried_and_whole(ui, killed, or_the_sensor=True)
