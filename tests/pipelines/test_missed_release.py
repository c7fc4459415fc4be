"""A release left behind the batches with nothing requested to rebuild it is rebuilt by the
landing sensor: Dagster's eager condition, evaluated with Dagster's own test entry point, misses
a batch de-identified between the release's update and the automation's next tick, and the
sensor then requests ``release_job`` once, a minute on, when no run is going."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    DagsterRunStatus,
    build_sensor_context,
    evaluate_automation_conditions,
)
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteInstigatorOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.scheduler.instigation import InstigatorState, InstigatorStatus, InstigatorType
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import AUTO_RETRY_RUN_ID_TAG, SENSOR_NAME_TAG, WILL_RETRY_TAG
from dagster._core.test_utils import instance_for_test

from pipelines.assets.deid import RELEASE_INPUT
from pipelines.assets.freshness import online_store_freshness
from pipelines.definitions import defs, release_assets
from pipelines.jobs import RELEASE_AUTOMATION
from pipelines.sensors import RELEASE_GRACE_SECONDS, missed_release

RELEASE_KEYS = [key for assets in release_assets for key in assets.keys]
(FRESHNESS,) = online_store_freshness.check_keys
DEID = AssetKey("deid_resources")
RELEASED = AssetKey("released_patients")


def _report(instance: DagsterInstance, key: AssetKey, partition: str | None = None) -> None:
    instance.report_runless_asset_event(AssetMaterialization(key, partition=partition))


def _batch_published(instance: DagsterInstance, partition: str) -> None:
    """What a batch run records: its three assets, and the release input its publication
    reports."""
    for name in ("landing_batch", "ingest", "deid_resources"):
        _report(instance, AssetKey(name), partition)
    _report(instance, RELEASE_INPUT)


def _released(instance: DagsterInstance) -> None:
    """What a whole release run records, step after step."""
    for key in RELEASE_KEYS:
        _report(instance, key)


class _AutomationTicks:
    """Ticks of the automation sensor, each seeing what happened since the one before."""

    def __init__(self, instance: DagsterInstance) -> None:
        self.instance = instance
        self.cursor: object = None
        self.checks: set[AssetCheckKey] = set()

    def requested(self) -> set[AssetKey]:
        """The release assets the tick requests; the checks it requests go to ``checks``."""
        result = evaluate_automation_conditions(
            defs=defs,
            instance=self.instance,
            cursor=self.cursor,  # type: ignore[arg-type]
        )
        self.cursor = result.cursor
        self.checks = {
            r.key for r in result.results if isinstance(r.key, AssetCheckKey) and r.true_subset.size
        }
        return {key for key in RELEASE_KEYS if result.get_num_requested(key)}


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    # a local instance in a temporary folder: it stores sensor states, as a deployment's does
    with instance_for_test() as local:
        yield local


def _missed(instance: DagsterInstance, requested_after: int = 0, later: float = 0.0):  # type: ignore[no-untyped-def]
    with build_sensor_context(instance=instance) as context:
        return missed_release(context, requested_after, time.time() + later)


def _released_then_published_again(instance: DagsterInstance) -> None:
    """Batch b1 published and released, then published again (run again, say)."""
    instance.add_dynamic_partitions("batches", ["b1"])
    _batch_published(instance, "b1")
    _released(instance)
    _batch_published(instance, "b1")


def _left_behind(instance: DagsterInstance) -> _AutomationTicks:
    """A batch released, then a release run's update of released_patients and another batch's
    de-identification between two automation ticks."""
    instance.add_dynamic_partitions("batches", ["b1", "b2"])
    _batch_published(instance, "b1")
    _batch_published(instance, "b2")
    _released(instance)
    ticks = _AutomationTicks(instance)
    assert ticks.requested() == set()
    _report(instance, RELEASED)
    _batch_published(instance, "b2")
    return ticks


def test_the_automation_misses_a_batch_the_sensor_then_requests_the_release_once(
    instance: DagsterInstance,
) -> None:
    ticks = _left_behind(instance)
    # the premise, Dagster's: the tick counts released_patients' own update as having handled
    # the newer de-identification (the views after it are requested, released_patients not),
    # and the next ticks request nothing
    assert RELEASED not in ticks.requested()
    assert ticks.requested() == set()
    # within the grace the automation's next tick may still request it: nothing yet
    assert _missed(instance)[0] is None
    request, reason, after = _missed(instance, later=RELEASE_GRACE_SECONDS)
    assert request is not None and request.job_name == "release_job"
    assert reason and "release_job requested" in reason
    (deid,) = instance.fetch_materializations(DEID, limit=1).records
    assert after == deid.storage_id
    # once per de-identification: the same state a tick later requests nothing more
    assert _missed(instance, after, later=2 * RELEASE_GRACE_SECONDS)[0] is None
    # the release run it requests brings every release asset after the batch: nothing missed
    _released(instance)
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None


def test_a_release_the_automation_follows_is_not_requested_again(
    instance: DagsterInstance,
) -> None:
    instance.add_dynamic_partitions("batches", ["b1"])
    _batch_published(instance, "b1")
    ticks = _AutomationTicks(instance)
    ticks.requested()
    _batch_published(instance, "b1")
    # the usual case: the next tick requests the whole release, and its run follows the batch
    assert ticks.requested() == set(RELEASE_KEYS)
    instance.add_run(DagsterRun(job_name="__ASSET_JOB", status=DagsterRunStatus.NOT_STARTED))
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None  # its run is queued
    _released(instance)
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None


def test_no_release_while_a_run_goes_a_partition_waits_or_the_automation_is_stopped(
    instance: DagsterInstance,
) -> None:
    _left_behind(instance)
    run = DagsterRun(job_name="ingest_batch_job", status=DagsterRunStatus.STARTED)
    instance.add_run(run)
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None
    instance.delete_run(run.run_id)  # the run gone
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is not None

    # a batch partition not de-identified (failed, or not run yet): automation holds the
    # release back, and so does the sensor
    instance.add_dynamic_partitions("batches", ["b3"])
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None
    _batch_published(instance, "b3")
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is not None

    # an operator stopped the automation sensor: the release is theirs to run
    origin = RemoteInstigatorOrigin(
        RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("ehr"), "__repository__"),
        RELEASE_AUTOMATION,
    )
    instance.add_instigator_state(
        InstigatorState(origin, InstigatorType.SENSOR, InstigatorStatus.STOPPED)
    )
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None


def test_a_release_run_that_stopped_half_way_is_rebuilt_unless_an_operator_terminated_it(
    instance: DagsterInstance,
) -> None:
    _released_then_published_again(instance)
    # a release run whose retries are spent (or never came) after its first step: the views
    # and everything after them are older than the batch
    _report(instance, RELEASED)
    request, _, after = _missed(instance, later=RELEASE_GRACE_SECONDS)
    assert request is not None and request.run_key == f"release-after-{after}"
    # the same, but an operator terminated a run since the batch: left to them
    instance.add_run(DagsterRun(job_name="release_job", status=DagsterRunStatus.CANCELED))
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None


def test_release_assets_out_of_step_among_themselves_are_rebuilt(
    instance: DagsterInstance,
) -> None:
    """The automation sensor started again while this sensor's release ran: its own run came
    after, rebuilding released_patients and some views only (seen live), and every asset was
    newer than the batch, the rest older than released_patients. Rebuilt too."""
    instance.add_dynamic_partitions("batches", ["b1"])
    _batch_published(instance, "b1")
    _released(instance)
    _report(instance, RELEASED)
    for name in ("allergy_intolerance", "condition"):
        _report(instance, AssetKey(["views", name]))
    request, _, after = _missed(instance, later=RELEASE_GRACE_SECONDS)
    assert request is not None
    (latest,) = instance.fetch_materializations(AssetKey(["views", "condition"]), limit=1).records
    assert after == latest.storage_id
    _released(instance)
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None


def test_a_failed_release_the_daemon_will_retry_or_one_of_its_own_is_left_alone(
    instance: DagsterInstance,
) -> None:
    _released_then_published_again(instance)
    # a release run failed, the daemon's retry not made yet: the retry rebuilds it
    failed = DagsterRun(
        job_name="release_job", status=DagsterRunStatus.FAILURE, tags={WILL_RETRY_TAG: "true"}
    )
    instance.add_run(failed)
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None
    # the retry made (and ended): no longer pending
    instance.add_run_tags(failed.run_id, {AUTO_RETRY_RUN_ID_TAG: "0" * 36})
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is not None
    # a release run this sensor requested failed since: not requested again and again
    mine = {SENSOR_NAME_TAG: "landing_sensor"}
    instance.add_run(DagsterRun(job_name="release_job", status=DagsterRunStatus.FAILURE, tags=mine))
    assert _missed(instance, later=RELEASE_GRACE_SECONDS)[0] is None


def _freshness_checked(instance: DagsterInstance) -> None:
    """What a release run records after the online store: the freshness check's result."""
    instance.report_runless_asset_event(
        AssetCheckEvaluation(asset_key=FRESHNESS.asset_key, check_name=FRESHNESS.name, passed=True)
    )


def test_the_freshness_check_runs_in_the_release_not_in_a_run_of_its_own_after_it(
    instance: DagsterInstance,
) -> None:
    instance.add_dynamic_partitions("batches", ["b1"])
    ticks = _AutomationTicks(instance)
    ticks.requested()
    _batch_published(instance, "b1")
    # the batch: the release and the check, one request
    assert ticks.requested() == set(RELEASE_KEYS) and ticks.checks == {FRESHNESS}
    # the release run evaluated the check after the store: nothing more to ask for (the
    # check used to be requested again, a run of its own after every release)
    _released(instance)
    _freshness_checked(instance)
    assert ticks.requested() == set() and ticks.checks == set()
    # a feature table rebuilt after the store, by hand: the check is asked again, and warns
    _report(instance, AssetKey(["features", "patient_demographics"]))
    ticks.requested()
    assert ticks.checks == {FRESHNESS}
