"""Stage ``deid``: the vault through a de-identification policy into released tables, guarded by
a PHI leak scan and a k-anonymity check. Both tables are staged, checked, then published: a
failed blocking check leaves the previous release as it was (see :mod:`deid.staging` and
:mod:`deid.kanon`)."""

import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TypeVar

import duckdb
from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetSelection,
    AssetSpec,
    AutomationCondition,
    FreshnessPolicy,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)
from dagster._core.definitions.data_version import (
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)
from dagster._core.definitions.metadata import RawMetadataValue

from deid.policy import Policy
from deid.release import (
    build_released_patients,
    release_batch_key_hits,
    release_totals,
    release_version,
)
from deid.staging import publish_batch
from deid.terminology import CONSENT_PROVISION_LEVELS
from pipelines.assets.checks import RELEASE_CANARIES, leak_scan_result
from pipelines.assets.ingest import WAREHOUSE_POOL
from pipelines.features.valuesets import release_terminology
from pipelines.landing_ledger import LandedBacklog, landed_backlog, read_ledger
from pipelines.parallel import in_background
from pipelines.partitions import batch_partitions
from pipelines.resources import (
    DeidSettings,
    KeyProviderResource,
    LandingResource,
    WarehouseResource,
)
from vault.landing import BatchKeyCollisionError

# Run-time overrides of DeidSettings (a deployment's environment, or a test over a cohort far
# too small for the production k): the k of the release and the withheld share allowed.
K_ENV = "EHR_DEID_K"
MAX_WITHHELD_ENV = "EHR_MAX_WITHHELD_SHARE"


def k_anonymity_settings(settings: DeidSettings) -> tuple[int, float]:
    """(k, largest withheld share): the environment's values when set, else the resource's."""
    k = os.environ.get(K_ENV)
    share = os.environ.get(MAX_WITHHELD_ENV)
    return (
        int(k) if k else settings.k,
        float(share) if share else settings.max_withheld_share,
    )


# Every release asset depends on this one, so that a published batch marks all of them stale
# at once: Dagster's stale status looks at an asset's direct dependencies only, and without it
# features, Feast and the model looked fresh until the release caught up. It is reported (not
# built) by the de-identification step each time a batch is published, with the release's
# content version as its data version.
RELEASE_INPUT = AssetKey("release_input")
release_input = AssetSpec(
    RELEASE_INPUT,
    group_name="deid",
    description="The de-identified resources of every batch as one input of the release: a "
    "new version each time a batch is published.",
    kinds={"duckdb"},
)
# The assets after the views (features, Feast, the model) follow them and each other, never
# release_input alone: a batch published while another batch's run failed (or waits for its
# retry) holds released_patients and the views back, and a rebuild from the views as they were
# would leave those assets without the new batch yet showing fresh.
FOLLOWS_THE_VIEWS = AutomationCondition.eager().ignore(AssetSelection.assets(RELEASE_INPUT))
DATA_VERSION_TAG = "dagster/data_version"
# What Dagster records on a materialization as the version of release_input it was built from,
# and the event that version came from (compared with release_input's version for its stale
# status)
BUILT_FROM_TAG = get_input_data_version_tag(RELEASE_INPUT)
BUILT_FROM_EVENT_TAG = get_input_event_pointer_tag(RELEASE_INPUT)


def built_from_upstream(context: AssetExecutionContext, key: AssetKey) -> dict[str, str]:
    """Tags for the materialization of ``key``, an asset after the views, recording as the
    release input it was built from the one its upstream release assets were built from, when
    one of them was built from an older one than the current: ``key`` built alone from an
    upstream that has not caught up with a batch (the asset page's "Materialize" while the
    views are stale) holds no more than that upstream, and shows stale until it is built again
    after it. Dagster records the current version otherwise, and the asset showed fresh
    without the new batch. Empty when every upstream is as new as the release input (the
    release run, in which the upstream steps ran first). One read of Dagster's asset records
    (the latest materialization of the release input and of every upstream asset)."""
    deps = sorted(
        (dep for dep in context.assets_def.asset_deps[key] if dep != RELEASE_INPUT),
        key=lambda k: k.to_user_string(),
    )
    latest = {
        record.asset_entry.asset_key: _recorded_tags(record.asset_entry.last_materialization)
        for record in context.instance.get_asset_records([RELEASE_INPUT, *deps])
    }
    version = latest.get(RELEASE_INPUT, {}).get(DATA_VERSION_TAG)
    if version is None:
        return {}
    for dep in deps:
        tags = latest.get(dep, {})
        built_from = tags.get(BUILT_FROM_TAG)
        if built_from is not None and built_from != version:
            return {
                BUILT_FROM_TAG: built_from,
                BUILT_FROM_EVENT_TAG: tags.get(BUILT_FROM_EVENT_TAG, "NULL"),
            }
    return {}


