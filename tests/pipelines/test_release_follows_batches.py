"""After a new batch every release asset is stale, down to the model, and the next tick of the
automation-condition sensor requests all of them, whoever launched the batch; the release run
after it rebuilds only what changed, and gives the same released tables as a full release of
both batches in a second work directory (the oracle: built from scratch, same keys)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
from dagster import AssetKey, DagsterInstance, evaluate_automation_conditions, materialize
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest

from fhirlake.synthetic.generator import generate
from pipelines.assets.deid import RELEASE_INPUT
from pipelines.assets.feast import ONLINE_STORE
from pipelines.assets.features import FEATURE_ASSET_KEYS
from pipelines.assets.models import TRAINING_SET
from pipelines.bench.release import release_digests
from pipelines.definitions import batch_assets, build_resources, defs, release_assets
from pipelines.workdir import Workdir

RELEASE_KEYS = sorted(key for assets in release_assets for key in assets.keys)


def _landing(tmp_path: Path) -> Path:
    """30 generated patients: 26 in batch ``base``, 4 in batch ``late``."""
    landing = tmp_path / "landing"
    generate(out_dir=landing / "base", patients=30, seed=11)
    (landing / "late").mkdir()
    for path in sorted((landing / "base").glob("[0-9]*.json"))[-4:]:
        shutil.move(path, landing / "late" / path.name)
    return landing


def _stale(instance: DagsterInstance) -> dict[AssetKey, StaleStatus]:
    resolver = CachingStaleStatusResolver(
        instance,
        asset_graph=lambda: defs.resolve_asset_graph(),
        loading_context=LoadingContextForTest(instance),
    )
    return {key: resolver.get_status(key) for key in RELEASE_KEYS}


def _data_end(work: Path) -> str:
    """The release's data end the feature tables were last built with."""
    con = duckdb.connect(str(Workdir(work).warehouse), read_only=True)
    try:
        found = con.execute(
            "SELECT value FROM release_state.feature_builds WHERE key = 'data_end'"
        ).fetchone()
        return str(found[0]) if found else ""
    finally:
        con.close()


def _run(instance: DagsterInstance, resources: dict[str, object], batch: str | None) -> None:
    assets = batch_assets if batch else release_assets
    assert materialize(assets, partition_key=batch, instance=instance, resources=resources).success


class _AutomationTicks:
    """Ticks of the automation-condition sensor, evaluated with Dagster's own test entry point
    (each tick sees what happened since the one before, as the sensor does)."""

    def __init__(self, instance: DagsterInstance) -> None:
        self.instance = instance
        self.cursor: Any = None  # Dagster's cursor type is not exported

    def requested(self, at: datetime | None = None) -> set[str]:
        """The release assets the next tick (now, or at ``at``) requests."""
        result = evaluate_automation_conditions(
            defs=defs, instance=self.instance, cursor=self.cursor, evaluation_time=at
        )
        self.cursor = result.cursor
        return {key.to_user_string() for key in RELEASE_KEYS if result.get_num_requested(key)}


