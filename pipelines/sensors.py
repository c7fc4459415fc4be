"""Watch the landing folder: each complete, new or changed batch becomes a partition and a run.

Safe to turn on at any time:
- what is already ingested comes from the warehouse's batch ledger (``batches``: the folder's
  fingerprint when the batch was read), so a batch ingested by ``ehr run`` or before the
  sensor's cursor existed is not ingested again, and one whose files changed since is, even
  when the new files carry older modification times (``cp -p``, ``tar``, ``unzip``);
- a batch is only picked up once complete: its folder holds the ``_READY`` marker, written at
  or after the last change of everything else in the folder (a marker older than a file
  changed since does not count), or nothing in it (hidden and ``_`` sub-folders included)
  changed for ``LandingResource.quiet_seconds``;
- a batch is marked done only when its run succeeded; a failed run is retried up to
  ``LandingResource.max_retries`` times with doubling back-off (a retry is the batch's
  de-identification alone where its ingest stands as its folder is now,
  ``deidentification_alone``, as ``ehr run`` runs it again: a run killed during a
  de-identification alone is not retried as a new ingest); once they are spent, writing
  or touching the marker again starts a new round of retries; one whose run failed and that
  another run (a launch or a backfill from the UI) de-identified since is done when the ledger
  shows it so, neither retried nor said to have failed;
- every tick that requests nothing says why (the skip reason on the tick, and the log); every
  request carries a run key no earlier run of its batch had (a folder back as it was at an
  earlier run is requested again, not dropped by Dagster as a run it made already: ``_unused``);
- a batch whose run failed, or whose folder cannot be read, is reported on the release as the
  failing warning check ``landed_batches_released`` of ``released_patients``, without a run
  (no release runs for it, and every release asset would otherwise look fresh), once per
  change of those batches, and reported passing once they are gone and the release holds every
  landed batch (:func:`landed_batches_events`);
- folders that are no batch (no FHIR data file in them: empty, the marker alone, FHIR XML) are
  counted on every tick, with what they hold by reason and count, never named (a folder's name
  can be a patient's, and a batch key's check does not see it: :func:`vault.landing.describe_idle`);
- a batch whose folder went away (renamed, deleted) before it was ingested has its partition
  removed: a partition never materialised would hold back the release for good. One whose
  folder went away after its ingest keeps its partition: the vault holds its rows. When it went
  before the batch's de-identification succeeded (renamed or deleted under its run once the
  ingest had read it), that partition would hold the release back for good, and the same files
  dropped under a new name are recorded as repeats of those rows: its de-identification alone
  (from the vault) is requested, once per ingest; and so it is, once per UTC day and settings,
  for one published whose release is out of date since (a new year, another profile), and
  after each time another batch's run took it out of the de-identification ledger: a
  landing folder cleaned once ingested does not leave its batch's rows as released for good;
- a batch done whose partition shows no de-identification (its materializations wiped in the
  UI) is run again: automation waits while any batch's partition is missing, so the release
  would be held back for good while every tick said nothing was new;
- a batch done that another batch's run took out of the de-identification ledger (a row handed
  over by its ingest, a conditional reference that names another resource now) is run again,
  whoever ran that other batch (this sensor, a backfill, a launch from the UI): the ledger is
  read again whenever a batch was de-identified since it was last read. Its de-identification
  alone is run where its vault rows stand (its folder as ingested, no Patient reference by
  which ingest filed its records changed: ``deidentification_alone``), as ``ehr run`` does;
- a batch done but out of date (``deid.staging.outdated_batches``: published under other
  de-identification settings, an earlier version's leak-scan or release rules or another
  profile, or released otherwise from a new UTC day, a date of it crossing the age limit since
  its de-identification or a new year moving a birth date over it) is de-identified again
  alone, from the vault, as ``ehr run`` does it: the ledger is read again on the first tick of
  each day and on the first tick under new settings; so is a batch the sensor meets with no
  state of its own (a cursor reset, a new instance) that was ingested from its folder as it is
  now but not published from that ingest (a run stopped between the two): one rule,
  ``deidentification_alone``, for every request and retry, as for ``ehr run``;
- a release left behind with nothing requested to rebuild it is rebuilt: when a release asset
  is older than what it is built from (a batch's de-identification, an earlier release asset),
  that materialization a minute old, every batch partition de-identified, no run queued or
  going and none about to be run again by the daemon, ``release_job`` is requested, once per
  such materialization; not when an operator stopped the automation sensor or terminated a run
  since, nor when a release run of this sensor's failed since. The automation sensor's eager
  condition can miss it: a release run and a batch run both ending between two of its ticks
  count the release's own update as having handled the batch; the automation sensor started
  again beside this sensor's release ran part of the release after it; and a release run whose
  retries are spent, or one the daemon did not run again, is not requested again until the next
  batch.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dagster import (
    AddDynamicPartitionsRequest,
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    DagsterRunStatus,
    DefaultSensorStatus,
    DeleteDynamicPartitionsRequest,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES
from dagster._core.storage.tags import AUTO_RETRY_RUN_ID_TAG, SENSOR_NAME_TAG, WILL_RETRY_TAG

from deid.methods import today_utc
from pipelines.assets.deid import (
    LANDED_BATCHES_CHECK,
    RELEASED_PATIENTS,
    landed_batches_cleared,
    landed_batches_failing,
    landed_batches_not_listed,
)
from pipelines.assets.ingest import FINGERPRINT_TAG
from pipelines.jobs import RELEASE_ASSETS, RELEASE_AUTOMATION, batch_job, release_job
from pipelines.landing_ledger import (
    LedgerEntry,
    current_settings,
    deidentification_alone,
    done_in_ledger,
    ingested_batches,
    landed_backlog,
    waiting_reason,
)
from pipelines.partitions import batch_partitions
from pipelines.resources import DeidSettings, LandingResource, WarehouseResource
from vault.landing import (
    BatchKeyCollisionError,
    BatchSource,
    Landing,
    describe_idle,
    discover_landing,
)

BATCH_TAG = "ehr/batch"
PARTITION_TAG = "dagster/partition"
# the batch asset every release asset that reads all batches depends on: a partition of it
# missing holds the release back (automation's eager condition)
DEID_RESOURCES = AssetKey("deid_resources")
# the release is behind while one of its assets' latest materialization is older than that of
# what it is built from: deid_resources or an earlier release asset (every release run
# materialises each asset it runs, in order)
RELEASE_KEYS = [key for assets in RELEASE_ASSETS for key in assets.keys]
RELEASE_DEPS = {
    key: {dep for dep in assets.asset_deps[key] if dep == DEID_RESOURCES or dep in RELEASE_KEYS}
    for assets in RELEASE_ASSETS
    for key in assets.keys
}
# automation ticks every 15 seconds and requests the release at the first tick after a batch:
# a release still behind this long after what it did not follow, with no run queued or going,
# was missed
RELEASE_GRACE_SECONDS = 60.0
# a failed release run the daemon will run again is its to rebuild for this long (the daemon
# looks every few seconds)
RETRY_PENDING_SECONDS = 120.0
LANDING_SENSOR = "landing_sensor"
RERUN_TAG = "ehr/rerun"
DELIVERY_TAG = "ehr/delivery"
ATTEMPT_TAG = "ehr/attempt"
# on the de-identification run of a batch whose folder went away after its ingest: the ingest
# (its time in the ledger) it de-identifies
DEID_OF_INGEST_TAG = "ehr/deid_of_ingest"
_FAILED = {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


@dataclass
class BatchState:
    """What the sensor knows of one batch: the files it saw, how often it ran them, and whether
    that succeeded (``done``) or when the next retry is due."""

    fingerprint: str
    attempt: int = 0
    done: bool = False
    retry_at: float = 0.0
    # times the batch was run again, its folder unchanged, because another batch's ingest
    # changed its ledger (a vault row handed over to it): part of the run key and tags
    rerun: int = 0
    # the attempt a round of retries started after (the marker touched once retries were
    # spent), and when the last failed attempt ended
    round_start: int = 0
    failed_at: float = 0.0
    # requests made again under the fingerprint, attempt and rerun of an earlier run of the
    # batch (its folder back as it was then: a file added and taken out again): part of the run
    # key and tags, as Dagster drops a request whose run key the sensor used before, and that
    # earlier run's end would stand for the folder as it is now (_unused)
    delivery: int = 0


# The cursor's entry (beside one per batch) holding the storage id of the latest
# de-identification the ledger was read after: "~" is in no batch key (vault.landing.batch_key)
LEDGER_READ_KEY = "~ledger_read_after"
# The cursor's entry holding the UTC day and the de-identification settings the ledger was last
# read under (_ledger_read_on): a new day (a date crossed the age limit:
# deid.staging.day_changed_batches) or new settings (an upgrade's leak-scan or release rules,
# another profile) can take batches out of the de-identification ledger with no run of any
# batch, so the ledger is read again once a day and whenever the settings change
LEDGER_DAY_KEY = "~ledger_read_on"
# The cursor's entry holding the storage id of the materialization (a batch's de-identification,
# or a release asset's) a release_job run was last requested after: one request per
# materialization left unfollowed (its run's own retries are Dagster's, RELEASE_RUN_TAGS)
RELEASE_REQUESTED_KEY = "~release_requested_after"
# The cursor's entry holding what the landed batches check was last reported failing for: each
# batch key with its failed runs (0: its folder cannot be read)
LANDED_REPORTED_KEY = "~landed_batches_reported"
# what stands for the landing folder itself among what the check was reported failing for
LANDING_NOT_READ = "~landing"
_CURSOR_ENTRIES = (LEDGER_READ_KEY, RELEASE_REQUESTED_KEY, LANDED_REPORTED_KEY, LEDGER_DAY_KEY)


def _load_cursor(cursor: str | None) -> dict[str, BatchState]:
    raw = json.loads(cursor) if cursor else {}
    for entry in _CURSOR_ENTRIES:
        raw.pop(entry, None)
    # an older cursor mapped key -> fingerprint: treat those batches as not yet confirmed
    return {
        key: BatchState(**value) if isinstance(value, dict) else BatchState(fingerprint=value)
        for key, value in raw.items()
    }


def _cursor_entry(cursor: str | None, entry: str) -> int:
    """A storage id the cursor keeps beside the batches' states (``_CURSOR_ENTRIES``; 0: none
    yet, or a cursor written before it was kept)."""
    raw = json.loads(cursor) if cursor else {}
    return int(raw.get(entry, 0))


def _ledger_read_on(today: int, settings: str) -> int:
    """The UTC day (its ordinal) and the settings digest (its first 48 bits) the ledger is read
    under, as one number the cursor keeps (``LEDGER_DAY_KEY``)."""
    return today << 48 | int(settings[:12], 16)


def _ledger_read_after(cursor: str | None) -> int:
    """The storage id of the latest de-identification of a batch the ledger was read after."""
    return _cursor_entry(cursor, LEDGER_READ_KEY)


def _landed_reported(cursor: str | None) -> dict[str, int]:
    """What the landed batches check was last reported failing for (``LANDED_REPORTED_KEY``)."""
    raw = json.loads(cursor) if cursor else {}
    return {str(k): int(v) for k, v in dict(raw.get(LANDED_REPORTED_KEY, {})).items()}


def _dump_cursor(
    states: dict[str, BatchState],
    ledger_read_after: int = 0,
    release_requested_after: int = 0,
    landed_reported: dict[str, int] | None = None,
    ledger_read_on: int = 0,
) -> str:
    raw: dict[str, object] = {k: asdict(v) for k, v in sorted(states.items())}
    for entry, value in (
        (LEDGER_READ_KEY, ledger_read_after),
        (LEDGER_DAY_KEY, ledger_read_on),
        (RELEASE_REQUESTED_KEY, release_requested_after),
        (LANDED_REPORTED_KEY, landed_reported),
    ):
        if value:
            raw[entry] = value
    return json.dumps(raw, sort_keys=True)


def _latest_deid(context: SensorEvaluationContext) -> int:
    """The storage id of the latest materialization of ``deid_resources`` (any partition,
    whoever ran it), 0 when there is none. Dagster's records only."""
    records = context.instance.get_asset_records([DEID_RESOURCES])
    if not records:
        return 0
    return int(records[0].asset_entry.last_materialization_storage_id or 0)


