"""Warehouse work side by side on cursors (pipelines.parallel), on a real DuckDB file."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
import pytest

from pipelines.parallel import duckdb_threads_beside, in_background, on_cursors


def test_pieces_overlap_and_results_keep_the_order_given() -> None:
    # both pieces wait for each other: they finish only if they run at the same time
    meeting = threading.Barrier(2, timeout=10)

    def work(cursor: duckdb.DuckDBPyConnection, item: int) -> int:
        meeting.wait()
        ((value,),) = cursor.execute("SELECT ? * 10", [item]).fetchall()
        return int(value)

    con = duckdb.connect()
    assert list(on_cursors(con, work, [2, 1], workers=2)) == [(2, 20), (1, 10)]


def test_largest_pieces_start_first() -> None:
    started: list[str] = []

    def work(_: duckdb.DuckDBPyConnection, item: str) -> str:
        started.append(item)
        return item.upper()

    items = ["small", "largest", "middle"]
    sizes = {"small": 1, "largest": 30, "middle": 5}
    found = list(on_cursors(duckdb.connect(), work, items, size=sizes.__getitem__, workers=1))
    assert started == ["largest", "middle", "small"]
    assert found == [("small", "SMALL"), ("largest", "LARGEST"), ("middle", "MIDDLE")]


def test_a_failure_is_raised_after_the_others_committed(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("CREATE TABLE ledger (piece VARCHAR, n INTEGER)")
    con.execute("INSERT INTO ledger VALUES ('a', 0), ('b', 0), ('c', 0)")

    def work(cursor: duckdb.DuckDBPyConnection, piece: str) -> str:
        # each piece rewrites its own rows of one shared table, in a transaction of its own
        cursor.execute("BEGIN TRANSACTION")
        cursor.execute("DELETE FROM ledger WHERE piece = ?", [piece])
        cursor.execute("INSERT INTO ledger VALUES (?, 1)", [piece])
        if piece == "b":
            cursor.execute("ROLLBACK")
            raise ValueError("piece b failed")
        cursor.execute("COMMIT")
        return piece

    done: list[str] = []
    with pytest.raises(ValueError, match="piece b failed"):
        for piece, _ in on_cursors(con, work, ["a", "b", "c"], workers=2):
            done.append(piece)
    assert done == ["a", "c"]
    found = con.execute("SELECT piece, n FROM ledger ORDER BY piece").fetchall()
    assert found == [("a", 1), ("b", 0), ("c", 1)]


def test_cursors_keep_the_connections_time_zone() -> None:
    con = duckdb.connect()
    # a zone no test machine runs in: a bare cursor would start with the machine's
    con.execute("SET TimeZone = 'Pacific/Chatham'")

    def zone(cursor: duckdb.DuckDBPyConnection, _: int) -> str:
        ((value,),) = cursor.execute("SELECT current_setting('TimeZone')").fetchall()
        return str(value)

    assert {z for _, z in on_cursors(con, zone, [1, 2, 3], workers=2)} == {"Pacific/Chatham"}


def test_background_work_runs_beside_the_block_and_keeps_its_error() -> None:
    con = duckdb.connect()
    meeting = threading.Barrier(2, timeout=10)

    def work(cursor: duckdb.DuckDBPyConnection) -> int:
        meeting.wait()  # returns only while the block below waits too
        ((value,),) = cursor.execute("SELECT 42").fetchall()
        return int(value)

    with in_background(con, work) as result:
        meeting.wait()
        assert result() == 42

    def failing(_: duckdb.DuckDBPyConnection) -> int:
        raise LookupError("no canaries")

    with in_background(con, failing) as result, pytest.raises(LookupError, match="no canaries"):
        result()


def test_pieces_that_run_alone_have_nothing_beside_them() -> None:
    lock = threading.Lock()
    running: set[str] = set()
    seen_beside: dict[str, set[str]] = {}

    def work(_: duckdb.DuckDBPyConnection, item: str) -> str:
        with lock:
            running.add(item)
            for other in running:
                seen_beside.setdefault(other, set()).update(running - {other})
        threading.Event().wait(0.2)  # long enough for a second thread to start beside it
        with lock:
            running.discard(item)
        return item

    items = ["full-a", "small-1", "full-b", "small-2", "small-3"]
    found = list(
        on_cursors(duckdb.connect(), work, items, alone=lambda i: i.startswith("full"), workers=2)
    )
    assert [item for item, _ in found] == items
    assert not seen_beside.get("full-a") and not seen_beside.get("full-b")
    assert any(seen_beside.get(f"small-{n}") for n in (1, 2, 3))  # the rest overlap


def test_a_result_is_handed_on_while_later_pieces_run() -> None:
    """The second piece waits until the first one's result has reached the caller, so it is
    still running when that result arrives; a caller that stops there still finds every piece
    ended when it leaves."""
    first_received = threading.Event()
    ended: list[int] = []

    def work(_: duckdb.DuckDBPyConnection, item: int) -> int:
        if item == 2:
            first_received.wait(timeout=5)
        ended.append(item)
        return item * 10

    results = on_cursors(duckdb.connect(), work, [1, 2], workers=2)
    for item, value in results:
        assert (item, value, ended) == (1, 10, [1])  # the second piece has not ended yet
        first_received.set()
        break
    results.close()
    assert sorted(ended) == [1, 2]
    assert list(on_cursors(duckdb.connect(), work, [1, 2], workers=2)) == [(1, 10), (2, 20)]


def _threads(con: duckdb.DuckDBPyConnection) -> int:
    ((value,),) = con.execute("SELECT current_setting('threads')").fetchall()
    return int(value)


def test_duckdb_threads_beside_fill_the_cores_and_no_more() -> None:
    # each thread issuing a query works on it: workers + (threads - 1) == cores, at least 1
    for cores in range(1, 17):
        for workers in range(1, 5):
            threads = duckdb_threads_beside(workers, cores)
            busy = workers + threads - 1
            assert threads >= 1
            assert busy == cores if workers <= cores else threads == 1


def test_side_by_side_pieces_run_on_fewer_threads_until_the_last_ends(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    default = _threads(con)
    inner_seen: list[int] = []

    def work(cursor: duckdb.DuckDBPyConnection, item: int) -> int:
        if item == 1:
            # a piece's own side-by-side section, nested: it shares the lowered setting and
            # leaves it lowered for the outer one when it ends
            inner = list(on_cursors(cursor, lambda c, _: _threads(c), [1, 2], workers=2))
            inner_seen.extend(value for _, value in inner)
        return _threads(cursor)

    found = dict(on_cursors(con, work, [1, 2, 3], workers=2))
    lowered = duckdb_threads_beside(2)
    assert set(found.values()) == {lowered}
    assert inner_seen == [lowered, lowered]
    assert _threads(con) == default  # reset once the last section ended
    with in_background(con, _threads) as result:
        assert result() == lowered == _threads(con)
    assert _threads(con) == default


def test_a_failing_or_abandoned_section_still_resets_the_threads(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    default = _threads(con)

    def failing(cursor: duckdb.DuckDBPyConnection, item: int) -> int:
        if item == 2:
            raise ValueError("piece 2 failed")
        return _threads(cursor)

    with pytest.raises(ValueError, match="piece 2 failed"):
        list(on_cursors(con, failing, [1, 2], workers=2))
    assert _threads(con) == default
    results = on_cursors(con, lambda c, _: _threads(c), [1, 2, 3], workers=2)
    next(results)
    results.close()  # the caller stopped early
    assert _threads(con) == default


def test_an_in_memory_database_keeps_its_threads() -> None:
    con = duckdb.connect()
    con.execute("SET threads = 3")
    found = {v for _, v in on_cursors(con, lambda c, _: _threads(c), [1, 2], workers=2)}
    assert found == {3} and _threads(con) == 3
