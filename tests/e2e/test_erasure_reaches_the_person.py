"""``ehr forget`` reaches everything that names the person, not only their compartment: the
vault resources of no patient (sealed under the shared key, which no erasure destroys) that
name them, the other Patient resources of the same person (one of their identifiers), and
later records carrying one of their identifiers written differently."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pytest
from click.testing import CliRunner

from deid.leakscan import CanarySet
from deid.policy import Policy
from deid.release import deidentify_batch
from pipelines.cli.privacy import forget
from pipelines.views.refresh import refresh_view
from pipelines.views.tables import load_views
from pipelines.workdir import Workdir
from vault import warehouse
from vault.ingest import ERASED_SUBJECT, ingest_batch, loose_identifier_key
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer
from vault.read import iter_every_version

pytestmark = pytest.mark.e2e

MRN_SYSTEM = "http://hospital.example.org/mrn"
SSN_SYSTEM = "http://hl7.org/fhir/sid/us-ssn"
MRN, SSN = "88442211", "731-55-9012"
FULL_NAME, PHONE, LINE = "Zephyrine Quorvalent", "(617) 555-0199", "4471 Wimbleton Crescent"
# what names her, as a reader of a decrypted record would find it
CANARIES = ("Quorvalent", "Zephyrine", MRN, SSN, "555-0199", "Wimbleton", "Patient/pz")
PHI = f"{FULL_NAME} SSN {SSN} phone {PHONE}"
OBS_CODE = {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}


def _patient(pid: str, identifiers: list[tuple[str, str]], **more: Any) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"family": "Quorvalent", "given": ["Zephyrine"]}],
        "identifier": [{"system": s, "value": v} for s, v in identifiers],
        "birthDate": "1971-11-05",
        **more,
    }


def _obs(oid: str, subject: dict[str, Any], value: str | None = None) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": OBS_CODE,
        "subject": subject,
        "effectiveDateTime": "2021-04-01T10:00:00Z",
    }
    if value is None:
        obs["valueQuantity"] = {"value": 72, "unit": "/min"}
    else:
        obs["valueString"] = value
    return obs


PZ = _patient(
    "pz",
    [(MRN_SYSTEM, MRN), (SSN_SYSTEM, SSN)],
    telecom=[{"system": "phone", "value": PHONE}],
    address=[{"line": [LINE], "city": "Brackenholt"}],
)
# the same person under another id: her MRN and SSN exactly
DUPLICATE = _patient("pt-dup-77", [(MRN_SYSTEM, MRN), (SSN_SYSTEM, SSN)])
OTHER = {"resourceType": "Patient", "id": "p-other", "name": [{"family": "Oddsock"}]}
# resources of no patient compartment that name her (sealed under the shared key)
NAMING_HER = [
    _obs(
        "by-identifier",
        {"identifier": {"system": MRN_SYSTEM, "value": MRN}, "display": FULL_NAME},
        PHI,
    ),
    _obs("external", {"reference": "http://other.example/fhir/Patient/pz"}, PHI),
    {
        "resourceType": "DocumentReference",
        "id": "source-info",
        "status": "current",
        "context": {"sourcePatientInfo": {"reference": "Patient/pz"}},
        "description": PHI,
        "content": [{"attachment": {"contentType": "text/plain", "title": "letter"}}],
    },
    {
        "resourceType": "Organization",
        "id": "org-quorvalent",
        "name": "Quorvalent Family Practice",
        "telecom": [{"system": "phone", "value": PHONE}],
        "address": [{"line": [LINE], "city": "Brackenholt"}],
    },
    {
        "resourceType": "Practitioner",
        "id": "prac-quorvalent",
        "name": [{"family": "Quorvalent", "given": ["Zephyrine"]}],
    },
]
# resources of no patient that do not name her: kept
NOT_HER = [
    {"resourceType": "Organization", "id": "org-harbor", "name": "Harborview Clinic"},
    # colleagues who share one of her name parts, nothing else
    {
        "resourceType": "Practitioner",
        "id": "prac-first-name",
        "name": [{"family": "Oddsock", "given": ["Zephyrine"]}],
    },
    {
        "resourceType": "Practitioner",
        "id": "prac-surname",
        "name": [{"family": "Quorvalent", "given": ["Amadeo"]}],
    },
    # born the same day as she was: a birth date alone names no one
    {
        "resourceType": "Practitioner",
        "id": "prac-same-birthday",
        "name": [{"family": "Oddsock"}],
        "birthDate": "1971-11-05",
    },
    _obs("anonymous", {"display": "walk-in"}, "no one named"),
]


def _write(folder: Path, name: str, records: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(json.dumps(r) for r in records) + "\n")


@pytest.fixture
def person(tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.delenv("EHR_AUDIT_ANCHOR", raising=False)
    provider = FileKeyProvider.load(key_file)
    landing = tmp_path / "landing" / "b1"
    _write(
        landing,
        "records.ndjson",
        [
            PZ,
            _obs("pz-pulse", {"reference": "Patient/pz"}),
            DUPLICATE,
            _obs("dup-pulse", {"reference": "Patient/pt-dup-77"}),
            OTHER,
            _obs("other-pulse", {"reference": "Patient/p-other"}),
            *NAMING_HER,
            *NOT_HER,
        ],
    )
    workdir = Workdir(tmp_path / "work")
    report = ingest_batch(workdir.warehouse, "b1", landing, provider, workers=1)
    assert (report.accepted, report.quarantined) == (6 + len(NAMING_HER) + len(NOT_HER), 0)
    con = warehouse.connect(workdir.warehouse)
    try:
        deidentify_batch(con, provider, "b1", Policy.shipped("research"), workers=1)
        for view in load_views():
            if view.name in ("patient", "observation"):
                refresh_view(con, view, workdir.root, CanarySet())
        con.execute("CHECKPOINT")
    finally:
        con.close()
    pseudo = Pseudonymizer(provider.pseudonym_key())
    return {"provider": provider, "workdir": workdir, "key_file": key_file, "pseudo": pseudo}


def _forget(person: dict[str, Any], patient: str) -> dict[str, Any]:
    workdir, key_file = person["workdir"], person["key_file"]
    common = ["--workdir", str(workdir.root), "--key-file", str(key_file)]
    result = CliRunner().invoke(forget, [patient, "--reason", "ticket 4711", *common])
    assert result.exit_code == 0, result.output
    assert not any(c.casefold() in result.output.casefold() for c in CANARIES[:-1])
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _readable(person: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(resource type, owner, text) of every version of every vault row, decrypted with the
    real keys: what anyone holding the keyring can still read."""
    con = warehouse.connect(person["workdir"].warehouse, read_only=True)
    try:
        return [
            (r.resource_type, r.patient_key, orjson.dumps(r.resource).decode())
            for r in iter_every_version(con, person["provider"])
        ]
    finally:
        con.close()