def _run_tags(key: str, state: BatchState) -> dict[str, str]:
    """The tags of the run the sensor requests for ``key`` in ``state``, which also find it."""
    tags = {BATCH_TAG: key, FINGERPRINT_TAG: state.fingerprint, ATTEMPT_TAG: str(state.attempt)}
    if state.rerun:
        tags[RERUN_TAG] = str(state.rerun)
    if state.delivery:
        tags[DELIVERY_TAG] = str(state.delivery)
    return tags


def _latest_run(
    context: SensorEvaluationContext, key: str, state: BatchState
) -> tuple[DagsterRunStatus | None, float | None]:
    """The status of the batch's latest requested run, and when it ended (None if it did not)."""
    records = context.instance.get_run_records(
        filters=RunsFilter(tags=_run_tags(key, state)), limit=1
    )
    if not records:
        return None, None
    return records[0].dagster_run.status, records[0].end_time


def _unused(context: SensorEvaluationContext, key: str, state: BatchState) -> None:
    """Move ``state.delivery`` past every run of the batch requested with its tags before (the
    folder back as it was at an earlier run, or the cursor reset): Dagster would drop the
    request as one it ran already (same run key), the tick would show a skip with no reason,
    and that earlier run's success or failure would be taken for this request's.
    Dagster's records only."""
    runs = RunsFilter(tags={BATCH_TAG: key, FINGERPRINT_TAG: state.fingerprint})
    used = {
        (r.dagster_run.tags.get(ATTEMPT_TAG), r.dagster_run.tags.get(RERUN_TAG, "0"), delivery)
        for r in context.instance.get_run_records(filters=runs)
        for delivery in [r.dagster_run.tags.get(DELIVERY_TAG, "0")]
    }
    while (str(state.attempt), str(state.rerun), str(state.delivery)) in used:
        state.delivery += 1


