"""A batch is staged, scanned, and published only when the scan passes."""

from __future__ import annotations

import random
import shutil
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from deid import staging
from deid.policy import Policy
from deid.release import deidentify_batch
from deid.staging import publish_batch
from deid.terminology import Terminology
from fhirlake.synthetic import generate
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.read import iter_current_resources

TODAY = date(2026, 11, 28)
# an HbA1c of patient p1, the first version an export sends (read only: tests derive from it)
_HBA1C_V1: dict[str, Any] = {
    "resourceType": "Observation",
    "id": "o1",
    "status": "final",
    "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
    "subject": {"reference": "Patient/p1"},
    "valueQuantity": {"value": 7.4, "unit": "%"},
    "meta": {"versionId": "1"},
}


def _release(con: Any) -> list[tuple[str, str]]:
    return con.execute(
        "SELECT id, resource::VARCHAR FROM deid_resources ORDER BY resource_type, id"
    ).fetchall()


def _tables(con: Any) -> set[str]:
    return {t for (t,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}


def test_planted_leak_keeps_the_previous_release(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate(tmp_path / "landing", 3, seed=11)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", tmp_path / "landing", key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        first = publish_batch(con, key_provider, "b", Policy.shipped("research"), today=TODAY)
        assert first.published and first.scan.passed and first.report.released > 0
        published = _release(con)
        (recorded,) = con.execute("SELECT count(*) FROM release_quasi_identifiers").fetchone()
        assert recorded == 3
        # Patient rows wait for the release-wide k-anonymity step for their demographics
        patients = [
            orjson.loads(r) for i, r in published if orjson.loads(r)["resourceType"] == "Patient"
        ]
        assert patients and all("birthDate" not in p and "address" not in p for p in patients)

        victim = next(
            r for r in iter_current_resources(con, key_provider) if r["resourceType"] == "Patient"
        )
        phone = victim["telecom"][0]["value"]
        digits = "".join(ch for ch in phone if ch.isdigit())

        def leaky(con: Any, *args: Any, target: str, **kwargs: Any) -> Any:
            report = deidentify_batch(con, *args, target=target, **kwargs)
            note = {"resourceType": "Observation", "valueString": f"call back on {digits}"}
            con.execute(
                f"INSERT INTO {target} (resource_type, id, patient_id, batch_id, resource) "
                "VALUES ('Observation', 'x', NULL, 'b', ?)",
                [orjson.dumps(note).decode()],
            )
            return report

        monkeypatch.setattr(staging, "deidentify_batch", leaky)
        second = publish_batch(con, key_provider, "b", Policy.shipped("research"), today=TODAY)
        assert not second.published and second.scan.by_kind() == {"phone": 1}
        assert _release(con) == published  # the previous release, untouched
        assert not {t for t in _tables(con) if t.startswith("deid_stage_")}
    finally:
        con.close()


def test_failed_first_release_publishes_nothing(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate(tmp_path / "landing", 2, seed=12)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b", tmp_path / "landing", key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        name = next(
            r for r in iter_current_resources(con, key_provider) if r["resourceType"] == "Patient"
        )["name"][0]["family"]

        def leaky(con: Any, *args: Any, target: str, **kwargs: Any) -> Any:
            report = deidentify_batch(con, *args, target=target, **kwargs)
            con.execute(f"UPDATE {target} SET resource = json_object('note', ?)", [name])
            return report

        monkeypatch.setattr(staging, "deidentify_batch", leaky)
        result = publish_batch(con, key_provider, "b", Policy.shipped("research"), today=TODAY)
        assert not result.published
        tables = _tables(con)
        assert "deid_resources" not in tables or not _release(con)
        assert not {t for t in tables if t.startswith("deid_stage_")}
    finally:
        con.close()


def _first_day_changed(con: Any, provider: FileKeyProvider) -> date | None:
    """Counted from the vault: the first day after TODAY on which a birth date of the batch
    crosses the age limit (1 January of the year it is 90 years before: the limit counts
    calendar years), or, for one over it (released as the year of 90), the next 1 January."""
    days = []
    for resource in iter_current_resources(con, provider):
        born = resource.get("birthDate") if resource["resourceType"] == "Patient" else None
        if born:
            days.append(_reference_until(born))
    return min(days, default=None)


def _reference_until(born: str, today: date = TODAY) -> date:
    """Research: 1 January of the year of a birth date's 90th anniversary, or, when that year
    has come, the next 1 January (the year of 90 it is released as moves on)."""
    ninety = date(int(born[:4]) + 90, 1, 1)
    return ninety if ninety > today else date(today.year + 1, 1, 1)


def test_a_batch_records_a_new_year_never_a_birthday(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """One-patient batches of random birth dates (near the age limit, most of them): each
    ledger row's stable_until, stored in clear beside the batch, is a 1 January, the one the
    plain reference gives: a year, where it was the patient's 90th birthday."""
    rng = random.Random(20261207)
    births = [date(1930, 1, 1) + timedelta(days=rng.randrange(12 * 366)) for _ in range(10)]
    births += [date(1936, 12, 8), date(1937, 2, 28), date(1940, 2, 29), date(1937, 12, 31)]
    wh = tmp_path / "w.duckdb"
    research = Policy.shipped("research")
    for n, born in enumerate(births):
        land = tmp_path / f"export{n}"
        land.mkdir()
        patient = {"resourceType": "Patient", "id": f"p{n}", "birthDate": born.isoformat()}
        (land / "data.ndjson").write_bytes(orjson.dumps(patient) + b"\n")
        ingest_batch(wh, f"b{n}", land, key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        for n in range(len(births)):
            assert publish_batch(con, key_provider, f"b{n}", research, today=TODAY).published
        recorded = dict(con.execute("SELECT batch_id, stable_until FROM deid_batches").fetchall())
    finally:
        con.close()
    assert recorded == {
        f"b{n}": _reference_until(born.isoformat()) for n, born in enumerate(births)
    }
    assert {(day.month, day.day) for day in recorded.values()} == {(1, 1)}


def _settled(con: Any, policy: Policy, today: date = TODAY) -> set[str]:
    return staging.deidentified_batches(con, staging.settings_digest(policy), today)


def test_the_ledger_names_a_batch_published_from_its_vault_state_under_the_same_settings(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    generate(tmp_path / "landing", 2, seed=13)
    wh = tmp_path / "w.duckdb"
    research, safe_harbor = Policy.shipped("research"), Policy.shipped("safe_harbor")
    ingest_batch(wh, "b", tmp_path / "landing", key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        assert _settled(con, research) == set()  # ingested, never de-identified
        assert publish_batch(con, key_provider, "b", research, today=TODAY).published
        assert _settled(con, research) == {"b"}
        # what else the rows depend on: another policy or terminology needs a new pass; another
        # day only from the first day a date of the batch crosses the age limit (or a new year
        # for a birth date over it)
        until = _first_day_changed(con, key_provider)
        assert until is not None and until > TODAY
        assert _settled(con, research, until - timedelta(days=1)) == {"b"}
        assert _settled(con, research, until) == set()
        assert staging.day_changed_batches(con, None, until) == {"b"}
        assert staging.day_changed_batches(con, None, until - timedelta(days=1)) == set()
        # out of date: under other settings, or past its day; current: neither
        settings = staging.settings_digest(research)
        other = staging.settings_digest(safe_harbor)
        eve = until - timedelta(days=1)
        assert staging.outdated_batches(con, settings, eve) == set()
        assert staging.outdated_batches(con, settings, until) == {"b"}
        assert staging.outdated_batches(con, other, eve) == {"b"}
        assert _settled(con, safe_harbor) == set()
        other_terms = Terminology(displays={("http://loinc.org", "1-8"): "a display"})
        assert (
            staging.deidentified_batches(con, staging.settings_digest(research, other_terms))
            == set()
        )
        # bookkeeping only: batch ids and digests, no patient's id
        info = con.execute("SELECT name FROM pragma_table_info('deid_batches')").fetchall()
        columns = {c for (c,) in info}
        assert columns == {"batch_id", "vault_digest", "settings", "published_at", "stable_until"}
    finally:
        con.close()

    # the same files ingested again: another vault state, so another pass
    ingest_batch(wh, "b", tmp_path / "landing", key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        assert _settled(con, research) == set()
        assert publish_batch(con, key_provider, "b", research, today=TODAY).published
        assert _settled(con, research) == {"b"}

        # a pass whose scan fails takes the batch out of the ledger: the next one runs again
        victim = next(
            r for r in iter_current_resources(con, key_provider) if r["resourceType"] == "Patient"
        )
        family = victim["name"][0]["family"]

        def leaky(con: Any, *args: Any, target: str, **kwargs: Any) -> Any:
            report = deidentify_batch(con, *args, target=target, **kwargs)
            con.execute(f"UPDATE {target} SET resource = json_object('note', ?)", [family])
            return report

        monkeypatch.setattr(staging, "deidentify_batch", leaky)
        assert not publish_batch(con, key_provider, "b", research, today=TODAY).published
        assert _settled(con, research) == set()
    finally:
        con.close()


def test_a_resource_sent_again_with_an_older_instant_keeps_its_newest_version_released(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two exports of one Observation without a versionId; the second, arriving later, holds
    the older version, its lastUpdated written in another zone (10:00+05:00 is 05:00 UTC, an
    hour before 06:00Z, though its text sorts after)."""
    patient = {"resourceType": "Patient", "id": "p1", "birthDate": "1960-05-01"}
    observation = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/p1"},
    }
    versions = [("2024-03-01T06:00:00Z", 61), ("2024-03-01T10:00:00+05:00", 99)]
    wh = tmp_path / "w.duckdb"
    for n, (instant, rate) in enumerate(versions):
        land = tmp_path / f"export{n}"
        land.mkdir()
        resource = {
            **observation,
            "valueQuantity": {"value": rate, "unit": "/min"},
            "meta": {"lastUpdated": instant},
        }
        entries = [patient, resource] if n == 0 else [resource]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "collection"}
        bundle["entry"] = [{"resource": r} for r in entries]
        (land / "export.json").write_bytes(orjson.dumps(bundle))
        ingest_batch(wh, f"b{n}", land, key_provider, workers=1)
    research = Policy.shipped("research")
    con = warehouse.connect(wh)
    try:
        for batch in ("b0", "b1"):
            assert publish_batch(con, key_provider, batch, research, today=TODAY).published
        released = [orjson.loads(r) for _, r in _release(con)]
        values = [r["valueQuantity"]["value"] for r in released if r["resourceType"] != "Patient"]
        assert values == [61]  # the newest instant's version, though it arrived first
        # batches published under another rule for the newest version are not settled: the
        # next `ehr run` de-identifies them again
        assert _settled(con, research) == {"b0", "b1"}
        monkeypatch.setattr(staging, "NEWEST_VERSION_FIRST", "ingest_seq DESC")
        assert _settled(con, research) == set()
    finally:
        con.close()


def test_identifiers_glued_to_letters_in_kept_codes_keep_the_batch_unpublished(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """The MRN and SSN glued to a prefix and the phone in E.164 form, in the Coding codes and
    versions the research profile keeps: the scan finds them and the batch is not published."""
    subject = {"reference": "Patient/p5"}
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "Patient",
            "id": "p5",
            "identifier": [
                {"system": "http://hospital.example.org/mrn", "value": "55190377"},
                {"system": "http://hl7.org/fhir/sid/us-ssn", "value": "624-18-3307"},
            ],
            "telecom": [{"system": "phone", "value": "(508) 555-0163"}],
        },
        {
            "resourceType": "Observation",
            "id": "o5",
            "status": "final",
            "subject": subject,
            "category": [
                {
                    "coding": [
                        {"system": "http://hospital.example.org/cat", "code": "tel+15085550163"}
                    ]
                }
            ],
            "code": {
                "coding": [
                    {"system": "http://loinc.org", "code": "8302-2"},
                    {
                        "system": "http://hospital.example.org/local",
                        "version": "SSN624183307",
                        "code": "MRN55190377",
                    },
                ]
            },
        },
        {
            "resourceType": "Encounter",
            "id": "e5",
            "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "subject": subject,
            "type": [
                {"coding": [{"system": "http://hospital.example.org/t", "code": "SSN624183307"}]}
            ],
        },
    ]
    landing = tmp_path / "landing"
    landing.mkdir()
    for resource in resources:
        (landing / f"{resource['id']}.json").write_bytes(orjson.dumps(resource))
    wh = tmp_path / "w.duckdb"
    assert ingest_batch(wh, "b", landing, key_provider, workers=1).accepted == 3
    con = warehouse.connect(wh)
    try:
        result = publish_batch(con, key_provider, "b", Policy.shipped("research"), today=TODAY)
        assert not result.published
        assert result.scan.by_kind() == {"identifier": 1, "ssn": 2, "phone": 1}
        assert "deid_resources" not in _tables(con) or not _release(con)
    finally:
        con.close()


def test_identifiers_typed_as_numbers_keep_the_batch_unpublished(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """An SSN typed into an HbA1c value and the birth date written 19460219 as a BMI: numbers
    the research profile keeps. The scan finds them, so they reach no view, feature or Feast."""
    subject = {"reference": "Patient/p6"}

    def lab(n: int, loinc: str, value: float) -> dict[str, Any]:
        return {
            "resourceType": "Observation",
            "id": f"o6{n}",
            "status": "final",
            "subject": subject,
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "valueQuantity": {"value": value, "unit": "%"},
        }

    patient = {
        "resourceType": "Patient",
        "id": "p6",
        "birthDate": "1946-02-19",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "264-87-6926"}],
    }
    landing = tmp_path / "landing"
    landing.mkdir()
    for resource in (patient, lab(1, "4548-4", 264876926), lab(2, "39156-5", 19460219.0)):
        (landing / f"{resource['id']}.json").write_bytes(orjson.dumps(resource))
    wh = tmp_path / "w.duckdb"
    assert ingest_batch(wh, "b", landing, key_provider, workers=1).accepted == 3
    con = warehouse.connect(wh)
    try:
        result = publish_batch(con, key_provider, "b", Policy.shipped("research"), today=TODAY)
        assert not result.published
        assert set(result.scan.by_kind()) == {"ssn", "birth_date"}
        assert "deid_resources" not in _tables(con) or not _release(con)
    finally:
        con.close()


def test_a_name_in_a_references_type_is_neither_indexed_nor_released(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """``encounter: CourtneyBarajas/x1``: a name where the resource type stands. It was kept
    as the reference's type in the vault's plain-text reference index and in the release."""
    name = "Quorvina" + "Zabrowskyte"
    patient = {"resourceType": "Patient", "id": "p7", "name": [{"family": "Zabrowskyte"}]}
    lab = {
        "resourceType": "Observation",
        "id": "o7",
        "status": "final",
        "subject": {"reference": "Patient/p7"},
        "encounter": {"reference": f"{name}/x1"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
        "valueQuantity": {"value": 7.1, "unit": "%"},
    }
    landing = tmp_path / "landing"
    landing.mkdir()
    for resource in (patient, lab):
        (landing / f"{resource['id']}.json").write_bytes(orjson.dumps(resource))
    wh = tmp_path / "w.duckdb"
    assert ingest_batch(wh, "b", landing, key_provider, workers=1).accepted == 2
    con = warehouse.connect(wh)
    try:
        index = con.execute("SELECT * FROM resource_references").fetchall()
        assert name not in repr(index) and len(index) == 1  # the subject only
        assert publish_batch(
            con, key_provider, "b", Policy.shipped("research"), today=TODAY
        ).published
        released = [orjson.loads(r) for _, r in _release(con)]
        (observation,) = [r for r in released if r["resourceType"] == "Observation"]
        assert "encounter" not in observation and name not in repr(released)
    finally:
        con.close()


def test_a_resource_changed_in_a_later_batch_is_released_once_as_its_newest_version(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """An export corrects a lab and the patient's sex that an earlier export sent: the release
    holds each resource once, the later version (worked out here from the two exports: the
    second carries versionId 2), not the earlier batch's row beside it."""
    first = [
        {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1960-05-01"},
        _HBA1C_V1,
    ]
    second = [
        {**first[0], "gender": "female"},
        {**first[1], "valueQuantity": {"value": 9.9, "unit": "%"}, "meta": {"versionId": "2"}},
    ]
    wh = tmp_path / "w.duckdb"
    research = Policy.shipped("research")
    # each export ingested and published in turn, as the landing sensor and `ehr run` do: the
    # first batch's rows are published before the second batch exists
    for n, entries in enumerate((first, second)):
        land = tmp_path / f"export{n}"
        land.mkdir()
        bundle = {"resourceType": "Bundle", "type": "collection"}
        bundle["entry"] = [{"resource": r} for r in entries]  # type: ignore[assignment]
        (land / "export.json").write_bytes(orjson.dumps(bundle))
        ingest_batch(wh, f"b{n}", land, key_provider, workers=1)
        con = warehouse.connect(wh)
        try:
            assert publish_batch(con, key_provider, f"b{n}", research, today=TODAY).published
        finally:
            con.close()
    con = warehouse.connect(wh)
    try:
        rows = con.execute(
            "SELECT resource_type, batch_id, resource FROM deid_resources ORDER BY resource_type"
        ).fetchall()
        assert [(kind, batch) for kind, batch, _ in rows] == [
            ("Observation", "b1"),
            ("Patient", "b1"),
        ]
        observation = orjson.loads(rows[0][2])
        assert observation["valueQuantity"]["value"] == second[1]["valueQuantity"]["value"]
        ((sex,),) = con.execute("SELECT sex FROM release_quasi_identifiers").fetchall()
        assert sex == second[0]["gender"]
        # the first batch published again (a settings change) does not bring its version back
        assert publish_batch(con, key_provider, "b0", research, today=TODAY).published
        assert con.execute("SELECT count(*) FROM deid_resources").fetchall() == [(2,)]
    finally:
        con.close()


def test_a_resource_its_later_batch_no_longer_holds_is_released_again_from_the_earlier_one(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A later export sent a lab's second version, then was corrected to drop the lab. The
    vault's newest version is the first export's again, whose released row the second version
    had replaced: the first batch leaves the ledger, and publishing it again (what the next
    `ehr run` does) releases its version, once."""
    patient = {"resourceType": "Patient", "id": "p1", "gender": "male", "birthDate": "1960-05-01"}
    lab = _HBA1C_V1
    newer = {**lab, "valueQuantity": {"value": 9.9, "unit": "%"}, "meta": {"versionId": "2"}}
    wh = tmp_path / "w.duckdb"
    research = Policy.shipped("research")

    def export(batch: str, entries: list[dict[str, Any]]) -> None:
        land = tmp_path / batch
        shutil.rmtree(land, ignore_errors=True)
        land.mkdir()
        bundle = {"resourceType": "Bundle", "type": "collection"}
        bundle["entry"] = [{"resource": r} for r in entries]  # type: ignore[assignment]
        (land / "export.json").write_bytes(orjson.dumps(bundle))
        ingest_batch(wh, batch, land, key_provider, workers=1)
        con = warehouse.connect(wh)
        try:
            assert publish_batch(con, key_provider, batch, research, today=TODAY).published
        finally:
            con.close()

    def released_values(con: Any) -> list[tuple[str, float]]:
        rows = con.execute(
            "SELECT batch_id, resource FROM deid_resources WHERE resource_type = 'Observation'"
        ).fetchall()
        return [(batch, orjson.loads(r)["valueQuantity"]["value"]) for batch, r in rows]

    export("b0", [patient, lab])
    export("b1", [patient, newer])
    con = warehouse.connect(wh)
    try:
        assert released_values(con) == [("b1", 9.9)]
    finally:
        con.close()
    export("b1", [patient])  # the corrected second export: the lab is not in it
    con = warehouse.connect(wh)
    try:
        assert "b0" not in _settled(con, research)  # the next run publishes it again
        assert publish_batch(con, key_provider, "b0", research, today=TODAY).published
        assert released_values(con) == [("b0", 7.4)]
        assert _settled(con, research) == {"b0", "b1"}
    finally:
        con.close()


def test_the_systems_released_upper_cased_are_part_of_the_settings_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch released while a lower-case ICD-10-CM code was withheld is de-identified again."""
    research = Policy.shipped("research")
    now = staging.settings_digest(research)
    monkeypatch.setattr(staging, "UPPER_CASE_SYSTEMS", frozenset())
    assert staging.settings_digest(research) != now


def test_the_references_resolved_by_ingest_are_part_of_the_settings_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch released while absolute references to Bundle entries were dropped is
    de-identified again."""
    research = Policy.shipped("research")
    now = staging.settings_digest(research)
    monkeypatch.setattr(staging, "INGEST_RESOLVED_KINDS", ("urn", "conditional"))
    assert staging.settings_digest(research) != now


def test_the_leak_scan_rules_are_part_of_the_settings_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch published before the scan found a birth date written 19-FEB-1946 or an address
    written 709-Michele-Prairie is de-identified and scanned again."""
    research = Policy.shipped("research")
    now = staging.settings_digest(research)
    monkeypatch.setattr(staging, "SCAN_RULES", ())
    assert staging.settings_digest(research) != now


def test_a_batch_drops_what_was_released_of_a_compartment_refused_as_an_erased_person(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """Records naming a new Patient id, released from one batch; a later batch brings that
    Patient with an erased person's identifier, and ingest refuses it and erases what the
    earlier batch stored for the id (vault.lifecycle.erase_earlier_compartments): publishing
    the later batch drops the earlier batch's released rows of her."""
    from vault.audit import AuditLog
    from vault.lifecycle import forget_in_warehouse
    from vault.pseudonym import Pseudonymizer

    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "urn:mrn", "value": "MRN-1"}],
        "name": [{"family": "Fennimore"}],
    }
    hers = {**_HBA1C_V1, "id": "o-early", "subject": {"reference": "Patient/p1-new"}}
    other = {"resourceType": "Patient", "id": "p2", "gender": "male"}
    wh = tmp_path / "w.duckdb"
    for batch, resources in (("b0", [patient]), ("b1", [hers, other])):
        land = tmp_path / batch
        land.mkdir()
        bundle = {"resourceType": "Bundle", "type": "collection"}
        bundle["entry"] = [{"resource": r} for r in resources]
        (land / "export.json").write_bytes(orjson.dumps(bundle))
        ingest_batch(wh, batch, land, key_provider, workers=1)
    pseudo = Pseudonymizer(key_provider.pseudonym_key())
    audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
    forget_in_warehouse(wh, pseudo.resource_key("Patient", "p1"), audit, "erasure request")
    research = Policy.shipped("research")
    con = warehouse.connect(wh)
    try:
        assert publish_batch(con, key_provider, "b1", research, today=TODAY).published
        assert {i for i, _ in _release(con)} == {
            pseudo.resource_key("Observation", "o-early"),
            pseudo.resource_key("Patient", "p2"),
        }
    finally:
        con.close()
    land = tmp_path / "b2"
    land.mkdir()
    (land / "Patient.ndjson").write_bytes(orjson.dumps({**patient, "id": "p1-new"}) + b"\n")
    ingest_batch(wh, "b2", land, key_provider, workers=1)
    con = warehouse.connect(wh)
    try:
        assert publish_batch(con, key_provider, "b2", research, today=TODAY).published
        assert {i for i, _ in _release(con)} == {pseudo.resource_key("Patient", "p2")}
    finally:
        con.close()


def test_a_batch_naming_a_patient_of_an_earlier_batch_is_not_published(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A batch's rows are scanned against every patient of the vault, not only its own: a code
    in another patient's record naming a patient of an earlier batch was published (the views'
    scan found it later, with the release's canaries, and the release failed)."""
    earlier = {
        "resourceType": "Patient",
        "id": "pa",
        "name": [{"given": ["Hollis"], "family": "Quenbyrd"}],
    }
    other = {"resourceType": "Patient", "id": "pb", "gender": "male"}
    coded = {
        "resourceType": "Observation",
        "id": "ob",
        "status": "final",
        "code": {"coding": [{"system": "http://hospital.example/local", "code": "QUENBYRD"}]},
        "subject": {"reference": "Patient/pb"},
    }
    wh = tmp_path / "w.duckdb"
    for batch, resources in (("b1", [earlier]), ("b2", [other, coded])):
        (tmp_path / batch).mkdir()
        for resource in resources:
            (tmp_path / batch / f"{resource['id']}.json").write_bytes(orjson.dumps(resource))
        ingest_batch(wh, batch, tmp_path / batch, key_provider, workers=1)
    research = Policy.shipped("research")
    con = warehouse.connect(wh)
    try:
        assert publish_batch(con, key_provider, "b1", research, today=TODAY).published
        second = publish_batch(con, key_provider, "b2", research, today=TODAY)
        assert not second.published and second.scan.by_kind() == {"name": 1}
        assert "b2" not in {
            b for (b,) in con.execute("SELECT batch_id FROM deid_resources").fetchall()
        }
    finally:
        con.close()


def _visit(eid: str, patient: str, number: str | None) -> dict[str, Any]:
    visit: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
    }
    if number is not None:
        visit["identifier"] = [{"system": "http://hospital.example/visit", "value": number}]
    return visit


@pytest.mark.parametrize(
    ("code", "found"),
    [
        ("VN88213377", True),  # the visit number, as a code writes it
        ("VN-88213377", True),
        ("CLM55103321", True),  # the claim number
        ("VN88213378", False),  # another number
    ],
)
def test_a_visit_or_claim_number_written_as_a_code_is_not_published(
    tmp_path: Path, key_provider: FileKeyProvider, code: str, found: bool
) -> None:
    """An Encounter's and a Claim's identifiers are the patient's canaries (a visit number, a
    claim number), read from the records that hold one."""
    claim = {
        "resourceType": "Claim",
        "id": "c1",
        "status": "active",
        "use": "claim",
        "created": "2025-03-02",
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                             "code": "institutional"}]},
        "patient": {"reference": "Patient/pa"},
        "provider": {"display": "Clinic"},
        "priority": {"coding": [{"code": "normal"}]},
        "insurance": [{"sequence": 1, "focal": True, "coverage": {"display": "Plan"}}],
        "identifier": [{"system": "http://hospital.example/claim", "value": "CLM-55103321"}],
    }  # fmt: skip
    coded = {
        "resourceType": "Observation",
        "id": "ob",
        "status": "final",
        "code": {"coding": [{"system": "http://hospital.example/local", "code": code}]},
        "subject": {"reference": "Patient/pb"},
    }
    batches = (
        ("b1", [{"resourceType": "Patient", "id": "pa"}, _visit("e1", "pa", "VN-88213377"),
                _visit("e2", "pa", None), claim]),
        ("b2", [{"resourceType": "Patient", "id": "pb"}, coded]),
    )  # fmt: skip
    wh = tmp_path / "w.duckdb"
    for batch, resources in batches:
        (tmp_path / batch).mkdir()
        for resource in resources:
            (tmp_path / batch / f"{resource['id']}.json").write_bytes(orjson.dumps(resource))
        assert ingest_batch(wh, batch, tmp_path / batch, key_provider, workers=1).accepted == len(
            resources
        )
    research = Policy.shipped("research")
    con = warehouse.connect(wh)
    try:
        assert publish_batch(con, key_provider, "b1", research, today=TODAY).published
        second = publish_batch(con, key_provider, "b2", research, today=TODAY)
        assert second.published is not found
        if found:
            assert set(second.scan.by_kind()) == {"identifier"}
    finally:
        con.close()
