"""The real Feast store over crafted feature tables: apply, point-in-time retrieval,
incremental materialisation and online reads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from feast import FeatureStore

from pipelines.features.feast_store import (
    FEAST_DATA_ENV,
    FEATURES_DIR_ENV,
    ApplyReport,
    EntityTimestampError,
    FeastDataNotSetError,
    FeastRegistryNotFoundError,
    MissingEntityTimestampError,
    UnknownEntityError,
    apply_repo,
    declared_types,
    entity_timestamps,
    feast_data_from_env,
    feature_store,
    materialize_latest,
    online_features,
    with_declared_types,
)
from pipelines.features.tables import FEATURE_TABLES, build_feature_tables
from tests.pipelines.features.crafted import A, B, C, D, crafted_rows, write_views

# The crafted time line starts 400 days ago, so its last events are recent enough to be
# materialised (within each view's TTL) and online reads see them.
REPO = Path(__file__).resolve().parents[3] / "feature_repo"
BASE = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=400)
DAY = timedelta(days=1)
# 2024-03-10 (hba1c 9.0) and 2024-03-20 (a planted 12.0) on the crafted time line
HBA1C_9_AT = BASE + 69 * DAY
PLANTED_AT = BASE + 79 * DAY


@dataclass
class Applied:
    store: FeatureStore
    report: ApplyReport
    features_dir: Path
    data_dir: Path


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Applied]:
    saved = {k: os.environ.get(k) for k in (FEAST_DATA_ENV, FEATURES_DIR_ENV)}
    root = tmp_path_factory.mktemp("feast")
    rows = crafted_rows(BASE)
    # a future value: dated after the entity timestamps used below, it must never be returned
    # for them by the point-in-time join
    rows["observation"].append(
        {
            "id": "planted",
            "patient_id": A,
            "status": "final",
            "code": "4548-4",
            "value_quantity": 12.0,
            "effective_date_time": PLANTED_AT,
        }
    )
    con = duckdb.connect()
    write_views(con, rows)
    build_feature_tables(con, root / "features")
    report = apply_repo("feature_repo", root / "feast", root / "features")
    store = feature_store("feature_repo", root / "feast", root / "features")
    yield Applied(store, report, root / "features", root / "feast")
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_apply_registers_repo_in_data_dir(applied: Applied) -> None:
    assert (applied.report.entities, applied.report.feature_views) == (1, 5)
    assert applied.report.feature_services == 1
    assert (applied.data_dir / "registry.db").exists()
    assert applied.store.config.online_store.path == str(applied.data_dir / "online_store.db")
    service = applied.store.get_feature_service("readmission_v2")
    assert service.tags["version"] == "2"


def test_declared_fields_match_parquet_columns(applied: Applied) -> None:
    views = {v.name: v for v in applied.store.list_feature_views()}
    assert set(views) == set(FEATURE_TABLES)
    for name, view in views.items():
        columns = pq.read_schema(applied.features_dir / f"{name}.parquet").names
        assert [f.name for f in view.features] == columns[3:], name
        assert view.batch_source.path == str(applied.features_dir / f"{name}.parquet")
        assert {"description", "owner", "sensitivity"} <= set(view.tags)
        assert view.ttl and view.ttl >= timedelta(days=365)


def test_historical_features_are_point_in_time(applied: Applied) -> None:
    entities = pd.DataFrame(
        {
            "patient_id": [A, A, A, C],
            "event_timestamp": [
                HBA1C_9_AT - DAY,  # before the 9.0: the 1 Jan 7.0
                PLANTED_AT - DAY,  # the day before the planted value
                PLANTED_AT + DAY,  # after it
                PLANTED_AT,
            ],
        }
    )
    df = (
        applied.store.get_historical_features(
            entity_df=entities,
            features=["patient_labs_vitals:hba1c_latest", "patient_demographics:age_years"],
        )
        .to_df()
        .sort_values("event_timestamp")
    )
    got = {(row.patient_id, row.event_timestamp): row.hba1c_latest for row in df.itertuples()}
    assert got[(A, pd.Timestamp(HBA1C_9_AT - DAY))] == 7.0
    assert got[(A, pd.Timestamp(PLANTED_AT - DAY))] == 9.0  # never the future 12.0
    assert got[(A, pd.Timestamp(PLANTED_AT + DAY))] == 12.0
    assert pd.isna(got[(C, pd.Timestamp(PLANTED_AT))])  # opted out: no features


def test_feature_service_training_set(applied: Applied) -> None:
    entities = pd.DataFrame({"patient_id": [A, B], "event_timestamp": [PLANTED_AT - DAY] * 2})
    service = applied.store.get_feature_service("readmission_v2")
    df = applied.store.get_historical_features(entity_df=entities, features=service).to_df()
    assert len(df) == 2
    a = df[df.patient_id == A].iloc[0]
    assert a.age_years == 63 and bool(a.has_diabetes) and a.hba1c_latest == 9.0


def test_materialize_latest_then_online_reads(applied: Applied) -> None:
    report = materialize_latest(applied.store)
    # the data end of the release, not now: A's last measurement
    assert report.end == BASE + (
        datetime(2025, 1, 5, tzinfo=UTC) - datetime(2024, 1, 1, tzinfo=UTC)
    )
    assert report.entities_online["patient_demographics"] == 3  # A, B, D; never C
    assert report.entities_online["patient_utilisation"] == 3  # however old their rows are
    service = applied.store.get_feature_service("readmission_v2")
    unknown = "e" * 32
    answer = online_features(applied.store, service, [A, C, unknown])
    assert answer.unknown == [C, unknown]  # opted out / never released: reported, not null
    assert answer.values["patient_id"] == [A, C, unknown]
    assert answer.values["hba1c_latest"][0] == 8.0  # A's latest, 2025-01-05 on the time line
    assert answer.values["charlson_index"][0] == 8
    assert answer.values["encounters_30d"][0] == 0  # a quiet month is 0, not null
    assert answer.values["encounters_365d"][0] == 5
    with pytest.raises(UnknownEntityError):
        online_features(applied.store, service, [A, unknown], strict=True)
    # no patients: the same columns, empty (Feast alone fails with an IndexError)
    empty = online_features(applied.store, service, [])
    assert empty.unknown == [] and empty.values == {name: [] for name in answer.values}
    refs = ["patient_labs_vitals:hba1c_latest", "patient_demographics:age_years"]
    assert online_features(applied.store, refs, []).values == {
        "patient_id": [],
        "hba1c_latest": [],
        "age_years": [],
    }
    # a second run keeps what is there
    assert materialize_latest(applied.store).entities_online == report.entities_online


def test_online_features_takes_the_collections_model_builders_pass(applied: Applied) -> None:
    materialize_latest(applied.store)
    service = applied.store.get_feature_service("readmission_v2")
    unknown = "e" * 32
    ids = [A, unknown, B]
    expected = online_features(applied.store, service, ids)
    assert expected.unknown == [unknown]
    for given in (
        np.array(ids),
        pd.Series(ids),
        pd.Index(ids),
        (pid for pid in ids),  # read once: the unknown patient is still found
    ):
        answer = online_features(applied.store, service, given)
        assert answer.unknown == [unknown], type(given)
        assert answer.values == expected.values, type(given)
    with pytest.raises(UnknownEntityError):
        online_features(applied.store, service, (pid for pid in ids), strict=True)
    # one pseudonym as a string is not 32 one-character patients
    with pytest.raises(TypeError, match="not one string"):
        online_features(applied.store, service, A)


# Feast warns as it reads the raw nanosecond column it then refuses
@pytest.mark.filterwarnings("ignore:Discarding nonzero nanoseconds")
def test_entity_timestamps_gives_feast_every_form_of_entity_timestamp(applied: Applied) -> None:
    nine_at = pd.Timestamp(HBA1C_9_AT)  # the 9.0 row's instant (7.0 before it)
    ns = pd.Timedelta(nanoseconds=1)
    instants = [nine_at - ns, nine_at, nine_at + ns, nine_at - pd.Timedelta(microseconds=1)]
    expected = [7.0, 9.0, 9.0, 7.0]
    features = ["patient_labs_vitals:hba1c_latest"]

    def hba1c(entities: pd.DataFrame) -> list[float]:
        entities = entities.assign(row=range(len(entities)))
        df = applied.store.get_historical_features(entity_df=entities, features=features).to_df()
        return df.sort_values("row")["hba1c_latest"].tolist()

    # between two microseconds: Feast alone refuses the column ("would lose data")
    in_ns = pd.DataFrame(
        {
            "patient_id": [A] * 4,
            "event_timestamp": pd.Series(instants).astype("datetime64[ns, UTC]"),
        }
    )
    with pytest.raises(Exception, match="would lose data"):
        hba1c(in_ns)
    assert hba1c(entity_timestamps(in_ns)) == expected
    # ISO strings of mixed precision (in another zone) and a pyarrow-backed column
    as_text = pd.DataFrame(
        {
            "patient_id": [A] * 4,
            "event_timestamp": [t.tz_convert("America/New_York").isoformat() for t in instants],
        }
    )
    as_arrow = in_ns.assign(
        event_timestamp=pd.Series(instants)
        .dt.floor("us")
        .astype(pd.ArrowDtype(pa.timestamp("us", tz="UTC")))
    )
    naive = in_ns.assign(event_timestamp=in_ns["event_timestamp"].dt.tz_localize(None))
    for given in (as_text, as_arrow, naive):
        normal = entity_timestamps(given)
        assert str(normal["event_timestamp"].dtype) == "datetime64[us, UTC]"
        assert hba1c(normal) == expected


def test_an_entity_row_without_a_timestamp_is_refused_not_answered_with_nulls(
    applied: Applied,
) -> None:
    given = pd.DataFrame(
        {
            "patient_id": [A, A, D],
            "event_timestamp": [PLANTED_AT - DAY, None, PLANTED_AT - DAY],
        },
        index=[10, 11, 12],
    )
    # what Feast does with it: the row's features are null, as if nothing were known
    answered = applied.store.get_historical_features(
        entity_df=given.assign(event_timestamp=pd.to_datetime(given["event_timestamp"], utc=True)),
        features=["patient_utilisation:prior_stay_length_days"],
    ).to_df()
    by_time = {
        (row["patient_id"], str(row["event_timestamp"])): row["prior_stay_length_days"]
        for row in answered.to_dict("records")
    }
    assert by_time[(A, str(PLANTED_AT - DAY))] == 5 and pd.isna(by_time[(A, "NaT")])
    for blank in (None, pd.NaT, ""):
        with pytest.raises(
            MissingEntityTimestampError,
            match=r"^1 entity rows have no "
            r"event_timestamp \(rows 11\)",
        ):
            entity_timestamps(given.assign(event_timestamp=[PLANTED_AT - DAY, blank, PLANTED_AT]))
    epoch = given.assign(event_timestamp=[int(PLANTED_AT.timestamp())] * 3)
    with pytest.raises(EntityTimestampError, match=r'unit="s"'):
        entity_timestamps(epoch)
    as_text = given.assign(event_timestamp=[(PLANTED_AT - DAY).isoformat(), "", None])
    with pytest.raises(MissingEntityTimestampError, match=r"^2 entity rows .*rows 11, 12\)"):
        entity_timestamps(as_text)


def test_entity_timestamps_reads_pyarrow_text_and_refuses_numbers_in_an_object_column() -> None:
    at = pd.Timestamp("2024-03-10T00:00:00Z")
    text = ["2024-03-10T00:00:00Z", "2024-03-09T23:59:59.999999Z", "2024-03-09T19:00:00-05:00"]
    # read_parquet(dtype_backend="pyarrow") of isoformat() text: mixed precision and zones
    as_arrow = pd.DataFrame(
        {"patient_id": [A] * 3, "event_timestamp": pd.array(text, dtype=pd.ArrowDtype(pa.string()))}
    )
    read = entity_timestamps(as_arrow)["event_timestamp"].tolist()
    assert read == [at, at - pd.Timedelta(microseconds=1), at]
    # epoch seconds in an object column (JSON, a mixed list): pandas read them as nanoseconds
    for numbers in ([int(at.timestamp())] * 3, [at, float(at.timestamp()), at]):
        given = pd.DataFrame(
            {"patient_id": [A] * 3, "event_timestamp": pd.Series(numbers, dtype=object)}
        )
        with pytest.raises(EntityTimestampError, match=r'unit="s"'):
            entity_timestamps(given)


def test_declared_types_survive_retrieval(applied: Applied) -> None:
    types = declared_types(applied.store)
    assert types["charlson_index"] == "Int64" and types["has_diabetes"] == "Bool"
    entities = pd.DataFrame(
        {"patient_id": [A, D], "event_timestamp": [PLANTED_AT - DAY, PLANTED_AT - DAY]}
    )
    df = applied.store.get_historical_features(
        entity_df=entities,
        features=["patient_utilisation:prior_stay_length_days", "patient_comorbidities:has_mi"],
    ).to_df()
    typed = with_declared_types(applied.store, df)
    assert str(typed["prior_stay_length_days"].dtype) == "Int64"
    assert str(typed["has_mi"].dtype) == "boolean"


def test_feast_data_must_be_set_and_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FEAST_DATA_ENV, raising=False)
    with pytest.raises(FeastDataNotSetError, match="is not set"):
        feast_data_from_env()
    monkeypatch.setenv(FEAST_DATA_ENV, "data/work/feast")
    with pytest.raises(FeastDataNotSetError, match="relative"):
        feast_data_from_env()


@pytest.mark.parametrize("absolute", [False, True], ids=["as-is", "after-a-slash"])
def test_a_key_in_feast_data_is_refused_and_not_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, absolute: bool
) -> None:
    """A key pasted into EHR_FEAST_DATA: its error (``feast apply``'s and every store's)
    printed it, and one starting with '/' made Feast create folders named after it."""
    key = "kR3v9Q0xYz7+Lm2NpT5wUa8bCd1EfGhIjKl4MnOpQrs="
    value = "/" + key if absolute else key
    monkeypatch.setenv(FEAST_DATA_ENV, value)
    with pytest.raises(FeastDataNotSetError, match="looks like key material") as raised:
        feast_data_from_env()
    assert key[:16] not in str(raised.value)
    env = {**os.environ, FEAST_DATA_ENV: value, "PYTHONPATH": str(REPO.parent)}
    done = subprocess.run(
        [sys.executable, "-c", "import repo_env"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "looks like key material" in done.stderr
    assert key[:16] not in done.stdout + done.stderr


def test_a_data_folder_without_a_registry_is_refused_and_not_created(
    applied: Applied, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model builder's folder mistyped, or relative to another directory: Feast made the
    folder and an empty registry, and then said the feature service does not exist."""
    monkeypatch.setenv(FEAST_DATA_ENV, os.environ[FEAST_DATA_ENV])  # restored after the test
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FeastRegistryNotFoundError) as raised:
        feature_store(None, "data/work/feast")
    message = str(raised.value)
    assert f"no Feast registry in {tmp_path / 'data' / 'work' / 'feast'}:" in message
    assert f"read from the current directory, {tmp_path})" in message
    assert not (tmp_path / "data").exists()
    # the folder the release applied the repo in, relative to where it is: the same store
    monkeypatch.chdir(applied.data_dir.parent)
    store = feature_store(None, applied.data_dir.name, applied.features_dir)
    assert store.get_feature_service("readmission_v2").tags["version"] == "2"
    # the platform's own steps make the folder before their first apply
    assert feature_store(None, tmp_path / "new", create=True) is not None
    assert (tmp_path / "new").is_dir()


