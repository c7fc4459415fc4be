"""Independent pieces of warehouse work (one view's refresh, one feature table's statistics) run
side by side, each on its own cursor of the step's connection.

A cursor is a second connection to the same DuckDB database: it has its own transaction, and
DuckDB lets transactions that touch different rows commit side by side. Half of such work is
Python (FHIRPath, the leak scan, drawing) and half DuckDB, which runs without holding Python's
lock, so a second thread overlaps the two; more threads add memory, not speed, on a machine
whose DuckDB already uses every core for each query.

While pieces run side by side, the database runs each query on fewer threads of its own
(:func:`duckdb_threads_beside`): DuckDB's ``threads`` counts the thread that issued a query
with its own workers, so two cursors each running a query on a two-core machine with the
default setting keep three threads busy on two cores. With one thread each, a release after a
1 % batch at 1,000 patients took 0.05-0.30 s less (medians of four rounds of 10-15 alternating
pairs; docs/benchmarks.md) and a full release as long as before. The setting belongs to the
database, not to a cursor: it is lowered when the first side-by-side section of a database
file begins and reset to DuckDB's default when the last one ends (an in-memory database,
scratch work, is left as it is).

Every piece runs to its end even when another fails (each is its own transaction, so a failure
leaves the others' work whole); the results come back in the order of the pieces, and the first
failure is raised after the last result.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import duckdb

from vault.warehouse import database_path

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

MAX_WORKERS = 2
# side-by-side sections running, per database file (see duckdb_threads_beside)
_SECTIONS: dict[str, int] = {}
_SECTIONS_LOCK = threading.Lock()
# settings the platform sets per connection (pipelines.features.refresh sets the time zone)
_SESSION_SETTINGS = ("TimeZone",)


def default_workers() -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def duckdb_threads_beside(workers: int, cores: int | None = None) -> int:
    """DuckDB's ``threads`` while ``workers`` threads each run queries side by side: each one
    issuing a query works on it too, so ``threads - 1`` workers of DuckDB's own beside them
    fill the machine's cores and no more."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores - workers + 1)


@contextlib.contextmanager
def side_by_side(con: duckdb.DuckDBPyConnection, workers: int) -> Iterator[None]:
    """A section in which ``workers`` threads run queries on cursors of ``con``'s database:
    the database's ``threads`` lowered to :func:`duckdb_threads_beside` from the first such
    section to the end of the last (nested or overlapping sections share it)."""
    file = database_path(con)
    if file is None:
        yield
        return
    path = str(file)
    with _SECTIONS_LOCK:
        if not _SECTIONS.get(path):
            con.execute(f"SET threads = {duckdb_threads_beside(workers)}")
        _SECTIONS[path] = _SECTIONS.get(path, 0) + 1
    try:
        yield
    finally:
        with _SECTIONS_LOCK:
            _SECTIONS[path] -= 1
            if not _SECTIONS[path]:
                del _SECTIONS[path]
                # a caller that closed its connection first closed the database with it, or
                # left it open elsewhere on fewer threads: slower, never wrong
                with contextlib.suppress(duckdb.ConnectionException):
                    con.execute("RESET threads")


def on_cursors(
    con: duckdb.DuckDBPyConnection,
    work: Callable[[duckdb.DuckDBPyConnection, ItemT], ResultT],
    items: Sequence[ItemT],
    *,
    size: Callable[[ItemT], float] | None = None,
    alone: Callable[[ItemT], bool] | None = None,
    workers: int | None = None,
) -> Iterator[tuple[ItemT, ResultT]]:
    """``work(cursor, item)`` for every item, up to ``workers`` at a time (each on a cursor of
    ``con`` of its own, closed after it); yields ``(item, result)`` in the order of ``items``
    for every piece that succeeded, each as soon as it has ended, then raises the first
    failure; it returns (or raises) only once every piece has ended.
    With ``size`` (a guess of each piece's work), the largest pieces start first, so that the
    longest one does not start last. Pieces for which ``alone`` holds (Python alone, which two
    threads only slow down) run first, one at a time, with nothing beside them."""

    settings = _session_settings(con)

    def run(item: ItemT) -> ResultT:
        return _on_own_cursor(con, settings, lambda cursor: work(cursor, item))

    count = workers or default_workers()
    order = list(range(len(items)))
    if size is not None:
        weights = [size(item) for item in items]
        order.sort(key=lambda i: -weights[i])
    solo = [i for i in order if alone is not None and alone(items[i])]
    side_by_side_items = [i for i in order if i not in solo]
    futures = {i: _settled(run, items[i]) for i in solo}
    if count <= 1 or len(side_by_side_items) <= 1:
        futures.update({i: _settled(run, items[i]) for i in side_by_side_items})
        yield from _in_order(items, futures)
        return
    # each result is handed on as soon as it and those before it are done, while the rest still
    # run (the caller's own work, a Dagster step's events, overlaps theirs); leaving the block,
    # even when the caller stops early, waits for every piece to end
    with (
        side_by_side(con, count),
        ThreadPoolExecutor(count, thread_name_prefix="warehouse") as pool,
    ):
        futures.update({i: pool.submit(run, items[i]) for i in side_by_side_items})
        yield from _in_order(items, futures)


def _in_order(
    items: Sequence[ItemT], futures: dict[int, Future[ResultT]]
) -> Iterator[tuple[ItemT, ResultT]]:
    """``(item, result)`` of the pieces that succeeded, in the order of ``items`` (each waited
    for in turn), then the first failure raised."""
    failure: BaseException | None = None
    for i, item in enumerate(items):
        future = futures[i]
        error = future.exception()
        if error is None:
            yield item, future.result()
        elif failure is None:
            failure = error
    if failure is not None:
        raise failure


@contextlib.contextmanager
def in_background(
    con: duckdb.DuckDBPyConnection, work: Callable[[duckdb.DuckDBPyConnection], ResultT]
) -> Iterator[Callable[[], ResultT]]:
    """``work(cursor)`` started in a thread on a cursor of ``con`` of its own while the block
    runs; the block gets a function that waits for its result (or raises its error). Leaving
    the block waits for the work to end."""
    settings = _session_settings(con)
    # two side by side: the background thread and the block's own
    with side_by_side(con, 2), ThreadPoolExecutor(1, thread_name_prefix="warehouse") as pool:
        future = pool.submit(_on_own_cursor, con, settings, work)
        yield future.result


def _on_own_cursor(
    con: duckdb.DuckDBPyConnection,
    settings: list[str],
    work: Callable[[duckdb.DuckDBPyConnection], ResultT],
) -> ResultT:
    """``work`` on a new cursor of ``con`` given ``settings``, closed after it."""
    cursor = con.cursor()
    try:
        for statement in settings:
            cursor.execute(statement)
        return work(cursor)
    finally:
        cursor.close()


def _session_settings(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The statements that give a cursor the settings of ``con`` that belong to a connection,
    not to the database (a cursor starts with the machine's time zone: a feature's year would
    move with it)."""
    statements = []
    for setting in _SESSION_SETTINGS:
        found = con.execute("SELECT current_setting(?)", [setting]).fetchone()
        if found is not None and found[0] is not None:
            value = str(found[0]).replace("'", "''")
            statements.append(f"SET {setting} = '{value}'")
    return statements


def _settled(run: Callable[[ItemT], ResultT], item: ItemT) -> Future[ResultT]:
    """``run(item)`` done now, its outcome kept as a finished future (as the pool's are)."""
    future: Future[ResultT] = Future()
    try:
        future.set_result(run(item))
    except Exception as error:  # kept, and raised after the other pieces
        future.set_exception(error)
    return future