def _request(
    context: SensorEvaluationContext, key: str, state: BatchState, deidentify_only: bool = False
) -> RunRequest:
    """The batch's run: its whole job, or with ``deidentify_only`` its de-identification
    alone (:func:`pipelines.landing_ledger.deidentification_alone`), under a run key no
    earlier run of the batch had (:func:`_unused`)."""
    _unused(context, key, state)
    run_key = f"{key}:{state.fingerprint}:{state.attempt}"
    if state.rerun:
        run_key += f":rerun{state.rerun}"
    if state.delivery:
        run_key += f":delivery{state.delivery}"
    return RunRequest(
        job_name=batch_job.name,
        partition_key=key,
        run_key=run_key,
        tags=_run_tags(key, state),
        asset_selection=[DEID_RESOURCES] if deidentify_only else None,
    )


def _marked_since(batch: BatchSource, landing: LandingResource, since: float) -> bool:
    """Whether the batch's marker was written or touched after ``since``."""
    with contextlib.suppress(OSError):
        return (batch.path / landing.ready_marker).lstat().st_mtime > since
    return False


def _deidentified_after(context: SensorEvaluationContext, key: str, since: float) -> bool:
    """Whether the batch's partition of ``deid_resources`` was materialised after ``since``
    (by any run: a launch or a backfill from the UI carries none of this sensor's tags).
    Dagster's records only."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=DEID_RESOURCES, asset_partitions=[key]), limit=1
    ).records
    return bool(records) and records[0].timestamp > since


def _follow_run(
    context: SensorEvaluationContext,
    landing: LandingResource,
    batch: BatchSource,
    state: BatchState,
    now: float,
    done_in_warehouse: Callable[[BatchSource], bool | None] = lambda _: False,
    alone_in_warehouse: Callable[[BatchSource], bool | None] = lambda _: False,
) -> tuple[RunRequest | None, str | None]:
    """A batch whose run was requested: done on success, retried (bounded) on failure; once
    the retries are spent, a marker written or touched after the last failure starts a new
    round of them. A retry is the batch's de-identification alone where the warehouse's
    ledger shows its ingest standing as its folder is now (``alone_in_warehouse``, read only
    then: :func:`pipelines.landing_ledger.deidentification_alone`; None while the ledger is
    not readable, and the retry waits), as ``ehr run`` runs it again: a failed
    de-identification alone is not retried as a new ingest. A batch whose run failed but
    which another run (a launch or a backfill from
    the UI, as the skip reason suggests) de-identified since is done when the warehouse's
    ledger (``done_in_warehouse``, read only then; None while it is not readable, and the batch
    waits) shows it so, as its folder is now: neither retried nor said to have failed."""
    key = batch.key
    status, ended = _latest_run(context, key, state)
    if status == DagsterRunStatus.SUCCESS:
        state.done = True
        return None, None
    if status not in _FAILED:
        return None, f"batch {key}: run {state.attempt} is {status.value if status else 'queued'}"
    if not state.failed_at:
        state.failed_at = ended or now
    in_warehouse = (
        done_in_warehouse(batch) if _deidentified_after(context, key, state.failed_at) else False
    )
    if in_warehouse is None:  # not retried, nor said to have failed, before the ledger is read
        return None, (
            f"batch {key}: its run {state.attempt} failed, but another run de-identified it "
            "since: warehouse busy, ledger not readable this tick"
        )
    if in_warehouse:
        state.done = True
        state.retry_at = 0.0
        state.failed_at = 0.0
        return None, (
            f"batch {key}: its run {state.attempt} failed, but another run ingested and "
            "de-identified it since: already ingested (warehouse ledger)"
        )
    if state.attempt - state.round_start > landing.max_retries:
        if not _marked_since(batch, landing, state.failed_at):
            return None, (
                f"batch {key}: failed {state.attempt} times, not retried again (fix it, then "
                f"touch {landing.ready_marker} in its folder to retry it, or re-run the "
                "partition from the UI)"
            )
    else:
        if not state.retry_at:
            state.retry_at = now + landing.retry_backoff_seconds * 2 ** (state.attempt - 1)
        if now < state.retry_at:
            wait = state.retry_at - now
            return None, f"batch {key}: run {state.attempt} failed, retry in {wait:.0f}s"
    alone = alone_in_warehouse(batch)
    if alone is None:  # retried once the ledger says whether its ingest stands
        return None, (
            f"batch {key}: run {state.attempt} failed, retry waiting: warehouse busy, ledger "
            "not readable this tick"
        )
    if state.attempt - state.round_start > landing.max_retries:
        state.round_start = state.attempt
    return _next_attempt(context, key, state, alone), None


def _next_attempt(
    context: SensorEvaluationContext, key: str, state: BatchState, deidentify_only: bool = False
) -> RunRequest:
    """The request of the batch's next attempt (its back-off and failure time cleared): its
    de-identification alone with ``deidentify_only``."""
    state.attempt += 1
    state.retry_at = 0.0
    state.failed_at = 0.0
    return _request(context, key, state, deidentify_only)


class LandingNotReadError(RuntimeError):
    """The landing folder could not be read as a whole this tick: the folder itself cannot be
    listed, or two folders share a batch key (``cause``). The tick fails with it."""

    def __init__(self, cause: OSError | BatchKeyCollisionError) -> None:
        super().__init__(f"the landing folder could not be read: {cause}")
        self.cause = cause


@dataclass
class Tick:
    """What one evaluation decided: the runs to request, the batch partitions to remove, why
    each batch left is waiting (or done), and the sensor's new state."""

    requests: list[RunRequest]
    removed: list[str]
    reasons: list[str]
    states: dict[str, BatchState]
    # the storage id of the latest de-identification the ledger was read after (the cursor's)
    ledger_read_after: int = 0
    # batches not done whose runs failed (each one's failed runs), and those whose folder
    # cannot be read (0): the landed batches check reports them
    failing: dict[str, int] = field(default_factory=dict)
    # what the tick read: the landing folder, and the warehouse's ledger (None when it did not
    # read it, or could not)
    found: Landing | None = None
    ledger: dict[str, LedgerEntry] | None = None
    # the UTC day (its ordinal) the ledger was last read on (the cursor's)
    ledger_read_on: int = 0


