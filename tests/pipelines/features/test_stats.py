from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.features.stats import (
    BINS,
    CELL_INCHES,
    DPI,
    GRID_COLUMNS,
    TITLE_INCHES,
    TOP_CODES,
    Distribution,
    distributions,
    null_rates,
    plot_distributions,
)

START = datetime(2015, 1, 1, tzinfo=UTC)
# numpy's bin edges themselves: a value on an edge is where a plain division lands one bin off
EDGES = list(np.linspace(0.1, 7.3, BINS + 1))
CODES = [f"code-{i:02d}" for i in range(12)]
BLUE_RGB, GREY_RGB = (0x44, 0x77, 0xAA), (0x99, 0x99, 0x99)
HEADROOM = 1.05  # a count axis runs 5 % past the panel's largest count


def _value(rng: np.random.Generator, i: int) -> float | None:
    """Every third patient on an edge (both ends included, so the range is the edges' range)."""
    if i % 3 == 0:
        return float(EDGES[(i // 3) % len(EDGES)])
    return None if rng.random() < 0.2 else float(rng.uniform(0.1, 7.3))


def _patient(rng: np.random.Generator, i: int) -> list[dict[str, Any]]:
    """A patient's rows, oldest first; older rows hold outliers that only a wrong "latest" sees."""
    rows = []
    count = int(rng.integers(1, 4))
    for k in range(count):
        latest = k == count - 1
        rows.append(
            {
                "patient_id": f"p{i:04d}",
                "event_timestamp": START + timedelta(days=30 * k + int(rng.integers(0, 29))),
                "created": START,
                "age": None if rng.random() < 0.1 else int(rng.integers(0, 91)),
                "value": _value(rng, i),
                "outlier": 1e6 if not latest else float(rng.normal(50, 10)),
                "constant": 5.0,
                "empty": None,
                "flag": None if rng.random() < 0.1 else bool(rng.random() < 0.3),
                "code": None if rng.random() < 0.1 else CODES[int(rng.zipf(1.6)) % len(CODES)],
                "seen_at": START + timedelta(days=int(rng.integers(0, 3650))),
            }
        )
    return rows


def _table(seed: int) -> tuple[duckdb.DuckDBPyConnection, list[dict[str, Any]]]:
    """``features.t`` in DuckDB and each patient's latest row, picked in plain Python."""
    rng = np.random.default_rng(seed)
    patients = [_patient(rng, i) for i in range(300)]
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE SCHEMA features")
    frame = pd.DataFrame([row for rows in patients for row in rows])
    con.register("frame", frame)
    con.execute(
        "CREATE TABLE features.t AS SELECT patient_id, event_timestamp::TIMESTAMPTZ AS "
        "event_timestamp, created::TIMESTAMPTZ AS created, age::BIGINT AS age, "
        "value::DOUBLE AS value, outlier::DOUBLE AS outlier, constant::DOUBLE AS constant, "
        "empty::DOUBLE AS empty, flag::BOOLEAN AS flag, code::VARCHAR AS code, "
        "seen_at::TIMESTAMPTZ AS seen_at FROM frame"
    )
    latest = [max(rows, key=lambda r: r["event_timestamp"]) for rows in patients]
    return con, latest


def _present(latest: list[dict[str, Any]], column: str) -> list[Any]:
    return [r[column] for r in latest if r[column] is not None and not pd.isna(r[column])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_counts_match_numpy_on_the_latest_rows(seed: int) -> None:
    con, latest = _table(seed)
    found = {d.feature: d for d in distributions(con, "t")}
    assert list(found) == [
        "age",
        "value",
        "outlier",
        "constant",
        "empty",
        "flag",
        "code",
        "seen_at",
    ]
    years = {"seen_at": lambda v: v.year}
    for column in ("age", "value", "outlier", "constant", "seen_at"):
        values = [years.get(column, float)(v) for v in _present(latest, column)]
        counts, edges = np.histogram(np.array(values, dtype=float), bins=BINS)
        d = found[column]
        assert d.counts == tuple(int(n) for n in counts), column
        np.testing.assert_array_equal(d.edges, edges)
        assert (d.rows, d.present) == (len(latest), len(values))
    np.testing.assert_array_equal(found["value"].edges, EDGES)
    assert found["outlier"].high < 1e6  # older rows are not counted
    assert found["seen_at"].kind == "year"
    assert found["empty"].counts == () and found["empty"].present == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_flag_and_code_counts_match_python(seed: int) -> None:
    con, latest = _table(seed)
    found = {d.feature: d for d in distributions(con, "t")}
    flags = Counter(_present(latest, "flag"))
    assert found["flag"].labels == ("false", "true")
    assert found["flag"].counts == (flags[False], flags[True])
    codes = sorted(Counter(_present(latest, "code")).items(), key=lambda p: (-p[1], p[0]))
    top = codes[:TOP_CODES]
    assert len(codes) > TOP_CODES  # the cut is exercised
    assert found["code"].labels == tuple(c for c, _ in top)
    assert found["code"].counts == tuple(n for _, n in top)
    assert found["code"].present == sum(n for _, n in codes)


def _frame(cell: np.ndarray) -> tuple[int, int, int, int]:
    """Left, top, right, bottom pixel of a panel's frame: the only long straight dark lines."""
    dark = np.all(cell < 80, axis=-1)
    columns = np.flatnonzero(dark.sum(axis=0) > cell.shape[0] // 2)
    rows = np.flatnonzero(dark.sum(axis=1) > cell.shape[1] // 2)
    assert len(columns) == 2 and len(rows) == 2, (columns, rows)
    return int(columns[0]), int(rows[0]), int(columns[1]), int(rows[1])


def _lengths(bars: np.ndarray, axis: int) -> set[int]:
    """The distinct bar lengths of a panel: colored pixels per column (axis 0) or row (1)."""
    return {int(n) for n in bars.sum(axis=axis) if n}


def _assert_bars(panel: np.ndarray, d: Distribution) -> None:
    """Bar lengths in pixels are proportional to the counts (within 2 px of rounding)."""
    height, width = panel.shape[:2]
    blue = np.all(panel == BLUE_RGB, axis=-1)
    if d.kind == "flag":  # shares of the present values: false grey, true blue
        grey = np.all(panel == GREY_RGB, axis=-1)
        for bars, n in ((grey, d.counts[0]), (blue, d.counts[1])):
            assert max(_lengths(bars, 0), default=0) == pytest.approx(n / d.present * height, abs=2)
        return
    top = max(d.counts) * HEADROOM
    # codes are horizontal bars as long as the frame is wide; numbers vertical, as it is high
    found = _lengths(blue, 1) if d.kind == "code" else _lengths(blue, 0)
    full = width if d.kind == "code" else height
    expected = [n / top * full for n in d.counts if n]
    assert max(found) == pytest.approx(max(d.counts) / top * full, abs=2), d.feature
    for length in found:  # no bar but of some count
        assert min(abs(length - e) for e in expected) <= 2, (d.feature, length, expected)
    for e in expected:  # and every count has its bar
        assert min(abs(length - e) for length in found) <= 2, (d.feature, e, found)


def test_plot_writes_a_valid_png_with_bars(tmp_path: Path) -> None:
    con, _ = _table(0)
    found = distributions(con, "t")
    path = plot_distributions(con, "t", tmp_path / "stats" / "t.png")
    assert path == tmp_path / "stats" / "t.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    rows = -(-len(found) // GRID_COLUMNS)
    size = (GRID_COLUMNS * CELL_INCHES[0] * DPI, (rows * CELL_INCHES[1] + TITLE_INCHES) * DPI)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(size[0]), round(size[1])) == (960, 384)
        pixels = np.asarray(image.convert("RGB"))
    cell_w, cell_h = round(CELL_INCHES[0] * DPI), round(CELL_INCHES[1] * DPI)
    title_h = round(TITLE_INCHES * DPI)
    assert not np.all(pixels[:title_h] == BLUE_RGB, axis=-1).any()  # only the title up there
    for k, d in enumerate(found):
        row, col = divmod(k, GRID_COLUMNS)
        cell = pixels[title_h + row * cell_h :][:cell_h, col * cell_w :][:, :cell_w]
        left, top, right, bottom = _frame(cell)
        assert (bottom - top, right - left) == (112, 180)  # the 1.4 x 2.25 inch plot area
        panel = cell[top + 1 : bottom, left + 1 : right]
        if not d.present:
            assert d.feature == "empty"
            assert not np.all(panel == BLUE_RGB, axis=-1).any()
            continue
        assert np.all(panel == BLUE_RGB, axis=-1).sum() > 100, d.feature
        _assert_bars(panel, d)


def test_a_plot_is_drawn_again_only_when_its_distributions_change(tmp_path: Path) -> None:
    con, _ = _table(0)
    path = tmp_path / "t.png"
    first = plot_distributions(con, "t", path).stat()

    def kept() -> bool:  # neither renamed over nor written in place
        now = plot_distributions(con, "t", path).stat()
        return (now.st_ino, now.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    time.sleep(0.01)  # a file written again would show another modification time
    # the same latest rows: the file is kept
    assert kept()
    # an older row changed, which no latest-row distribution reads: still kept
    con.execute(
        "UPDATE features.t SET outlier = 2e6 WHERE outlier = 1e6 AND patient_id = "
        "(SELECT patient_id FROM features.t WHERE outlier = 1e6 LIMIT 1)"
    )
    assert kept()
    # a new patient changes the counts: drawn again, and it records what it was drawn from
    before = path.read_bytes()
    con.execute(
        "INSERT INTO features.t SELECT 'p9999', event_timestamp, created, age, value, outlier, "
        "constant, empty, flag, code, seen_at FROM features.t LIMIT 1"
    )
    again = plot_distributions(con, "t", path)
    assert again.stat().st_ino != first.st_ino and again.read_bytes() != before
    with Image.open(again) as image:
        image.verify()
    # a PNG that records nothing (drawn by an older version, or not by us) is drawn again
    Image.new("RGB", (4, 4)).save(path, format="PNG")
    plain = path.stat().st_ino
    with Image.open(plot_distributions(con, "t", path)) as image:
        assert image.size == (960, 384)
    assert path.stat().st_ino != plain
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_of_an_empty_table_and_a_table_without_features(tmp_path: Path) -> None:
    con, _ = _table(0)
    con.execute("CREATE TABLE features.none AS SELECT * FROM features.t LIMIT 0")
    con.execute(
        "CREATE TABLE features.keys AS SELECT patient_id, event_timestamp, created FROM features.t"
    )
    assert all(d.counts in ((), (0, 0)) for d in distributions(con, "none"))
    for name in ("none", "keys"):
        path = plot_distributions(con, name, tmp_path / f"{name}.png")
        with Image.open(path) as image:
            image.verify()
    assert distributions(con, "keys") == []


def test_null_rates_over_all_rows() -> None:
    con, _ = _table(0)
    rows = con.execute("SELECT count(*), count(age), count(empty) FROM features.t").fetchone()
    assert rows is not None
    rates = null_rates(con, "t")
    assert rates["age"] == round(1 - rows[1] / rows[0], 4)
    assert rates["empty"] == 1.0 and rates["constant"] == 0.0