def test_feast_apply_fails_loudly_without_feast_data(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != FEAST_DATA_ENV}
    done = subprocess.run(
        [sys.executable, "-c", "import repo_env"],
        cwd=REPO, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "EHR_FEAST_DATA is not set" in done.stderr
    assert not (REPO / "${EHR_FEAST_DATA}").exists()


@pytest.mark.parametrize("command", [["feature-services", "list"], ["registry-dump"]])
def test_every_feast_command_fails_loudly_without_feast_data(
    tmp_path: Path, command: list[str]
) -> None:
    """Commands that import none of the repo's modules (``feast apply`` does) open the registry
    through ``DataFolderFileRegistryStore``: without ``EHR_FEAST_DATA`` they stop with the fix,
    where they created a folder literally named ``${EHR_FEAST_DATA}`` and listed an empty
    registry. With it set, the same command runs."""
    repo = tmp_path / "feature_repo"
    shutil.copytree(REPO, repo)
    feast = Path(sys.executable).with_name("feast")
    env = {k: v for k, v in os.environ.items() if k != FEAST_DATA_ENV}
    done = subprocess.run(
        [str(feast), *command], cwd=repo, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and "EHR_FEAST_DATA is not set" in done.stderr
    assert not (repo / "${EHR_FEAST_DATA}").exists() and not list(repo.rglob("registry.db"))

    data = tmp_path / "feast"
    data.mkdir()
    done = subprocess.run(
        [str(feast), *command],
        cwd=repo,
        env={**env, FEAST_DATA_ENV: str(data)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "EHR_FEAST_DATA is not set" not in done.stderr
    assert not (repo / "${EHR_FEAST_DATA}").exists()
