from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest

from fhirlake.synthetic import generate
from vault import warehouse
from vault.audit import AuditLog
from vault.errors import InvalidCiphertext, KeyMaterialError, PseudonymKeyMismatchError
from vault.ingest import ERASED_SUBJECT, BatchIngestor, ingest_batch, reconcile_batch
from vault.keys import FileKeyProvider
from vault.lifecycle import ErasureReport, forget_in_warehouse
from vault.pseudonym import Pseudonymizer
from vault.read import iter_current_resources, read_resource


def _bundle(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{r['id']}",
                "resource": r,
                "request": {"method": "POST", "url": r["resourceType"]},
            }
            for r in entries
        ],
    }


PID = "6f1b9d3c-0000-4000-8000-000000000001"
EID = "6f1b9d3c-0000-4000-8000-000000000002"
PATIENT = {
    "resourceType": "Patient",
    "id": PID,
    "name": [{"family": "Quillfeather", "given": ["Marisol"]}],
    "birthDate": "1948-02-29",
    "telecom": [{"system": "phone", "value": "555-0134-77"}],
}
ENCOUNTER = {
    "resourceType": "Encounter",
    "id": EID,
    "status": "finished",
    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
    "subject": {"reference": f"urn:uuid:{PID}"},
    "serviceProvider": {"reference": "Organization?identifier=urn:org|77"},
}