def test_a_batch_marks_the_whole_release_stale_and_the_refresh_equals_a_full_release(
    tmp_path: Path, key_file: Path
) -> None:
    landing = _landing(tmp_path)
    work = tmp_path / "incremental"
    resources = build_resources(str(work), str(landing), str(key_file), 1)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("batches", ["base", "late"])
        ticks = _AutomationTicks(instance)
        assert ticks.requested() == set()
        _run(instance, resources, "base")
        # batch "late" is known and not ingested yet: the release waits for it
        assert ticks.requested() == set()
        _run(instance, resources, None)
        assert set(_stale(instance).values()) == {StaleStatus.FRESH}
        assert ticks.requested() == set()

        data_end_before = _data_end(work)
        # a batch launched by hand (as from a backfill or the partition's page), not by the
        # landing sensor: the next tick requests the whole release, down to the model
        _run(instance, resources, "late")
        assert instance.get_latest_materialization_event(RELEASE_INPUT) is not None
        stale = _stale(instance)
        assert {k.to_user_string() for k, s in stale.items() if s != StaleStatus.STALE} == set()
        assert ticks.requested() == {key.to_user_string() for key in RELEASE_KEYS}

        _run(instance, resources, None)
        assert set(_stale(instance).values()) == {StaleStatus.FRESH}
        assert ticks.requested() == set()
        refresh = instance.get_latest_materialization_event(AssetKey(["views", "observation"]))
        assert refresh is not None and refresh.asset_materialization is not None
        metadata = refresh.asset_materialization.metadata
        assert metadata["refresh"].value == "incremental"
        assert 0 < metadata["resources_changed"].value < metadata["rows"].value
        features = instance.get_latest_materialization_event(
            AssetKey(["features", "patient_utilisation"])
        )
        assert features is not None and features.asset_materialization is not None
        metadata = features.asset_materialization.metadata
        # dates are shifted by each patient's secret offset (a fresh keyring per test): when a
        # late patient's shifted data ends after everyone else's, the data end moves, and the
        # patients whose rows it changes are computed again with the 4 late ones; otherwise
        # only the 4 late patients are
        assert metadata["refresh"].value == "incremental"
        moved = metadata["patients_data_end_moved"].value
        assert metadata["patients_changed"].value == 4 + moved
        if _data_end(work) == data_end_before:
            assert moved == 0
        _assert_each_of_the_serving_step_runs_alone(instance, resources)

    full = tmp_path / "full"
    resources = build_resources(str(full), str(landing), str(key_file), 1)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("batches", ["base", "late"])
        _run(instance, resources, "base")
        _run(instance, resources, "late")
        _run(instance, resources, None)
    incremental = release_digests(Workdir(work).warehouse)
    assert len(incremental) >= 14
    assert incremental == release_digests(Workdir(full).warehouse)
    _assert_a_new_process_finds_nothing_to_do(work, landing, key_file)


def test_the_release_is_rebuilt_at_each_new_year_new_batch_or_not(
    tmp_path: Path, key_file: Path
) -> None:
    landing = _landing(tmp_path)
    resources = build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1)
    new_year = datetime(datetime.now(UTC).year + 1, 1, 1, tzinfo=UTC)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("batches", ["base"])
        _run(instance, resources, "base")
        _run(instance, resources, None)
        ticks = _AutomationTicks(instance)
        assert ticks.requested() == set()
        assert ticks.requested(at=new_year - timedelta(hours=1)) == set()
        # the first tick of the year requests the age bands counted as of the new year, and
        # everything after them (eager), as one run; the next tick nothing more
        everything = {key.to_user_string() for key in RELEASE_KEYS}
        assert ticks.requested(at=new_year + timedelta(minutes=1)) == everything
        assert ticks.requested(at=new_year + timedelta(minutes=2)) == set()
        # a run of the k-anonymous patients alone (from the UI): the rest follows on the next tick
        assert materialize(
            release_assets, selection=["released_patients"], instance=instance, resources=resources
        ).success
        assert ticks.requested(at=new_year + timedelta(minutes=3)) == everything - {
            "released_patients"
        }
        assert ticks.requested(at=new_year + timedelta(days=200)) == set()


# A release run in a process of its own (as every Dagster run is), with another string hash seed:
# it prints how each asset was refreshed.
_RERUN = """
import json, sys
from dagster import DagsterInstance, materialize
from pipelines.definitions import build_resources, release_assets
work, landing, key_file = sys.argv[1:4]
with DagsterInstance.ephemeral() as instance:
    result = materialize(release_assets, instance=instance,
                         resources=build_resources(work, landing, key_file, 1))
    out = {}
    for event in result.get_asset_materialization_events():
        m = event.step_materialization_data.materialization
        out[m.asset_key.to_user_string()] = {k: v.value for k, v in m.metadata.items()
            if k in ("refresh", "mode", "rows_written", "rows_deleted", "retrained")}
print(json.dumps(out, default=str))
"""


