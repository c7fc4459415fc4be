"""The incremental online store against an independent oracle: after patients are added,
changed and removed, every answer of the synced store equals that of a store materialised from
scratch, in a fresh folder, over the same feature tables."""

from __future__ import annotations

import copy
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from deid.leakscan import CanarySet
from pipelines.features import online_sync
from pipelines.features.feast_store import (
    FEAST_DATA_ENV,
    FEATURES_DIR_ENV,
    HISTORY_START,
    apply_repo,
    feature_store,
    materialize_latest,
    online_table,
)
from pipelines.features.online_scan import online_entity_key, scan_online_store
from pipelines.features.online_sync import OnlineSyncReport, sync_online_store
from pipelines.features.resources import FeastStoreResource
from pipelines.features.tables import build_feature_tables
from tests.feast_stores import stored_rows
from tests.pipelines.features.crafted import A, B, C, D, crafted_rows, write_views

# near now, as in test_feast_store: the latest rows are recent, so online reads return values
BASE = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=400)
E = "e" * 32  # a patient new to the release
UNKNOWN = "f" * 32  # never released
PATIENTS = [A, B, C, D, E, UNKNOWN]
PLANTED = "Ottoline Quillfeather"


@pytest.fixture(autouse=True)
def _restore_feast_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # feature_store() writes these into os.environ; monkeypatch puts the old values back
    monkeypatch.setenv(FEAST_DATA_ENV, "/nonexistent")
    monkeypatch.setenv(FEATURES_DIR_ENV, "/nonexistent")
    yield


class Killed(BaseException):
    """The process killed (not an error the code could handle)."""


class Release:
    """A warehouse with crafted views, its feature tables (DuckDB and Parquet) and a Feast
    store applied over them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.rows = crafted_rows(BASE)
        self.con = duckdb.connect(str(root / "warehouse.duckdb"))
        self.rebuild()
        apply_repo("feature_repo", self.data, self.features)

    @property
    def data(self) -> Path:
        return self.root / "feast"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def online_db(self) -> Path:
        return self.data / "online_store.db"

    def rebuild(self) -> None:
        write_views(self.con, self.rows)
        build_feature_tables(self.con, self.features)

    def sync(self) -> OnlineSyncReport:
        # a new store per run, as each release run opens one
        return sync_online_store(self.con, feature_store("feature_repo", self.data, self.features))

    def add_patient(self, new: str, like: str, gender: str | None = None) -> None:
        """``new`` with a copy of every row of ``like``."""
        for view, rows in list(self.rows.items()):
            for row in [r for r in rows if like in (r.get("patient_id"), r.get("id"))]:
                twin = copy.deepcopy(row)
                key = "id" if view == "patient" else "patient_id"
                twin[key] = new
                if view != "patient":
                    twin["id"] = f"{row['id']}-{new[:4]}"
                elif gender is not None:
                    twin["gender"] = gender
                self.rows[view].append(twin)

    def remove_patient(self, pid: str) -> None:
        for view, rows in self.rows.items():
            self.rows[view] = [r for r in rows if pid not in (r.get("patient_id"), r.get("id"))]

    def opt_out(self, pid: str) -> None:
        for row in self.rows["consent"]:
            if row["patient_id"] == pid:
                row["status"] = "active"

    def add_hba1c(self, pid: str, value: float, days: int) -> None:
        self.rows["observation"].append(
            {
                "id": f"late-{pid[:4]}-{days}",
                "patient_id": pid,
                "status": "final",
                "code": "4548-4",
                "value_quantity": value,
                "effective_date_time": BASE + timedelta(days=days),
            }
        )


def holding(release: Release, pid: str) -> int:
    """How many online tables hold the patient."""
    rows = stored_rows(release.online_db)
    return sum(any(r[0] == online_entity_key(pid) for r in table) for table in rows.values())


def feature_refs(data: Path, features: Path) -> list[str]:
    store = feature_store("feature_repo", data, features)
    return [f"{v.name}:{f.name}" for v in store.list_feature_views() for f in v.features]


def online_answers(data: Path, features: Path) -> dict[str, list[Any]]:
    """Every feature of every patient (and an unknown one), with the rows' event times."""
    store = feature_store("feature_repo", data, features)
    response = store.get_online_features(
        features=feature_refs(data, features), entity_rows=[{"patient_id": p} for p in PATIENTS]
    )
    return dict(response.to_dict(include_event_timestamps=True))


