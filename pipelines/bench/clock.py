"""How much of a Dagster run is the platform's own work, and how much is Dagster's.

A run does more than call the assets: Dagster creates the run and an event for every asset and
check it plans, initialises the resources, and stores an event (about 2 ms each in SQLite) for
every step start and end, output, materialisation, check result and log line. A release run
after a small batch stores about 200; a full release about as many, so that part of a run's cost
does not shrink with the batch.

:class:`AssetCodeClock` times the assets' own functions while a run executes them (a generator
asset from each resumption to its next ``yield``, so Dagster's handling of what it yielded is not
counted, while a log line the asset writes is) and the warehouse resource's set-up and tear-down
(which open and close the warehouse file), in wall seconds and in CPU seconds of the thread that
runs them (the run's main thread; the assets' own worker threads are inside their wall time).
The rest of the main thread's time is Dagster's. In wall seconds that rest also holds the waits
for Python's lock while an asset's worker threads, still running after it yielded a first result
(the views, the online store beside the training set), hold it; its CPU seconds are Dagster's
own work alone.

It swaps each asset's compute function for a timed one for the length of a ``with`` block and
puts the originals back after (``OpDefinition._compute_fn``: Dagster internals, as in
:mod:`pipelines.dagster_storage`; Dagster is pinned below 1.14). Only the benches use it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from dagster import AssetsDefinition
from dagster._core.definitions.decorators.op_decorator import DecoratedOpFunction

from pipelines.resources import WarehouseResource

# the warehouse resource's methods a run calls around its steps (opening and closing the file)
_RESOURCE_HOOKS = ("setup_for_execution", "teardown_after_execution")


class AssetCodeClock:
    """Seconds spent in the assets' own code (and the warehouse resource's set-up and
    tear-down) during the runs made inside :meth:`timing`: wall seconds, and CPU seconds of the
    thread that ran them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def _add(self, started: float, cpu_started: float) -> None:
        self.seconds += time.perf_counter() - started
        self.cpu_seconds += time.thread_time() - cpu_started

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def timed_generator(*args: Any, **kwargs: Any) -> Iterator[Any]:
                results = fn(*args, **kwargs)
                try:
                    while True:
                        started, cpu_started = time.perf_counter(), time.thread_time()
                        try:
                            item = next(results)
                        except StopIteration:
                            return
                        finally:
                            self._add(started, cpu_started)
                        yield item  # Dagster handles the item: not counted
                finally:
                    results.close()

            return timed_generator

        @functools.wraps(fn)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(started, cpu_started)

        return timed_call

    @contextlib.contextmanager
    def timing(self, assets: Sequence[AssetsDefinition]) -> Iterator[AssetCodeClock]:
        """Runs made inside the block add their assets' time to :attr:`seconds` and
        :attr:`cpu_seconds`."""
        swapped: list[tuple[Any, Any]] = []
        hooks = {name: WarehouseResource.__dict__[name] for name in _RESOURCE_HOOKS}
        try:
            for asset in assets:
                op = asset.op
                compute = op._compute_fn
                if isinstance(compute, DecoratedOpFunction):
                    timed = compute._replace(decorated_fn=self._timed(compute.decorated_fn))
                    op._compute_fn = timed
                    swapped.append((op, compute))
            for name, method in hooks.items():
                setattr(WarehouseResource, name, self._timed(method))
            yield self
        finally:
            for op, compute in swapped:
                op._compute_fn = compute
            for name, method in hooks.items():
                setattr(WarehouseResource, name, method)
