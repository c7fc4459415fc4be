"""The vault's one read path: every reader of vault rows checks that the decrypted resource is
the one its row names, so a ciphertext moved to another row of the same patient (and so under
the same data key) is refused wherever it is read."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from deid.policy import Policy
from deid.release import batch_canaries, deidentify_batch, release_canaries
from vault import warehouse
from vault.audit import AuditLog
from vault.errors import InvalidCiphertext
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.lifecycle import reidentify
from vault.pseudonym import Pseudonymizer
from vault.read import (
    iter_current_records,
    iter_current_resources,
    iter_every_version,
    read_current,
    read_resource,
)

PATIENT = {
    "resourceType": "Patient",
    "id": "pt-quill",
    "name": [{"family": "Quillfeather", "given": ["Marisol"]}],
    "birthDate": "1948-02-29",
}
CONDITION = {
    "resourceType": "Condition",
    "id": "cond-asthma",
    "subject": {"reference": "Patient/pt-quill"},
    "code": {"text": "asthma"},
}
OTHER = {"resourceType": "Patient", "id": "pt-odd", "name": [{"family": "Oddsock"}]}


@pytest.fixture
def wh(tmp_path: Path, key_provider: FileKeyProvider) -> Path:
    land = tmp_path / "land"
    land.mkdir()
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in (PATIENT, CONDITION)],
    }
    (land / "quill.json").write_text(json.dumps(bundle))
    (land / "odd.json").write_text(json.dumps(OTHER))
    path = tmp_path / "w.duckdb"
    report = ingest_batch(path, "b1", land, key_provider, workers=1)
    assert report.accepted == 3
    return path


def _pseudonym(provider: FileKeyProvider, rtype: str, rid: str) -> str:
    return Pseudonymizer(provider.pseudonym_key()).resource_key(rtype, rid)


def _swap(con: duckdb.DuckDBPyConnection, a: str, b: str, columns: tuple[str, ...]) -> None:
    """Exchange ``columns`` between the vault rows of resource keys ``a`` and ``b``."""
    select = f"SELECT {', '.join(columns)} FROM phi_vault WHERE resource_key = ?"
    values = {key: con.execute(select, [key]).fetchall()[0] for key in (a, b)}
    assignments = ", ".join(f"{column} = ?" for column in columns)
    for key, other in ((a, b), (b, a)):
        con.execute(
            f"UPDATE phi_vault SET {assignments} WHERE resource_key = ?", [*values[other], key]
        )
    after = {key: con.execute(select, [key]).fetchall()[0] for key in (a, b)}
    assert after == {a: values[b], b: values[a]}
    # the same change to the rows' copies (vault.clustered), which the reads of Patients take:
    # a tamperer changes every table holding the rows; a copy changed alone is tested there
    for key in (a, b):
        con.execute(
            f"UPDATE phi_vault_clustered SET {assignments} WHERE resource_key = ?",
            [*after[key], key],
        )


def _audit(tmp_path: Path, provider: FileKeyProvider) -> AuditLog:
    at = datetime(2026, 3, 1, tzinfo=UTC)
    return AuditLog.for_provider(tmp_path / "audit.log", provider, clock=lambda: at)


Reader = Callable[[duckdb.DuckDBPyConnection, FileKeyProvider, Path], Any]

READ_PATHS: dict[str, Reader] = {
    "every current resource": lambda c, p, _: list(iter_current_resources(c, p)),
    "one batch's resources": lambda c, p, _: list(iter_current_resources(c, p, "b1")),
    "current records": lambda c, p, _: list(iter_current_records(c, p, chunk_rows=1)),
    "current Patients": lambda c, p, _: list(iter_current_records(c, p, resource_type="Patient")),
    "every version": lambda c, p, _: list(iter_every_version(c, p, chunk_rows=1)),
    "every version of the Patient": lambda c, p, _: list(
        iter_every_version(c, p, resource_key=_pseudonym(p, "Patient", "pt-quill"))
    ),
    "Patients of a batch": lambda c, p, _: list(iter_current_records(c, p, patients_of_batch="b1")),
    "read the Patient": lambda c, p, _: read_resource(c, p, "Patient", "pt-quill"),
    "read the Condition": lambda c, p, _: read_resource(c, p, "Condition", "cond-asthma"),
    "read by pseudonym": lambda c, p, _: read_current(c, p, _pseudonym(p, "Patient", "pt-quill")),
    "re-identification": lambda c, p, tmp: reidentify(
        c, p, _pseudonym(p, "Patient", "pt-quill"), _audit(tmp, p), "tamper test"
    ),
    "de-identification": lambda c, p, _: deidentify_batch(c, p, "b1", Policy.shipped("research")),
    "batch canaries": lambda c, p, _: batch_canaries(c, p, "b1"),
    "release canaries": lambda c, p, _: release_canaries(c, p),
}


@pytest.mark.parametrize("path", sorted(READ_PATHS))
def test_every_read_path_reads_an_untampered_vault(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider, tmp_path: Path, path: str
) -> None:
    assert READ_PATHS[path](con, key_provider, tmp_path) is not None


@pytest.mark.parametrize("path", sorted(READ_PATHS))
@pytest.mark.parametrize(
    "columns",
    [("sealed", "aad"), ("sealed",)],
    ids=["ciphertext-and-aad", "ciphertext-only"],
)
def test_swapping_two_rows_of_one_patient_is_detected(
    con: duckdb.DuckDBPyConnection,
    key_provider: FileKeyProvider,
    tmp_path: Path,
    path: str,
    columns: tuple[str, ...],
) -> None:
    patient = _pseudonym(key_provider, "Patient", "pt-quill")
    condition = _pseudonym(key_provider, "Condition", "cond-asthma")
    owners = dict(con.execute("SELECT resource_key, patient_key FROM phi_vault").fetchall())
    assert owners[patient] == owners[condition] == patient  # one patient, one data key
    _swap(con, patient, condition, columns)
    with pytest.raises(InvalidCiphertext) as raised:
        READ_PATHS[path](con, key_provider, tmp_path)
    message = str(raised.value)
    for phi in ("pt-quill", "cond-asthma", "Quillfeather", "Marisol", "asthma", "1948-02-29"):
        assert phi not in message


def test_reading_the_vault_with_foreign_row_metadata_is_refused(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider
) -> None:
    # the row claims another type than the resource it holds: same key, same AAD, wrong label
    patient = _pseudonym(key_provider, "Patient", "pt-quill")
    con.execute(
        "UPDATE phi_vault SET resource_type = 'Condition' WHERE resource_key = ?", [patient]
    )
    with pytest.raises(InvalidCiphertext, match="different resource"):
        read_resource(con, key_provider, "Patient", "pt-quill")
    with pytest.raises(InvalidCiphertext):
        list(iter_current_resources(con, key_provider))


def test_records_carry_their_rows_pseudonymous_columns(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider
) -> None:
    records = {r.resource_key: r for r in iter_current_records(con, key_provider, chunk_rows=2)}
    patient = _pseudonym(key_provider, "Patient", "pt-quill")
    condition = records[_pseudonym(key_provider, "Condition", "cond-asthma")]
    assert condition.resource == CONDITION and condition.resource_type == "Condition"
    assert condition.patient_key == patient and condition.batch_id == "b1"
    assert records[patient].resource == PATIENT
    other = _pseudonym(key_provider, "Patient", "pt-odd")
    touched = list(iter_current_records(con, key_provider, patients_of_batch="b1"))
    assert {r.resource_key for r in touched} == {patient, other}
    assert read_current(con, key_provider, patient, "Condition") is None


# read paths that read the Condition's row
_READS_THE_CONDITION = [
    "every current resource",
    "one batch's resources",
    "current records",
    "read the Condition",
    "de-identification",
]


@pytest.mark.parametrize("path", _READS_THE_CONDITION)
@pytest.mark.parametrize("owner", ["pt-odd", None], ids=["another-patient", "no-patient"])
def test_a_row_moved_to_another_owner_is_refused(
    con: duckdb.DuckDBPyConnection,
    key_provider: FileKeyProvider,
    tmp_path: Path,
    path: str,
    owner: str | None,
) -> None:
    """The Condition's row relabelled as another patient's (or as no patient's): its
    ciphertext is sealed under pt-quill's data key, whose owner is bound when it is wrapped."""
    condition = _pseudonym(key_provider, "Condition", "cond-asthma")
    target = _pseudonym(key_provider, "Patient", owner) if owner else None
    con.execute("UPDATE phi_vault SET patient_key = ? WHERE resource_key = ?", [target, condition])
    with pytest.raises(InvalidCiphertext, match="another owner's data key") as raised:
        READ_PATHS[path](con, key_provider, tmp_path)
    message = str(raised.value)
    assert condition in message  # the row's pseudonym, and no PHI
    for phi in ("pt-quill", "pt-odd", "cond-asthma", "Quillfeather", "Oddsock", "asthma"):
        assert phi not in message


def _newest_versions(con: duckdb.DuckDBPyConnection) -> dict[str, tuple[Any, ...]]:
    """The newest version of each resource, worked out here from every row's columns: the
    highest numeric versionId, then the latest lastUpdated, then the last to arrive."""
    rows = con.execute(
        "SELECT resource_key, resource_type, batch_id, patient_key, version_id, last_updated, "
        "ingest_seq FROM phi_vault"
    ).fetchall()

    def rank(row: tuple[Any, ...]) -> tuple[Any, ...]:
        version = int(row[4]) if row[4] is not None and str(row[4]).isdigit() else None
        # lastUpdated is an instant: compared as the moment it names, whatever its zone
        instant = datetime.fromisoformat(row[5]).astimezone(UTC) if row[5] else None
        return (version is not None, version or 0, instant is not None, instant or 0, row[6])

    newest: dict[str, tuple[Any, ...]] = {}
    for row in rows:
        if row[0] not in newest or rank(row) > rank(newest[row[0]]):
            newest[row[0]] = row
    return newest


def test_filtered_reads_are_the_newest_versions_filtered(
    wh: Path, tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """Later batches: a newer version of the Patient, then an older one arriving after it, and
    a Condition of the other patient. Each filter gives the newest versions that match it."""
    newer = {**PATIENT, "meta": {"versionId": "3"}, "name": [{"family": "Quillfeather-Ng"}]}
    older = {**PATIENT, "meta": {"versionId": "2"}}
    odd_condition = {**CONDITION, "id": "cond-odd", "subject": {"reference": "Patient/pt-odd"}}
    for batch, resources in (("b2", [newer]), ("b3", [older, odd_condition])):
        land = tmp_path / batch
        land.mkdir()
        for i, resource in enumerate(resources):
            (land / f"{i}.json").write_text(json.dumps(resource))
        ingest_batch(wh, batch, land, key_provider, workers=1)
    with warehouse.connect(wh) as con:
        newest = _newest_versions(con)
        quill = _pseudonym(key_provider, "Patient", "pt-quill")
        assert newest[quill][2] == "b2"  # the older version that came later is not current
        compartments = {
            batch: {
                key
                for (key,) in con.execute(
                    "SELECT DISTINCT patient_key FROM phi_vault WHERE batch_id = ?", [batch]
                ).fetchall()
            }
            for batch in ("b1", "b2", "b3")
        }
        cases = {
            "all": ({}, lambda r: True),
            "Patients": ({"resource_type": "Patient"}, lambda r: r[1] == "Patient"),
            "Conditions": ({"resource_type": "Condition"}, lambda r: r[1] == "Condition"),
            "batch b3": ({"batch_id": "b3"}, lambda r: r[2] == "b3"),
            "batch b1": ({"batch_id": "b1"}, lambda r: r[2] == "b1"),
            "Patients of b3": (
                {"patients_of_batch": "b3"},
                lambda r: r[0] in compartments["b3"],
            ),
            "Patients of b3, from b1": (
                {"patients_of_batch": "b3", "batch_id": "b1"},
                lambda r: r[0] in compartments["b3"] and r[2] == "b1",
            ),
            "Conditions from b3": (
                {"resource_type": "Condition", "batch_id": "b3"},
                lambda r: r[1] == "Condition" and r[2] == "b3",
            ),
        }
        for name, (filters, keep) in cases.items():
            read = [
                (r.resource_key, r.batch_id)
                for r in iter_current_records(con, key_provider, chunk_rows=2, **filters)
            ]
            expected = sorted((r for r in newest.values() if keep(r)), key=lambda r: r[6])
            assert read == [(r[0], r[2]) for r in expected], name
        assert {r[0] for r in newest.values() if r[0] in compartments["b3"]} == {
            quill,
            _pseudonym(key_provider, "Patient", "pt-odd"),
        }

        # every version, current or not: each filter gives the vault's rows that match it
        rows = con.execute(
            "SELECT resource_key, resource_type, batch_id, ingest_seq FROM phi_vault"
        ).fetchall()
        every = {
            "all": ({}, lambda r: True),
            "Patients": ({"resource_type": "Patient"}, lambda r: r[1] == "Patient"),
            "one resource": ({"resource_key": quill}, lambda r: r[0] == quill),
            "Patients of b2": (
                {"resource_type": "Patient", "patients_of_batch": "b2"},
                lambda r: r[1] == "Patient" and r[0] in compartments["b2"],
            ),
        }
        for name, (filters, keep) in every.items():
            read = [
                (r.resource_key, r.batch_id)
                for r in iter_every_version(con, key_provider, chunk_rows=2, **filters)
            ]
            expected = sorted((r for r in rows if keep(r)), key=lambda r: r[3])
            assert read == [(r[0], r[2]) for r in expected], name
        names = [
            r.resource["name"][0]["family"]
            for r in iter_every_version(con, key_provider, resource_key=quill)
        ]
        assert names == ["Quillfeather", "Quillfeather-Ng", "Quillfeather"]  # b1, b2, b3


# One Patient sent in four exports without a versionId: its lastUpdated in other zones and
# precisions, each export arriving after the one before. (instant, gender) in arrival order.
_EXPORTS = [
    ("2024-03-01T06:00:00Z", "female"),
    ("2024-03-01T10:00:00+05:00", "male"),  # 05:00 UTC: older, though its text sorts last
    ("2024-03-01T01:00:00.999999-04:00", "other"),  # 05:00:00.999999 UTC
    ("2024-03-01T06:00:00.5+00:00", "unknown"),  # half a second after the first: the newest
]


@pytest.mark.parametrize("arrived", [len(_EXPORTS) - 1, len(_EXPORTS)], ids=["3", "4"])
def test_the_newest_version_is_the_latest_instant_in_any_zone(
    tmp_path: Path, key_provider: FileKeyProvider, arrived: int
) -> None:
    path = tmp_path / "w.duckdb"
    for n, (instant, gender) in enumerate(_EXPORTS[:arrived]):
        land = tmp_path / f"export{n}"
        land.mkdir()
        resource = {**PATIENT, "gender": gender, "meta": {"lastUpdated": instant}}
        (land / "p.json").write_text(json.dumps(resource))
        assert ingest_batch(path, f"b{n}", land, key_provider, workers=1).accepted == 1
    latest = max(_EXPORTS[:arrived], key=lambda e: datetime.fromisoformat(e[0]).timestamp())
    with warehouse.connect(path) as con:
        read = read_resource(con, key_provider, "Patient", "pt-quill")
        assert read is not None and read["gender"] == latest[1]
        current = [r["gender"] for r in iter_current_resources(con, key_provider)]
        assert current == [latest[1]]
        assert [r[5] for r in _newest_versions(con).values()] == [latest[0]]


def test_identified_only_reads_the_resources_with_an_identifier(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """``identified_only``: every version of the resources one version of which held an
    identifier, and nothing of the others (an Encounter without a visit number is not
    decrypted for the canaries)."""

    def visit(eid: str, version: str, identifier: list[dict[str, str]]) -> dict[str, Any]:
        return {
            "resourceType": "Encounter",
            "id": eid,
            "meta": {"versionId": version},
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": "Patient/p1"},
            **({"identifier": identifier} if identifier else {}),
        }

    numbered = [{"system": "http://hospital.example/visit", "value": "VN-88213377"}]
    batches = {
        "b1": [{"resourceType": "Patient", "id": "p1"}, visit("e1", "1", numbered),
               visit("e2", "1", [])],
        "b2": [visit("e1", "2", []), visit("e3", "1", [])],  # e1's number dropped since
    }  # fmt: skip
    wh = tmp_path / "w.duckdb"
    for batch, resources in batches.items():
        folder = tmp_path / batch
        folder.mkdir()
        (folder / "data.ndjson").write_text("".join(json.dumps(r) + "\n" for r in resources))
        assert ingest_batch(wh, batch, folder, key_provider, workers=1).accepted == len(resources)
    con = warehouse.connect(wh)
    try:
        read = [
            (r.resource["id"], r.resource["meta"]["versionId"])
            for r in iter_every_version(
                con, key_provider, resource_type="Encounter", identified_only=True
            )
        ]
        everything = iter_every_version(con, key_provider, resource_type="Encounter")
        assert len(list(everything)) == 4
    finally:
        con.close()
    assert read == [("e1", "1"), ("e1", "2")]


class _CountingConnection:
    """A connection that records how many rows of positions (rows of one integer) each
    statement fetched."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self._con = con
        self.position_fetches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)

    def execute(self, *args: Any) -> Any:
        self._con.execute(*args)
        return self

    def fetchall(self) -> list[Any]:
        rows = self._con.fetchall()
        if rows and all(len(r) == 1 and isinstance(r[0], int) for r in rows):
            self.position_fetches.append(len(rows))
        return rows


def test_a_read_fetches_its_positions_a_chunk_at_a_time(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """Every read of the vault holds one chunk of the positions it reads, never all of them:
    a batch's (de-identification) or every version of a type (the release canaries) were
    fetched whole into a list, 98 bytes of memory a resource, before the first chunk."""
    from vault.read import iter_current_chunks

    land = tmp_path / "land"
    land.mkdir()
    lines = [
        {"resourceType": "Patient", "id": f"pt-{i}", "name": [{"family": f"Fam{i}"}]}
        for i in range(11)
    ]
    (land / "p.ndjson").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    path = tmp_path / "w.duckdb"
    ingest_batch(path, "b1", land, key_provider, workers=1)
    con = warehouse.connect(path)
    try:
        counting = _CountingConnection(con)
        reading: Any = counting
        chunks = list(iter_current_chunks(reading, key_provider, batch_id="b1", chunk_rows=3))
        assert [len(positions) for positions, _ in chunks] == [3, 3, 3, 2]
        versions = iter_every_version(reading, key_provider, resource_type="Patient", chunk_rows=3)
        assert len({r.resource_key for r in versions}) == 11
        assert len(list(iter_current_records(reading, key_provider, chunk_rows=4))) == 11
        assert counting.position_fetches and max(counting.position_fetches) <= 4
        # the positions staged for each read are gone once it is read
        assert not con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE '_read_positions_%'"
        ).fetchall()
    finally:
        con.close()


class _RowFetches(_CountingConnection):
    """Counts the rows each fetch of seven columns (the quarantine's sealed records with their
    place) returns."""

    def fetchall(self) -> list[Any]:
        rows = self._con.fetchall()
        if rows and all(len(r) == 7 for r in rows):
            self.position_fetches.append(len(rows))
        return rows


def test_the_quarantine_is_read_a_chunk_at_a_time(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """The quarantine's records (read for the release's canaries and for `ehr reidentify`)
    were fetched whole, sealed, before the first was decrypted: a refused export fills the
    quarantine. Now a chunk at a time, in their order, and what is read is what the test
    wrote: Patients refused by validation under their patient, and Patients of no JSON
    (Latin-1) under none."""
    from vault.read import iter_quarantined_records, iter_unattributed_quarantined_records

    land = tmp_path / "land"
    land.mkdir()
    refused = [
        {"resourceType": "Patient", "id": f"pv-{i}", "birthDate": "23/07/1961",
         "name": [{"family": f"Vex{i}"}]}
        for i in range(7)
    ]  # fmt: skip
    latin = [
        json.dumps({"resourceType": "Patient", "id": f"pl-{i}", "name": [{"family": f"Brontë{i}"}]},
                   ensure_ascii=False).encode("latin-1")
        for i in range(5)
    ]  # fmt: skip
    body = b"\n".join([*(json.dumps(r).encode() for r in refused), *latin, b"not json"]) + b"\n"
    (land / "p.ndjson").write_bytes(body)
    path = tmp_path / "w.duckdb"
    ingest_batch(path, "b1", land, key_provider, workers=1)
    con = warehouse.connect(path)
    try:
        counting = _RowFetches(con)
        reading: Any = counting
        owned = list(iter_quarantined_records(reading, key_provider, ["Patient"], chunk_rows=3))
        assert [r["name"][0]["family"] for _, r in owned] == [f"Vex{i}" for i in range(7)]
        loose = list(iter_unattributed_quarantined_records(reading, key_provider, ["Patient"], 2))
        assert [r["name"][0]["family"] for r in loose] == [f"Brontë{i}" for i in range(5)]
        assert counting.position_fetches and max(counting.position_fetches) <= 3
        assert not con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE '_read_quarantine_%'"
        ).fetchall()
    finally:
        con.close()


def test_a_patient_held_in_a_refused_record_is_read_only_when_asked(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A child's refused lab result holding her mother's Patient (contained): the release's
    canaries read the mother from it (``with_held``), but the child's own Patient records, which
    an erasure of the child reads to know her identifiers and tombstone them, do not include
    the mother's."""
    from vault.read import iter_quarantined_records

    land = tmp_path / "land"
    land.mkdir()
    mother = {"resourceType": "Patient", "id": "m1", "name": [{"family": "Quellmere"}]}
    lab = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}}
    lab |= {"subject": {"reference": "Patient/c1"}, "effectiveDateTime": "2024-13-01"}
    lab["contained"] = [mother]
    (land / "p.ndjson").write_text(json.dumps(lab) + "\n")
    path = tmp_path / "w.duckdb"
    ingest_batch(path, "b1", land, key_provider, workers=1)
    con = warehouse.connect(path)
    try:
        child = key_provider_pseudonym(key_provider, "c1")
        assert list(iter_quarantined_records(con, key_provider, ["Patient"], child)) == []
        held = list(iter_quarantined_records(con, key_provider, ["Patient"], with_held=True))
        assert held == [(child, mother)]
    finally:
        con.close()


def key_provider_pseudonym(provider: FileKeyProvider, patient_id: str) -> str:
    from vault.pseudonym import Pseudonymizer

    return Pseudonymizer(provider.pseudonym_key()).resource_key("Patient", patient_id)
