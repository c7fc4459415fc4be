"""The clustered copies of the vault's Patients (vault.clustered): kept in step with the vault by
ingest and erasure, used by reads only where they match the vault's row, and never a reason for
a read to differ from one of ``phi_vault`` alone."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from deid.release import release_canaries
from vault import warehouse
from vault.audit import AuditLog
from vault.clustered import CLUSTERED_TABLE, CLUSTERED_TYPES, sync_clustered
from vault.errors import InvalidCiphertext
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.lifecycle import ErasurePlan, forget_patient
from vault.read import iter_current_records

FAMILIES = ("Ashgrove", "Birchell", "Calloway", "Dunmore", "Everleigh", "Farthing")
GIVEN = ("Ines", "Joro", "Kaia", "Lumen", "Mireille", "Noor")
PATIENTS = [
    {
        "resourceType": "Patient",
        "id": f"pt-{i}",
        "name": [{"family": FAMILIES[i], "given": [GIVEN[i]]}],
        "birthDate": f"19{40 + i}-03-0{1 + i}",
    }
    for i in range(6)
]
RELATIVE = {
    "resourceType": "RelatedPerson",
    "id": "rel-1",
    "patient": {"reference": "Patient/pt-1"},
    "name": [{"family": "Kinsman", "given": ["Audra"]}],
}


def _condition(i: int) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "id": f"cond-{i}",
        "subject": {"reference": f"Patient/pt-{i}"},
        "code": {"text": "asthma"},
    }


def _land(folder: Path, resources: list[dict[str, Any]]) -> Path:
    folder.mkdir()
    for i, resource in enumerate(resources):
        (folder / f"{i:03}.json").write_text(json.dumps(resource))
    return folder


@pytest.fixture
def wh(tmp_path: Path, key_provider: FileKeyProvider) -> Path:
    """Two batches; Patients interleaved with Conditions, as exports deliver them."""
    path = tmp_path / "w.duckdb"
    first = [r for i in range(4) for r in (PATIENTS[i], _condition(i))] + [RELATIVE]
    second = [r for i in range(4, 6) for r in (PATIENTS[i], _condition(i))]
    second.append({**PATIENTS[0], "meta": {"versionId": "2"}, "name": [{"family": "Renamed"}]})
    ingest_batch(path, "b1", _land(tmp_path / "b1", first), key_provider, workers=1)
    ingest_batch(path, "b2", _land(tmp_path / "b2", second), key_provider, workers=1)
    return path


def _vault_rows(con: duckdb.DuckDBPyConnection, table: str) -> set[tuple[Any, ...]]:
    return {
        tuple(row)
        for row in con.execute(
            f"SELECT ingest_seq, resource_key, resource_type, patient_key, content_mac, batch_id, "
            f"sealed, aad FROM {table}"
        ).fetchall()
    }


def _clustered_in_vault(con: duckdb.DuckDBPyConnection) -> set[tuple[Any, ...]]:
    """The vault's rows of the clustered types, picked here in Python from every row."""
    return {row for row in _vault_rows(con, "phi_vault") if row[2] in CLUSTERED_TYPES}


def _reads(con: duckdb.DuckDBPyConnection, provider: FileKeyProvider) -> dict[str, Any]:
    return {
        rtype: [
            (r.resource_key, r.patient_key, r.batch_id, r.resource)
            for r in iter_current_records(con, provider, resource_type=rtype)
        ]
        for rtype in CLUSTERED_TYPES
    } | {
        "batch b2's patients": list(
            iter_current_records(con, provider, resource_type="Patient", patients_of_batch="b2")
        )
    }


def test_ingest_copies_every_patient_and_relative_row_and_nothing_else(
    con: duckdb.DuckDBPyConnection,
) -> None:
    copies = _vault_rows(con, CLUSTERED_TABLE)
    assert copies == _clustered_in_vault(con)
    assert len(copies) == 8  # six Patients, one second version, one RelatedPerson
    assert sync_clustered(con) == (0, 0)  # already in step


def test_deid_canary_types_are_clustered() -> None:
    # the Patient and the relatives' resources (deid.leakscan's canary types read at every
    # release); a Coverage or an Account is a few rows a patient, read from the vault itself
    assert {"Patient", "RelatedPerson", "FamilyMemberHistory"} <= set(CLUSTERED_TYPES)


