from __future__ import annotations

import re
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

from pipelines.features import stats
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

K = 5  # the platform's default k, which distributions and plot_distributions apply unless told

START = datetime(2015, 1, 1, tzinfo=UTC)
# numpy's bin edges themselves: a value on an edge is where a plain division lands one bin off.
# K - 1 patients lie beyond each end, so with k = K these edges are the histogram's own (the
# range runs from the K-th smallest to the K-th largest value)
EDGES = list(np.linspace(0.1, 7.3, BINS + 1))
LOW_OUTLIERS, HIGH_OUTLIERS = (1, 4, 7, 10), (13, 16, 19, 22)
CODES = [f"code-{i:02d}" for i in range(12)]
BLUE_RGB, GREY_RGB = (0x44, 0x77, 0xAA), (0x99, 0x99, 0x99)
HEADROOM = 1.05  # a count axis runs 5 % past the panel's largest count


def _value(rng: np.random.Generator, i: int) -> float | None:
    """Every third patient on an edge (5 on the first, 4 on the last), and K - 1 patients far
    beyond each end."""
    if i in LOW_OUTLIERS:
        return -50.0
    if i in HIGH_OUTLIERS:
        return 1000.0
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


def _k_th(values: list[float], k: int) -> tuple[float, float]:
    """The k-th smallest and the k-th largest value."""
    ordered = sorted(values)
    return ordered[k - 1], ordered[-k]


def _assert_shown(d: Distribution, expected: list[int], k: int) -> None:
    """``d.counts`` are ``expected`` (the true counts, in order) as a panel may show them: every
    count under k (but not 0) hidden, any other count shown as it is, and hidden beside those
    only when the patients the shown counts leave out would otherwise be fewer than k; at least
    k (or none) are left out, so the total cannot give a hidden count either."""
    assert len(d.counts) == len(expected), d.feature
    for shown, n in zip(d.counts, expected, strict=True):
        assert shown == n or shown is None, d.feature
        if 0 < n < k:
            assert shown is None, (d.feature, n)
    assert not any(n is not None and 0 < n < k for n in d.counts), d.feature
    left_out = d.present - sum(n or 0 for n in d.counts)
    assert left_out == 0 or left_out >= k, (d.feature, left_out)
    hidden_large = [n for s, n in zip(d.counts, expected, strict=True) if s is None and n >= k]
    if hidden_large:  # only to cover a remainder under k, and one is enough
        assert len(hidden_large) == 1, d.feature
        assert 0 < left_out - hidden_large[0] < k, d.feature


@pytest.mark.parametrize(("seed", "k"), [(0, 1), (1, 1), (2, 1), (0, K), (1, K), (2, K)])
def test_histogram_counts_match_numpy_on_the_latest_rows(seed: int, k: int) -> None:
    """k = 1 shows every group: the histogram is numpy's over the values as they are. With
    k = K the range runs from the K-th smallest to the K-th largest value (an end is never one
    patient's value, as min and max are) and the counts are numpy's over the values clipped
    to it, each under K hidden."""
    con, latest = _table(seed)
    found = {d.feature: d for d in distributions(con, "t", k)}
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
        low, high = _k_th(values, k)
        assert sum(v <= low for v in values) >= k and sum(v >= high for v in values) >= k
        clipped = np.clip(np.array(values, dtype=float), low, high)
        counts, edges = np.histogram(clipped, bins=BINS)
        d = found[column]
        if k == 1:
            assert d.counts == tuple(int(n) for n in counts), column
        _assert_shown(d, [int(n) for n in counts], k)
        np.testing.assert_array_equal(d.edges, edges)
        assert (d.rows, d.present) == (len(latest), len(values))
    assert found["constant"].single and found["constant"].edges[0] == 4.5  # numpy's widening
    if k == 1:
        assert (found["value"].low, found["value"].high) == (-50.0, 1000.0)
    else:  # the outliers beyond are counted at the ends, which are K patients' values
        np.testing.assert_array_equal(found["value"].edges, EDGES)
    assert found["outlier"].high < 1e6  # older rows are not counted
    assert found["seen_at"].kind == "year"
    assert found["empty"].counts == () and found["empty"].present == 0