def _naming_her(text: str) -> list[str]:
    """What of hers a decrypted record holds, when that names her: one of her name parts
    alone (a colleague who shares her first name or her surname) names someone else."""
    found = [c for c in CANARIES if c.casefold() in text.casefold()]
    name_parts = {"Quorvalent", "Zephyrine"}
    return found if set(found) - name_parts or name_parts <= set(found) else []


def _released_ids(person: dict[str, Any]) -> set[str]:
    con = duckdb.connect(str(person["workdir"].warehouse), read_only=True)
    try:
        released = {str(i) for (i,) in con.execute("SELECT id FROM deid_resources").fetchall()}
        viewed = con.execute("SELECT id FROM views.observation UNION SELECT id FROM views.patient")
        return released | {str(i) for (i,) in viewed.fetchall()}
    finally:
        con.close()


def _parquet_ids(person: dict[str, Any]) -> set[str]:
    views = person["workdir"].views
    con = duckdb.connect()
    try:
        return {
            str(i)
            for path in sorted(views.glob("*.parquet"))
            for (i,) in con.execute("SELECT id FROM read_parquet(?)", [str(path)]).fetchall()
        }
    finally:
        con.close()


def test_forget_erases_the_shared_records_that_name_the_patient(person: dict[str, Any]) -> None:
    """A record naming her only by an identifier, by another server's URL, or by a reference
    outside her compartment, and a Practitioner or an Organization carrying her name, phone or
    address, are sealed under the shared key: they are erased with her, and their released
    copies too; the shared records naming no one stay."""
    key = person["pseudo"].resource_key
    shared_naming_her = {key(r["resourceType"], r["id"]) for r in NAMING_HER}
    before = _readable(person)
    expected = sum(1 for _, owner, text in before if owner is None and _naming_her(text))
    assert expected == len(NAMING_HER)  # every one of them is sealed under the shared key
    released = {key("Observation", "by-identifier"), key("Observation", "external")}
    assert released <= _released_ids(person) and released <= _parquet_ids(person)

    report = _forget(person, "pz")

    after = _readable(person)
    assert [
        (t, _naming_her(text)) for t, owner, text in after if owner is None and _naming_her(text)
    ] == []
    kept = {orjson.loads(text)["id"] for _, owner, text in after if owner is None}
    assert kept == {
        "org-harbor",
        "prac-same-birthday",
        "prac-first-name",
        "prac-surname",
        "anonymous",
    }
    assert shared_naming_her & (_released_ids(person) | _parquet_ids(person)) == set()
    assert key("Observation", "anonymous") in _released_ids(person) & _parquet_ids(person)
    assert report["rows_deleted"]["phi_vault_shared"] == expected