def test_reads_with_and_without_the_copies_are_the_same(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider
) -> None:
    with_copies = _reads(con, key_provider)
    canaries = release_canaries(con, key_provider)
    con.execute(f"DELETE FROM {CLUSTERED_TABLE}")
    assert _reads(con, key_provider) == with_copies
    again = release_canaries(con, key_provider)
    probe = "Dunmore Noor Renamed Kinsman Audra"
    assert (len(again), again.find(probe)) == (len(canaries), canaries.find(probe))
    assert len(canaries.find(probe)) == 6  # five names, and "Dunmore Noor" family name first
    families = {row[3]["name"][0]["family"] for row in with_copies["Patient"]}
    assert families == {"Renamed", *FAMILIES[1:]}  # the newest version of pt-0
    con.execute(f"DROP TABLE {CLUSTERED_TABLE}")  # a warehouse from before the table
    assert _reads(con, key_provider) == with_copies


def test_reads_take_the_copies(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider
) -> None:
    """The Patients' ciphertexts in phi_vault emptied: reads of Patients still succeed, from the
    copies, while a read of every resource (no copies for it) refuses the emptied rows."""
    before = _reads(con, key_provider)
    con.execute("UPDATE phi_vault SET sealed = ''::BLOB WHERE resource_type = 'Patient'")
    assert _reads(con, key_provider) == before
    with pytest.raises(InvalidCiphertext):
        list(iter_current_records(con, key_provider))


@pytest.mark.parametrize(
    "column, value",
    [
        ("content_mac", "'0' || content_mac"),
        ("patient_key", "NULL"),
        ("batch_id", "'b9'"),
        ("resource_key", "'x' || resource_key"),
    ],
)
def test_a_copy_that_disagrees_with_the_vault_row_is_not_used(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider, column: str, value: str
) -> None:
    """A copy no longer matching its vault row (altered, or left from another state) is passed
    over for the vault's own row, whose emptied ciphertext then fails the read: proof that the
    vault's row, not the copy, was read."""
    con.execute(f"UPDATE {CLUSTERED_TABLE} SET {column} = {value} WHERE resource_type = 'Patient'")
    con.execute("UPDATE phi_vault SET sealed = ''::BLOB WHERE resource_type = 'Patient'")
    with pytest.raises(InvalidCiphertext):
        list(iter_current_records(con, key_provider, resource_type="Patient"))


def test_a_tampered_copy_is_refused(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider
) -> None:
    """Two copies' ciphertexts swapped (their narrow columns still match the vault's rows): the
    reader's own checks refuse them, as they refuse a swap in phi_vault."""
    (a, sealed_a), (b, sealed_b) = con.execute(
        f"SELECT resource_key, sealed FROM {CLUSTERED_TABLE} WHERE resource_type = 'Patient' "
        "AND batch_id = 'b1' ORDER BY ingest_seq LIMIT 2"
    ).fetchall()
    for key, sealed in ((a, sealed_b), (b, sealed_a)):
        con.execute(
            f"UPDATE {CLUSTERED_TABLE} SET sealed = ? WHERE resource_key = ?", [sealed, key]
        )
    with pytest.raises(InvalidCiphertext) as raised:
        release_canaries(con, key_provider)
    for phi in (*FAMILIES, *GIVEN, "pt-"):
        assert phi not in str(raised.value)


def test_sync_puts_stale_and_missing_copies_right(con: duckdb.DuckDBPyConnection) -> None:
    expected = _clustered_in_vault(con)
    con.execute(f"UPDATE {CLUSTERED_TABLE} SET content_mac = 'stale' WHERE batch_id = 'b1'")
    con.execute(f"DELETE FROM {CLUSTERED_TABLE} WHERE batch_id = 'b2'")
    con.execute(
        f"INSERT INTO {CLUSTERED_TABLE} VALUES (999, 'gone', 'Patient', NULL, 'm', 'b0', "
        "''::BLOB, ''::BLOB)"
    )
    stale_b1 = sum(1 for row in expected if row[5] == "b1")
    missing = len(expected)  # b1's stale copies and b2's deleted ones
    assert sync_clustered(con, chunk_rows=2) == (stale_b1 + 1, missing)
    assert _vault_rows(con, CLUSTERED_TABLE) == expected