def _write(folder: Path, name: str, obj: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(orjson.dumps(obj))
    return path


def _ledger(wh: Path, batch: str) -> dict[str, int]:
    con = warehouse.connect(wh, read_only=True)
    try:
        rows = con.execute(
            "SELECT outcome, count(*) FROM record_ledger WHERE batch_id = ? GROUP BY 1", [batch]
        ).fetchall()
    finally:
        con.close()
    return dict(rows)


def test_bundle_ingest_encrypts_resolves_and_reconciles(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    land = tmp_path / "land"
    _write(land, "p.json", _bundle([PATIENT, ENCOUNTER]))
    org = {
        "resourceType": "Organization",
        "id": "org77",
        "identifier": [{"system": "urn:org", "value": "77"}],
    }
    _write(land, "org.json", org)
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (3, 3, 0)
    assert report.unresolved_references == 0  # urn and conditional references both resolve
    con = warehouse.connect(wh, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
        patient = read_resource(con, key_provider, "Patient", PID)
        assert patient == PATIENT
        owners = con.execute(
            "SELECT resource_type, patient_key FROM phi_vault ORDER BY resource_type"
        ).fetchall()
        enc_owner = dict(owners)["Encounter"]
        assert enc_owner == dict(owners)["Patient"] and dict(owners)["Organization"] is None
        assert len(list(iter_current_resources(con, key_provider))) == 3
    finally:
        con.close()
    assert b"Quillfeather" not in wh.read_bytes()
    assert PID.encode() not in wh.read_bytes()


def test_reingest_changes_nothing_and_versions_supersede(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    land = tmp_path / "land"
    _write(land, "p.json", _bundle([PATIENT, ENCOUNTER]))
    wh = tmp_path / "w.duckdb"
    first = ingest_batch(wh, "b1", land, key_provider, workers=1)
    again = ingest_batch(wh, "b1", land, key_provider, workers=1)  # same partition re-run
    assert first.outcomes == again.outcomes == {"new": 2}
    resend = ingest_batch(wh, "b2", land, key_provider, workers=1)  # same file, new batch
    assert resend.outcomes == {"unchanged": 2}

    newer = dict(PATIENT, meta={"versionId": "2"}, gender="female")
    _write(tmp_path / "v2", "p.json", newer)
    older = dict(PATIENT, meta={"versionId": "1"}, gender="male")
    _write(tmp_path / "v1", "p.json", older)
    assert ingest_batch(wh, "b3", tmp_path / "v2", key_provider, workers=1).outcomes == {
        "updated": 1
    }
    ingest_batch(wh, "b4", tmp_path / "v1", key_provider, workers=1)  # arrives late
    con = warehouse.connect(wh, read_only=True)
    try:
        current = read_resource(con, key_provider, "Patient", PID)
        assert current is not None and current["gender"] == "female"
        for batch in ("b1", "b2", "b3", "b4"):
            assert reconcile_batch(con, batch).passed
    finally:
        con.close()


def test_a_resource_set_back_to_an_earlier_content_is_its_newest_version(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A research opt-out (an active deny), made inactive by a later export, then active
    again in the export after it, written exactly as the first time (no versionId, no
    lastUpdated: the order of arrival decides). The last export's word is the current
    version: the deny is active, whatever an earlier batch held the same content. A repeat of
    the current version is still a repeat, and so is an earlier version sent again late."""
    deny = {
        "resourceType": "Consent",
        "id": "c-optout",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "research",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{PID}"},
        "provision": {"type": "deny"},
    }
    withdrawn = dict(deny, status="inactive")
    for name, consent in (("one", deny), ("two", withdrawn), ("three", deny), ("four", deny)):
        _write(tmp_path / name, "c.json", consent)
    _write(tmp_path / "one", "p.json", PATIENT)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "one", tmp_path / "one", key_provider, workers=1)
    assert ingest_batch(wh, "two", tmp_path / "two", key_provider, workers=1).outcomes == {
        "updated": 1
    }
    assert ingest_batch(wh, "three", tmp_path / "three", key_provider, workers=1).outcomes == {
        "updated": 1
    }
    # the same content as the current version: a repeat, as is a batch ingested again
    assert ingest_batch(wh, "four", tmp_path / "four", key_provider, workers=1).outcomes == {
        "unchanged": 1
    }
    assert ingest_batch(wh, "three", tmp_path / "three", key_provider, workers=1).outcomes == {
        "updated": 1
    }
    con = warehouse.connect(wh, read_only=True)
    try:
        current = read_resource(con, key_provider, "Consent", "c-optout")
        assert current is not None and current["status"] == "active"
        for batch in ("one", "two", "three", "four"):
            assert reconcile_batch(con, batch).passed
    finally:
        con.close()
    # an older version (by its versionId) sent again late stays a repeat, never current
    older = dict(withdrawn, meta={"versionId": "1"})
    newer = dict(deny, meta={"versionId": "2"})
    _write(tmp_path / "v1", "c.json", older)
    _write(tmp_path / "v2", "c.json", newer)
    _write(tmp_path / "v1-again", "c.json", older)
    for name in ("v1", "v2"):
        ingest_batch(wh, name, tmp_path / name, key_provider, workers=1)
    late = ingest_batch(wh, "v1-again", tmp_path / "v1-again", key_provider, workers=1)
    assert late.outcomes == {"unchanged": 1}
    con = warehouse.connect(wh, read_only=True)
    try:
        current = read_resource(con, key_provider, "Consent", "c-optout")
        assert current is not None and current["meta"]["versionId"] == "2"
    finally:
        con.close()


def test_an_export_delivered_again_under_another_name_sets_nothing_back(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """An export, then a correction without versionId or lastUpdated (an encounter entered in
    error), then the first export's folder renamed (or copied with its times): the same files,
    the same fingerprint. Its records repeat what the vault holds; none of them is the latest
    word, so the correction stays current. A later export with those contents in files of its
    own (another fingerprint) still sets the encounter back, as any export may."""
    first, correction = tmp_path / "first", tmp_path / "correction"
    encounter = dict(ENCOUNTER, subject={"reference": f"Patient/{PID}"})
    _write(first, "e.json", encounter)
    _write(first, "p.json", PATIENT)
    _write(correction, "e.json", dict(encounter, status="entered-in-error"))
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "first", first, key_provider, workers=1, fingerprint="f-first")
    ingest_batch(wh, "correction", correction, key_provider, workers=1, fingerprint="f-fix")
    renamed = ingest_batch(wh, "renamed", first, key_provider, workers=1, fingerprint="f-first")
    assert renamed.outcomes == {"unchanged": 2}
    con = warehouse.connect(wh, read_only=True)
    try:
        current = read_resource(con, key_provider, "Encounter", EID)
    finally:
        con.close()
    assert current is not None and current["status"] == "entered-in-error"
    later = ingest_batch(wh, "later", first, key_provider, workers=1, fingerprint="f-later")
    assert later.outcomes == {"updated": 1, "unchanged": 1}
    con = warehouse.connect(wh, read_only=True)
    try:
        current = read_resource(con, key_provider, "Encounter", EID)
        assert all(reconcile_batch(con, b).passed for b in ("first", "renamed", "later"))
    finally:
        con.close()
    assert current is not None and current["status"] == "finished"


def test_a_version_id_is_kept_in_plain_text_only_as_a_counter(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """``meta.versionId`` is an id: a source may put a name or an SSN in it. Only a short
    version counter is kept as it is beside the ciphertext; versions still tell apart (two
    contents under one versionId conflict, under two they are versions) and order (the
    highest counter is current)."""
    named = "Quillfeather" + "Oriane"
    land = tmp_path / "land"
    _write(land, "a.json", dict(PATIENT, meta={"versionId": named}, gender="female"))
    _write(land, "b.json", dict(PATIENT, meta={"versionId": named}, gender="male"))
    _write(land, "c.json", dict(ENCOUNTER, meta={"versionId": "264876926"}))
    _write(land, "d.json", dict(ENCOUNTER, meta={"versionId": "4718"}, status="cancelled"))
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    # one Patient under one versionId with two contents: a conflict; two Encounter versions
    assert report.quarantine_reasons == {"duplicate_conflict": 1}
    assert report.accepted == 3
    con = warehouse.connect(wh, read_only=True)
    try:
        stored = {v for (v,) in con.execute("SELECT version_id FROM phi_vault").fetchall()}
        encounter = read_resource(con, key_provider, "Encounter", ENCOUNTER["id"])
    finally:
        con.close()
    assert "4718" in stored and not {named, "264876926"} & stored
    assert all(v == "4718" or v.startswith("v-") for v in stored)
    assert named.encode() not in wh.read_bytes() and b"264876926" not in wh.read_bytes()
    # the counter is the only number left to order by: version 4718 is current
    assert encounter is not None and encounter["status"] == "cancelled"


def test_within_batch_duplicates_and_dangling_references(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    land = tmp_path / "land"
    changed = dict(PATIENT, gender="other")
    dangling = dict(ENCOUNTER, id="e-dangle", subject={"reference": "urn:uuid:nowhere-0001"})
    _write(land, "a.json", _bundle([PATIENT, ENCOUNTER, dangling]))
    _write(land, "b.json", PATIENT)  # identical: harmless repeat
    _write(land, "c.json", changed)  # same id, different content, no version: conflict
    (land / "d.ndjson").write_bytes(b'{"resourceType": "Patient", "id": \n\n')
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert report.records_in == 6
    assert report.quarantine_reasons == {
        "dangling_reference": 1,
        "duplicate_conflict": 1,
        "invalid_json": 1,
    }
    assert report.outcomes == {"new": 2, "duplicate_identical": 1}
    con = warehouse.connect(wh, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
        messages = [m for (m,) in con.execute("SELECT message FROM quarantine").fetchall()]
    finally:
        con.close()
    assert all("Quillfeather" not in m and "nowhere" not in m for m in messages)


def test_a_repeat_of_a_conflicting_record_is_a_conflict_too(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """One Patient three ways in one export, no versionId or lastUpdated: the first is kept,
    the second (other content) is a conflict, and so is the third, identical to the second:
    it is no harmless repeat of a record the vault holds, and its content is not in the vault.
    A repeat of the kept record is still a repeat."""
    land = tmp_path / "land"
    changed = dict(PATIENT, gender="other")
    for n, record in enumerate((PATIENT, changed, changed, PATIENT)):
        _write(land, f"{n}.json", record)
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert report.records_in == 4
    assert report.outcomes == {"new": 1, "duplicate_identical": 1}
    assert report.quarantine_reasons == {"duplicate_conflict": 2}
    con = warehouse.connect(wh, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
        ((quarantined,),) = con.execute("SELECT count(*) FROM quarantine").fetchall()
        current = read_resource(con, key_provider, "Patient", PID)
    finally:
        con.close()
    assert quarantined == 2
    assert current is not None and "gender" not in current


def test_within_a_batch_versions_told_apart_by_their_instant_are_kept_and_ordered(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """Two versions of one Patient in one export, without a versionId, the older one first:
    their lastUpdated instants tell them apart, so both are kept and the newer is current, as
    across batches. A third with the second's instant, written another way, and other content
    is a conflict."""
    land = tmp_path / "land"
    versions = [
        ("2024-03-01T10:00:00+05:00", "male"),  # 05:00 UTC
        ("2024-03-01T06:00:00Z", "female"),
        ("2024-03-01T07:00:00.000+01:00", "other"),  # 06:00 UTC again: no telling which
    ]
    for n, (instant, gender) in enumerate(versions):
        _write(land, f"{n}.json", dict(PATIENT, gender=gender, meta={"lastUpdated": instant}))
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert report.outcomes == {"new": 2}
    assert report.quarantine_reasons == {"duplicate_conflict": 1}
    newest = max(versions[:2], key=lambda v: datetime.fromisoformat(v[0]))
    con = warehouse.connect(wh, read_only=True)
    try:
        current = read_resource(con, key_provider, "Patient", PID)
        assert current is not None and current["gender"] == newest[1] == "female"
        assert reconcile_batch(con, "b1").passed
    finally:
        con.close()


def test_a_last_updated_in_a_leap_second_is_the_instant_it_names(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """R4's instant takes a leap second (``23:59:60``), and ingest accepts it. It is read as the
    last instant of its minute, after ``23:59:59``: a version updated in it supersedes one
    updated the second before, in a later batch and in the same one (two instants tell two
    versions apart), and one without a lastUpdated still ranks below it."""
    leap, before = "2016-12-31T23:59:60Z", "2016-12-31T23:59:59.5Z"
    _write(tmp_path / "b1", "p.json", dict(PATIENT, gender="male", meta={"lastUpdated": before}))
    _write(tmp_path / "b2", "p.json", dict(PATIENT, gender="female", meta={"lastUpdated": leap}))
    _write(tmp_path / "b3", "e.json", dict(ENCOUNTER, meta={"lastUpdated": leap}))
    _write(tmp_path / "b3", "f.json", dict(ENCOUNTER, status="cancelled"))
    wh = tmp_path / "w.duckdb"
    for name in ("b1", "b2"):
        ingest_batch(wh, name, tmp_path / name, key_provider, workers=1)
    third = ingest_batch(wh, "b3", tmp_path / "b3", key_provider, workers=1)
    assert third.outcomes == {"new": 2} and third.quarantine_reasons == {}
    con = warehouse.connect(wh, read_only=True)
    try:
        patient = read_resource(con, key_provider, "Patient", PID)
        encounter = read_resource(con, key_provider, "Encounter", EID)
        assert all(reconcile_batch(con, b).passed for b in ("b1", "b2", "b3"))
    finally:
        con.close()
    assert patient is not None and patient["gender"] == "female"
    assert encounter is not None and encounter["status"] == "finished"


def test_tampered_vault_row_is_detected(tmp_path: Path, key_provider: FileKeyProvider) -> None:
    _write(tmp_path / "land", "p.json", PATIENT)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b1", tmp_path / "land", key_provider, workers=1)
    con = duckdb.connect(str(wh))
    try:
        con.execute("UPDATE phi_vault SET sealed = sealed[:40] || '\\x00'::BLOB || sealed[42:]")
        with pytest.raises(InvalidCiphertext):
            read_resource(con, key_provider, "Patient", PID)
    finally:
        con.close()


def test_wrong_keys_cannot_read_the_vault(tmp_path: Path, key_provider: FileKeyProvider) -> None:
    from vault.keys import init_keyring

    _write(tmp_path / "land", "p.json", PATIENT)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b1", tmp_path / "land", key_provider, workers=1)
    init_keyring(tmp_path / "other.json")
    other = FileKeyProvider.load(tmp_path / "other.json")
    # the same keyring but for the warehouse's own pseudonym key: its KEK alone is wrong
    document = json.loads((tmp_path / "other.json").read_text())
    document["pseudonym_key"] = json.loads(key_provider.path.read_text())["pseudonym_key"]
    (tmp_path / "other-kek.json").write_text(json.dumps(document))
    (tmp_path / "other-kek.json").chmod(0o600)
    other_kek = FileKeyProvider.load(tmp_path / "other-kek.json")
    con = warehouse.connect(wh, read_only=True)
    try:
        for read in (
            lambda provider: read_resource(con, provider, "Patient", PID),
            lambda provider: list(iter_current_resources(con, provider)),
        ):
            with pytest.raises(PseudonymKeyMismatchError):  # another pseudonym key
                read(other)
            with pytest.raises(KeyMaterialError, match="KEK"):
                read(other_kek)
    finally:
        con.close()


def test_shared_reference_sets_are_accepted(
    tmp_path: Path, key_provider: FileKeyProvider, shared_data: Path
) -> None:
    wh = tmp_path / "w.duckdb"
    synthea = ingest_batch(wh, "synthea", shared_data / "synthea_small", key_provider, workers=2)
    assert synthea.quarantined == 0 and synthea.unresolved_references == 0
    incremental = shared_data / "synthea_small" / "incremental"
    inc = ingest_batch(wh, "incremental", incremental, key_provider, workers=1)
    assert inc.quarantined == 0
    assert inc.unresolved_references == 0  # practitioners resolve against the earlier batch
    bulk = ingest_batch(wh, "bulk", shared_data / "bulk_ndjson_10", key_provider, workers=2)
    lines = sum(
        sum(1 for ln in p.read_bytes().splitlines() if ln.strip())
        for p in (shared_data / "bulk_ndjson_10").glob("*.ndjson")
        if p.name != "log.ndjson"
    )
    assert (bulk.records_in, bulk.accepted, bulk.quarantined) == (lines, lines, 0)
    con = warehouse.connect(wh, read_only=True)
    try:
        for batch in ("synthea", "incremental", "bulk"):
            assert reconcile_batch(con, batch).passed
    finally:
        con.close()


# The invalid corpus (../shared/data/fhir_invalid), case by case: test_invalid_corpus.py


MARK = "Zq7MarkerValue"


def _quarantine_rows(wh: Path, batch: str) -> list[tuple[str, str, int]]:
    con = warehouse.connect(wh, read_only=True)
    try:
        assert reconcile_batch(con, batch).passed
        return con.execute(
            "SELECT reason_code, message, position FROM quarantine WHERE batch_id = ? "
            "ORDER BY file_index, position",
            [batch],
        ).fetchall()
    finally:
        con.close()


def test_files_failing_before_their_first_record_count_as_one(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    import gzip

    land = tmp_path / "land"
    land.mkdir()
    good = orjson.dumps(dict(PATIENT, name=[{"family": MARK}]))
    whole = gzip.compress(b"\n".join([good] * 50))
    (land / "a.ndjson.gz").write_bytes(whole[:12])  # truncated inside the gzip header
    (land / "b.json").write_bytes(b"\xff\xfe" + MARK.encode())  # not UTF-8, not JSON
    (land / "c.json.gz").write_bytes(MARK.encode())  # not gzip at all
    (land / "d.ndjson").write_bytes(good + b"\n")
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (4, 1, 3)
    assert report.quarantine_reasons == {"unreadable_file": 2, "invalid_json": 1}
    rows = _quarantine_rows(wh, "b1")
    assert [(code, pos) for code, _, pos in rows] == [
        ("unreadable_file", 1),
        ("invalid_json", 1),
        ("unreadable_file", 1),
    ]
    assert all(MARK not in message for _, message, _ in rows)


def test_an_overlong_ndjson_line_is_quarantined_and_counted(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fhirlake import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 2_000)
    land = tmp_path / "land"
    land.mkdir()
    good = orjson.dumps(PATIENT)
    long_one = orjson.dumps(dict(PATIENT, id="long", name=[{"family": MARK * 200}]))
    assert len(long_one) > 2_000
    (land / "a.ndjson").write_bytes(b"\n".join([good, long_one]) + b"\n")
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (2, 1, 1)
    assert report.quarantine_reasons == {"record_too_large": 1}
    rows = _quarantine_rows(wh, "b1")
    assert [(code, pos) for code, _, pos in rows] == [("record_too_large", 2)]
    assert all(MARK not in message for _, message, _ in rows)


def test_a_json_document_over_the_record_limit_is_quarantined_unread_and_counted(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``.json`` file over the record limit that is no Bundle (here a JSON array of
    resources) is one quarantined record whose bytes are not kept: it was read whole and
    staged as one value, which at 254 MiB ran DuckDB out of memory and failed the batch."""
    from fhirlake import readers

    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 2_000)
    land = tmp_path / "land"
    land.mkdir()
    many = [dict(PATIENT, id=f"p{i}", name=[{"family": MARK}]) for i in range(40)]
    document = orjson.dumps(many)
    (land / "a.json").write_bytes(document)
    (land / "b.ndjson").write_bytes(orjson.dumps(PATIENT) + b"\n")
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (2, 1, 1)
    assert report.quarantine_reasons == {"record_too_large": 1}
    rows = _quarantine_rows(wh, "b1")
    assert [(code, pos) for code, _, pos in rows] == [("record_too_large", 1)]
    assert all(MARK not in message for _, message, _ in rows)
    con = duckdb.connect(str(wh))
    try:
        ((sealed,),) = con.execute("SELECT max(octet_length(sealed)) FROM quarantine").fetchall()
    finally:
        con.close()
    assert sealed < len(document) // 10  # nothing of the document kept


def test_surprise_exceptions_quarantine_one_record(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure inside the per-record work quarantines that record (type name only) and
    drops any row it had staged; the batch carries on and reconciles."""
    from vault.ingest import BatchIngestor

    original = BatchIngestor._index

    def flaky(self: BatchIngestor, checked: Any, *args: Any) -> None:
        original(self, checked, *args)  # rows staged first, then the failure
        if checked.resource_type == "Encounter":
            raise RuntimeError(MARK)

    monkeypatch.setattr(BatchIngestor, "_index", flaky)
    _write(tmp_path / "land", "p.json", _bundle([PATIENT, ENCOUNTER]))
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", tmp_path / "land", key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (2, 1, 1)
    rows = _quarantine_rows(wh, "b1")
    assert [(c, m) for c, m, _ in rows] == [("internal_error", "ingest raised RuntimeError")]
    con = warehouse.connect(wh, read_only=True)
    try:
        (refs,) = con.execute("SELECT count(*) FROM resource_references").fetchone() or (0,)
    finally:
        con.close()
    assert refs == 0  # the Encounter's reference rows were rolled back with it


def test_running_out_of_memory_fails_the_pass_rather_than_quarantining_the_record(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MemoryError says nothing of the record it was raised by: it was quarantined as an
    ``internal_error`` and the batch marked ingested, so a valid record stayed out of the vault
    for good (a run again found the batch done). The pass fails instead, the batch is not
    marked ingested, and ingesting it again accepts the record."""
    from vault.ingest import BatchIngestor

    original = BatchIngestor._index

    def exhausted(self: BatchIngestor, checked: Any, *args: Any) -> None:
        original(self, checked, *args)
        if checked.resource_type == "Encounter":
            raise MemoryError

    monkeypatch.setattr(BatchIngestor, "_index", exhausted)
    _write(tmp_path / "land", "p.json", _bundle([PATIENT, ENCOUNTER]))
    wh = tmp_path / "w.duckdb"
    with pytest.raises(MemoryError):
        ingest_batch(wh, "b1", tmp_path / "land", key_provider, workers=1)
    monkeypatch.setattr(BatchIngestor, "_index", original)
    report = ingest_batch(wh, "b1", tmp_path / "land", key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (2, 2, 0)


def test_other_servers_references_are_never_local(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = "https://ehr.example.org/fhir"
    patient = {"resourceType": "Patient", "id": "1"}
    foreign = dict(
        ENCOUNTER, id="e-foreign", subject={"reference": "http://other.example/fhir/Patient/1"}
    )
    ours = dict(ENCOUNTER, id="e-ours", subject={"reference": f"{base}/Patient/1"})
    relative = dict(ENCOUNTER, id="e-rel", subject={"reference": "Patient/1"})
    for name, obj in {"p": patient, "f": foreign, "o": ours, "r": relative}.items():
        _write(tmp_path / "land", f"{name}.json", obj)
    monkeypatch.setenv("EHR_FHIR_BASE", base)
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", tmp_path / "land", key_provider, workers=1)
    assert report.quarantined == 0 and report.external_references == 1
    assert report.unresolved_patient_references == 1
    con = warehouse.connect(wh, read_only=True)
    try:
        owners = dict(con.execute("SELECT resource_key, patient_key FROM phi_vault").fetchall())
        kinds = con.execute(
            "SELECT kind, resolved FROM resource_references WHERE target_type = 'Patient' "
            "ORDER BY kind"
        ).fetchall()
    finally:
        con.close()
    from vault.pseudonym import Pseudonymizer

    pseudo = Pseudonymizer(key_provider.pseudonym_key())
    patient_key = pseudo.resource_key("Patient", "1")
    assert owners[pseudo.resource_key("Encounter", "e-foreign")] is None
    assert owners[pseudo.resource_key("Encounter", "e-ours")] == patient_key
    assert owners[pseudo.resource_key("Encounter", "e-rel")] == patient_key
    assert kinds == [("absolute", True), ("external", False), ("relative", True)]
    # without a configured base, an absolute URL to this server is foreign too
    monkeypatch.delenv("EHR_FHIR_BASE")
    again = ingest_batch(wh, "b2", tmp_path / "land", key_provider, workers=1)
    assert again.external_references == 2


def test_a_batch_ingested_again_is_unfinished_until_the_pass_completes(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that dies part-way leaves the batch marked unfinished, not with the time and
    report of the pass before it (what the landing sensor and ``ehr run`` trust)."""
    land = tmp_path / "land"
    _write(land, "p.json", _bundle([PATIENT, ENCOUNTER]))
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b1", land, key_provider, workers=1)

    def dies(_source: Any, **_options: Any) -> Any:
        raise RuntimeError("the process died here")
        yield

    monkeypatch.setattr("vault.ingest.iter_records", dies)
    with pytest.raises(RuntimeError):
        ingest_batch(wh, "b1", land, key_provider, workers=1)
    con = duckdb.connect(str(wh), read_only=True)
    try:
        assert con.execute("SELECT ingested_at, report FROM batches").fetchall() == [(None, None)]
    finally:
        con.close()
    monkeypatch.undo()
    assert ingest_batch(wh, "b1", land, key_provider, workers=1).outcomes == {"new": 2}
    con = duckdb.connect(str(wh), read_only=True)
    try:
        finished = con.execute("SELECT count(*) FROM batches WHERE ingested_at IS NOT NULL")
        assert finished.fetchall() == [(1,)]
    finally:
        con.close()


def test_a_batch_ingested_again_counts_what_its_folder_no_longer_holds(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """Re-ingesting a batch replaces what it wrote: a file removed from its folder takes its
    resources out of the vault with it. The report counts them (worked out here: the records
    of the removed file), so the run can say so; the same folder again counts none."""
    land = tmp_path / "land"
    _write(land, "a.json", _bundle([PATIENT, ENCOUNTER]))
    others = [
        dict(PATIENT, id=f"6f1b9d3c-0000-4000-8000-00000000010{n}", name=[{"family": f"F{n}"}])
        for n in range(3)
    ]
    removed = _write(land, "b.ndjson", others[0])
    removed.write_bytes(b"\n".join(orjson.dumps(p) for p in others) + b"\n")
    wh = tmp_path / "w.duckdb"
    first = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert first.accepted == 5 and first.no_longer_in_batch == 0
    assert ingest_batch(wh, "b1", land, key_provider, workers=1).no_longer_in_batch == 0
    expected = len(removed.read_bytes().splitlines())
    removed.unlink()
    again = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert again.accepted == 2 and again.no_longer_in_batch == expected == 3
    con = warehouse.connect(wh, read_only=True)
    try:
        assert read_resource(con, key_provider, "Patient", others[0]["id"]) is None
        assert reconcile_batch(con, "b1").passed
    finally:
        con.close()


# A synthetic batch of two patients, one Bundle file each (000000.json, 000001.json), with the
# shared Organizations and Practitioners in files of their own.
def _synthetic_batch(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """The batch's data files and the resources of each, as read here from the files."""
    generate(folder, 2, seed=5)
    (folder / "_generation.json").unlink()  # export metadata: not a data file
    return {
        path.name: [entry["resource"] for entry in orjson.loads(path.read_bytes())["entry"]]
        for path in sorted(folder.glob("*.json"))
    }


def _erase_patient_of(
    wh: Path, tmp_path: Path, key_provider: FileKeyProvider, file: list[dict[str, Any]]
) -> ErasureReport:
    """``ehr forget`` of the Patient in ``file`` (its resources)."""
    (patient_id,) = [r["id"] for r in file if r["resourceType"] == "Patient"]
    pseudonym = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", patient_id)
    audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
    return forget_in_warehouse(wh, pseudonym, audit, "erasure request")


def _ingest_again_refusing_hers(
    wh: Path, land: Path, key_provider: FileKeyProvider, records: int, hers: int
) -> None:
    """Batch b1 ingested again with her records still in its files: every record in, hers
    refused as erased, none counted as no longer in the batch, the batch reconciled."""
    again = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert again.no_longer_in_batch == 0
    assert again.records_in == records and again.accepted == records - hers
    assert again.quarantine_reasons == {ERASED_SUBJECT: hers}
    con = warehouse.connect(wh, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
    finally:
        con.close()


def test_a_batch_ingested_again_after_an_erasure_counts_no_erased_resource_as_gone(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A patient of the batch erased, then the same folder ingested again: her records are
    still in its files, refused as erased (quarantined unstored), not "no longer in batch",
    and every record is accounted for. Files removed afterwards count their resources, hers
    excepted: the erasure took them, not the folder."""
    land = tmp_path / "land"
    files = _synthetic_batch(land)
    records = sum(len(resources) for resources in files.values())
    hers, his = files["000000.json"], files["000001.json"]
    wh = tmp_path / "w.duckdb"
    first = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert first.accepted == records and first.no_longer_in_batch == 0
    assert _erase_patient_of(wh, tmp_path, key_provider, hers).ledger_rows_erased == len(hers)

    _ingest_again_refusing_hers(wh, land, key_provider, records, len(hers))

    (land / "000000.json").unlink()
    (land / "000001.json").unlink()
    emptied = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert emptied.no_longer_in_batch == len(his)
    assert emptied.records_in == emptied.accepted == records - len(hers) - len(his)


# an ingest in another process, killed (SIGKILL) once it has written its second flush of rows
# (a few records of the first file staged in the vault and the ledger, the batch unfinished)
_INGEST_KILLED_PART_WAY = """
import os, signal, sys
from pathlib import Path
from vault import ingest
from vault.keys import FileKeyProvider

ingest.FLUSH_ROWS = 40
flush = ingest._Buffers.flush
flushes = []

def killed(self, con):
    flush(self, con)
    flushes.append(1)
    if len(flushes) == 2:
        os.kill(os.getpid(), signal.SIGKILL)

ingest._Buffers.flush = killed
wh, folder, key_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ingest.ingest_batch(wh, "b1", folder, FileKeyProvider.load(key_file), workers=1)
"""


def test_an_erasure_after_a_killed_ingest_leaves_its_staged_records_out_of_the_count(
    tmp_path: Path, key_provider: FileKeyProvider, key_file: Path
) -> None:
    """An ingest killed part-way leaves records of the first patient staged (in the vault,
    the ledger rows keyed); she is erased before the batch is ingested again. The erasure
    empties those ledger rows as it does a finished batch's, so the re-ingest counts none of
    her resources as no longer in the batch: they are still in its files, refused as erased.
    A file removed afterwards is still counted."""
    land = tmp_path / "land"
    files = _synthetic_batch(land)
    records = sum(len(resources) for resources in files.values())
    hers, his = files["000000.json"], files["000001.json"]
    wh = tmp_path / "w.duckdb"
    killed = subprocess.run(
        [sys.executable, "-c", _INGEST_KILLED_PART_WAY, str(wh), str(land), str(key_file)],
        capture_output=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    con = warehouse.connect(wh, read_only=True)
    try:
        ((staged, keyed, other_files),) = con.execute(
            "SELECT count(*) FILTER (WHERE status = 'staged'), count(resource_key), "
            "count(*) FILTER (WHERE file_index <> 0) FROM record_ledger"
        ).fetchall()
    finally:
        con.close()
    # her file's first records only, every one staged with its resource key
    assert 0 < staged == keyed < len(hers) and other_files == 0

    report = _erase_patient_of(wh, tmp_path, key_provider, hers)
    assert report.ledger_rows_erased == staged
    con = warehouse.connect(wh, read_only=True)
    try:
        assert con.execute(
            "SELECT status, count(*), count(resource_key) FROM record_ledger GROUP BY 1"
        ).fetchall() == [("erased", staged, 0)]
    finally:
        con.close()

    _ingest_again_refusing_hers(wh, land, key_provider, records, len(hers))

    (land / "000001.json").unlink()
    assert ingest_batch(wh, "b1", land, key_provider, workers=1).no_longer_in_batch == len(his)


def test_a_bad_gzip_trailer_keeps_the_last_record_in_the_vault(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """Three Patients in a gzip whose CRC is wrong, the last without a final newline: all
    three are stored, none is quarantined, and the report says what was wrong with the file."""
    import gzip

    lines = [orjson.dumps(dict(PATIENT, id=f"p{i}")) for i in range(3)]
    packed = bytearray(gzip.compress(b"\n".join(lines)))
    packed[-8] ^= 0xFF
    land = tmp_path / "land"
    land.mkdir()
    (land / "a.ndjson.gz").write_bytes(bytes(packed))
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (len(lines), len(lines), 0)
    assert list(report.file_warnings.values()) == [1]
    assert _quarantine_rows(wh, "b1") == []
    con = warehouse.connect(wh, read_only=True)
    try:
        stored = {r["id"] for r in iter_current_resources(con, key_provider)}
    finally:
        con.close()
    assert stored == {orjson.loads(line)["id"] for line in lines}


def test_a_streamed_bundle_whose_entry_is_no_list_counts_one_record(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fhirlake import readers

    monkeypatch.setattr(readers, "STREAM_JSON_BYTES", 0)  # stream every .json file
    land = tmp_path / "land"
    _write(land, "a.json", {"resourceType": "Bundle", "type": "collection", "entry": {}})
    _write(land, "b.json", {"resourceType": "Bundle", "type": "collection", "identifier": {}})
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert report.records_in == 2
    assert report.quarantine_reasons["invalid_bundle"] == 1
    assert _quarantine_rows(wh, "b1")[0][0] == "invalid_bundle"


def test_a_bundle_with_an_empty_entry_array_is_one_record_quarantined(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A search that found nothing, exported with ``"entry": []``: the file came in, so it is
    one record in, quarantined for ele-1 with its bytes, never a file of no record at all."""
    land = tmp_path / "land"
    _write(land, "a.json", {"resourceType": "Bundle", "type": "searchset", "entry": []})
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (1, 0, 1)
    assert _quarantine_rows(wh, "b1") == [
        ("schema_violation", "Bundle.entry: empty element (ele-1)", 1)
    ]


def _vault_rows(wh: Path) -> dict[str, int]:
    con = warehouse.connect(wh, read_only=True)
    try:
        return dict(con.execute("SELECT batch_id, count(*) FROM phi_vault GROUP BY 1").fetchall())
    finally:
        con.close()


def _others(n: int) -> list[dict[str, Any]]:
    return [
        dict(PATIENT, id=f"6f1b9d3c-0000-4000-8000-00000000020{i}", name=[{"family": f"G{i}"}])
        for i in range(n)
    ]


def test_a_resource_another_batch_holds_stays_when_one_batch_drops_it(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """Batch a holds patients p0 and p1, batch b (ingested after it) the same p0 byte for
    byte, recorded as a repeat. Removing p0's file from a and ingesting a again must not take
    p0 out of the vault: b's folder still holds it. The vault keeps it as b's row, b's ledger
    says so, and both batches reconcile; ingesting b again changes nothing."""
    p0, p1 = _others(2)
    _write(tmp_path / "a", "p0.json", p0)
    _write(tmp_path / "a", "p1.json", p1)
    _write(tmp_path / "b", "p0.json", p0)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "a", tmp_path / "a", key_provider, workers=1)
    assert ingest_batch(wh, "b", tmp_path / "b", key_provider, workers=1).outcomes == {
        "unchanged": 1
    }
    # a re-run of a with every file in place gives back what it held, outcomes as before
    assert ingest_batch(wh, "a", tmp_path / "a", key_provider, workers=1).outcomes == {"new": 2}
    assert _ledger(wh, "b") == {"unchanged": 1}
    assert _vault_rows(wh) == {"a": 2}

    (tmp_path / "a" / "p0.json").unlink()
    again = ingest_batch(wh, "a", tmp_path / "a", key_provider, workers=1)
    assert again.outcomes == {"new": 1} and again.no_longer_in_batch == 1
    # b's one record is now the vault's only copy of p0: a new resource there
    assert _ledger(wh, "b") == {"new": 1}
    assert _vault_rows(wh) == {"a": 1, "b": 1}
    con = warehouse.connect(wh, read_only=True)
    try:
        assert read_resource(con, key_provider, "Patient", p0["id"]) == p0
        assert read_resource(con, key_provider, "Patient", p1["id"]) == p1
        for batch in ("a", "b"):
            assert reconcile_batch(con, batch).passed
        ((report,),) = con.execute("SELECT report FROM batches WHERE batch_id = 'b'").fetchall()
        assert json.loads(report)["outcomes"] == {"new": 1}
    finally:
        con.close()
    assert ingest_batch(wh, "b", tmp_path / "b", key_provider, workers=1).outcomes == {"new": 1}
    assert _vault_rows(wh) == {"a": 1, "b": 1}


def test_the_same_json_written_differently_is_the_same_content(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """One Patient written compactly, with spaces, with its keys in reverse order, and inside
    a Bundle: four spellings of one JSON value. Within a batch the later three are identical
    repeats (not conflicts); across batches they are unchanged; a batch ingested again keeps
    its outcome. A real difference (another gender) is still a conflict, and a new version in
    a later batch."""
    p = _others(1)[0]
    spellings = [
        json.dumps(p, separators=(",", ":")),
        json.dumps(p, indent=2),
        json.dumps(dict(reversed(list(p.items())))),
    ]
    assert len(set(spellings)) == len(spellings)  # three different byte strings
    land = tmp_path / "one"
    land.mkdir()
    (land / "a.ndjson").write_text(spellings[0] + "\n" + spellings[2] + "\n")
    (land / "b.json").write_text(spellings[1])
    _write(land, "c.json", _bundle([p]))
    wh = tmp_path / "w.duckdb"
    first = ingest_batch(wh, "one", land, key_provider, workers=1)
    expected = {"new": 1, "duplicate_identical": 3}  # four records, one content
    assert first.outcomes == expected and first.quarantined == 0
    assert ingest_batch(wh, "one", land, key_provider, workers=1).outcomes == expected
    other = tmp_path / "two"
    other.mkdir()
    (other / "p.json").write_text(spellings[1])
    assert ingest_batch(wh, "two", other, key_provider, workers=1).outcomes == {"unchanged": 1}
    assert ingest_batch(wh, "one", land, key_provider, workers=1).outcomes == expected
    assert _vault_rows(wh) == {"one": 1}

    changed = dict(p, gender="other")
    (land / "d.ndjson").write_text(json.dumps(changed, indent=1).replace("\n", "") + "\n")
    mixed = ingest_batch(wh, "one", land, key_provider, workers=1)
    assert mixed.quarantine_reasons == {"duplicate_conflict": 1}
    third = tmp_path / "three"
    third.mkdir()
    (third / "p.json").write_text(json.dumps(changed))
    assert ingest_batch(wh, "three", third, key_provider, workers=1).outcomes == {"updated": 1}


def test_a_pass_dying_after_handing_a_row_over_loses_nothing(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handing over commits with the removal of the batch's old rows: a pass of a that
    dies while reading its files leaves p0 with b (whose folder holds it), both batches
    reconciled; the pass run again completes, p0 still in the vault once."""
    p0, p1 = _others(2)
    _write(tmp_path / "a", "p0.json", p0)
    _write(tmp_path / "a", "p1.json", p1)
    _write(tmp_path / "b", "p0.json", p0)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "a", tmp_path / "a", key_provider, workers=1)
    ingest_batch(wh, "b", tmp_path / "b", key_provider, workers=1)
    (tmp_path / "a" / "p0.json").unlink()

    def dies(_source: Any, **_options: Any) -> Any:
        raise RuntimeError("the process died here")
        yield

    monkeypatch.setattr("vault.ingest.iter_records", dies)
    with pytest.raises(RuntimeError):
        ingest_batch(wh, "a", tmp_path / "a", key_provider, workers=1)
    monkeypatch.undo()
    assert _vault_rows(wh) == {"b": 1}
    con = warehouse.connect(wh, read_only=True)
    try:
        assert read_resource(con, key_provider, "Patient", p0["id"]) == p0
        assert reconcile_batch(con, "b").passed
    finally:
        con.close()
    assert ingest_batch(wh, "a", tmp_path / "a", key_provider, workers=1).outcomes == {"new": 1}
    assert _vault_rows(wh) == {"a": 1, "b": 1}
    con = warehouse.connect(wh, read_only=True)
    try:
        assert read_resource(con, key_provider, "Patient", p0["id"]) == p0
        assert all(reconcile_batch(con, batch).passed for batch in ("a", "b"))
    finally:
        con.close()


def test_a_file_the_process_may_not_read_fails_the_batch_until_it_can(
    tmp_path: Path, key_provider: FileKeyProvider, refuse_reading: Any
) -> None:
    """A file the process may not read is not bad input: nothing of its records is known. The
    batch's ingest fails, naming the file by its pseudonym, and leaves nothing marked ingested
    (no ledger, no quarantine, nothing in the vault); once the file is readable the same batch
    ingests every record of both files and reconciles."""
    from vault.errors import SourceFileNotReadableError

    land = tmp_path / "land"
    land.mkdir()
    patients = [
        dict(PATIENT, id=f"6f1b9d3c-0000-4000-8000-0000000002{n:02d}", name=[{"family": MARK}])
        for n in range(8)
    ]
    (land / "a.ndjson").write_bytes(b"\n".join(orjson.dumps(p) for p in patients[:3]) + b"\n")
    secret = land / "b_Quillfeather.ndjson"
    secret.write_bytes(b"\n".join(orjson.dumps(p) for p in patients[3:]) + b"\n")
    allow = refuse_reading(secret)
    wh = tmp_path / "w.duckdb"
    with pytest.raises(SourceFileNotReadableError) as caught:
        ingest_batch(wh, "b1", land, key_provider, workers=1)
    message = str(caught.value)
    assert "PermissionError" in message and "EACCES" in message and "file 2 of 2" in message
    assert "Quillfeather" not in message and str(land) not in message
    con = duckdb.connect(str(wh), read_only=True)
    try:
        assert con.execute("SELECT ingested_at, report FROM batches").fetchall() == [(None, None)]
        for table in ("record_ledger", "quarantine", "source_files", "phi_vault_current"):
            assert con.execute(f"SELECT count(*) FROM {table}").fetchall() == [(0,)], table
    finally:
        con.close()
    allow()
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert (report.records_in, report.accepted, report.quarantined) == (8, 8, 0)
    con = duckdb.connect(str(wh), read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
        file_ids = {row[0] for row in con.execute("SELECT file_id FROM source_files").fetchall()}
    finally:
        con.close()
    # the file the error named is the pseudonym the batch's tables know it by
    assert any(fid in message for fid in file_ids)


def _assert_nothing_of_the_batch_kept(wh: Path) -> None:
    """The one batch of ``wh`` is not marked ingested, and no table holds a row of it."""
    con = duckdb.connect(str(wh), read_only=True)
    try:
        assert con.execute("SELECT ingested_at FROM batches").fetchall() == [(None,)]
        for table in warehouse.BATCH_TABLES:
            assert con.execute(f"SELECT count(*) FROM {table}").fetchall() == [(0,)], table
    finally:
        con.close()


def _stopped_after_a_flush(
    tmp_path: Path, refuse_reading: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path]:
    """A landing folder whose pass stops at its second file, one flush a row so that the first
    file's rows are in the vault by then, and a second folder of that first file alone (the
    folder renamed, dropped again)."""
    from vault import ingest as ingest_module

    monkeypatch.setattr(ingest_module, "FLUSH_ROWS", 1)
    land, again = tmp_path / "land", tmp_path / "again"
    land.mkdir()
    again.mkdir()
    # more records than the chunks read ahead of the writes, so that some were flushed
    patients = [
        dict(PATIENT, id=f"6f1b9d3c-0000-4000-8000-{n:012d}", name=[{"family": MARK}])
        for n in range(1202)
    ]
    first = b"\n".join(orjson.dumps(p) for p in patients[:1200]) + b"\n"
    (land / "a.ndjson").write_bytes(first)
    (again / "a.ndjson").write_bytes(first)
    stop = land / "b.ndjson"
    stop.write_bytes(b"\n".join(orjson.dumps(p) for p in patients[1200:]) + b"\n")
    refuse_reading(stop)
    return land, again


def test_a_file_not_readable_after_a_flush_leaves_nothing_of_the_pass_behind(
    tmp_path: Path,
    key_provider: FileKeyProvider,
    refuse_reading: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every flush commits: the records read before the unreadable file were in the vault when
    it failed. They are taken out again, or the batch, never marked ingested and so never
    released, would hold them: the same file dropped again under another name (the folder
    renamed) was recorded as repeats of those rows (``unchanged``), and no batch released
    them."""
    from vault.errors import SourceFileNotReadableError

    land, again = _stopped_after_a_flush(tmp_path, refuse_reading, monkeypatch)
    wh = tmp_path / "w.duckdb"
    with pytest.raises(SourceFileNotReadableError):
        ingest_batch(wh, "b1", land, key_provider, workers=1)
    _assert_nothing_of_the_batch_kept(wh)
    report = ingest_batch(wh, "b2", again, key_provider, workers=1)
    assert report.outcomes == {"new": 1200}


def test_a_pass_killed_after_a_flush_leaves_nothing_to_a_batch_of_the_same_records(
    tmp_path: Path,
    key_provider: FileKeyProvider,
    refuse_reading: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass killed after some flushes (SIGKILL: it takes nothing out) keeps those rows under
    a batch never marked ingested. Its folder renamed before its retry, the next batch's pass
    takes them out first: it read the same records as repeats of them (``unchanged``), and no
    batch released them. The killed batch's retry reads them again."""
    from vault import ingest as ingest_module
    from vault.errors import SourceFileNotReadableError

    land, again = _stopped_after_a_flush(tmp_path, refuse_reading, monkeypatch)
    wh = tmp_path / "w.duckdb"
    # killed where it stopped: nothing taken out
    monkeypatch.setattr(ingest_module.BatchIngestor, "withdraw", lambda self: None)
    with pytest.raises(SourceFileNotReadableError):
        ingest_batch(wh, "b1", land, key_provider, workers=1)
    con = duckdb.connect(str(wh), read_only=True)
    try:
        (left,) = con.execute("SELECT count(*) FROM phi_vault WHERE batch_id = 'b1'").fetchone()
    finally:
        con.close()
    assert left > 0

    report = ingest_batch(wh, "b2", again, key_provider, workers=1)
    assert report.outcomes == {"new": 1200}
    con = duckdb.connect(str(wh), read_only=True)
    try:
        for table in warehouse.BATCH_TABLES:
            assert con.execute(
                f"SELECT count(*) FROM {table} WHERE batch_id = 'b1'"
            ).fetchall() == [(0,)], table
        assert con.execute("SELECT batch_id FROM batches WHERE ingested_at IS NULL").fetchall() == [
            ("b1",)
        ]
    finally:
        con.close()


@pytest.mark.parametrize(
    ("replaced_by_a_file", "errno_name"), [(False, "ENOENT"), (True, "ENOTDIR")]
)
def test_a_file_gone_since_the_batch_was_listed_is_no_record_and_fails_the_batch(
    tmp_path: Path,
    key_provider: FileKeyProvider,
    monkeypatch: pytest.MonkeyPatch,
    replaced_by_a_file: bool,
    errno_name: str,
) -> None:
    """A batch's folder renamed (or a file of it removed) while its ingest reads it: the files
    not opened yet are gone. Nothing of them came in, so they are no records: the ingest fails
    with nothing of the batch kept or marked ingested, as for a file it may not read, and the
    folder under its new name is ingested whole. Before, each such file was one quarantined
    `unreadable_file` record with no bytes, and the batch was marked ingested with what was
    read before the rename (136 such records in two batches renamed under their runs)."""
    from vault import ingest as ingest_module
    from vault.errors import SourceFileNotReadableError

    land = tmp_path / "land"
    land.mkdir()
    patients = [
        dict(PATIENT, id=f"6f1b9d3c-0000-4000-8000-0000000004{n:02d}", name=[{"family": MARK}])
        for n in range(6)
    ]
    for name, part in (("a.ndjson", patients[:3]), ("b.ndjson", patients[3:])):
        (land / name).write_bytes(b"\n".join(orjson.dumps(p) for p in part) + b"\n")
    listed = ingest_module.list_batch_files

    def listed_then_renamed(source: Path, nested: bool = False) -> Any:
        files = listed(source, nested=nested)
        land.rename(tmp_path / "renamed")
        if replaced_by_a_file:  # a file where the folder was: its files' paths are no paths
            land.write_text("moved")
        return files

    monkeypatch.setattr(ingest_module, "list_batch_files", listed_then_renamed)
    wh = tmp_path / "w.duckdb"
    with pytest.raises(SourceFileNotReadableError) as caught:
        ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert errno_name in str(caught.value)
    assert "gone since the batch was listed" in str(caught.value)
    _assert_nothing_of_the_batch_kept(wh)
    monkeypatch.setattr(ingest_module, "list_batch_files", listed)
    report = ingest_batch(wh, "b1r", tmp_path / "renamed", key_provider, workers=1)
    assert (report.records_in, report.quarantined, report.outcomes) == (6, 0, {"new": 6})


class _Interrupted(BaseException):
    """What a run's step raises when it is terminated (Dagster's interrupt): no Exception."""


def test_a_pass_stopped_while_it_consumes_shuts_its_worker_pool_down(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass stopped by its consumer (a run terminated from the UI, a warehouse write that
    fails) shuts the validation pool down before the error leaves ``ingest_batch``. The pool
    was left to the generator's collection, which the kept traceback delays: a Dagster run
    process, itself a multiprocessing child, then joined the idle workers at its exit and
    waited for them for good (three processes and 0.4 GB left behind per terminated run)."""
    land = tmp_path / "land"
    land.mkdir()
    patients = [{**PATIENT, "id": f"p{i}", "name": [{"family": f"F{i}"}]} for i in range(40)]
    (land / "p.ndjson").write_bytes(b"\n".join(orjson.dumps(p) for p in patients))
    monkeypatch.setattr("vault.ingest.PARALLEL_AFTER", 0)
    monkeypatch.setattr("vault.ingest.CHUNK_RECORDS", 2)
    one = BatchIngestor._one
    seen = []

    def stopped(self: BatchIngestor, record: Any, checked: Any) -> None:
        seen.append(record)
        if len(seen) == 10:
            raise _Interrupted
        one(self, record, checked)

    monkeypatch.setattr(BatchIngestor, "_one", stopped)
    before = set(multiprocessing.active_children())
    with pytest.raises(_Interrupted) as raised:
        ingest_batch(tmp_path / "w.duckdb", "b1", land, key_provider, workers=2)
    try:
        left = set(multiprocessing.active_children()) - before
    finally:
        del raised
        gc.collect()  # the pool of a failing run, shut down by its generator's collection
    assert left == set()


def test_stalled_validation_workers_fail_the_pass_in_bounded_time(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation workers that stop answering (stopped, swapped out, stuck on a record) held
    the pass for good: it waited on their chunks with no end, and on leaving, on the pool's
    shutdown joining them. The pass fails once no chunk came back for
    ``STALLED_AFTER_SECONDS``, naming that, with every worker ended and the batch not marked
    ingested; ingesting it again accounts for every record. (Run on a thread the test gives a
    minute: a hang fails the test, its stopped workers killed.)"""
    import os
    import threading

    from vault import ingest

    land = tmp_path / "land"
    land.mkdir()
    patients = [{**PATIENT, "id": f"p{i}", "name": [{"family": f"F{i}"}]} for i in range(40)]
    (land / "p.ndjson").write_bytes(b"\n".join(orjson.dumps(p) for p in patients))
    monkeypatch.setattr(ingest, "PARALLEL_AFTER", 0)
    monkeypatch.setattr(ingest, "CHUNK_RECORDS", 2)
    monkeypatch.setattr(ingest, "STALLED_AFTER_SECONDS", 5.0, raising=False)
    one = BatchIngestor._one
    stopped: list[int] = []

    def stopping(self: BatchIngestor, record: Any, checked: Any) -> None:
        if not stopped:
            for child in multiprocessing.active_children():
                assert child.pid is not None
                os.kill(child.pid, signal.SIGSTOP)
                stopped.append(child.pid)
        one(self, record, checked)

    monkeypatch.setattr(BatchIngestor, "_one", stopping)
    before = set(multiprocessing.active_children())
    raised: list[BaseException] = []

    def run() -> None:
        try:
            ingest_batch(tmp_path / "w.duckdb", "b1", land, key_provider, workers=2)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    hung = thread.is_alive()
    for pid in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert stopped and not hung, "the pass still waited on the stopped workers after a minute"
    assert len(raised) == 1 and isinstance(raised[0], ingest.WorkersStalledError)
    assert "no chunk came back" in str(raised[0])
    assert set(multiprocessing.active_children()) - before == set()
    monkeypatch.setattr(BatchIngestor, "_one", one)
    report = ingest_batch(tmp_path / "w.duckdb", "b1", land, key_provider, workers=2)
    assert (report.records_in, report.accepted, report.quarantined) == (40, 40, 0)