class _Killed(BaseException):
    """The process stops here, as under SIGKILL: nothing after it runs, no handler sees it."""


def test_an_erasure_interrupted_after_its_commit_run_again_purges_the_shared_records(
    person: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ehr forget`` stopped after its warehouse transaction, before the released files were
    purged, is run again: the re-run can no longer read the shared records naming her (the
    first run deleted them from the vault), yet their released copies leave the Parquet files
    too, not only her own rows."""
    key = person["pseudo"].resource_key
    external = key("Observation", "external")  # of no patient: patient_id NULL when released
    assert external in _parquet_ids(person)

    import pipelines.erasure

    workdir, key_file = person["workdir"], person["key_file"]
    common = ["--workdir", str(workdir.root), "--key-file", str(key_file)]
    with monkeypatch.context() as stop:

        def killed(*args: Any, **kwargs: Any) -> int:
            raise _Killed

        stop.setattr(pipelines.erasure, "purge_released_parquet", killed)
        with pytest.raises(_Killed):
            CliRunner().invoke(forget, ["pz", "--reason", "ticket 4711", *common])
    assert external not in _released_ids(person)  # committed in the warehouse
    assert external in _parquet_ids(person)  # not yet purged from the files

    _forget(person, "pz")

    assert external not in _parquet_ids(person)
    assert key("Observation", "anonymous") in _parquet_ids(person)  # naming no one: kept


def test_forget_erases_the_other_patient_records_of_the_same_person(
    person: dict[str, Any],
) -> None:
    """A second Patient resource with her identifiers (same MRN and SSN, another id) is the
    same person: ingest would refuse it after the erasure, so the erasure takes it, and its
    compartment, too; another patient stays."""
    key = person["pseudo"].resource_key
    duplicate = key("Patient", "pt-dup-77")
    records = {duplicate, key("Observation", "dup-pulse")}
    assert records <= _released_ids(person) and records <= _parquet_ids(person)

    report = _forget(person, "pz")

    after = _readable(person)
    assert [(t, _naming_her(text)) for t, _, text in after if _naming_her(text)] == []
    assert {orjson.loads(text)["id"] for _, owner, text in after if owner is not None} == {
        "p-other",
        "other-pulse",
    }
    assert records & (_released_ids(person) | _parquet_ids(person)) == set()
    assert report["same_person"] == [duplicate]
    assert report["data_keys_destroyed"] == 2  # hers and the duplicate's

    # an erasure run again finds the duplicate through its tombstone, and finds nothing left
    again = _forget(person, "pz")
    assert again["same_person"] == [duplicate] and again["data_keys_destroyed"] == 0
    # and a third Patient resource with one of her identifiers is kept out
    landing = person["workdir"].root.parent / "landing" / "b2"
    _write(landing, "again.ndjson", [_patient("pt-third", [(SSN_SYSTEM, SSN)])])
    second = ingest_batch(person["workdir"].warehouse, "b2", landing, person["provider"], workers=1)
    assert second.quarantine_reasons == {ERASED_SUBJECT: 1}


def test_identifiers_written_differently_still_name_the_erased_person(
    person: dict[str, Any],
) -> None:
    """The tombstones compare identifiers in a loose form (letters and digits, case folded)
    within one system; another system's identifier with the same value is someone else."""
    _forget(person, "pz")
    resend = person["workdir"].root.parent / "landing" / "b2"
    records = [
        _patient("pt-new-3", [(SSN_SYSTEM, "731559012")]),
        _patient("pt-new-4", [(MRN_SYSTEM, f" {MRN} ")]),
        _patient("pt-new-5", [(SSN_SYSTEM, "731 55 9012")]),
        _obs("cond-ssn", {"reference": f"Patient?identifier={SSN_SYSTEM}|731.55.9012"}),
        # her system written in capitals, or with a trailing slash, is hers
        _patient("pt-new-6", [(MRN_SYSTEM.upper(), MRN)]),
        _patient("pt-new-7", [(MRN_SYSTEM + "/", MRN)]),
        # a record carrying her inside it: its subject is the Patient it contains
        {
            **_obs("contained-her", {"reference": "#p"}, None),
            "contained": [{**_patient("p", [(SSN_SYSTEM, SSN)])}],
        },
        # another hospital's MRN may equal hers: a different system, a different person
        {
            **OTHER,
            "id": "pt-elsewhere",
            "identifier": [{"system": "urn:oid:2.16.840.1.9", "value": MRN}],
        },
    ]
    _write(resend, "resend.ndjson", records)
    report = ingest_batch(person["workdir"].warehouse, "b2", resend, person["provider"], workers=1)
    con = warehouse.connect(person["workdir"].warehouse, read_only=True)
    try:
        outcomes = con.execute(
            "SELECT outcome FROM record_ledger WHERE batch_id = 'b2' ORDER BY file_index, position"
        ).fetchall()
    finally:
        con.close()
    assert [o for (o,) in outcomes] == [ERASED_SUBJECT] * 7 + ["new"]
    assert report.quarantine_reasons == {ERASED_SUBJECT: 7}
    kept = [orjson.loads(text)["id"] for _, _, text in _readable(person)]
    assert "pt-elsewhere" in kept
    assert not {"pt-new-3", "pt-new-4", "pt-new-5", "pt-new-6", "pt-new-7"} & set(kept)
    assert "contained-her" not in kept


def test_a_patient_indexed_before_loose_forms_is_tombstoned_by_them(
    person: dict[str, Any],
) -> None:
    """A warehouse whose identifier index predates loose forms (only exact criteria): the
    erasure computes the loose forms from the Patient versions it reads."""
    pseudo = person["pseudo"]
    loose = [loose_identifier_key(pseudo, "Patient", f"{s}|{v}") for s, v in ((SSN_SYSTEM, SSN),)]
    con = warehouse.connect(person["workdir"].warehouse)
    try:
        deleted = con.execute(
            "DELETE FROM identifier_index WHERE criteria_key IN (SELECT unnest(?::VARCHAR[]))",
            [loose],
        ).fetchall()
        con.execute("CHECKPOINT")
    finally:
        con.close()
    assert deleted == [(2,)]  # hers and the duplicate's

    _forget(person, "pz")
    resend = person["workdir"].root.parent / "landing" / "b2"
    _write(resend, "resend.ndjson", [_patient("pt-new-3", [(SSN_SYSTEM, "731559012")])])
    report = ingest_batch(person["workdir"].warehouse, "b2", resend, person["provider"], workers=1)
    assert report.quarantine_reasons == {ERASED_SUBJECT: 1}


@pytest.mark.parametrize("linked_from", ["old", "new"])
def test_a_record_linked_to_hers_is_the_same_person(
    tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch, linked_from: str
) -> None:
    """A record the hospital merged into hers (``Patient.link``: the old record
    ``replaced-by`` hers, or hers ``replaces`` it), with no identifier in common, is the same
    person: erasing her takes it and its compartment, whichever of the two holds the link;
    another patient stays."""
    monkeypatch.delenv("EHR_AUDIT_ANCHOR", raising=False)
    provider = FileKeyProvider.load(key_file)
    old = _patient("pt-old-12", [(MRN_SYSTEM, "55001122")])
    hers = dict(PZ)
    if linked_from == "old":
        old["link"] = [{"other": {"reference": "Patient/pz"}, "type": "replaced-by"}]
    else:
        hers["link"] = [{"other": {"reference": "Patient/pt-old-12"}, "type": "replaces"}]
    landing = tmp_path / "landing" / "b1"
    records = [hers, old, _obs("old-pulse", {"reference": "Patient/pt-old-12"}), OTHER]
    _write(
        landing, "records.ndjson", [*records, _obs("other-pulse", {"reference": "Patient/p-other"})]
    )
    workdir = Workdir(tmp_path / "work")
    report = ingest_batch(workdir.warehouse, "b1", landing, provider, workers=1)
    assert (report.accepted, report.quarantined) == (5, 0)
    con = warehouse.connect(workdir.warehouse)
    try:
        deidentify_batch(con, provider, "b1", Policy.shipped("research"), workers=1)
    finally:
        con.close()
    person = {"provider": provider, "workdir": workdir, "key_file": key_file}
    key = Pseudonymizer(provider.pseudonym_key()).resource_key

    erased = _forget(person, "pz")

    assert erased["same_person"] == [key("Patient", "pt-old-12")]
    assert erased["data_keys_destroyed"] == 2
    kept = {orjson.loads(text)["id"] for _, owner, text in _readable(person) if owner is not None}
    assert kept == {"p-other", "other-pulse"}
    assert {key("Patient", "pt-old-12"), key("Observation", "old-pulse")} & _released_ids(
        person
    ) == set()


@pytest.mark.parametrize("names_her_by", ["id", "identifier"])
def test_a_new_record_linked_to_her_after_the_erasure_is_refused(
    person: dict[str, Any], names_her_by: str
) -> None:
    """A Patient sent after her erasure under a new id and with identifiers of its own, whose
    ``link`` says it replaces hers (by her id, or by her MRN): the same person, by the rule the
    erasure itself reads links with, so it is refused as her, with its compartment."""
    _forget(person, "pz")
    other = (
        {"reference": "Patient/pz"}
        if names_her_by == "id"
        else {"reference": f"Patient?identifier={MRN_SYSTEM}|{MRN}"}
    )
    newer = _patient("pt-new-99", [(MRN_SYSTEM, "99990000")])
    newer["link"] = [{"other": other, "type": "replaces"}]
    landing = person["workdir"].root.parent / "landing" / "b2"
    _write(landing, "again.ndjson", [newer, _obs("new-pulse", {"reference": "Patient/pt-new-99"})])
    second = ingest_batch(person["workdir"].warehouse, "b2", landing, person["provider"], workers=1)
    assert second.quarantine_reasons == {ERASED_SUBJECT: 2}
    assert second.accepted == 0


def _flip_data_key_id(person: dict[str, Any], resource_key: str) -> None:
    """Flip a bit of the data key id in the header of the resource's sealed blobs (its vault
    row and its clustered copy): the blob now names a data key the warehouse never held."""
    con = duckdb.connect(str(person["workdir"].warehouse))
    try:
        for table in ("phi_vault", "phi_vault_clustered"):
            rows = con.execute(
                f"SELECT ingest_seq, sealed FROM {table} WHERE resource_key = ?", [resource_key]
            ).fetchall()
            for seq, sealed in rows:
                blob = bytes(sealed)
                tampered = blob[:5] + bytes([blob[5] ^ 1]) + blob[6:]
                con.execute(f"UPDATE {table} SET sealed = ? WHERE ingest_seq = ?", [tampered, seq])
    finally:
        con.close()


def test_a_patient_version_tampered_to_name_no_data_key_stops_the_erasure(
    person: dict[str, Any],
) -> None:
    """A Patient version whose blob names a data key the warehouse never held is a tampered
    row, not an erasure cut short (the patient's key lives): the erasure stops, naming the
    missing key and nothing of hers, and destroys nothing. Passed over, it left the shared
    records naming her unsearched, and the Practitioner carrying her name readable for good
    under the shared key, while the erasure reported success."""
    key = person["pseudo"].resource_key
    _flip_data_key_id(person, key("Patient", "pz"))
    workdir, key_file = person["workdir"], person["key_file"]
    common = ["--workdir", str(workdir.root), "--key-file", str(key_file)]
    result = CliRunner().invoke(forget, ["pz", "--reason", "ticket 4711", *common])
    assert result.exit_code == 1, result.output
    assert "does not exist" in result.output
    assert not any(c.casefold() in result.output.casefold() for c in CANARIES[:-1])
    readable = _readable_shared(person)
    assert any(_naming_her(text) for text in readable)  # nothing was erased
    con = duckdb.connect(str(workdir.warehouse), read_only=True)
    try:
        destroyed = con.execute(
            "SELECT count(*) FROM data_keys WHERE destroyed_at IS NOT NULL"
        ).fetchone()
    finally:
        con.close()
    assert destroyed == (0,)


def _readable_shared(person: dict[str, Any]) -> list[str]:
    """The text of every version of every vault row of no patient, decrypted with the keys."""
    con = warehouse.connect(person["workdir"].warehouse, read_only=True)
    try:
        return [
            orjson.dumps(r.resource).decode()
            for r in iter_every_version(con, person["provider"], shared_only=True)
        ]
    finally:
        con.close()


def _encounter(eid: str, patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "id": eid,
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{patient}"},
    }


def _filed_under(oid: str, encounter: str) -> dict[str, Any]:
    """An Observation with no subject (FHIR makes it optional), filed under an Encounter."""
    obs = _obs(oid, {})
    del obs["subject"]
    obs["encounter"] = {"reference": f"Encounter/{encounter}"}
    return obs


def _provenance(pid: str, target: str) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "id": pid,
        "target": [{"reference": target}],
        "recorded": "2021-04-01T10:05:00Z",
        "agent": [{"who": {"display": "ward clerk"}}],
    }


