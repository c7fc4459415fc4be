"""The platform as a data engineer operates it: `dagster dev`, the landing sensor turned on, a
batch dropped, and the release brought up to date without anyone pressing a button."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance
from dagster_ui import DagsterUI

from pipelines.definitions import defs, release_assets

# one `dagster dev` for both modules: they share its session fixture, so one worker runs them
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("dagster_ui")]
# the freshness daemon evaluates every 30 s
FRESHNESS_TIMEOUT = 120

REPO_FIELDS = (
    "assetGroups { groupName } jobs { name } sensors { name sensorState { status } } "
    "assetNodes { assetKey { path } groupName kinds "
    "assetChecksOrError { ... on AssetChecks { checks { name } } } }"
)


def test_every_group_asset_check_job_and_sensor_loads(ui_release: DagsterUI) -> None:
    repo = ui_release.repository(REPO_FIELDS)
    graph = defs.resolve_asset_graph()
    expected_assets = {k.to_user_string() for k in graph.get_all_asset_keys()}
    nodes = {"/".join(n["assetKey"]["path"]): n for n in repo["assetNodes"]}
    assert set(nodes) == expected_assets
    assert {g["groupName"] for g in repo["assetGroups"]} == {
        "ingest",
        "deid",
        "views",
        "features",
        "feast",
        "models",
    }
    checks = {
        f"{key}:{c['name']}"
        for key, node in nodes.items()
        for c in node["assetChecksOrError"].get("checks", [])
    }
    assert checks == {f"{c.asset_key.to_user_string()}:{c.name}" for c in graph.asset_check_keys}
    assert {"ingest_batch_job", "release_job"} <= {j["name"] for j in repo["jobs"]}
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    assert sensors == {"landing_sensor": "RUNNING", "release_automation": "RUNNING"}
    assert "sklearn" in nodes["readmission_model"]["kinds"]


def test_release_followed_the_batch(ui_release: DagsterUI) -> None:
    batch, release = ui_release.batch_run, ui_release.release_run
    assert batch is not None and release is not None
    tags = {t["key"]: t["value"] for t in release["tags"]}
    assert tags.get("dagster/sensor_name") == "release_automation"
    assert release["startTime"] >= batch["endTime"]
    print(
        f"batch run {batch['endTime'] - batch['startTime']:.1f}s, release run "
        f"{release['endTime'] - release['startTime']:.1f}s, drop to release "
        f"{ui_release.seconds_to_release:.0f}s"
    )


def test_the_ui_shows_the_refreshed_release_fresh(ui_release: DagsterUI) -> None:
    """What the asset graph shows (GraphQL's ``staleStatus``, the UI's "upstream data changed"
    badge) once the release the automation sensor launched has run: nothing stale."""
    repo = ui_release.repository("assetNodes { assetKey { path } staleStatus }")
    status = {"/".join(n["assetKey"]["path"]): n["staleStatus"] for n in repo["assetNodes"]}
    release = {key.to_user_string() for assets in release_assets for key in assets.keys}
    assert len(release) == 21  # released_patients, ten views, five feature tables, five more
    assert {key: status[key] for key in release} == dict.fromkeys(release, "FRESH")


FRESHNESS_QUERY = (
    '{ assetNodeOrError(assetKey: {path: ["released_patients"]}) { ... on AssetNode { '
    "freshnessStatusInfo { freshnessStatus } "
    "internalFreshnessPolicy { ... on CronFreshnessPolicy { deadlineCron lowerBoundDeltaSeconds "
    "timezone } } } } }"
)


def test_the_daemon_finds_the_release_built_this_year(ui_release: DagsterUI) -> None:
    """The freshness daemon `dagster dev` runs (``freshness: enabled`` in dagster.yaml) has
    evaluated the release's yearly policy: passing, since the release was built this year."""
    deadline = time.monotonic() + FRESHNESS_TIMEOUT
    while True:
        node = ui_release.graphql(FRESHNESS_QUERY)["assetNodeOrError"]
        status = (node["freshnessStatusInfo"] or {}).get("freshnessStatus")
        if status != "UNKNOWN" or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert node["internalFreshnessPolicy"] == {
        "deadlineCron": "0 1 1 1 *",
        "lowerBoundDeltaSeconds": 3600,
        "timezone": "UTC",
    }
    assert status == "HEALTHY"


def _features(workdir: Path) -> dict[str, pd.DataFrame]:
    """Every published feature table, rows in a stable order, without the build time."""
    tables = {}
    for path in sorted((workdir / "features").glob("*.parquet")):
        frame = pd.read_parquet(path).drop(columns=["created"], errors="ignore")
        tables[path.stem] = frame.sort_values(list(frame.columns)).reset_index(drop=True)
    return tables


def test_published_features_match_ehr_run(ui_release: DagsterUI) -> None:
    assert ui_release.reference is not None
    assert ui_release.reference.wait(timeout=300) == 0, ui_release.home.parent / "ehr_run.log"
    from_ui, from_cli = _features(ui_release.workdir), _features(ui_release.reference_workdir)
    assert set(from_ui) == set(from_cli) and len(from_ui) == 5
    for name, frame in from_ui.items():
        assert len(frame) > 0, name
        pd.testing.assert_frame_equal(frame, from_cli[name], check_like=True, obj=name)
    _print_release_ratio(ui_release)


def _print_release_ratio(ui: DagsterUI) -> None:
    """The UI's release run against the release run of `ehr run` (printed, not asserted: the
    two ran side by side on shared cores)."""
    summary = json.loads((ui.reference_workdir / "run_summary.json").read_text())
    release_run = next(r["run_id"] for r in summary["runs"] if r["batch"] is None)
    instance = DagsterInstance.local_temp(str(ui.reference_workdir / "dagster_home"))
    stats = instance.get_run_stats(release_run)
    cli = (stats.end_time or 0.0) - (stats.start_time or 0.0)
    assert ui.release_run is not None
    from_ui = ui.release_run["endTime"] - ui.release_run["startTime"]
    print(f"release run: UI {from_ui:.1f}s, ehr run {cli:.1f}s, ratio {from_ui / cli:.2f}")