def _orphaned_partitions(
    context: SensorEvaluationContext,
    present: set[str],
    ledger: dict[str, LedgerEntry] | None,
    warehouse: WarehouseResource,
    settings: str | None = None,
) -> tuple[list[str], dict[str, LedgerEntry]]:
    """Batch partitions whose folder is gone (renamed, deleted) and that were never
    ingested, with no run of theirs still going: nothing of them is in the vault, and a
    partition never materialised holds back every release asset that reads all batches
    (``released_patients``, the views) for good. Second, those whose folder is gone after
    their ingest but before their de-identification succeeded, or whose release is out of date
    since (a new year, other settings), with their ledger entries: kept, as the vault holds
    their rows (:func:`_deidentify_kept`). The ledger is read only
    when some partition has no folder (``ledger``, when the tick read it already): opening the
    warehouse at every tick could meet a run opening it to write. None removed while it is not
    readable."""
    partitions = context.instance.get_dynamic_partitions(batch_partitions.name or "batches")
    missing = sorted(set(partitions) - present)
    if not missing:
        return [], {}
    ledger = ledger if ledger is not None else ingested_batches(warehouse, settings)
    if ledger is None:
        return [], {}
    orphans = []
    kept = {key: ledger[key] for key in missing if key in ledger and not ledger[key].published}
    for key in missing:
        if key not in ledger and not _has_run_going(context, {BATCH_TAG: key}):
            orphans.append(key)
    return orphans, kept


