"""A corrected birth date reaches the kept rows of the other views.

A patient's own birth date is searched only in that patient's rows, so the distinct-value scan of
a view's kept rows cannot find it. Here the vault, the release and the views are built from the
platform's synthetic generator with the real stages (ingest, de-identification, k-anonymity);
then a later batch corrects one patient's birth date (a new version of their Patient) while
their other resources stay as they were. One of their released Conditions carries, as a leak the
de-identification missed, the real birth date the correction brings: no canary matched it when
the view was built (the vault then held the wrong date), and the row is kept by the refresh.

The oracle is independent of the refresh's bookkeeping: the leak is planted by the test, the
patient's pseudonym is computed with the keyed pseudonymiser from the original Patient id, and
the rows scanned are counted by the test around the scan function."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow.parquet as pq
import pytest

from deid.leakscan import LeakScanResult
from deid.policy import Policy
from deid.release import build_released_patients, release_canaries
from deid.staging import publish_batch
from fhirlake.synthetic import generate
from fhirlake.viewdef import ViewDefinition, load_view
from pipelines.views import refresh as refresh_module
from pipelines.views.refresh import BATCHES, ViewRefresh, refresh_view
from pipelines.views.tables import VIEWS_DIR, VIEWS_SCHEMA
from vault import warehouse
from vault.catalog import has_table
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer

TODAY = date(2026, 11, 28)
CONDITION = load_view(VIEWS_DIR / "condition.json")
OBSERVATION = load_view(VIEWS_DIR / "observation.json")
PATIENT = load_view(VIEWS_DIR / "patient.json")
VIEWS = (CONDITION, OBSERVATION, PATIENT)


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """Five generated patients (bundles): four in batch ``b1``, the last one kept aside."""
    generated = tmp_path / "generated"
    generate(generated, 5, seed=41)
    first = tmp_path / "landing" / "b1"
    first.mkdir(parents=True)
    patients = sorted(generated.glob("[0-9]*.json"))
    for path in [
        *patients[:-1],
        generated / "organizations.json",
        generated / "practitioners.json",
    ]:
        shutil.copy(path, first / path.name)
    shutil.copy(patients[-1], tmp_path / "late_patient.json")
    return tmp_path


def _release_batch(wh: Path, provider: FileKeyProvider, batch: str, source: Path) -> None:
    """Ingest a batch, de-identify it (staged, scanned, published) and run k-anonymity (k=1:
    a handful of patients), as the batch and release assets do."""
    ingest_batch(wh, batch, source, provider, workers=1)
    con = warehouse.connect(wh)
    try:
        released = publish_batch(con, provider, batch, Policy.shipped("research"), today=TODAY)
        assert released.published
        patients = build_released_patients(con, 1, canaries=release_canaries(con, provider))
        assert patients.published
    finally:
        con.close()


def _refresh(
    wh: Path, provider: FileKeyProvider, work: Path, views: tuple[ViewDefinition, ...] = VIEWS
) -> dict[str, ViewRefresh]:
    con = warehouse.connect(wh)
    try:
        canaries = release_canaries(con, provider)  # as the views asset loads them, once
        return {view.name: refresh_view(con, view, work, canaries) for view in views}
    finally:
        con.close()


def _bundle_patients(path: Path) -> list[dict[str, Any]]:
    bundle = orjson.loads(path.read_bytes())
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient"]


def _rows(wh: Path, view: str) -> list[tuple[Any, ...]]:
    con = warehouse.connect(wh, read_only=True)
    try:
        return sorted(con.execute(f"SELECT * FROM views.{view}").fetchall(), key=repr)
    finally:
        con.close()


def _has_view(wh: Path, view: str) -> bool:
    con = duckdb.connect(str(wh), read_only=True)
    try:
        return has_table(con, view, VIEWS_SCHEMA)
    finally:
        con.close()


def _plant_in_a_condition(wh: Path, patient: str, text: str) -> str:
    """Put ``text`` in the display of one released Condition of ``patient`` (a leak the
    de-identification missed); the Condition's pseudonym."""
    con = warehouse.connect(wh)
    try:
        found = con.execute(
            "SELECT id, resource FROM deid_resources WHERE resource_type = 'Condition' "
            "AND patient_id = ? ORDER BY id LIMIT 1",
            [patient],
        ).fetchone()
        assert found is not None, "the victim has a released Condition"
        rid, resource = found[0], orjson.loads(found[1])
        coding = resource["code"]["coding"][0]
        coding["display"] = f"{coding.get('display', '')}, patient born {text}"
        con.execute(
            "UPDATE deid_resources SET resource = ? WHERE resource_type = 'Condition' AND id = ?",
            [orjson.dumps(resource).decode(), rid],
        )
        return str(rid)
    finally:
        con.close()


