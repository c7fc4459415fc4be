"""``ehr bench release``: the runs it compares take turns, each from the same state, and a small
cohort's late release equals its full release."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from deid.release import release_version
from pipelines.bench import release as bench
from pipelines.bench.release import ReleaseRun, Timed, release_digests, steal_share
from tests.feast_stores import stored_rows


def test_release_runs_take_turns_and_each_starts_from_the_same_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    works = [tmp_path / "incremental", tmp_path / "full"]
    for work in works:
        (work / "nested").mkdir(parents=True)
        (work / "nested" / "state.txt").write_text(f"{work.name} before")
    seen: list[tuple[str, str]] = []

    def fake_run(work: Path, landing: Path, key_file: Path) -> ReleaseRun:
        state = work / "nested" / "state.txt"
        seen.append((work.name, state.read_text()))
        state.write_text(f"{work.name} after run {len(seen)}")  # a run changes its directory
        return ReleaseRun(Timed(float(len(seen)), 0.0), {}, {})

    monkeypatch.setattr(bench, "_release_run", fake_run)
    late, full = bench._release_runs(works, tmp_path / "landing", tmp_path / "keys.json", 3)

    assert seen == [("incremental", "incremental before"), ("full", "full before")] * 3
    assert [r.timed.seconds for r in late] == [1.0, 3.0, 5.0]
    assert [r.timed.seconds for r in full] == [2.0, 4.0, 6.0]
    # the last run's state stays; the copies set aside are gone
    assert (works[0] / "nested" / "state.txt").read_text() == "incremental after run 5"
    assert (works[1] / "nested" / "state.txt").read_text() == "full after run 6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "incremental"]


def test_steal_share_is_the_stolen_part_of_the_ticks_between_two_readings() -> None:
    assert steal_share((1000, 10), (1400, 110)) == pytest.approx(0.25)
    assert steal_share(None, (1400, 110)) is None
    assert steal_share((1000, 10), (1000, 10)) is None
    ticks = bench.host_ticks()
    if ticks is not None:  # Linux: the first line of /proc/stat
        total, stolen = ticks
        assert 0 <= stolen <= total


def test_a_small_bench_runs_and_its_late_release_equals_the_full_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EHR_DEID_K", "2")
    out = bench.bench_release(tmp_path, patients=40, share=0.05, seed=11, repeat=2)
    assert len(out["late_release_runs_s"]) == len(out["full_release_runs_s"]) == 2
    assert out["tables_compared"] > 10
    assert out["tables_differing"] == []
    # after a late batch no view is built in full (its definition is the same)
    views = {k: v for k, v in out["late_refresh"].items() if k.startswith("views/")}
    assert views and set(views.values()) <= {"incremental", "unchanged"}
    assert 0 < out["release_ratio"]
    # each run's wall time is the platform's code and Dagster's bookkeeping
    for which in ("late", "idle", "full"):
        assert 0 < out[f"{which}_platform_s"] and 0 < out[f"{which}_dagster_s"]
        # Dagster's own CPU seconds are part of its share of the wall time
        assert 0 < out[f"{which}_dagster_cpu_s"] < out[f"{which}_dagster_s"] * 1.05
    assert out["late_platform_s"] + out["late_dagster_s"] == pytest.approx(out["late_release_s"])
    assert 0 < out["without_dagster_ratio"]
    assert out["steal_share"] is None or 0 <= out["steal_share"] <= 1
    # a day's visits move the data end a day: the features are refreshed, not rebuilt, and
    # the release equals a full release of the same batches
    assert out["next_day_patients"] == 2 and len(out["next_day_release_runs_s"]) == 2
    features = {k: v for k, v in out["next_day_refresh"].items() if k.startswith("features/")}
    assert features and set(features.values()) == {"incremental"}, features
    assert out["next_day_tables_differing"] == []
    assert 0 < out["next_day_ratio"]
    # and the online store serves the same values, event times included
    served = [
        stored_rows(tmp_path / w / "feast" / "online_store.db") for w in ("incremental", "full")
    ]
    assert served[0] == served[1] and any(served[0].values())


def test_a_day_after_batch_moves_the_data_end_by_a_day(tmp_path: Path) -> None:
    """The next day's visits land the day after the data end on each patient's own time line:
    after their release, the data end is one day later."""
    landing, key_file = tmp_path / "landing", tmp_path / "keys.json"
    work = tmp_path / "work"
    bench.split_cohort(tmp_path, 30, 0.1, 5)
    bench._batches(work, landing, key_file, ["base"], release=True)
    warehouse = work / "warehouse.duckdb"
    before = _data_end(warehouse)
    key = bench.write_next_day_batch(landing, warehouse, key_file, 3)
    visits = (landing / key / "Encounter.ndjson").read_text().splitlines()
    assert len(visits) == 3
    bench._batches(work, landing, key_file, [key], release=False)
    bench._release_run(work, landing, key_file)
    assert _data_end(warehouse).date() - before.date() == timedelta(days=1)


def _data_end(warehouse: Path) -> datetime:
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        ((end,),) = con.execute(
            "SELECT value FROM release_state.feature_builds WHERE key = 'data_end'"
        ).fetchall()
    finally:
        con.close()
    return datetime.fromisoformat(end)


def test_the_release_version_and_the_bench_digests_see_a_pair_replaced(tmp_path: Path) -> None:
    """Two equal released rows replaced by two other equal rows: a new release version (the
    data version Dagster compares) and a table digest of its own in the bench's comparison."""
    paths = [tmp_path / "before.duckdb", tmp_path / "after.duckdb"]
    versions, digests = [], []
    for path, pair in zip(paths, ("b", "c"), strict=True):
        con = duckdb.connect(str(path))
        con.execute(
            "CREATE TABLE deid_resources (resource_type VARCHAR, id VARCHAR, resource JSON)"
        )
        con.execute("INSERT INTO deid_resources VALUES ('Observation', 'a', '{}')")
        for _ in range(2):
            con.execute("INSERT INTO deid_resources VALUES ('Observation', ?, '{}')", [pair])
        con.execute("CREATE SCHEMA views")
        con.execute("CREATE TABLE views.observation AS SELECT id FROM deid_resources")
        versions.append(release_version(con))
        con.close()
        digests.append(release_digests(path)["views.observation"])
    assert versions[0] != versions[1]
    assert digests[0] != digests[1]
    assert [d.split(":")[0] for d in digests] == ["3", "3"]


def test_a_cohort_too_small_for_k_anonymity_is_an_error_that_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 generated patients cannot be 5-anonymous within the share the release may withhold:
    the release is not published, and the bench says why instead of ending in a traceback."""
    from click.testing import CliRunner

    from pipelines.cli import main

    monkeypatch.delenv("EHR_DEID_K", raising=False)
    monkeypatch.delenv("EHR_MAX_WITHHELD_SHARE", raising=False)
    result = CliRunner().invoke(
        main, ["bench", "release", "--patients", "40", "--repeat", "1", "--keep", str(tmp_path)]
    )
    assert result.exit_code == 1, result.output
    assert "too few to be k-anonymous" in result.output
    assert "Traceback" not in result.output