def _deidentify_kept(
    context: SensorEvaluationContext, key: str, entry: LedgerEntry, occasion: int = 0
) -> tuple[RunRequest | None, str]:
    """A batch whose folder went away after its ingest, before its de-identification succeeded
    (its run failed once the folder was renamed or deleted under it, or in de-identification):
    its partition is kept, and it holds every release asset that reads all batches back, while
    the same files dropped under a new name are recorded as repeats of its vault rows, released
    by it alone. Its de-identification (``deid_resources`` of its partition, from the vault; its
    folder is not read) is requested once per ingest (``DEID_OF_INGEST_TAG``), with no run of
    its partition going, and again after each run of it that succeeded when another batch's run
    took it out of the de-identification ledger since (as a batch whose folder is there is run
    again); one that failed is the operator's to launch again. So is a batch
    published from that ingest whose release is out of date since (``entry.outdated``: a new
    year, other settings), once per occasion (``occasion``: the UTC day and the settings the
    ledger was read under, ``_ledger_read_on``), as its de-identification of an earlier
    occasion ran already: a landing folder cleaned once ingested leaves its batch's rows in
    the vault, and the release must follow the day and the settings for them too."""
    ingest = f"{entry.ingested_at:.6f}"
    tags = {
        BATCH_TAG: key,
        DEID_OF_INGEST_TAG: f"{ingest}:{occasion}" if entry.outdated else ingest,
    }
    gone = f"batch {key}: folder gone after its ingest (its vault rows stay; its partition is kept)"
    runs = context.instance.get_runs(filters=RunsFilter(tags=tags), limit=1)
    run_key = f"{key}:deid:{tags[DEID_OF_INGEST_TAG]}"
    said = "its de-identification requested, as the release waits for it"
    if runs and runs[0].status == DagsterRunStatus.SUCCESS:
        # a run that succeeded published the batch (its leak scan is a blocking check): another
        # batch's run took it out of the de-identification ledger since, as a folder's batch is
        # taken out; requested again once per such run, as for those
        run_key = f"{run_key}:after:{runs[0].run_id}"
        said = "its ledger changed when another batch was ingested or de-identified; " + (
            "de-identified again (its vault rows stand)"
        )
    elif runs and runs[0].status not in NOT_FINISHED_STATUSES:
        return None, (
            f"{gone}; its de-identification run ended {runs[0].status.value} without publishing "
            "it: materialise deid_resources of its partition from the UI once the cause is "
            "fixed, as the release waits for it"
        )
    if (runs and runs[0].status != DagsterRunStatus.SUCCESS) or _has_run_going(
        context, {PARTITION_TAG: key}
    ):
        return None, f"{gone}; waiting for its run"
    request = RunRequest(
        job_name=batch_job.name,
        partition_key=key,
        asset_selection=[DEID_RESOURCES],
        run_key=run_key,
        tags=tags,
    )
    return request, f"{gone}; {said}"


def _has_run_going(context: SensorEvaluationContext, tags: dict[str, str]) -> bool:
    """Whether a run with ``tags`` is queued or running."""
    filters = RunsFilter(tags=tags, statuses=NOT_FINISHED_STATUSES)
    return bool(context.instance.get_runs(filters=filters, limit=1))


def _unmaterialized_partitions(context: SensorEvaluationContext, keys: list[str]) -> list[str]:
    """Of the batches done (``keys``: their run succeeded, or the ledger shows them published),
    those whose partition exists but shows no materialization of ``deid_resources``, with no
    run of theirs going: its materializations were wiped in the UI (Dagster wipes a
    partitioned asset whole), or the partition was deleted with them and added again. The vault
    and the release still hold the batch, but automation waits while any partition of
    ``deid_resources`` is missing: the release would be held back for good. Dagster's records
    only: the warehouse is not opened."""
    if not keys:
        return []
    partitions = set(context.instance.get_dynamic_partitions(batch_partitions.name or "batches"))
    candidates = [key for key in keys if key in partitions]
    if not candidates:
        return []
    materialized = context.instance.get_materialized_partitions(DEID_RESOURCES)
    return [
        key
        for key in candidates
        if key not in materialized and not _has_run_going(context, {PARTITION_TAG: key})
    ]