def _victim(cohort: Path, provider: FileKeyProvider) -> tuple[dict[str, Any], str]:
    """A patient of batch b1 with a released Condition: their original Patient resource and
    their pseudonym (computed here from the original id, not read back from the release)."""
    pseudo = Pseudonymizer(provider.pseudonym_key())
    con = warehouse.connect(cohort / "w.duckdb", read_only=True)
    try:
        with_conditions = {
            p
            for (p,) in con.execute(
                "SELECT DISTINCT patient_id FROM deid_resources WHERE resource_type = 'Condition'"
            ).fetchall()
        }
    finally:
        con.close()
    for path in sorted((cohort / "landing" / "b1").glob("[0-9]*.json")):
        for patient in _bundle_patients(path):
            key = pseudo.resource_key("Patient", patient["id"])
            if key in with_conditions:
                return patient, key
    raise AssertionError("no patient of b1 has a released Condition")


def _correction(folder: Path, patient: dict[str, Any], birth: str) -> None:
    """A batch holding a new version of ``patient`` with another birth date (and nothing
    else of theirs)."""
    corrected = {**patient, "birthDate": birth, "meta": {"versionId": "2"}}
    corrected.pop("text", None)  # the narrative stated the old date
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{patient['id']}",
                "resource": corrected,
                "request": {"method": "PUT", "url": f"Patient/{patient['id']}"},
            }
        ],
    }
    folder.mkdir(parents=True)
    (folder / "correction.json").write_bytes(orjson.dumps(bundle))


@pytest.mark.parametrize("with_new_patient", [False, True], ids=["unchanged", "incremental"])
def test_a_corrected_birth_date_in_a_kept_row_blocks_the_refresh(
    cohort: Path, key_provider: FileKeyProvider, with_new_patient: bool
) -> None:
    wh, work = cohort / "w.duckdb", cohort / "work"
    _release_batch(wh, key_provider, "b1", cohort / "landing" / "b1")
    patient, pseudonym = _victim(cohort, key_provider)
    old = date.fromisoformat(patient["birthDate"])
    new = old - timedelta(days=400)  # the real birth date, which a clinician had written down
    planted = _plant_in_a_condition(wh, pseudonym, f"{new.month}/{new.day}/{new.year}")

    built = _refresh(wh, key_provider, work)
    assert all(r.mode == "full" and r.result.published for r in built.values())
    before = _rows(wh, "condition")
    assert any(row[0] == planted and row[1] == pseudonym for row in before)  # same pseudonym

    # the correction: a new version of the Patient, none of their other resources
    _correction(cohort / "landing" / "b2", patient, new.isoformat())
    if with_new_patient:  # a new patient too: the Condition view changes in place
        shutil.copy(cohort / "late_patient.json", cohort / "landing" / "b2" / "late.json")
    _release_batch(wh, key_provider, "b2", cohort / "landing" / "b2")

    refreshed = _refresh(wh, key_provider, work, (CONDITION,))["condition"]
    assert refreshed.mode == ("incremental" if with_new_patient else "unchanged")
    assert refreshed.patients_rechecked == (2 if with_new_patient else 1)
    scan = refreshed.result.check
    assert not refreshed.result.published and not scan.passed
    assert scan.by_kind() == {"birth_date": 1}
    assert [hit.row for hit in scan.hits] == [planted]
    # the leak is in a row the published view holds: the view is taken down, table and file
    assert refreshed.withdrawn
    assert not _has_view(wh, "condition")
    assert not (work / "views" / "condition.parquet").exists()
    # the next refresh builds it in full, and refuses it again: still nothing to read
    again = _refresh(wh, key_provider, work, (CONDITION,))["condition"]
    assert again.mode == "full" and not again.result.published
    assert again.result.check.by_kind() == {"birth_date": 1}
    assert not _has_view(wh, "condition")
    assert not (work / "views" / "condition.parquet").exists()

    # the leak taken out of the release (the Condition released again without it): published
    con = warehouse.connect(wh)
    try:
        con.execute(
            "UPDATE deid_resources SET resource = json_object('resourceType', 'Condition', "
            "'id', id, 'subject', json_object('reference', 'Patient/' || patient_id)) "
            "WHERE resource_type = 'Condition' AND id = ?",
            [planted],
        )
    finally:
        con.close()
    fixed = _refresh(wh, key_provider, work, (CONDITION,))["condition"]
    assert fixed.mode == "full" and fixed.result.published and fixed.result.check.passed
    after = _rows(wh, "condition")
    assert planted in {row[0] for row in after}  # the Condition again, without the leak
    assert len(pq.read_table(work / "views" / "condition.parquet")) == len(after)
    settled = _refresh(wh, key_provider, work, (CONDITION,))["condition"]
    assert settled.mode == "unchanged" and settled.patients_rechecked == 0