def test_records_of_no_patient_about_her_records_are_erased_and_refused_later(
    person: dict[str, Any],
) -> None:
    """A record filed under no patient that points at one of her records (an Observation with
    no subject under her Encounter, a Provenance of her Encounter, a Provenance of that
    Observation) is hers, though it holds none of her names or ids: it is erased with her,
    with its released copy, and one sent after the erasure is refused. The same records about
    another patient's records stay."""
    key = person["pseudo"].resource_key
    workdir, provider = person["workdir"], person["provider"]
    # ids that hold nothing of hers, as an export's UUIDs do: the text search finds none
    about_her = [
        _encounter("enc-a1c9", "pz"),
        _filed_under("filed-b7e2", "enc-a1c9"),
        _provenance("prov-of-her-visit", "Encounter/enc-a1c9"),
        _provenance("prov-of-the-filed", "Observation/filed-b7e2"),
    ]
    about_other = [
        _encounter("enc-other", "p-other"),
        _filed_under("under-other-encounter", "enc-other"),
        _provenance("prov-of-other-pulse", "Observation/other-pulse"),
    ]
    landing = workdir.root.parent / "landing" / "b2"
    _write(landing, "more.ndjson", [*about_her, *about_other])
    second = ingest_batch(workdir.warehouse, "b2", landing, provider, workers=1)
    assert (second.accepted, second.quarantined) == (7, 0)
    con = warehouse.connect(workdir.warehouse)
    try:
        deidentify_batch(con, provider, "b2", Policy.shipped("research"), workers=1)
    finally:
        con.close()
    hers = {key(r["resourceType"], r["id"]) for r in about_her[1:]}
    assert hers <= _released_ids(person)

    report = _forget(person, "pz")

    kept = {orjson.loads(text)["id"] for text in _readable_shared(person)}
    assert kept & {r["id"] for r in about_her} == set()
    assert {"under-other-encounter", "prov-of-other-pulse"} <= kept
    assert hers & _released_ids(person) == set()
    assert key("Observation", "under-other-encounter") in _released_ids(person)
    assert report["rows_deleted"]["phi_vault_shared"] == len(NAMING_HER) + len(hers)

    landing = workdir.root.parent / "landing" / "b3"
    _write(
        landing,
        "again.ndjson",
        [
            _filed_under("again-under-her-encounter", "enc-a1c9"),
            _provenance("again-prov-of-her-visit", "Encounter/enc-a1c9"),
            _filed_under("again-under-other-encounter", "enc-other"),
        ],
    )
    third = ingest_batch(workdir.warehouse, "b3", landing, provider, workers=1)
    assert third.quarantine_reasons == {ERASED_SUBJECT: 2}
    assert third.accepted == 1