def evaluate_landing(
    context: SensorEvaluationContext,
    landing: LandingResource,
    warehouse: WarehouseResource,
    now: float,
    settings: str | None = None,
) -> Tick:
    """One tick: the run requests, the partitions of batches gone before they were ingested,
    the reasons for every batch left waiting, the new state. ``settings``: the de-identification
    settings batches are published under now (:func:`pipelines.landing_ledger.current_settings`:
    a batch published under others is de-identified again, alone); None takes any for
    current."""
    states = _load_cursor(context.cursor)
    requests: list[RunRequest] = []
    reasons: list[str] = []
    ledger: dict[str, LedgerEntry] | None = None
    present: set[str] = set()
    finished: list[str] = []
    try:
        found = discover_landing(Path(landing.path))
    except (OSError, BatchKeyCollisionError) as error:
        raise LandingNotReadError(error) from error
    batches = found.batches
    reasons += describe_idle(found.idle)
    # a batch whose folder cannot be read waits, its partition kept (its folder is there); the
    # others are followed as usual, and it is read again at the next tick
    present |= set(found.unreadable)
    reasons += [
        f"{error} (the other batches are read; this one is tried again at every tick)"
        for error in found.unreadable.values()
    ]
    done = 0

    def read_ledger() -> dict[str, LedgerEntry] | None:
        """The warehouse's ledger, read at most once a tick (again while it is not readable)."""
        nonlocal ledger
        ledger = ledger if ledger is not None else ingested_batches(warehouse, settings)
        return ledger

    def done_in_warehouse(batch: BatchSource) -> bool | None:
        read = read_ledger()
        return None if read is None else done_in_ledger(batch, read)

    def alone_in_warehouse(batch: BatchSource) -> bool | None:
        read = read_ledger()
        return None if read is None else deidentification_alone(batch, read)

    for batch in batches:
        present.add(batch.key)
        state = states.get(batch.key)
        if state is not None and state.fingerprint == batch.fingerprint:
            if not state.done:
                request, reason = _follow_run(
                    context, landing, batch, state, now, done_in_warehouse, alone_in_warehouse
                )
                requests += [request] if request else []
                reasons += [reason] if reason else []
                finished += [batch.key] if state.done else []
            done += state.done
            continue
        reason = waiting_reason(batch, landing, now)
        if reason:
            reasons.append(reason)
            continue
        ledger = read_ledger()
        if ledger is None:
            reasons.append(f"batch {batch.key}: warehouse busy, ledger not readable this tick")
            continue
        if done_in_ledger(batch, ledger):
            states[batch.key] = BatchState(batch.fingerprint, done=True)
            reasons.append(f"batch {batch.key}: already ingested (warehouse ledger)")
            continue
        states[batch.key] = BatchState(batch.fingerprint, attempt=1)
        # ingested from its folder as it is now but not published from that ingest under
        # today's settings with its rows holding today (out of date, or a run stopped between
        # the two): de-identified alone from its vault rows, not ingested again, as `ehr run`
        # does it (pipelines.run.released_otherwise)
        alone = deidentification_alone(batch, ledger)
        requests.append(_request(context, batch.key, states[batch.key], alone))
    # a batch's run (this sensor's, a backfill's, a launch from the UI) may have taken batches
    # done before it out of the de-identification ledger: its ingest handed vault rows over to
    # them (vault.ingest), or its publication changed what their conditional references name
    # (deid.staging): they are run again to release what the vault holds now (de-identified
    # alone where their vault rows stand, as `ehr run` does them). Read when a batch
    # was de-identified since the ledger was last read, batches finished this tick included
    # (two runs ended between two ticks: the later one may have taken the earlier one out).
    # A new UTC day may have done so too, with no run at all: a batch holding a date that
    # crossed the age limit since its de-identification (or a birth date over it, at a new
    # year) is de-identified again from the vault (deid.staging.day_changed_batches), as `ehr
    # run` does it; the ledger is read again once a day for it.
    read_after = _ledger_read_after(context.cursor)
    latest_deid = _latest_deid(context)
    read_on = _cursor_entry(context.cursor, LEDGER_DAY_KEY)
    today = _ledger_read_on(today_utc().toordinal(), settings or "0" * 12)
    if finished or latest_deid > read_after or read_on != today:
        ledger = read_ledger()
        if ledger is None:
            for key in finished:  # followed again at the next tick, the ledger readable then
                states[key].done = False
                done -= 1
            reasons.append("warehouse busy, ledger not readable this tick")
        else:
            read_after = max(read_after, latest_deid)
            read_on = today
            for batch in batches:
                state = states.get(batch.key)
                if (
                    state is None
                    or not state.done
                    or state.fingerprint != batch.fingerprint
                    or done_in_ledger(batch, ledger)
                    # one whose own run succeeded this tick: only when the ledger shows it
                    # ingested and taken out of the de-identification ledger since
                    or (batch.key in finished and batch.key not in ledger)
                    or _has_run_going(context, {PARTITION_TAG: batch.key})
                ):
                    continue
                states[batch.key] = BatchState(batch.fingerprint, attempt=1, rerun=state.rerun + 1)
                alone = deidentification_alone(batch, ledger)
                requests.append(_request(context, batch.key, states[batch.key], alone))
                done -= 1
                entry = ledger.get(batch.key)
                reasons.append(
                    f"batch {batch.key}: "
                    + (
                        "its release is out of date (published under other de-identification "
                        "settings, or a date crossed the age limit, or a new year came); "
                        if entry is not None and entry.outdated
                        else "its ledger changed when another batch was ingested or de-identified; "
                    )
                    + ("de-identified again (its vault rows stand)" if alone else "run again")
                )
    requested = {r.partition_key for r in requests}
    settled = [
        batch.key
        for batch in batches
        if batch.key not in finished
        and batch.key not in requested
        and (state := states.get(batch.key)) is not None
        and state.done
        and state.fingerprint == batch.fingerprint
    ]
    for key in _unmaterialized_partitions(context, settled):
        state = states[key]
        states[key] = BatchState(state.fingerprint, attempt=1, rerun=state.rerun + 1)
        requests.append(_request(context, key, states[key]))
        done -= 1
        reasons.append(
            f"batch {key}: ingested, but its partition shows no de-identification in Dagster "
            "(its materializations wiped): run again, as the release waits for every partition"
        )
    removed, kept = _orphaned_partitions(context, present, ledger, warehouse, settings)
    for key in removed:
        states.pop(key, None)
        reasons.append(
            f"batch {key}: folder gone before it was ingested, its partition removed "
            "(drop it again to ingest it)"
        )
    for key, entry in kept.items():
        request, reason = _deidentify_kept(context, key, entry, today)
        requests += [request] if request else []
        reasons.append(reason)
    if done:
        reasons.append(f"{done} batch{'es' if done > 1 else ''} already ingested, nothing new")
    failing = _failing(batches, states, found)
    return Tick(requests, removed, reasons, states, read_after, failing, found, ledger, read_on)