def assert_equals_fresh_materialisation(release: Release, fresh: Path) -> None:
    """The oracle: a new registry and online store in ``fresh``, materialised in full by Feast
    over the same Parquet files, answers exactly as the synced store does."""
    synced = online_answers(release.data, release.features)
    apply_repo("feature_repo", fresh, release.features)
    materialize_latest(feature_store("feature_repo", fresh, release.features))
    expected = online_answers(fresh, release.features)
    assert synced == expected
    assert stored_rows(release.online_db) == stored_rows(fresh / "online_store.db")


def test_incremental_sync_equals_a_fresh_full_materialisation(tmp_path: Path) -> None:
    release = Release(tmp_path / "release")
    first = release.sync()
    assert (first.mode, first.reason) == ("full", "no snapshot")
    assert first.entities_online["patient_demographics"] == 3  # A, B, D; C opted out

    online_before = holding(release, B) + holding(release, D)
    assert online_before >= 8  # every view but labs (they have no measurement)
    release.add_patient(E, like=A)  # a new patient
    release.add_hba1c(A, 11.5, days=380)  # A's latest rows change
    release.remove_patient(B)  # erased or withheld
    release.opt_out(D)  # opted out
    release.rebuild()
    second = release.sync()
    assert (second.mode, second.rows_deleted) == ("incremental", online_before)
    assert second.written is not None
    # E everywhere, A where its latest row changed (a new HbA1c: the labs only)
    for table, keys in second.written.items():
        changed = {E, A} if table.endswith("patient_labs_vitals") else {E}
        assert set(keys) == {online_entity_key(p) for p in changed}, table
    assert (second.rows_written, second.rows_unchanged) == (6, 4)

    answers = online_answers(release.data, release.features)
    assert answers["hba1c_latest"][PATIENTS.index(A)] == 11.5
    assert_equals_fresh_materialisation(release, tmp_path / "fresh")

    third = release.sync()
    assert (third.mode, third.rows_written, third.rows_deleted) == ("incremental", 0, 0)
    assert third.rows_unchanged == 10  # A and E in every view


def test_a_kill_before_the_snapshot_only_rewrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the online writes and before the snapshot: the next sync writes the same
    rows again, and a patient written then removed before it is still deleted."""
    release = Release(tmp_path / "release")
    release.sync()
    release.add_patient(E, like=A)
    release.add_hba1c(D, 5.5, days=300)  # before the data end: D's labs only
    release.rebuild()

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(online_sync, "_record_snapshot", killed)
        with pytest.raises(Killed):
            release.sync()
    assert online_entity_key(E) in online_sync.online_keys(
        release.online_db, "ehr_platform_patient_demographics"
    )

    again = release.sync()  # the snapshot never saw E nor D's change: written again
    assert again.mode == "incremental" and again.rows_written == 6  # E: 5 views, D: labs
    release.remove_patient(E)  # E was only ever in a snapshot-less write: still deleted
    release.rebuild()
    last = release.sync()
    assert last.rows_deleted == 5
    assert_equals_fresh_materialisation(release, tmp_path / "fresh")


def test_a_sync_killed_while_writing_has_deleted_the_patients_the_release_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync killed while it writes a view's changed rows: the patients the release no
    longer has (erased, withheld, opted out) are gone from every view already, not served
    beside the new rows until the next sync (they were deleted after the writes)."""
    release = Release(tmp_path / "release")
    release.sync()
    assert holding(release, B) > 0 and holding(release, D) > 0
    release.add_patient(E, like=A)  # rows to write in every view
    release.remove_patient(B)
    release.opt_out(D)
    release.rebuild()

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(online_sync, "_write_rows", killed)
        with pytest.raises(Killed):
            release.sync()
    # killed at the first view's write (E written nowhere yet): B and D are out of it
    store = feature_store("feature_repo", release.data, release.features)
    killed_in = online_table(store, store.list_feature_views()[0].name)
    held = {table: {r[0] for r in rows} for table, rows in stored_rows(release.online_db).items()}
    assert all(online_entity_key(E) not in keys for keys in held.values())
    assert not {online_entity_key(B), online_entity_key(D)} & held[killed_in]
    release.sync()
    assert holding(release, B) == holding(release, D) == 0
    assert_equals_fresh_materialisation(release, tmp_path / "fresh")