def test_patients_read_before_a_patient_refused_as_her_and_tied_to_it_are_refused(
    person: dict[str, Any],
) -> None:
    """After her erasure a batch holds a new Patient whose ``link`` says it replaces hers, and
    before it three more: one linked to that new Patient by id, one by its MRN, one sharing
    its MRN. Each is the same person as the new Patient, so she, by the rule the erasure reads
    people with (``same_person``): all four are refused with their records, and no data key is
    written for any of them. Before, the three read first were stored and released."""
    _forget(person, "pz")
    workdir = person["workdir"]
    con = duckdb.connect(str(workdir.warehouse), read_only=True)
    try:
        keys_before = con.execute("SELECT count(*) FROM data_keys").fetchone()
    finally:
        con.close()
    hers = _patient("pt-new-1", [(MRN_SYSTEM, "77001")])
    hers["link"] = [{"other": {"reference": "Patient/pz"}, "type": "replaces"}]
    by_id = _patient("pt-new-2", [(MRN_SYSTEM, "77002")])
    by_id["link"] = [{"other": {"reference": "Patient/pt-new-1"}, "type": "replaces"}]
    by_mrn = _patient("pt-new-3", [(MRN_SYSTEM, "77003")])
    by_mrn["link"] = [
        {"other": {"identifier": {"system": MRN_SYSTEM, "value": "77001"}}, "type": "seealso"}
    ]
    same_mrn = _patient("pt-new-4", [(MRN_SYSTEM, "77001")])
    records: list[dict[str, Any]] = []
    for patient in (by_id, by_mrn, same_mrn, hers):
        records += [
            patient,
            _obs(f"{patient['id']}-pulse", {"reference": f"Patient/{patient['id']}"}),
        ]
    landing = workdir.root.parent / "landing" / "b2"
    _write(landing, "again.ndjson", records)
    second = ingest_batch(workdir.warehouse, "b2", landing, person["provider"], workers=1)
    assert second.quarantine_reasons == {ERASED_SUBJECT: 8}
    assert second.accepted == 0
    con = duckdb.connect(str(workdir.warehouse), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM data_keys").fetchone() == keys_before
        stored = con.execute("SELECT count(*) FROM phi_vault WHERE batch_id = 'b2'").fetchone()
    finally:
        con.close()
    assert stored == (0,)


def _stored_in(person: dict[str, Any], batch: str) -> int:
    con = duckdb.connect(str(person["workdir"].warehouse), read_only=True)
    try:
        row = con.execute("SELECT count(*) FROM phi_vault WHERE batch_id = ?", [batch]).fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0])


