"""The de-identification stage on synthetic data: vault → policy → released tables."""

from __future__ import annotations

import re
from datetime import date
from pathlib import Path

import orjson
import pytest

from deid.policy import Policy
from deid.release import build_released_patients, deidentify_batch, scan_released_batch
from fhirlake.synthetic import generate
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.read import iter_current_resources

TODAY = date(2026, 11, 28)


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("landing")
    generate(root / "b", 25, seed=21)
    return root / "b"


def _released(con, batch: str = "b") -> list[dict]:
    rows = con.execute("SELECT resource FROM deid_resources WHERE batch_id = ?", [batch]).fetchall()
    return [orjson.loads(r) for (r,) in rows]


def test_research_profile_releases_a_joinable_graph_without_phi(
    tmp_path: Path, key_provider: FileKeyProvider, landing: Path
) -> None:
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", landing, key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        report = deidentify_batch(con, key_provider, "b", Policy.shipped("research"), today=TODAY)
        assert report.released == report.resources_in > 2000 and report.withheld == 0
        scan = scan_released_batch(con, key_provider, "b")
        assert scan.passed, scan.by_kind()
        released = _released(con)
        originals = {
            (r["resourceType"], r["id"]): r for r in iter_current_resources(con, key_provider)
        }
    finally:
        con.close()
    ids = {(r["resourceType"], r["id"]) for r in released}
    refs = re.findall(rb'"reference":"([A-Za-z]+)/([0-9a-f]{32})"', orjson.dumps(released))
    assert refs and all((t.decode(), i.decode()) in ids for t, i in refs)  # the graph joins
    # no original id survives, nor any free text
    assert not ids & set(originals)
    blob = orjson.dumps(released)
    assert b'"div"' not in blob and b'"data"' not in blob and b'"note"' not in blob
    # dates move by one secret offset per patient: intervals within a patient survive
    by_patient_shift: dict[str, set[int]] = {}
    for r in released:
        if r["resourceType"] != "Encounter":
            continue
        original = next(
            o
            for o in originals.values()
            if o["resourceType"] == "Encounter"
            and o.get("period", {}).get("start", "")[:4].isdigit()
            and _pseudo(key_provider, "Encounter", o["id"]) == r["id"]
        )
        shift = (
            date.fromisoformat(r["period"]["start"][:10])
            - date.fromisoformat(original["period"]["start"][:10])
        ).days
        by_patient_shift.setdefault(r["subject"]["reference"], set()).add(shift)
    assert by_patient_shift
    for shifts in by_patient_shift.values():
        assert len(shifts) == 1 and 1 <= abs(next(iter(shifts))) <= 50


def _pseudo(provider: FileKeyProvider, rtype: str, rid: str) -> str:
    from vault.pseudonym import Pseudonymizer

    return Pseudonymizer(provider.pseudonym_key()).resource_key(rtype, rid)


def test_safe_harbor_keeps_years_only_and_caps_ages(
    tmp_path: Path, key_provider: FileKeyProvider, landing: Path
) -> None:
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", landing, key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        deidentify_batch(con, key_provider, "b", Policy.shipped("safe_harbor"), today=TODAY)
        released = _released(con)
    finally:
        con.close()
    patients = [r for r in released if r["resourceType"] == "Patient"]
    assert patients
    for p in patients:
        assert "birthDate" not in p or re.fullmatch(r"\d{4}", p["birthDate"])
        if "birthDate" in p:
            assert TODAY.year - int(p["birthDate"]) <= 89
        for addr in p.get("address", []):
            assert set(addr) <= {"state", "country", "postalCode"}
            assert re.fullmatch(r"\d{3}00|00000", addr.get("postalCode", "00000"))
    dates = re.findall(
        rb'"(?:start|end|date|authoredOn|recordedDate|occurrenceDateTime)":"([^"]+)"',
        orjson.dumps(released),
    )
    assert dates and all(re.fullmatch(rb"\d{4}", d) for d in dates)


def test_planted_leak_fails_the_scan(
    tmp_path: Path, key_provider: FileKeyProvider, landing: Path
) -> None:
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", landing, key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        deidentify_batch(con, key_provider, "b", Policy.shipped("research"), today=TODAY)
        patient = next(
            r for r in iter_current_resources(con, key_provider) if r["resourceType"] == "Patient"
        )
        name = f"{patient['name'][0]['given'][0]} {patient['name'][0]['family']}"
        con.execute(
            "INSERT INTO deid_resources (resource_type, id, patient_id, batch_id, resource) "
            "VALUES ('Observation', 'x', NULL, 'b', ?)",
            [orjson.dumps({"resourceType": "Observation", "valueString": name.upper()}).decode()],
        )
        scan = scan_released_batch(con, key_provider, "b")
    finally:
        con.close()
    assert not scan.passed and {h.row for h in scan.hits} == {"x"}


def test_released_patients_reach_k(
    tmp_path: Path, key_provider: FileKeyProvider, landing: Path
) -> None:
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", landing, key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        deidentify_batch(con, key_provider, "b", Policy.shipped("research"), today=TODAY)
        # 25 patients are too few for k=3 over six quasi-identifiers: many must be withheld,
        # and the check says so; a lenient limit lets the same release through
        strict = build_released_patients(con, k=3, as_of=TODAY)
        assert not strict.passed and not strict.published and strict.withheld_share > 0.05
        report = build_released_patients(con, k=3, as_of=TODAY, max_withheld=0.8)
        assert report.published and report.after.passed
        assert report.after.records + report.withheld == 25
        bands = {b for (b,) in con.execute("SELECT age_band FROM released_patients").fetchall()}
        (withheld,) = con.execute("SELECT count(*) FROM withheld_patients").fetchone()
    finally:
        con.close()
    assert withheld == report.withheld
    assert bands <= {"90+", "unknown"} | {b for b in bands if re.fullmatch(r"\d+-\d+", b)}