@pytest.mark.parametrize(("seed", "k"), [(0, 1), (1, 1), (0, K), (1, K)])
def test_flag_and_code_counts_match_python(seed: int, k: int) -> None:
    """The most frequent codes of at least k patients are named (with k = 1, simply the most
    frequent); the patients of rarer codes make one "other" bar, shown only when it is k or
    more."""
    con, latest = _table(seed)
    found = {d.feature: d for d in distributions(con, "t", k)}
    flags = Counter(_present(latest, "flag"))
    assert found["flag"].labels == ("false", "true")
    assert found["flag"].counts == (flags[False], flags[True])  # both well over K
    codes = sorted(Counter(_present(latest, "code")).items(), key=lambda p: (-p[1], p[0]))
    top = [(c, n) for c, n in codes if n >= k][:TOP_CODES]
    rare = sum(n for _, n in codes if n < k)
    assert len(codes) > TOP_CODES  # the cut is exercised
    if k > 1:  # seed 0: the "other" bar is under k, so hidden; seed 1: it is shown
        assert (0 < rare < k, rare >= k) == (seed == 0, seed == 1)
        top.append((f"other (<{k})", rare))
    assert found["code"].labels == tuple(c for c, _ in top)
    _assert_shown(found["code"], [n for _, n in top], k)
    if k == 1:
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
    """Bar lengths in pixels are proportional to the shown counts (within 2 px of rounding),
    and a hidden count has no bar."""
    height, width = panel.shape[:2]
    blue = np.all(panel == BLUE_RGB, axis=-1)
    if d.kind == "flag":  # shares of the present values: false grey, true blue
        grey = np.all(panel == GREY_RGB, axis=-1)
        for bars, n in ((grey, d.counts[0]), (blue, d.counts[1])):
            share = (n or 0) / d.present * height
            assert max(_lengths(bars, 0), default=0) == pytest.approx(share, abs=2)
        return
    shown = [n for n in d.counts if n]
    top = max(shown) * HEADROOM
    # codes are horizontal bars as long as the frame is wide; numbers vertical, as it is high
    found = _lengths(blue, 1) if d.kind == "code" else _lengths(blue, 0)
    full = width if d.kind == "code" else height
    expected = [n / top * full for n in shown]
    assert max(found) == pytest.approx(max(shown) / top * full, abs=2), d.feature
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


# A small cohort of 40 patients with one extreme value per feature (a creatinine of 25, a stay
# of 173 days, a heart rate of 250, an admission in 1990), a lab only 7 patients have, a flag 3
# patients hold and codes of 2 and 1 patients: each of them a group of fewer than K.
COHORT = 40
EXTREMES = {"creatinine": 25.0, "stay_days": 173, "heart_rate": 250.0, "admitted": 1990}


def _cohort_row(i: int, latest: bool) -> dict[str, Any]:
    last = i == COHORT - 1
    if not latest:  # an older row, which no distribution reads
        return {
            "patient_id": f"c{i:02d}",
            "event_timestamp": START,
            "created": START,
            "creatinine": 99.0,
            "stay_days": 999,
            "heart_rate": 999.0,
            "admitted": datetime(1900, 1, 1, tzinfo=UTC),
            "rare_lab": 99.0,
            "smoker": True,
            "dx": "old-dx",
        }
    dx = "A" if i < 20 else "B" if i < 30 else "C" if i < 32 else "rare-dx" if i == 32 else None
    return {
        "patient_id": f"c{i:02d}",
        "event_timestamp": START + timedelta(days=30),
        "created": START,
        "creatinine": None if i == 0 else 25.0 if last else 0.6 + (i % 9) * 0.1,
        "stay_days": 173 if last else 1 + i % 10,
        "heart_rate": 250.0 if last else 60.0 + i,
        "admitted": datetime(1990 if last else 2016 + i % 8, 6, 1, tzinfo=UTC),
        "rare_lab": float(i) if i < 7 else None,
        "smoker": i < 3,
        "dx": dx,
    }


def _cohort() -> tuple[duckdb.DuckDBPyConnection, list[dict[str, Any]]]:
    """``features.t`` of the cohort in DuckDB, and each patient's latest row."""
    latest = [_cohort_row(i, latest=True) for i in range(COHORT)]
    older = [_cohort_row(i, latest=False) for i in range(COHORT)]
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("CREATE SCHEMA features")
    con.register("frame", pd.DataFrame(older + latest))
    con.execute(
        "CREATE TABLE features.t AS SELECT patient_id, event_timestamp::TIMESTAMPTZ AS "
        "event_timestamp, created::TIMESTAMPTZ AS created, creatinine::DOUBLE AS creatinine, "
        "stay_days::BIGINT AS stay_days, heart_rate::DOUBLE AS heart_rate, "
        "admitted::TIMESTAMPTZ AS admitted, rare_lab::DOUBLE AS rare_lab, "
        "smoker::BOOLEAN AS smoker, dx::VARCHAR AS dx FROM frame"
    )
    return con, latest


def _cohort_values(latest: list[dict[str, Any]], column: str) -> list[float]:
    as_number = (lambda v: float(v.year)) if column == "admitted" else float
    return [as_number(v) for v in _present(latest, column)]