def test_full_path_when_the_snapshot_cannot_be_trusted(tmp_path: Path) -> None:
    release = Release(tmp_path / "release")
    release.sync()
    release.con.execute(f"DROP TABLE {online_sync.META}")
    assert release.sync().reason == "no snapshot"

    release.con.execute(f"CREATE OR REPLACE TABLE {online_sync.ROWS} (junk INTEGER)")
    assert release.sync().reason == "snapshot unreadable"
    assert release.sync().mode == "incremental"  # the full path wrote a good one

    apply_repo("feature_repo", release.data, release.features, force=True)
    report = release.sync()
    assert (report.mode, report.reason) == ("full", "registry applied since the last sync")

    # a removed online store: the resource applies again (the tables come from apply), then
    # reloads in full
    release.online_db.unlink()
    resource = FeastStoreResource(
        repo_path="feature_repo", data_dir=str(release.data), features_dir=str(release.features)
    )
    report = resource.sync_online(release.con)
    assert report.mode == "full" and report.entities_online["patient_demographics"] == 3
    assert resource.sync_online(release.con).mode == "incremental"


def _latest_offline(release: Release, view: str, pid: str, column: str) -> Any:
    """The column of the patient's latest row in the view's Parquet file (ties: the later
    ``created``), read by DuckDB: what the online store must serve."""
    found = duckdb.sql(
        f"SELECT {column} FROM read_parquet('{release.features / view}.parquet') "
        f"WHERE patient_id = '{pid}' ORDER BY event_timestamp DESC, created DESC LIMIT 1"
    ).fetchall()
    return found[0][0]


def test_an_instant_dated_to_its_day_is_served_online_as_offline(tmp_path: Path) -> None:
    """A lab result and a discharge dated without a time of day stand at the end of that day
    (23:59:59.999 in the latest zone, 11:59:59.999 UTC the next day): Feast keeps a
    ``UnixTimestamp`` feature online in whole seconds, so the tables' instants must be whole
    seconds for the online value to be the offline one."""
    release = Release(tmp_path / "release")
    day = BASE + timedelta(days=380)
    end_of_day = day + timedelta(hours=35, minutes=59, seconds=59, milliseconds=999)
    release.rows["observation"].append(
        {
            "id": "dated-to-its-day",
            "patient_id": A,
            "status": "final",
            "code": "4548-4",
            "value_quantity": 7.1,
            "effective_date_time": day,
            "effective_date_time_latest": end_of_day,
        }
    )
    discharged = day - timedelta(days=10)  # before the data end, so a prior stay there
    release.rows["encounter"].append(
        {
            "id": "stay-dated-to-its-day",
            "patient_id": A,
            "class_code": "IMP",
            "period_start": discharged - timedelta(days=3),
            "period_end": discharged,
            "period_end_latest": discharged + (end_of_day - day),
        }
    )
    release.rebuild()
    release.sync()
    answers = online_answers(release.data, release.features)
    at = PATIENTS.index(A)
    for view, column, dated in [
        ("patient_labs_vitals", "hba1c_measured_at", day),
        ("patient_utilisation", "prior_discharge_at", discharged),
    ]:
        offline = _latest_offline(release, view, A, column)
        assert answers[column][at] == offline, column
        assert offline == dated + timedelta(hours=35, minutes=59, seconds=59), column


