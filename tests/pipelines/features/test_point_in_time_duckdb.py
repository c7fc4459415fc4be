"""The DuckDB point-in-time join against Feast's own ``get_historical_features`` (the reference)
on a throw-away Feast store: boundaries (a row exactly at T, exactly a TTL before T and a
microsecond more, ties on the timestamp broken by ``created``), nulls of every type, unknown
patients, repeated entity rows, a caller's session in another time zone, and random cohorts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from pipelines.features.point_in_time import UnsupportedJoinError, historical_features
from pipelines.models.training_set import readmission_training_rows, readmission_training_set
from tests.feast_stores import throwaway_store

feast = pytest.importorskip("feast")

TTL = timedelta(days=30)
T0 = pd.Timestamp("2024-03-01", tz="UTC")
US = pd.Timedelta(microseconds=1)


def _views(tmp_path: Path) -> tuple[list[object], dict[str, Path]]:
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Bool, Float64, Int64, String, UnixTimestamp

    patient = Entity(name="patient", join_keys=["patient_id"], value_type=ValueType.STRING)
    paths = {name: tmp_path / f"{name}.parquet" for name in ("counts", "labs")}

    def source(name: str) -> FileSource:
        return FileSource(
            name=f"{name}_source",
            path=str(paths[name]),
            timestamp_field="event_timestamp",
            created_timestamp_column="created",
        )

    counts = FeatureView(
        name="counts",
        entities=[patient],
        ttl=TTL,
        schema=[
            Field(name="visits", dtype=Int64),
            Field(name="flag", dtype=Bool),
            Field(name="code", dtype=String),
        ],
        source=source("counts"),
    )
    labs = FeatureView(
        name="labs",
        entities=[patient],
        ttl=timedelta(0),  # no TTL: any earlier row counts
        schema=[Field(name="value", dtype=Float64), Field(name="measured_at", dtype=UnixTimestamp)],
        source=source("labs"),
    )
    return [patient, counts, labs], paths


def _store(tmp_path: Path, services: list[object]) -> feast.FeatureStore:
    objects, _ = _views(tmp_path)
    return throwaway_store(tmp_path, "pit_test", [*objects, *services])


def _service(tmp_path: Path, name: str = "svc", alias: bool = False) -> object:
    from feast import FeatureService

    objects, _ = _views(tmp_path)
    counts, labs = objects[1], objects[2]
    first = counts.with_name("counts_alias") if alias else counts  # type: ignore[attr-defined]
    return FeatureService(name=name, features=[first[["visits", "code"]], labs])


def _write(paths: dict[str, Path], counts: pd.DataFrame, labs: pd.DataFrame) -> None:
    """Timestamps in microseconds, as the feature tables' files hold them (DuckDB writes them)."""
    for frame, name in ((counts, "counts"), (labs, "labs")):
        times = frame.select_dtypes("datetimetz").columns
        frame.astype({c: "datetime64[us, UTC]" for c in times}).to_parquet(paths[name])


def _feast(store: feast.FeatureStore, entities: pd.DataFrame, service: str) -> pd.DataFrame:
    frame = store.get_historical_features(
        entity_df=entities.copy(), features=store.get_feature_service(service)
    ).to_df()
    return _sorted(frame)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    keys = ["patient_id", "event_timestamp", "label"]
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)


def _boundary_rows() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ts = pd.to_datetime
    counts = pd.DataFrame(
        {
            "patient_id": ["a", "a", "a", "b", "c"],
            "event_timestamp": [T0, T0, T0 + pd.Timedelta(days=10), T0, T0],
            # a's two rows at T0: the later created one wins
            "created": ts(
                ["2024-06-01", "2024-06-02", "2024-06-01", "2024-06-01", "2024-06-01"]
            ).tz_localize("UTC"),
            "visits": pd.array([1, 2, None, 4, 5], dtype="Int64"),
            "flag": pd.array([True, False, None, True, None], dtype="boolean"),
            "code": ["x", None, "z", "ü-é", ""],
        }
    )
    labs = pd.DataFrame(
        {
            "patient_id": ["a", "b", "b"],
            "event_timestamp": [T0 - pd.Timedelta(days=400), T0, T0 + US],
            "created": [T0] * 3,
            "value": [np.nan, 7.5, -0.0],
            "measured_at": [T0 - pd.Timedelta(days=401), pd.NaT, T0],
        }
    )
    at = {
        "before any row": T0 - US,
        "exactly at the row": T0,
        "between rows": T0 + pd.Timedelta(days=5),
        "exactly a TTL after": T0 + TTL,
        "a microsecond past the TTL": T0 + TTL + US,
        "at the later row": T0 + pd.Timedelta(days=10),
        "long after": T0 + pd.Timedelta(days=400),
    }
    pairs = [(p, t) for p in ("a", "b", "c", "unknown") for t in at.values()]
    entities = pd.DataFrame(
        [{"patient_id": p, "event_timestamp": t, "label": i % 2} for i, (p, t) in enumerate(pairs)]
    )
    repeated = entities.iloc[[1, 1]]  # the same entity row twice
    return counts, labs, pd.concat([entities, repeated], ignore_index=True)


