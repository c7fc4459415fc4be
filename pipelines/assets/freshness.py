"""Freshness of what is served online: the Feast online store must be newer than every batch's
de-identification and every feature table, otherwise model builders get yesterday's release."""

import time

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    AutomationCondition,
    DagsterInstance,
    asset_check,
)

from pipelines.assets.features import FEATURE_ASSET_KEYS

ONLINE_STORE = AssetKey("feast_online_store")
UPSTREAM: list[AssetKey] = [AssetKey("deid_resources"), *FEATURE_ASSET_KEYS]


# Evaluated again whenever a batch or a feature table changes, so a stale store shows up as a
# warning until the release catches up; but not after a run that evaluated the check itself
# after changing them (a release run does), nor while such a run is going: that would be a run
# of its own after every release for an answer the release run gives.
CHECKED_WHEN_AN_INPUT_CHANGES = (
    AutomationCondition.any_deps_updated().since_last_handled()
    & ~AutomationCondition.any_deps_in_progress()
    & ~AutomationCondition.in_progress()
)


def _last_materialized(instance: DagsterInstance, key: AssetKey) -> float | None:
    event = instance.get_latest_materialization_event(key)
    return event.timestamp if event else None


@asset_check(
    asset=ONLINE_STORE,
    additional_deps=UPSTREAM,
    blocking=False,
    description="The online store was materialised after the latest de-identified batch and "
    "after every feature table, so it serves the current release.",
    automation_condition=CHECKED_WHEN_AN_INPUT_CHANGES,
)
def online_store_freshness(context: AssetCheckExecutionContext) -> AssetCheckResult:
    store = _last_materialized(context.instance, ONLINE_STORE)
    newer = [
        key.to_user_string()
        for key in UPSTREAM
        if store is None or (_last_materialized(context.instance, key) or 0.0) > store
    ]
    return AssetCheckResult(
        passed=store is not None and not newer,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "online_store_age_minutes": round((time.time() - store) / 60, 1) if store else -1.0,
            "newer_upstream": ", ".join(newer) or "none",
        },
        description="never materialised" if store is None else None,
    )