def test_an_axis_runs_from_the_kth_smallest_to_the_kth_largest_value() -> None:
    """No end of an axis is a value fewer than K patients reach: min and max were one
    patient's own (a creatinine of 25 spanned the axis to 25 with one patient in the last bin).
    The values beyond are counted in the end bins, and the counts are numpy's over the values
    clipped to the range, except those under K."""
    con, latest = _cohort()
    found = {d.feature: d for d in distributions(con, "t")}  # the default k, the platform's
    for column, extreme in EXTREMES.items():
        values = _cohort_values(latest, column)
        ordered = sorted(values)
        low, high = ordered[K - 1], ordered[-K]  # the K-th smallest and the K-th largest
        d = found[column]
        assert (d.low, d.high) == (low, high), column
        assert d.k == K and not d.single
        assert not d.low <= extreme <= d.high, column
        # at least K patients at or beyond each end: neither end singles anyone out
        assert sum(v <= d.low for v in values) >= K and sum(v >= d.high for v in values) >= K
        counts, edges = np.histogram(np.clip(values, low, high), bins=BINS)
        np.testing.assert_array_equal(d.edges, edges)
        _assert_shown(d, [int(n) for n in counts], K)
        # the end bins hold every value beyond them (and are never hidden: K or more each)
        assert d.counts[0] == int(counts[0]) >= sum(v <= low for v in values), column
        assert d.counts[-1] == int(counts[-1]) >= sum(v >= high for v in values), column
        assert sum(n or 0 for n in d.counts) + sum(n is None for n in d.counts) <= len(values)
    # stays and heart rates of one or two patients a bin: most bins are hidden
    assert any(n is None for n in found["heart_rate"].counts)
    # a feature of fewer than 2K values has no range at all
    assert found["rare_lab"].present == 7 and found["rare_lab"].counts == ()


def test_no_count_under_k_is_shown_or_drawn(tmp_path: Path, monkeypatch: Any) -> None:
    """Neither the distributions nor the panels drawn from them give a count of 1 to K - 1
    patients: not as a bin, a flag, a code (nor its name), an end of an axis, a null share, nor
    as what the shown counts leave out of the patients with a value."""
    con, latest = _cohort()
    found = {d.feature: d for d in distributions(con, "t")}
    for d in found.values():
        assert not any(n is not None and 0 < n < K for n in d.counts), d.feature
        left_out = d.present - sum(n or 0 for n in d.counts)
        assert d.counts == () or left_out == 0 or left_out >= K, (d.feature, left_out)
    # 3 smokers of 40: hidden, and the 37 others too (37 of 40 gives the 3)
    assert Counter(_present(latest, "smoker"))[True] == 3
    assert found["smoker"].counts == (None, None)
    # A 20, B 10, C 2 and one rare-dx: the 3 of C and rare-dx together are under K, so they are
    # hidden, and so is B (else the 33 with a code less A's 20 and B's 10 would give the 3)
    dx = Counter(_present(latest, "dx"))
    assert (dx["A"], dx["B"], dx["C"], dx["rare-dx"]) == (20, 10, 2, 1)
    assert found["dx"].labels == ("A", "B", f"other (<{K})")
    assert found["dx"].counts == (20, None, None)

    drawn: list[str] = []
    text = stats._Sketch.text

    def recording(sk: Any, x: float, y: float, s: str, *args: Any, **kwargs: Any) -> None:
        drawn.append(s)
        text(sk, x, y, s, *args, **kwargs)

    monkeypatch.setattr(stats._Sketch, "text", recording)
    path = plot_distributions(con, "t", tmp_path / "t.png")
    # no rare code named, and no extreme value on an axis
    assert not any("rare-dx" in s or s == "C" for s in drawn)
    numbers = {float(m) for s in drawn for m in re.findall(r"-?\d+(?:\.\d+)?", s)}
    assert not numbers & {float(v) for v in EXTREMES.values()}, numbers
    for column in EXTREMES:  # each axis's ends say they hold the values beyond them
        d = found[column]
        assert f"<={d.low:g}" in drawn and f">={d.high:g}" in drawn, column
    # one creatinine missing: the title does not give the share (1 of 40)
    assert sum(r["creatinine"] is None for r in latest) == 1
    assert f"creatinine (null: <{K} patients)" in drawn
    assert not any(s.startswith("creatinine (null") and "%" in s for s in drawn)
    assert "rare_lab (null 82%)" in drawn and f"fewer than {2 * K} values: not drawn" in drawn

    # and the picture draws no bar but of a shown count
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    cell_w, cell_h = round(CELL_INCHES[0] * DPI), round(CELL_INCHES[1] * DPI)
    title_h = round(TITLE_INCHES * DPI)
    for i, d in enumerate(found.values()):
        row, col = divmod(i, GRID_COLUMNS)
        cell = pixels[title_h + row * cell_h :][:cell_h, col * cell_w :][:, :cell_w]
        left, top, right, bottom = _frame(cell)
        panel = cell[top + 1 : bottom, left + 1 : right]
        if not any(d.counts):  # nothing shown: no bar at all
            assert not np.all(panel == BLUE_RGB, axis=-1).any(), d.feature
            # (the grey of a flag's false bar is also a level of the text's antialiasing: no
            # column holds more of it than a line of text)
            assert np.all(panel == GREY_RGB, axis=-1).sum(axis=0).max() < 8, d.feature
            continue
        _assert_bars(panel, d)