def _failing(
    batches: list[BatchSource], states: dict[str, BatchState], found: Landing
) -> dict[str, int]:
    """Each batch not done with a failed run (how many of its runs failed: a retry requested
    or going counts the failures before it; a new delivery into its folder, not yet requested,
    leaves it failing), and each batch whose folder cannot be read (0)."""
    failing = dict.fromkeys(found.unreadable, 0)
    for batch in batches:
        state = states.get(batch.key)
        if state is None or state.done:
            continue
        failed = state.attempt if state.failed_at else state.attempt - 1
        if failed > 0:
            failing[batch.key] = failed
    return failing


def landed_batches_events(
    context: SensorEvaluationContext,
    tick: Tick,
    landing: LandingResource,
    warehouse: WarehouseResource,
    now: float,
) -> tuple[list[AssetCheckEvaluation], dict[str, int]]:
    """The landed batches check's evaluations this tick reports, without a run, and what it
    has then reported failing (the cursor's). Failing, once for each change of the batches
    whose runs failed or whose folders cannot be read: no release runs for them, and every
    release asset would otherwise look fresh. Passing once none is left, when the release holds
    every landed batch, every batch partition shows a de-identification (one ingested whose
    folder went away holds the release back) and no run is queued or going; otherwise the next
    release run evaluates it (a batch run again after its failure, and then released)."""
    reported = _landed_reported(context.cursor)
    if not reported and _reported_landing_not_read(context):
        reported = {LANDING_NOT_READ: 0}  # cleared as a failed batch is, once all is released
    if tick.failing:
        if tick.failing == reported:
            return [], reported
        failed = {key: n for key, n in tick.failing.items() if n}
        not_readable = [key for key, n in tick.failing.items() if not n]
        latest = {key: run for key in failed if (run := _latest_failed_run(context, key))}
        return [landed_batches_failing(failed, not_readable, latest)], dict(tick.failing)
    if not reported:
        return [], {}
    ledger = tick.ledger if tick.ledger is not None else ingested_batches(warehouse)
    if ledger is None:  # tried again at the next tick
        return [], reported
    backlog = landed_backlog(landing, ledger, now, tick.found)
    if (
        backlog.keys
        or not _all_partitions_deidentified(context)
        or _release_behind(context) is not None
        or _has_run_going(context, {})
    ):
        return [], {}
    return [landed_batches_cleared(backlog)], {}


def _latest_landed_evaluation(context: SensorEvaluationContext) -> AssetCheckEvaluation | None:
    """The landed batches check's latest evaluation (a release run's or this sensor's), None
    when it has none. Dagster's records only."""
    check = AssetCheckKey(RELEASED_PATIENTS, LANDED_BATCHES_CHECK)
    storage = context.instance.event_log_storage
    record = storage.get_latest_asset_check_execution_by_key([check]).get(check)
    event = record.event if record is not None else None
    data = event.dagster_event.event_specific_data if event and event.dagster_event else None
    return data if isinstance(data, AssetCheckEvaluation) else None


def _reported_landing_not_read(context: SensorEvaluationContext) -> bool:
    """Whether the check's latest evaluation is this sensor's failure to read the landing
    folder (:class:`LandingNotReadError`), which no cursor of a failed tick remembers."""
    latest = _latest_landed_evaluation(context)
    return (
        latest is not None
        and not latest.passed
        and "reason" in latest.metadata
        and "reported_by" in latest.metadata
    )


def _latest_failed_run(context: SensorEvaluationContext, key: str) -> str | None:
    """The id of the batch's latest failed or canceled run (this sensor's, or its partition's
    launched from the UI), None when it has none."""
    filters = RunsFilter(tags={PARTITION_TAG: key}, statuses=list(_FAILED))
    runs = context.instance.get_runs(filters=filters, limit=1)
    return runs[0].run_id if runs else None


def _automation_stopped(context: SensorEvaluationContext) -> bool:
    """Whether an operator stopped the automation sensor (a state stored as stopped; a sensor
    never switched keeps its default, on; an instance storing no sensor states has none)."""
    if context.instance.schedule_storage is None:
        return False
    states = context.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
    return any(
        state.instigator_name == RELEASE_AUTOMATION and state.status == InstigatorStatus.STOPPED
        for state in states
    )


def _all_partitions_deidentified(context: SensorEvaluationContext) -> bool:
    """Whether every batch partition shows a de-identification: automation holds the release
    back while one is missing (a batch failed, or not run yet), and so does this sensor."""
    partitions = set(context.instance.get_dynamic_partitions(batch_partitions.name or "batches"))
    return partitions <= set(context.instance.get_materialized_partitions(DEID_RESOURCES))


def _release_behind(context: SensorEvaluationContext) -> tuple[int, float] | None:
    """When a release asset's latest materialization is older than one of what it is built
    from (``deid_resources`` or an earlier release asset; or it has none): the storage id and
    time of the newest such materialization, which it has not followed. None when every one is
    newer than all it is built from. Dagster's records only."""
    records = context.instance.get_asset_records([DEID_RESOURCES, *RELEASE_KEYS])
    latest = {
        record.asset_entry.asset_key: (
            int(record.asset_entry.last_materialization_storage_id or 0),
            record.asset_entry.last_materialization.timestamp
            if record.asset_entry.last_materialization
            else 0.0,
        )
        for record in records
    }
    if latest.get(DEID_RESOURCES, (0, 0.0))[0] == 0:
        return None
    behind = [
        latest[dep]
        for key, deps in RELEASE_DEPS.items()
        for dep in deps
        if dep in latest and latest[dep][0] > latest.get(key, (0, 0.0))[0]
    ]
    return max(behind) if behind else None