class _CountingScans:
    """scan_released_table as the refresh calls it, counting the rows each call scanned."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self._scan = refresh_module.scan_released_table

    def __call__(self, *args: Any, **kwargs: Any) -> LeakScanResult:
        result = self._scan(*args, **kwargs)
        self.rows.append(result.scanned_rows)
        return result


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[_CountingScans]:
    spy = _CountingScans()
    monkeypatch.setattr(refresh_module, "scan_released_table", spy)
    yield spy


def _view_rows_of(wh: Path, view: str, patients: set[str]) -> int:
    con = warehouse.connect(wh, read_only=True)
    try:
        return sum(
            1
            for (p,) in con.execute(f"SELECT patient_id FROM views.{view}").fetchall()
            if p in patients
        )
    finally:
        con.close()


def test_without_a_birth_date_change_only_the_batchs_rows_are_scanned_row_by_row(
    cohort: Path, key_provider: FileKeyProvider, counting: _CountingScans
) -> None:
    wh, work = cohort / "w.duckdb", cohort / "work"
    _release_batch(wh, key_provider, "b1", cohort / "landing" / "b1")
    _refresh(wh, key_provider, work)
    late = {
        Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", p["id"])
        for p in _bundle_patients(cohort / "late_patient.json")
    }
    (cohort / "landing" / "b2").mkdir()
    shutil.copy(cohort / "late_patient.json", cohort / "landing" / "b2" / "late.json")
    _release_batch(wh, key_provider, "b2", cohort / "landing" / "b2")

    for view in (CONDITION, OBSERVATION):
        counting.rows.clear()
        refreshed = _refresh(wh, key_provider, work, (view,))[view.name]
        assert refreshed.mode == "incremental" and refreshed.result.published
        # row by row: the new patient's rows, and no kept row of anybody else
        assert sum(counting.rows) == _view_rows_of(wh, view.name, late) > 0
        assert sum(counting.rows) < len(_rows(wh, view.name))
        counting.rows.clear()
        unchanged = _refresh(wh, key_provider, work, (view,))[view.name]
        assert unchanged.mode == "unchanged" and unchanged.result.published
        assert unchanged.result.check.scanned_rows == 0 and sum(counting.rows) == 0


def test_a_view_without_the_record_searches_every_patients_rows_once(
    cohort: Path, key_provider: FileKeyProvider, counting: _CountingScans
) -> None:
    """Bookkeeping from before the record existed: each patient's rows are searched for their
    own birth date once, then the record holds them all."""
    wh, work = cohort / "w.duckdb", cohort / "work"
    _release_batch(wh, key_provider, "b1", cohort / "landing" / "b1")
    _refresh(wh, key_provider, work, (CONDITION,))
    con = warehouse.connect(wh)
    try:
        con.execute(f"DROP TABLE {BATCHES}")
    finally:
        con.close()
    counting.rows.clear()
    first = _refresh(wh, key_provider, work, (CONDITION,))["condition"]
    assert first.mode == "unchanged" and first.result.published
    assert sum(counting.rows) == len(_rows(wh, "condition"))
    counting.rows.clear()
    second = _refresh(wh, key_provider, work, (CONDITION,))["condition"]
    assert second.patients_rechecked == 0 and sum(counting.rows) == 0


def test_a_batch_ingested_again_with_a_corrected_birth_date_is_rechecked(
    cohort: Path, key_provider: FileKeyProvider
) -> None:
    """The correction re-sent in the same batch: the new version takes the old one's vault
    position, so no position above the last one seen tells it apart; the batch's new ingest
    does."""
    wh, work = cohort / "w.duckdb", cohort / "work"
    landing = cohort / "landing" / "b1"
    _release_batch(wh, key_provider, "b1", landing)
    patient, pseudonym = _victim(cohort, key_provider)
    new = date.fromisoformat(patient["birthDate"]) - timedelta(days=400)
    planted = _plant_in_a_condition(wh, pseudonym, new.isoformat())
    assert _refresh(wh, key_provider, work, (CONDITION,))["condition"].result.published
    con = warehouse.connect(wh, read_only=True)
    try:
        positions = con.execute("SELECT max(ingest_seq), count(*) FROM phi_vault").fetchall()
    finally:
        con.close()

    for path in landing.glob("[0-9]*.json"):
        bundle = orjson.loads(path.read_bytes())
        for entry in bundle["entry"]:
            if entry["resource"].get("id") == patient["id"]:
                entry["resource"]["birthDate"] = new.isoformat()
                entry["resource"].pop("text", None)
                path.write_bytes(orjson.dumps(bundle))
    ingest_batch(wh, "b1", landing, key_provider, workers=1)  # the vault only, as yet
    con = warehouse.connect(wh, read_only=True)
    try:
        assert con.execute("SELECT max(ingest_seq), count(*) FROM phi_vault").fetchall() == (
            positions
        )
    finally:
        con.close()

    refreshed = _refresh(wh, key_provider, work, (CONDITION,))["condition"]
    assert refreshed.mode == "unchanged" and not refreshed.result.published
    assert refreshed.withdrawn and not _has_view(wh, "condition")
    assert refreshed.result.check.by_kind() == {"birth_date": 1}
    assert [hit.row for hit in refreshed.result.check.hits] == [planted]


def test_the_record_holds_batches_and_digests_only(
    cohort: Path, key_provider: FileKeyProvider
) -> None:
    """Nothing for an erasure to purge: no patient's pseudonym, no PHI."""
    wh, work = cohort / "w.duckdb", cohort / "work"
    _release_batch(wh, key_provider, "b1", cohort / "landing" / "b1")
    _refresh(wh, key_provider, work)
    con = warehouse.connect(wh, read_only=True)
    try:
        columns = con.execute(f"DESCRIBE {BATCHES}").fetchall()
        assert [(c[0], c[1]) for c in columns] == [
            ("view", "VARCHAR"),
            ("batch_id", "VARCHAR"),
            ("digest", "UBIGINT"),
        ]
        recorded = con.execute(f"SELECT view, batch_id FROM {BATCHES} ORDER BY 1").fetchall()
        patients = {
            p for (p,) in con.execute("SELECT DISTINCT patient_key FROM phi_vault").fetchall()
        }
    finally:
        con.close()
    assert recorded == [(view.name, "b1") for view in sorted(VIEWS, key=lambda v: v.name)]
    assert not patients & {value for row in recorded for value in row}