def test_a_batch_ingested_again_leaves_copies_of_its_new_rows_only(
    wh: Path, tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    ingest_batch(wh, "b2", _land(tmp_path / "b2-again", [PATIENTS[5]]), key_provider, workers=1)
    with warehouse.connect(wh) as con:
        copies = _vault_rows(con, CLUSTERED_TABLE)
        assert copies == _clustered_in_vault(con)
        assert sorted(row[5] for row in copies) == ["b1"] * 5 + ["b2"]


def test_erasure_deletes_the_patients_copies(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider, tmp_path: Path
) -> None:
    audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
    report = forget_patient(con, key_provider, "pt-1", audit, "erasure request", plan=ErasurePlan())
    # the Patient and the relative naming them (in pt-1's compartment)
    assert report.rows_deleted[CLUSTERED_TABLE] == 2
    assert _vault_rows(con, CLUSTERED_TABLE) == _clustered_in_vault(con)
    names = [
        r.resource["name"][0]["family"]
        for r in iter_current_records(con, key_provider, resource_type="Patient")
    ]
    assert "Birchell" not in names and len(names) == 5


def _content_mac(provider: FileKeyProvider, data: bytes) -> str:
    """A content MAC computed here, from its definition: HMAC-SHA256 under the pseudonym key of
    ``content``, NUL and the hex SHA-256 of the content, cut to 128 bits."""
    message = b"content\x00" + hashlib.sha256(data).hexdigest().encode()
    return hmac.new(provider.pseudonym_key(), message, hashlib.sha256).hexdigest()[:32]


def _versions(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[Any, ...]]:
    """The two versions of pt-0's Patient in ``table``: (ingest_seq, sealed, aad), oldest
    first (the batch b1 wrote its first, b2 its renamed second)."""
    rows = con.execute(
        f"SELECT ingest_seq, sealed, aad, batch_id FROM {table} WHERE resource_key IN "
        f"(SELECT resource_key FROM {table} GROUP BY resource_key HAVING count(*) = 2) "
        "ORDER BY ingest_seq"
    ).fetchall()
    assert [row[3] for row in rows] == ["b1", "b2"]
    return [row[:3] for row in rows]


@pytest.mark.parametrize("tables", [("phi_vault", CLUSTERED_TABLE), (CLUSTERED_TABLE,)])
def test_an_older_versions_ciphertext_in_the_newer_versions_row_is_refused(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider, tables: tuple[str, ...]
) -> None:
    """The older version's ciphertext put into the newer version's row (same resource, same
    data key: it authenticates and names its row), in the vault and its copy, or in the copy
    alone: read back as the current Patient, the release's canaries would miss her new name.
    The row's content MAC tells them apart."""
    for table in tables:
        (_, old_sealed, old_aad), (new_seq, _, _) = _versions(con, table)
        con.execute(
            f"UPDATE {table} SET sealed = ?, aad = ? WHERE ingest_seq = ?",
            [old_sealed, old_aad, new_seq],
        )
    with pytest.raises(InvalidCiphertext, match="other content") as raised:
        list(iter_current_records(con, key_provider, resource_type="Patient"))
    with pytest.raises(InvalidCiphertext, match="other content"):
        release_canaries(con, key_provider)
    for phi in (*FAMILIES, *GIVEN, "Renamed", "pt-"):
        assert phi not in str(raised.value)


def test_each_rows_content_mac_is_that_of_its_content(
    con: duckdb.DuckDBPyConnection, key_provider: FileKeyProvider
) -> None:
    """Every row's content MAC, computed here from the record read back (its keys sorted, no
    spaces); a row written before content was compared as JSON (its MAC of the bytes as
    received) still reads."""
    records = {
        r.resource_key: r.resource
        for r in iter_current_records(con, key_provider, resource_type="Patient")
    }
    macs = dict(
        con.execute(
            "SELECT resource_key, content_mac FROM phi_vault_current "
            "WHERE resource_type = 'Patient'"
        ).fetchall()
    )
    for key, resource in records.items():
        canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert macs[key] == _content_mac(key_provider, canonical.encode())
    # pt-3 as its file held it (one resource, as json.dumps wrote it): the MAC of those bytes
    (key,) = [k for k, r in records.items() if r["id"] == "pt-3"]
    as_received = json.dumps(PATIENTS[3]).encode()
    con.execute(
        "UPDATE phi_vault SET content_mac = ? WHERE resource_key = ?",
        [_content_mac(key_provider, as_received), key],
    )
    con.execute(f"DELETE FROM {CLUSTERED_TABLE} WHERE resource_key = ?", [key])
    reread = list(iter_current_records(con, key_provider, resource_type="Patient"))
    assert {r.resource_key: r.resource for r in reread} == records
