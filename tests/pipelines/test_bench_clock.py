"""The benches' clock: a run's wall time split into the assets' own code and Dagster's, checked
against assets that sleep a known time and an event store made slow on purpose."""

from __future__ import annotations

import contextlib
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

# What the assets' bodies measure of themselves, a second account the clock is checked against:
# on a loaded machine a body runs longer than its nominal sleep or CPU burn, and both accounts
# see the same stretch, while none of Dagster's event handling is inside a body.
BODY_WALL: list[float] = []
BODY_CPU: list[float] = []


@contextlib.contextmanager
def _body() -> Iterator[None]:
    started, cpu_started = time.perf_counter(), time.thread_time()
    try:
        yield
    finally:
        BODY_WALL.append(time.perf_counter() - started)
        BODY_CPU.append(time.thread_time() - cpu_started)


@pytest.fixture(autouse=True)
def _fresh_bodies() -> None:
    BODY_WALL.clear()
    BODY_CPU.clear()


@asset
def sleeping() -> MaterializeResult:
    with _body():
        time.sleep(2 * ASSET_SLEEP)
    return MaterializeResult()


@multi_asset(specs=[AssetSpec("first"), AssetSpec("second")])
def yielding() -> Iterator[MaterializeResult]:
    with _body():
        time.sleep(ASSET_SLEEP)
    yield MaterializeResult(asset_key="first")
    # Dagster stores this result's events before the generator resumes: not the asset's time
    with _body():
        time.sleep(ASSET_SLEEP)
    yield MaterializeResult(asset_key="second")


@asset
def busy() -> MaterializeResult:
    with _body():
        until = time.thread_time() + BUSY_CPU
        while time.thread_time() < until:
            pass
    return MaterializeResult()


@asset
def failing() -> None:
    with _body():
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

    # four bodies measured, at least as long as they were told to take
    assert len(BODY_WALL) == 4
    assert sum(BODY_WALL) >= 4 * ASSET_SLEEP + BUSY_CPU
    assert sum(BODY_WALL) <= clock.seconds < sum(BODY_WALL) + EVENT_SLEEP
    # every stored event's sleep is in the rest of the run, none in the clock
    assert len(slept) > 10
    assert wall - clock.seconds >= sum(slept)
    # CPU seconds: the busy asset's, not the sleeps'
    assert BUSY_CPU <= sum(BODY_CPU) <= clock.cpu_seconds < sum(BODY_CPU) + EVENT_SLEEP


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
    assert BODY_WALL[0] >= ASSET_SLEEP
    assert BODY_WALL[0] <= clock.seconds < BODY_WALL[0] + EVENT_SLEEP
    assert all(a.op._compute_fn is c for a, c in zip(assets, computes, strict=True))
    assert all(WarehouseResource.__dict__[n] is f for n, f in hooks.items())
