"""The benches' clock: a run's wall time split into the assets' own code and Dagster's, checked
against assets that sleep a known time and an event store made slow on purpose."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from dagster import (
    AssetSpec,
    DagsterInstance,
    MaterializeResult,
    asset,
    materialize,
    multi_asset,
)

from pipelines.bench.clock import AssetCodeClock
from pipelines.resources import WarehouseResource

ASSET_SLEEP = 0.1
EVENT_SLEEP = 0.05  # each stored event: one counted by mistake would show
BUSY_CPU = 0.2


@asset
def sleeping() -> MaterializeResult:
    time.sleep(2 * ASSET_SLEEP)
    return MaterializeResult()


@multi_asset(specs=[AssetSpec("first"), AssetSpec("second")])
def yielding() -> Iterator[MaterializeResult]:
    time.sleep(ASSET_SLEEP)
    yield MaterializeResult(asset_key="first")
    # Dagster stores this result's events before the generator resumes: not the asset's time
    time.sleep(ASSET_SLEEP)
    yield MaterializeResult(asset_key="second")


@asset
def busy() -> MaterializeResult:
    until = time.thread_time() + BUSY_CPU
    while time.thread_time() < until:
        pass
    return MaterializeResult()


@asset
def failing() -> None:
    time.sleep(ASSET_SLEEP)
    raise RuntimeError("boom")


def _slow_events(instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    storage = instance.event_log_storage
    original = storage.store_event
    slept: list[float] = []

    def store_event(event: object) -> None:
        time.sleep(EVENT_SLEEP)
        slept.append(EVENT_SLEEP)
        original(event)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "store_event", store_event)
    return slept


def test_the_clock_counts_the_assets_code_and_not_dagsters_event_handling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance = DagsterInstance.ephemeral()
    slept = _slow_events(instance, monkeypatch)
    clock = AssetCodeClock()
    with clock.timing([sleeping, yielding, busy]):
        started = time.perf_counter()
        materialize([sleeping, yielding, busy], instance=instance)
        wall = time.perf_counter() - started

    in_assets = 4 * ASSET_SLEEP + BUSY_CPU
    assert in_assets <= clock.seconds < in_assets + EVENT_SLEEP
    # every stored event's sleep is in the rest of the run, none in the clock
    assert len(slept) > 10
    assert wall - clock.seconds >= sum(slept)
    # CPU seconds: the busy asset's, not the sleeps'
    assert BUSY_CPU <= clock.cpu_seconds < BUSY_CPU + EVENT_SLEEP


def test_a_failing_asset_is_timed_and_the_functions_are_put_back() -> None:
    assets = [sleeping, yielding, failing]
    computes = [a.op._compute_fn for a in assets]
    names = ("setup_for_execution", "teardown_after_execution")
    hooks = {name: WarehouseResource.__dict__[name] for name in names}
    clock = AssetCodeClock()
    with clock.timing(assets):
        assert all(a.op._compute_fn is not c for a, c in zip(assets, computes, strict=True))
        assert all(WarehouseResource.__dict__[n] is not f for n, f in hooks.items())
        result = materialize([failing], instance=DagsterInstance.ephemeral(), raise_on_error=False)
    assert not result.success
    assert ASSET_SLEEP <= clock.seconds < ASSET_SLEEP + EVENT_SLEEP
    assert all(a.op._compute_fn is c for a, c in zip(assets, computes, strict=True))
    assert all(WarehouseResource.__dict__[n] is f for n, f in hooks.items())