def _sent_again_all_refused(person: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """``records`` sent in a batch after her erasure: every one refused as hers, none stored."""
    workdir = person["workdir"]
    landing = workdir.root.parent / "landing" / "b2"
    _write(landing, "again.ndjson", records)
    second = ingest_batch(workdir.warehouse, "b2", landing, person["provider"], workers=1)
    assert second.quarantine_reasons == {ERASED_SUBJECT: len(records)}
    assert second.accepted == 0
    assert _stored_in(person, "b2") == 0


def test_patients_a_patient_refused_as_her_links_to_are_refused(person: dict[str, Any]) -> None:
    """A link says two records are one person whichever of them holds it (``same_person``
    reads it either way round): the Patients that a new Patient refused as her names in its
    ``link``, by id or by an identifier, read before it or after, are refused with their
    records. Before, only Patients whose own link named the refused one were, so these two
    were stored and released under new pseudonyms."""
    _forget(person, "pz")
    before = _patient("pt-before", [(MRN_SYSTEM, "66001")])
    after = _patient("pt-after", [(MRN_SYSTEM, "66002")])
    hers = _patient("pt-hers", [(MRN_SYSTEM, "66003")])
    hers["link"] = [
        {"other": {"reference": "Patient/pz"}, "type": "replaces"},
        {"other": {"reference": "Patient/pt-before"}, "type": "seealso"},
        {"other": {"reference": f"Patient?identifier={MRN_SYSTEM}|66002"}, "type": "seealso"},
    ]
    records = [
        before,
        _obs("before-pulse", {"reference": "Patient/pt-before"}),
        hers,
        after,
        _obs("after-pulse", {"reference": "Patient/pt-after"}),
    ]
    assert len(records) == 5
    _sent_again_all_refused(person, records)


def test_patients_tied_to_her_through_each_other_or_a_loose_identifier_are_refused(
    person: dict[str, Any],
) -> None:
    """After her erasure a batch holds, before a new Patient refused as her (its ``link``
    replaces hers; MRN ``MX-88003``), a chain of two: the first linked to the second, the
    second to her, each read before what it is linked to; and one whose ``link`` names her MRN
    written another way (``mx 88003``, the same person by the loose form of an identifier). All
    are refused with their records: the ties are followed until none is left (one pass left
    the head of the chain), and a link's identifier is read in its loose form too."""
    _forget(person, "pz")
    head = _patient("pt-chain-1", [(MRN_SYSTEM, "88001")])
    head["link"] = [{"other": {"reference": "Patient/pt-chain-2"}, "type": "seealso"}]
    middle = _patient("pt-chain-2", [(MRN_SYSTEM, "88002")])
    middle["link"] = [{"other": {"reference": "Patient/pt-hers"}, "type": "seealso"}]
    loose = _patient("pt-loose", [(MRN_SYSTEM, "88004")])
    loose["link"] = [
        {"other": {"reference": f"Patient?identifier={MRN_SYSTEM}|mx 88003"}, "type": "seealso"}
    ]
    hers = _patient("pt-hers", [(MRN_SYSTEM, "MX-88003")])
    hers["link"] = [{"other": {"reference": "Patient/pz"}, "type": "replaces"}]
    records: list[dict[str, Any]] = []
    for patient in (head, middle, loose, hers):
        records += [
            patient,
            _obs(f"{patient['id']}-pulse", {"reference": f"Patient/{patient['id']}"}),
        ]
    _sent_again_all_refused(person, records)


def test_another_patients_record_holding_her_inside_it_is_erased_with_her(
    person: dict[str, Any],
) -> None:
    """Her child's lab result holds her Patient as a contained resource (the sample's
    performer), filed under the child's key. The erasure searched her compartment, records of
    no patient and the quarantine: her name, MRN, SSN, phone and address stayed readable under
    the child's key. Every version of that record is erased with her (the release never
    published it); the child's other records stay."""
    workdir = person["workdir"]
    child = {"resourceType": "Patient", "id": "p-child", "name": [{"family": "Oddsock"}]}
    held = dict(PZ, id="mother")
    lab = _obs("child-lab", {"reference": "Patient/p-child"})
    lab["contained"] = [held]
    lab["performer"] = [{"reference": "#mother"}]
    records = [child, _obs("child-pulse", {"reference": "Patient/p-child"}), lab]
    landing = workdir.root.parent / "landing" / "b2"
    _write(landing, "family.ndjson", records)
    report = ingest_batch(workdir.warehouse, "b2", landing, person["provider"], workers=1)
    assert report.accepted == 3
    child_key = person["pseudo"].resource_key("Patient", "p-child")
    assert any(owner == child_key and _naming_her(text) for _, owner, text in _readable(person))

    _forget(person, "pz")
    left = _readable(person)
    assert [(kind, owner) for kind, owner, text in left if _naming_her(text)] == []
    kept = {(kind, owner) for kind, owner, _ in left if owner == child_key}
    assert kept == {("Patient", child_key), ("Observation", child_key)}


def test_records_of_no_patient_about_records_refused_as_hers_are_refused(
    person: dict[str, Any],
) -> None:
    """After her erasure a batch sends her again under a new id with a new Encounter, and
    records of no patient about it: an Observation with no subject filed under it and a
    Provenance of it, before and after, and a Provenance of an Observation refused for being
    filed under her erased Encounter. Each is about a record refused as hers, so it is refused
    too, whichever came first. Before, the four were stored under the shared key, pointing at
    records the vault never held, where no later erasure found them."""
    workdir = person["workdir"]
    landing = workdir.root.parent / "landing" / "b2"
    _write(landing, "visit.ndjson", [_encounter("enc-a1c9", "pz")])
    ingest_batch(workdir.warehouse, "b2", landing, person["provider"], workers=1)
    _forget(person, "pz")
    records = [
        _filed_under("filed-before", "enc-new"),
        _provenance("prov-before", "Encounter/enc-new"),
        _provenance("prov-of-refused", "Observation/filed-under-erased"),
        _patient("pt-new", [(MRN_SYSTEM, MRN)]),
        _encounter("enc-new", "pt-new"),
        _filed_under("filed-after", "enc-new"),
        _filed_under("filed-under-erased", "enc-a1c9"),
        _filed_under("not-hers", "enc-elsewhere"),
    ]
    landing = workdir.root.parent / "landing" / "b3"
    _write(landing, "again.ndjson", records)
    third = ingest_batch(workdir.warehouse, "b3", landing, person["provider"], workers=1)
    assert third.quarantine_reasons == {ERASED_SUBJECT: 7}
    assert third.accepted == 1
    assert _stored_in(person, "b3") == 1