def _assert_each_of_the_serving_step_runs_alone(
    instance: DagsterInstance, resources: dict[str, object]
) -> None:
    """The online store and the training set share a step: each, selected alone (its asset
    page's Materialize), runs by itself and finds nothing to redo after a release."""
    for key, other in ((ONLINE_STORE, TRAINING_SET), (TRAINING_SET, ONLINE_STORE)):
        result = materialize(
            release_assets, selection=[key], instance=instance, resources=resources
        )
        assert result.success
        done = result.get_asset_materialization_events()
        assert [e.asset_key for e in done] == [key]
        metadata = done[0].step_materialization_data.materialization.metadata
        if key == ONLINE_STORE:
            assert (metadata["rows_written"].value, metadata["rows_deleted"].value) == (0, 0)
            assert [c.check_name for c in result.get_asset_check_evaluations()] == ["phi_leak_scan"]
        else:
            assert metadata["refresh"].value == "unchanged"
            assert not result.get_asset_check_evaluations()
        assert other not in {e.asset_key for e in done}


def _assert_a_new_process_finds_nothing_to_do(work: Path, landing: Path, key_file: Path) -> None:
    """Nothing changed since the last release: a run in another process rebuilds nothing (no
    bookkeeping may depend on the process, e.g. on the order of a set of strings)."""
    done = subprocess.run(
        [sys.executable, "-c", _RERUN, str(work), str(landing), str(key_file)],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    modes = json.loads(done.stdout.strip().splitlines()[-1])
    refreshed = {key: m["refresh"] for key, m in modes.items() if "refresh" in m}
    assert len(refreshed) >= 14
    assert set(refreshed.values()) == {"unchanged"}, refreshed
    online = modes["feast_online_store"]
    assert (online["mode"], online["rows_written"], online["rows_deleted"]) == ("incremental", 0, 0)
    if "retrained" in modes.get("readmission_model", {}):
        assert modes["readmission_model"]["retrained"] is False


def test_a_batch_published_while_another_has_failed_leaves_the_whole_release_stale(
    tmp_path: Path, key_file: Path
) -> None:
    """Batch ``late`` is published while batch ``failed`` (its run failed, or is waiting for a
    retry) holds ``released_patients`` and the views back: nothing of the release is rebuilt,
    and every release asset shows stale. Features, Feast and the model used to be rebuilt from
    the views as they were, without ``late``, and then showed fresh."""
    landing = _landing(tmp_path)
    resources = build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1)
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("batches", ["base"])
        ticks = _AutomationTicks(instance)
        _run(instance, resources, "base")
        _run(instance, resources, None)
        assert ticks.requested() == set()
        instance.add_dynamic_partitions("batches", ["late", "failed"])
        _run(instance, resources, "late")
        assert ticks.requested() == set()
        assert set(_stale(instance).values()) == {StaleStatus.STALE}


def test_an_asset_after_the_views_built_alone_before_them_stays_stale(
    tmp_path: Path, key_file: Path
) -> None:
    """After a batch, the feature tables, the Feast registry and online store, the labels, the
    training set and the model each materialised alone (the asset page's "Materialize"), in
    that order, while the views have not caught up: each is built from an upstream without
    the batch, so none may show fresh. Each used to be recorded against the new release input
    and showed fresh without the batch. The release run then brings them all up to date."""
    landing = _landing(tmp_path)
    resources = build_resources(str(tmp_path / "work"), str(landing), str(key_file), 1)
    after_the_views = [
        FEATURE_ASSET_KEYS,
        [AssetKey("feast_registry")],
        [AssetKey("readmission_labels")],
        [ONLINE_STORE],
        [TRAINING_SET],
        [AssetKey("readmission_model")],
    ]
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("batches", ["base", "late"])
        _run(instance, resources, "base")
        _run(instance, resources, None)
        _run(instance, resources, "late")
        for keys in after_the_views:
            assert materialize(
                release_assets, selection=keys, instance=instance, resources=resources
            ).success
            stale = _stale(instance)
            fresh = {k.to_user_string() for k, s in stale.items() if s != StaleStatus.STALE}
            assert fresh == set(), [k.to_user_string() for k in keys]
        _run(instance, resources, None)
        assert set(_stale(instance).values()) == {StaleStatus.FRESH}