def _recorded_tags(event: object) -> dict[str, str]:
    """The tags of a materialization event (an ``EventLogEntry``), none when there is none."""
    materialization = getattr(event, "asset_materialization", None)
    return dict(getattr(materialization, "tags", None) or {})


# The release's age bands, and the birth years its Patients carry, are counted in calendar years
# as of the year it is built in (deid.kanon): a release left as it was into a new year would
# keep last year's bands, a patient of 89 among the 85-89 after turning 90. The automation
# sensor's first tick of each year rebuilds it (and everything after it, eagerly), new batch
# or not.
NEW_YEAR_CRON = "0 0 1 1 *"
REBUILT_EACH_YEAR = (
    AutomationCondition.cron_tick_passed(NEW_YEAR_CRON, "UTC") & ~AutomationCondition.in_progress()
)
# What shows a release not rebuilt (the automation sensor off, its run failed): Dagster's
# freshness daemon (``freshness: enabled`` in dagster.yaml) marks the asset as failing its
# freshness from 01:00 UTC on 1 January until it is built again, whatever runs or sensors are on.
# Built since the year began is fresh: the window is the year's first hour, and any build after
# the window's start passes until the next year's deadline.
BUILT_THIS_YEAR = FreshnessPolicy.cron(
    deadline_cron="0 1 1 1 *", lower_bound_delta=timedelta(hours=1), timezone="UTC"
)


BATCH_KEY_CHECK = "batch_key_holds_no_identifier"
RELEASE_BATCH_KEYS_CHECK = "batch_keys_hold_no_identifier"
# A warning on the release's first asset while a complete landed batch is not in it: every
# release run evaluates it, and the landing sensor reports it failing as soon as a batch's run
# fails or its folder cannot be read, when no release runs (the release follows de-identified
# batches only, so a failed batch otherwise left every release asset looking fresh)
LANDED_BATCHES_CHECK = "landed_batches_released"
RELEASED_PATIENTS = AssetKey("released_patients")
# what that check's outcome is built as: in a release run, or reported by the landing sensor
CheckT = TypeVar("CheckT", AssetCheckResult, AssetCheckEvaluation)


def _batch_key_result(hits: tuple[str, ...]) -> AssetCheckResult:
    """The batch key check: the kinds found, never what matched."""
    return AssetCheckResult(
        asset_key="deid_resources",
        check_name=BATCH_KEY_CHECK,
        passed=not hits,
        severity=AssetCheckSeverity.WARN,
        metadata={"kinds_found": MetadataValue.json(list(hits))},
        description=None
        if not hits
        else "the landing folder's name holds an identifier of one of the batch's patients "
        f"({', '.join(hits)}): rename such folders at the source; the runs and the partition "
        "under this key keep it until they are deleted",
    )


def _table(rows: dict[str, int], head: str) -> MetadataValue:
    body = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return MetadataValue.md(f"| {head} | count |\n|---|---|\n{body}" if rows else "none")


