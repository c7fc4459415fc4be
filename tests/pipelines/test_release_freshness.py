"""A release not rebuilt in a new year shows as failing its freshness policy, whatever runs or
sensors are on: the age bands of ``released_patients`` are counted as of the year it is built
in, so one built last year is out of date from the new year's first hour until built again.

Dagster's own evaluator (the one its freshness daemon runs) is asked about builds and moments on
both sides of two New Years, at frozen clocks; the oracle is the rule written out plainly."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from dagster import AssetKey, AssetMaterialization, DagsterInstance
from dagster._core.definitions.freshness import FreshnessState
from dagster._core.definitions.freshness_evaluator import CronFreshnessPolicyEvaluator
from dagster._core.loader import LoadingContextForTest
from dagster._core.test_utils import freeze_time

from pipelines.definitions import defs

RELEASED_PATIENTS = AssetKey("released_patients")
YEAR = datetime.now(UTC).year + 1
GRACE = timedelta(hours=1)  # the automation sensor's new-year rebuild has the first hour

BUILDS = [
    datetime(YEAR - 1, 6, 1, 12, tzinfo=UTC),
    datetime(YEAR - 1, 12, 31, 23, 59, tzinfo=UTC),
    datetime(YEAR, 1, 1, 0, 0, 30, tzinfo=UTC),  # the automation sensor's first tick
    datetime(YEAR, 1, 1, 2, tzinfo=UTC),  # built by hand, late
    datetime(YEAR, 7, 1, tzinfo=UTC),
]
MOMENTS = [
    datetime(YEAR, 1, 1, 0, 30, tzinfo=UTC),
    datetime(YEAR, 1, 1, 1, 0, 1, tzinfo=UTC),
    datetime(YEAR, 1, 1, 3, tzinfo=UTC),
    datetime(YEAR, 12, 31, 23, 59, tzinfo=UTC),
    datetime(YEAR + 1, 1, 1, 0, 59, tzinfo=UTC),
    datetime(YEAR + 1, 1, 1, 1, 0, 1, tzinfo=UTC),
]


def _fresh(built: datetime, now: datetime) -> bool:
    """The rule: built since the start of the current UTC year, the year's first hour given
    over to the rebuild (until then, since the start of the year before)."""
    return built >= datetime((now - GRACE).year, 1, 1, tzinfo=UTC)


def _state(instance: DagsterInstance, now: datetime) -> FreshnessState:
    node = defs.resolve_asset_graph().get(RELEASED_PATIENTS)
    with freeze_time(now):
        evaluation = CronFreshnessPolicyEvaluator().evaluate_freshness(
            LoadingContextForTest(instance), node
        )
        return asyncio.run(evaluation)


@pytest.mark.parametrize("built", BUILDS, ids=lambda b: b.strftime("built %Y-%m-%d %H:%M"))
def test_a_release_built_before_this_year_fails_its_freshness(built: datetime) -> None:
    with DagsterInstance.ephemeral() as instance:
        assert _state(instance, built) == FreshnessState.UNKNOWN  # never built
        with freeze_time(built):
            instance.report_runless_asset_event(AssetMaterialization(RELEASED_PATIENTS))
        seen = {now: _state(instance, now) for now in MOMENTS if now > built}
        expected = {
            now: FreshnessState.PASS if _fresh(built, now) else FreshnessState.FAIL for now in seen
        }
        assert seen == expected
        assert FreshnessState.FAIL in seen.values()  # every build goes stale at some New Year


def test_only_the_release_carries_the_yearly_policy() -> None:
    graph = defs.resolve_asset_graph()
    with_policy = {
        key.to_user_string()
        for key in graph.get_all_asset_keys()
        if graph.get(key).freshness_policy is not None
    }
    assert with_policy == {"released_patients"}