def test_boundaries_equal_feasts_join(tmp_path: Path) -> None:
    service = _service(tmp_path)
    store = _store(tmp_path, [service])
    counts, labs, entities = _boundary_rows()
    _write(_views(tmp_path)[1], counts, labs)
    with duckdb.connect() as con:
        ours = _sorted(historical_features(con, store, entities, "svc"))
    expected = _feast(store, entities, "svc")
    pd.testing.assert_frame_equal(ours, expected)

    # spot checks a reader can follow, beside the reference
    def value(patient: str, at: pd.Timestamp, column: str) -> object:
        hit = ours[(ours["patient_id"] == patient) & (ours["event_timestamp"] == at)]
        return hit[column].iloc[0]

    assert value("a", T0, "visits") == 2  # a tie on T0: the later created row
    assert value("a", T0 + TTL, "code") == "z"
    assert value("b", T0 + TTL, "visits") == 4  # exactly a TTL after: still known
    assert pd.isna(value("b", T0 + TTL + US, "visits"))  # a microsecond more: not
    # no TTL: a row 800 days old still counts
    assert value("a", T0 + pd.Timedelta(days=400), "measured_at") == T0 - pd.Timedelta(days=401)
    assert value("b", T0, "value") == 7.5  # no TTL; the row a microsecond later is not seen
    assert pd.isna(value("unknown", T0, "value"))


def test_entity_rows_keep_their_order_and_other_columns(tmp_path: Path) -> None:
    service = _service(tmp_path)
    store = _store(tmp_path, [service])
    counts, labs, entities = _boundary_rows()
    _write(_views(tmp_path)[1], counts, labs)
    shuffled = entities.sample(frac=1.0, random_state=3).reset_index(drop=True)
    with duckdb.connect() as con:
        ours = historical_features(con, store, shuffled, "svc")
    assert list(ours.columns) == list(_feast(store, shuffled, "svc").columns)
    assert ours["patient_id"].tolist() == shuffled["patient_id"].tolist()
    assert ours["event_timestamp"].tolist() == shuffled["event_timestamp"].tolist()


def test_a_session_in_another_time_zone_changes_nothing(tmp_path: Path) -> None:
    """A TTL across a daylight-saving change: a day added in New York's zone is 23 hours; Feast
    and this join add 30 x 86,400 s."""
    service = _service(tmp_path)
    store = _store(tmp_path, [service])
    counts, labs, entities = _boundary_rows()
    _write(_views(tmp_path)[1], counts, labs)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'America/New_York'")
        ours = _sorted(historical_features(con, store, entities, "svc"))
        assert con.execute("SELECT current_setting('TimeZone')").fetchone() == ("America/New_York",)
    pd.testing.assert_frame_equal(ours, _feast(store, entities, "svc"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_cohorts_equal_feasts_join(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    service = _service(tmp_path)
    store = _store(tmp_path, [service])
    patients = [f"p{i}" for i in range(12)]

    def rows(n: int) -> pd.DataFrame:
        days = rng.integers(0, 120, n)
        frame = pd.DataFrame(
            {
                "patient_id": rng.choice(patients, n),
                "event_timestamp": T0 + pd.to_timedelta(days, unit="D"),
                "created": T0 + pd.to_timedelta(rng.permutation(n), unit="s"),
            }
        )
        return frame.drop_duplicates(["patient_id", "event_timestamp"]).reset_index(drop=True)

    counts = rows(150)
    counts["visits"] = pd.array(
        np.where(rng.random(len(counts)) < 0.2, None, rng.integers(0, 9, len(counts))),
        dtype="Int64",
    )
    counts["flag"] = pd.array(rng.random(len(counts)) < 0.5, dtype="boolean")
    counts["code"] = rng.choice(["x", "y", None], len(counts))
    labs = rows(80)
    labs["value"] = np.where(rng.random(len(labs)) < 0.2, np.nan, rng.normal(size=len(labs)))
    labs["measured_at"] = labs["event_timestamp"] - pd.Timedelta(hours=1)
    _write(_views(tmp_path)[1], counts, labs)
    # entity times: random, on a feature row, and exactly a TTL after one
    on_rows = counts.sample(20, random_state=seed)["event_timestamp"]
    times = [
        *(T0 + pd.to_timedelta(rng.integers(-5, 160, 60), unit="D")),
        *on_rows,
        *(on_rows + TTL),
    ]
    entities = pd.DataFrame(
        {
            "patient_id": rng.choice([*patients, "nobody"], len(times)),
            "event_timestamp": times,
            "label": rng.integers(0, 2, len(times)),
        }
    )
    with duckdb.connect() as con:
        ours = _sorted(historical_features(con, store, entities, "svc"))
    pd.testing.assert_frame_equal(ours, _feast(store, entities, "svc"))


def test_an_alias_is_left_to_feast(tmp_path: Path) -> None:
    service = _service(tmp_path, name="readmission_alias", alias=True)
    store = _store(tmp_path, [service])
    counts, labs, entities = _boundary_rows()
    _write(_views(tmp_path)[1], counts, labs)
    with duckdb.connect() as con:
        with pytest.raises(UnsupportedJoinError, match="alias"):
            historical_features(con, store, entities, "readmission_alias")
        rows = readmission_training_rows(con, store, entities, "readmission_alias")
    pd.testing.assert_frame_equal(
        rows, readmission_training_set(store, entities, "readmission_alias")
    )


def test_training_rows_equal_the_training_set(tmp_path: Path) -> None:
    """The training set's own steps (declared types, days since, order) on top of either join."""
    service = _service(tmp_path, name="readmission_v2")
    store = _store(tmp_path, [service])
    counts, labs, entities = _boundary_rows()
    _write(_views(tmp_path)[1], counts, labs)
    with duckdb.connect() as con:
        rows = readmission_training_rows(con, store, entities)
    expected = readmission_training_set(store, entities)
    pd.testing.assert_frame_equal(rows, expected)
    assert "measured_days_since" in rows.columns