@multi_asset(
    specs=[
        AssetSpec(
            "deid_resources",
            group_name="deid",
            deps=["phi_vault"],
            description="De-identified FHIR resources (policy applied, pseudonymous ids).",
            kinds={"duckdb"},
        )
    ],
    check_specs=[
        AssetCheckSpec(
            "phi_leak_scan",
            asset="deid_resources",
            blocking=True,
            description="No name (the patient's, a contact's, a relative's), identifier (a "
            "health plan's member number, an account number), SSN or phone (however "
            "punctuated), email, address, city with ZIP, or the patient's own birth date (ISO "
            "or US formats) of any patient of the vault appears in the batch's staged rows "
            "(case-folded, base64 decoded, names also as ASCII and as a code writes them); the "
            "batch is published only when none does.",
        ),
        AssetCheckSpec(
            BATCH_KEY_CHECK,
            asset="deid_resources",
            blocking=False,
            description="The batch key (the landing folder's name, shown as the partition key "
            "in the UI, the event log and run summaries) holds no name, identifier, phone, "
            "email, address or source Patient id of the batch's patients. A warning: the key "
            "never reaches a released table, but an exporter that names folders after patients "
            "puts PHI in Dagster's storage. Rename such folders at the source.",
        ),
    ],
    partitions_def=batch_partitions,
    pool=WAREHOUSE_POOL,
)
def deid_resources(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    keys: KeyProviderResource,
    deid_settings: DeidSettings,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """De-identify the resources a batch put in the vault, then scan the release for PHI."""
    policy = Policy.shipped(deid_settings.profile)
    provider = keys.provider()
    con = warehouse.connect()
    try:
        with keys.naming_source():  # keys that are not the warehouse's own: say whose they were
            batch = publish_batch(
                con,
                provider,
                context.partition_key,
                policy,
                terminology=release_terminology(),
                # held for the release's scans too while the vault stays as it is (ehr run)
                canaries=lambda c: RELEASE_CANARIES.get(
                    c, provider, context.run.run_id, sealed=keys.seal_canaries
                ),
            )
        table = release_totals(con)
        version = release_version(con) if batch.published else None
    finally:
        con.close()
    report, scan = batch.report, batch.scan
    context.log.info(
        f"batch {report.batch_id}: {report.released} released, {report.withheld} withheld "
        f"under policy {report.policy} in {report.seconds:.1f}s; "
        + ("published" if batch.published else "not published: the leak scan failed")
    )
    yield MaterializeResult(
        asset_key="deid_resources",
        metadata={
            "dagster/row_count": table["released"],
            "release_totals": MetadataValue.json(table),
            "published": batch.published,
            "policy": report.policy,
            "resources_in": report.resources_in,
            "released": report.released,
            "withheld": report.withheld,
            "withheld_reasons": MetadataValue.json(report.withheld_reasons),
            "security_labels": MetadataValue.json(report.labels),
            "rule_counts": _table(report.rule_counts, "rule"),
            # inside released resources: what was withheld, normalised or generalised, by kind
            "release_counts": _table(report.release_counts, "kind"),
        },
    )
    too_deep = report.release_counts.get("consent_provisions_too_deep", 0)
    if too_deep:
        context.log.warning(
            f"{too_deep} Consents nest provisions deeper than the {CONSENT_PROVISION_LEVELS} "
            "levels the release keeps: a deny nested deeper is not released, so an opt-out "
            "there applies to no one; send the exception at a shallower level"
        )
    yield leak_scan_result("deid_resources", scan)
    yield _batch_key_result(batch.batch_key_hits)
    if version is not None:
        context.log_event(
            AssetMaterialization(
                RELEASE_INPUT,
                description=f"batch {context.partition_key} published",
                metadata={"dagster/row_count": table["released"], "batch": context.partition_key},
                tags={DATA_VERSION_TAG: version},
            )
        )


@multi_asset(
    specs=[
        AssetSpec(
            "released_patients",
            group_name="deid",
            deps=["deid_resources", RELEASE_INPUT],
            description="One row per released patient: quasi-identifiers, k-anonymous.",
            automation_condition=(AutomationCondition.eager() | REBUILT_EACH_YEAR).with_label(
                "eager, and on each new year (UTC)"
            ),
            freshness_policy=BUILT_THIS_YEAR,
            kinds={"duckdb"},
        )
    ],
    check_specs=[
        AssetCheckSpec(
            "k_anonymity",
            asset="released_patients",
            blocking=True,
            description="After generalisation, every combination of age band, sex, ZIP3, state, "
            "race and ethnicity is shared by at least k released patients, and the patients "
            "withheld (groups still below k) are within the configured share.",
        ),
        AssetCheckSpec(
            "phi_leak_scan",
            asset="released_patients",
            blocking=True,
            description="No name, identifier, phone, email, address or city with ZIP of any "
            "patient appears in the staged table; it is published only when none does.",
        ),
        AssetCheckSpec(
            LANDED_BATCHES_CHECK,
            asset="released_patients",
            blocking=False,
            description="Every complete batch in the landing folder is in the release as its "
            "folder is now. A warning naming the batch keys that are not, and why (not "
            "ingested: waiting for its run, or its run failed; changed since its ingest; a "
            "folder that cannot be read); the landing sensor reports it as soon as a batch's "
            "run fails, and the next release run evaluates it again.",
        ),
        AssetCheckSpec(
            RELEASE_BATCH_KEYS_CHECK,
            asset="released_patients",
            blocking=False,
            description="No batch key (the landing folders' names, shown as partition keys) "
            "holds a name, identifier, phone, email, address or source Patient id of any "
            "patient in the vault: each batch's own check knows its own patients only. A "
            "warning naming the keys: rename such folders at the source.",
        ),
    ],
    pool=WAREHOUSE_POOL,
)
def released_patients(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    keys: KeyProviderResource,
    deid_settings: DeidSettings,
    landing: LandingResource,
) -> Iterator[MaterializeResult | AssetCheckResult]:
    """Quasi-identifiers of every released patient, generalised up to k over the whole release;
    patients still below k withheld (views and features leave them out); the Patient resources
    rewritten to the released values."""
    con = warehouse.connect()
    try:
        k, max_withheld = k_anonymity_settings(deid_settings)
        provider = keys.provider()
        # the canaries (the vault's PHI, decrypted: Python) load while k-anonymity runs (DuckDB),
        # and the landing folder is listed (files' times and sizes: the disk) meanwhile
        with (
            ThreadPoolExecutor(1, thread_name_prefix="landing") as landing_pool,
            keys.naming_source(),
            in_background(
                con,
                lambda cursor: RELEASE_CANARIES.get(
                    cursor, provider, context.run.run_id, sealed=keys.seal_canaries
                ),
            ) as loaded,
        ):
            landed = landing_pool.submit(_landed_batches_result, landing, con.cursor())
            report = build_released_patients(con, k, max_withheld=max_withheld, canaries=loaded)
            key_hits = release_batch_key_hits(con, loaded())
            landed_result = landed.result()
    finally:
        con.close()
    if not report.published:
        # the release kept what it published before: it holds no batch de-identified since
        landed_result = _landed_batches_unknown("this release was not published (k_anonymity)")
    summary = report.to_dict()
    context.log.info(
        f"k={report.after.k}: smallest group {report.before.min_group} → "
        f"{report.after.min_group}, {report.withheld} of {report.before.records} patients "
        f"withheld; " + ("published" if report.published else "not published")
    )
    yield MaterializeResult(
        asset_key="released_patients",
        metadata={
            "dagster/row_count": report.after.records if report.published else 0,
            **{k: v for k, v in summary.items() if isinstance(v, int | float | bool)},
            "generalised": MetadataValue.json(report.steps_applied),
        },
    )
    if report.check is not None:
        yield leak_scan_result("released_patients", report.check)
    yield AssetCheckResult(
        check_name="k_anonymity",
        asset_key="released_patients",
        passed=report.passed,
        severity=AssetCheckSeverity.ERROR,
        metadata={k: v for k, v in summary.items() if isinstance(v, int | float | bool)},
    )
    yield _release_batch_keys_result(key_hits)
    yield landed_result


def _landed_batches_result(
    landing: LandingResource, cursor: duckdb.DuckDBPyConnection
) -> AssetCheckResult:
    """The release's landed batches check, over the landing folder and the batch ledger as they
    are now (the release reads every batch the ledger shows de-identified); ``cursor``, of the
    step's connection, is closed after."""
    try:
        backlog = landed_backlog(landing, read_ledger(cursor), time.time())
    except OSError as exc:  # the landing folder itself
        return _landed_batches_unknown(_not_listed(exc))
    finally:
        cursor.close()
    return _landed_check(AssetCheckResult, *_backlog_outcome(backlog))


def _landed_batches_unknown(why: str) -> AssetCheckResult:
    """The landed batches check failing because it cannot tell: the landing folder could not
    be listed, or the release was not published."""
    return _landed_check(AssetCheckResult, False, *_unknown_outcome(why))


def _unknown_outcome(why: str) -> tuple[dict[str, RawMetadataValue], str]:
    return {"reason": why}, f"not known whether every landed batch is in the release: {why}"


def _not_listed(error: OSError) -> str:
    """Why, when the landing folder itself could not be listed: its error's type only (the
    error's text names the path, which is configuration)."""
    return f"the landing folder could not be listed ({type(error).__name__})"


def landed_batches_not_listed(error: OSError | BatchKeyCollisionError) -> AssetCheckEvaluation:
    """The landed batches check as the landing sensor reports it, without a run, when its tick
    cannot read the landing folder as a whole: the folder itself cannot be listed
    (:func:`_not_listed`), or two folders share a batch key (the error names the keys, which
    the UI shows as partitions, never the folders)."""
    why = str(error) if isinstance(error, BatchKeyCollisionError) else _not_listed(error)
    metadata, description = _unknown_outcome(why)
    return _landed_check(
        AssetCheckEvaluation, False, {**metadata, "reported_by": "landing_sensor"}, description
    )


def _landed_check(
    make: Callable[..., CheckT],
    passed: bool,
    metadata: Mapping[str, RawMetadataValue],
    description: str | None = None,
) -> CheckT:
    """The landed batches check's outcome as ``make`` builds it: a result of the release run
    (``AssetCheckResult``) or an evaluation the landing sensor reports without a run."""
    return make(
        asset_key=RELEASED_PATIENTS,
        check_name=LANDED_BATCHES_CHECK,
        passed=passed,
        severity=AssetCheckSeverity.WARN,
        metadata=metadata,
        description=description,
    )


def _backlog_outcome(
    backlog: LandedBacklog,
) -> tuple[bool, dict[str, RawMetadataValue], str | None]:
    keys = backlog.keys
    metadata: dict[str, RawMetadataValue] = {
        "batches_not_released": len(keys),
        "not_ingested": MetadataValue.json(backlog.not_ingested),
        "not_deidentified": MetadataValue.json(backlog.not_deidentified),
        "changed_since_ingest": MetadataValue.json(backlog.changed),
        "not_readable": MetadataValue.json(backlog.not_readable),
        "key_shared": MetadataValue.json(backlog.key_shared),
        "waiting_to_complete": backlog.waiting,
    }
    if not keys:
        return True, metadata, None
    why = (
        [f"{key} (not ingested)" for key in backlog.not_ingested]
        + [f"{key} (ingested, not de-identified)" for key in backlog.not_deidentified]
        + [f"{key} (changed since its ingest)" for key in backlog.changed]
        + [f"{key} (its folder cannot be read)" for key in backlog.not_readable]
        + [f"{key} (a key two folders share: rename one)" for key in backlog.key_shared]
    )
    return (
        False,
        metadata,
        f"{len(keys)} complete landed batch{'es' if len(keys) > 1 else ''} not in this release: "
        f"{', '.join(why)}. A batch's failed run shows on its partition and the landing "
        "sensor's ticks; the release follows each batch once it is de-identified",
    )


def landed_batches_failing(
    failed: dict[str, int], not_readable: list[str], latest_failed: dict[str, str] | None = None
) -> AssetCheckEvaluation:
    """The landed batches check as the landing sensor reports it, without a run, when batches'
    runs failed (``failed``: each key's failed attempts) or their folders cannot be read;
    ``latest_failed``: each failed batch's latest failed run, linked from the check (its logs
    say why)."""
    latest_failed = latest_failed or {}
    keys = sorted({*failed, *not_readable})
    why = [
        f"{key} (its run failed {n} time{'s' if n > 1 else ''}"
        + (f"; latest {latest_failed[key][:8]})" if key in latest_failed else ")")
        for key, n in sorted(failed.items())
    ]
    runs = {
        f"latest_failed_run {key}": MetadataValue.dagster_run(run_id)
        for key, run_id in sorted(latest_failed.items())
    }
    why += [f"{key} (its folder cannot be read)" for key in not_readable if key not in failed]
    return _landed_check(
        AssetCheckEvaluation,
        False,
        {
            "batches_not_released": len(keys),
            "runs_failed": MetadataValue.json(dict(sorted(failed.items()))),
            "not_readable": MetadataValue.json(sorted(not_readable)),
            **runs,
            "reported_by": "landing_sensor",
        },
        f"{len(keys)} landed batch{'es' if len(keys) > 1 else ''} not in the "
        f"release: {', '.join(why)}. The release shows what it held before; it follows each "
        "batch once its run succeeds. A batch whose retries are spent waits: fix the cause, then "
        "touch _READY in its folder (or launch its partition again)",
    )


def landed_batches_cleared(backlog: LandedBacklog) -> AssetCheckEvaluation:
    """The landed batches check passing, as the landing sensor reports it when the batches it
    reported failing are gone and the release holds every landed batch."""
    passed, metadata, _ = _backlog_outcome(backlog)
    assert passed
    return _landed_check(AssetCheckEvaluation, True, {**metadata, "reported_by": "landing_sensor"})


def _release_batch_keys_result(hits: dict[str, list[str]]) -> AssetCheckResult:
    """The release's batch key check: the keys that hold an identifier and the kinds found in
    each, never what matched. The keys are named: they are partition keys, which the UI shows
    already, and a data engineer needs them to rename the folders."""
    kinds = sorted({kind for found in hits.values() for kind in found})
    return AssetCheckResult(
        asset_key="released_patients",
        check_name=RELEASE_BATCH_KEYS_CHECK,
        passed=not hits,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "batch_keys_flagged": len(hits),
            "kinds_found": MetadataValue.json(hits),
        },
        description=None
        if not hits
        else f"{len(hits)} batch keys hold an identifier of a patient in the vault "
        f"({', '.join(kinds)}): rename such folders at the source; the runs and the partitions "
        "under these keys keep them until they are deleted",
    )