def test_a_planted_value_in_a_changed_row_fails_the_scan(tmp_path: Path) -> None:
    release = Release(tmp_path / "release")
    first = release.sync()
    canaries = CanarySet()
    canaries.add_patient({"name": [{"family": "Quillfeather", "given": ["Ottoline"]}]}, E)
    everything = scan_online_store(release.online_db, canaries, only=first.written)
    assert everything.passed and everything.scanned_rows > 100  # a full run: every row

    release.add_patient(E, like=D, gender=PLANTED)  # a name where the sex belongs
    release.rebuild()
    report = release.sync()
    assert report.written is not None
    assert report.rows_written == 4  # E's rows (like D, no labs), nobody else's
    assert {k for keys in report.written.values() for k in keys} == {online_entity_key(E)}
    scan = scan_online_store(release.online_db, canaries, only=report.written)
    assert not scan.passed and "full_name" in scan.by_kind()
    assert {hit.row for hit in scan.hits} == {"ehr_platform_patient_demographics:sex"}
    # one row per feature of E's views: nothing unchanged is read again
    written_views = [v for v in _views(release) if report.written.get(f"ehr_platform_{v.name}")]
    assert scan.scanned_rows == sum(len(v.features) for v in written_views)

    quiet = release.sync()
    assert quiet.rows_written == 0
    assert scan_online_store(release.online_db, canaries, only=quiet.written).scanned_rows == 0


def _views(release: Release) -> list[Any]:
    return list(feature_store("feature_repo", release.data, release.features).list_feature_views())


def test_a_patient_a_full_materialisation_writes_and_the_release_lacks_is_deleted_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full path deletes the patients the release does not want after Feast's
    materialisation too: one that writes such a patient (it read the Parquet files as another
    writer left them, or by a rule of its own) leaves none of them served."""
    release = Release(tmp_path / "release")
    release.sync()
    served_b = {
        table: {r for r in rows if r[0] == online_entity_key(B)}
        for table, rows in stored_rows(release.online_db).items()
    }
    assert any(served_b.values())
    release.remove_patient(B)
    release.rebuild()
    release.con.execute(f"DROP TABLE {online_sync.META}")  # the full path
    real = online_sync.materialize_latest

    def writes_b_too(store: Any, end: datetime) -> None:
        real(store, end)
        db = sqlite3.connect(release.online_db)
        try:  # B's rows put back as an earlier materialisation wrote them
            for table, rows in served_b.items():
                db.executemany(
                    f'INSERT INTO "{table}" (entity_key, feature_name, value, event_ts) '
                    "VALUES (?, ?, ?, ?)",
                    sorted(rows),
                )
            db.commit()
        finally:
            db.close()

    monkeypatch.setattr(online_sync, "materialize_latest", writes_b_too)
    report = release.sync()
    assert report.mode == "full"
    assert holding(release, B) == 0


def test_a_materialisation_from_a_shell_is_reloaded_by_the_next_sync(tmp_path: Path) -> None:
    """``feast materialize 1900-01-01T00:00:00 <an earlier end>`` run by hand writes each
    patient's latest row up to that end over the release's newer one. Nothing the snapshot
    compares changed, so the next sync found it matching, wrote nothing, and the store kept
    serving the older values; Feast records the materialisation in the registry."""
    release = Release(tmp_path / "release")
    release.sync()
    synced = online_answers(release.data, release.features)
    store = feature_store("feature_repo", release.data, release.features)
    store.materialize(start_date=HISTORY_START, end_date=BASE + timedelta(days=60))
    assert online_answers(release.data, release.features) != synced  # older values served

    report = release.sync()
    assert (report.mode, report.reason) == ("full", "online store materialised outside the release")
    assert online_answers(release.data, release.features) == synced
    assert_equals_fresh_materialisation(release, tmp_path / "fresh")
    assert release.sync().mode == "incremental"