def _retry_pending(context: SensorEvaluationContext, now: float) -> bool:
    """Whether a run failed in the last ``RETRY_PENDING_SECONDS`` that the daemon will run again
    (``dagster/will_retry``) and has not yet (no ``dagster/auto_retry_run_id``): its retry
    rebuilds the release. Bounded, so a retry the daemon never makes does not hold the release
    back for good."""
    filters = RunsFilter(
        statuses=[DagsterRunStatus.FAILURE],
        tags={WILL_RETRY_TAG: "true"},
        updated_after=datetime.fromtimestamp(now - RETRY_PENDING_SECONDS, UTC),
    )
    return any(
        AUTO_RETRY_RUN_ID_TAG not in run.tags for run in context.instance.get_runs(filters=filters)
    )


def _own_release_failed_since(context: SensorEvaluationContext, since: float) -> bool:
    """Whether a release run this sensor requested (or the daemon's retry of one) failed after
    ``since``: a release that fails is not requested again and again; its run's failure is
    shown, and the next batch, or an operator, starts the next one."""
    filters = RunsFilter(
        job_name=release_job.name,
        statuses=[DagsterRunStatus.FAILURE],
        tags={SENSOR_NAME_TAG: LANDING_SENSOR},
        updated_after=datetime.fromtimestamp(int(since) - 1, UTC),
    )
    return bool(context.instance.get_runs(filters=filters, limit=1))


def _canceled_since(context: SensorEvaluationContext, since: float) -> bool:
    """Whether a run was canceled (terminated by an operator) after ``since``, to the second
    (a run's update time is stored in whole seconds)."""
    after = datetime.fromtimestamp(int(since) - 1, UTC)
    filters = RunsFilter(statuses=[DagsterRunStatus.CANCELED], updated_after=after)
    return bool(context.instance.get_runs(filters=filters, limit=1))


def missed_release(
    context: SensorEvaluationContext, requested_after: int, now: float
) -> tuple[RunRequest | None, str | None, int]:
    """A ``release_job`` run when the release was left behind with nothing requested to
    rebuild it (the module's docstring), with the reason; and the storage id of the
    materialization it follows (``requested_after``, the cursor's, when none). Not while a run
    is queued or going or the daemon is about to run a failed one again, not after a run an
    operator terminated or a release run of this sensor's failed since that materialization
    (the release is then the operator's to finish), and not while the automation sensor is
    stopped. Dagster's records only: the warehouse is not opened."""
    behind = _release_behind(context)
    if behind is None:
        return None, None, requested_after
    trigger_id, trigger_at = behind
    if (
        trigger_id <= requested_after
        or now - trigger_at < RELEASE_GRACE_SECONDS
        or _has_run_going(context, {})
        or _retry_pending(context, now)
        or not _all_partitions_deidentified(context)
        or _canceled_since(context, trigger_at)
        or _own_release_failed_since(context, trigger_at)
        or _automation_stopped(context)
    ):
        return None, None, requested_after
    request = RunRequest(job_name=release_job.name, run_key=f"release-after-{trigger_id}")
    reason = (
        f"a release asset is older than what it is built from, materialised "
        f"{now - trigger_at:.0f}s ago, and no run was requested to rebuild it: "
        f"{release_job.name} requested"
    )
    return request, reason, trigger_id


@sensor(
    jobs=[batch_job, release_job],
    minimum_interval_seconds=15,
    default_status=DefaultSensorStatus.STOPPED,
    description="Runs each complete new or changed landing batch; retries failed runs; "
    "rebuilds a release the automation left behind.",
    name=LANDING_SENSOR,
)
def landing_sensor(
    context: SensorEvaluationContext,
    landing: LandingResource,
    warehouse: WarehouseResource,
    deid_settings: DeidSettings,
) -> SensorResult:
    """Register one dynamic partition per batch it runs and request that batch's run; remove
    the partitions of batches whose folder went away before they were ingested."""
    now = time.time()
    try:
        settings = current_settings(deid_settings.profile)
        tick = evaluate_landing(context, landing, warehouse, now, settings)
    except LandingNotReadError as error:
        # the tick fails, as it must; the release's check says why (once, not every tick), so
        # that it does not keep an evaluation of batches the sensor can no longer see
        evaluation = landed_batches_not_listed(error.cause)
        latest = _latest_landed_evaluation(context)
        if latest is None or latest.description != evaluation.description:
            context.instance.report_runless_asset_event(evaluation)
        raise
    requested_after = _cursor_entry(context.cursor, RELEASE_REQUESTED_KEY)
    events, landed_reported = landed_batches_events(context, tick, landing, warehouse, now)
    if not tick.requests:
        release, reason, requested_after = missed_release(context, requested_after, now)
        tick.requests += [release] if release else []
        tick.reasons += [reason] if reason else []
    for reason in tick.reasons:
        context.log.info(reason)
    keys = sorted({r.partition_key for r in tick.requests if r.partition_key})
    new_keys = [k for k in keys if not context.instance.has_dynamic_partition("batches", k)]
    changes: list[AddDynamicPartitionsRequest | DeleteDynamicPartitionsRequest] = []
    changes += [batch_partitions.build_add_request(new_keys)] if new_keys else []
    changes += [batch_partitions.build_delete_request(tick.removed)] if tick.removed else []
    return SensorResult(
        run_requests=tick.requests,
        dynamic_partitions_requests=changes,
        cursor=_dump_cursor(
            tick.states,
            tick.ledger_read_after,
            requested_after,
            landed_reported,
            tick.ledger_read_on,
        ),
        asset_events=events,
        skip_reason=None
        if tick.requests
        else SkipReason("; ".join(tick.reasons) or "no batches in the landing folder"),
    )
