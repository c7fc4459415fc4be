"""The resolved references a batch's release needs are read a chunk of resources at a time, from
a temporary table of the connection, not held for the whole batch in a Python dict: that dict
(three references a resource in a Synthea-shaped export) was the one part of a run's memory that
grew with the input (de-identification's peak RSS 662 → 845 → 1,071 → 1,482 MiB at 500, 1,000,
2,000 and 4,000 patients; 575 → 599 MiB at 2,000 → 4,000 without it)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest

import deid.release as release
from deid.policy import Policy
from deid.staging import publish_batch
from vault import read, warehouse
from vault.catalog import has_table
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.pseudonym import Pseudonymizer
from vault.read import VaultRecord

TODAY = date(2026, 11, 28)


def _bundle(pid: str) -> dict[str, Any]:
    patient, encounter = f"urn:uuid:{pid}-0000", f"urn:uuid:{pid}-0001"
    resources = [
        (patient, {"resourceType": "Patient", "id": pid, "gender": "male"}),
        (
            encounter,
            {
                "resourceType": "Encounter",
                "id": f"{pid}-e",
                "status": "finished",
                "class": {"code": "AMB"},
                "subject": {"reference": patient},
            },
        ),
        (
            f"urn:uuid:{pid}-0002",
            {
                "resourceType": "Observation",
                "id": f"{pid}-o",
                "status": "final",
                "code": {"text": "heart rate"},
                "subject": {"reference": patient},
                "encounter": {"reference": encounter},
            },
        ),
    ]
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": url, "resource": r, "request": {"method": "PUT", "url": r["resourceType"]}}
            for url, r in resources
        ],
    }


def test_references_are_looked_up_a_chunk_at_a_time_and_all_resolve(
    tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "landing" / "b1"
    folder.mkdir(parents=True)
    patients = [f"p{i}" for i in range(5)]
    for pid in patients:
        (folder / f"{pid}.json").write_text(json.dumps(_bundle(pid)))
    report = ingest_batch(tmp_path / "w.duckdb", "b1", folder, key_provider, workers=1)
    assert report.accepted == 15
    looked_up: list[int] = []
    real = release._reference_targets

    def spy(con: Any, keys: list[str]) -> Any:
        looked_up.append(len(keys))
        return real(con, keys)

    monkeypatch.setattr(release, "_DEID_CHUNK", 4)
    monkeypatch.setattr(release, "_reference_targets", spy)
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        batch = publish_batch(
            con, key_provider, "b1", Policy.shipped("research"), today=TODAY, workers=1
        )
        assert batch.published
        # the staged references leave with the batch's de-identification
        assert not has_table(con, release._TARGETS_TABLE)
        rows = con.execute(
            "SELECT resource_type, resource, patient_id FROM deid_resources"
        ).fetchall()
    finally:
        con.close()
    assert looked_up == [4, 4, 4, 3]  # every resource once, never the whole batch at a time
    key = Pseudonymizer(key_provider.pseudonym_key()).resource_key
    released = {orjson.loads(text)["id"]: orjson.loads(text) for _, text, _ in rows}
    for pid in patients:
        observation = released[key("Observation", f"{pid}-o")]
        assert observation["subject"] == {"reference": f"Patient/{key('Patient', pid)}"}
        assert observation["encounter"] == {
            "reference": f"Encounter/{key('Encounter', f'{pid}-e')}"
        }
    assert {pid for _, _, pid in rows} == {key("Patient", p) for p in patients}


class _Unsealed:
    """Stands for vault.read's reader over rows written here without ciphertexts: each row's
    record is a stub of the resource it names."""

    def __init__(self, con: Any, provider: Any) -> None:
        pass

    def prefetch_keys(self, rows: Any) -> None:
        pass

    def record(self, row: Any) -> VaultRecord:
        resource_key, resource_type, patient_key, batch_id, *_ = row
        resource = {"resourceType": resource_type, "id": resource_key}
        return VaultRecord(resource_key, resource_type, patient_key, batch_id, resource)


_RESOURCES = 40_000
_REFS_EACH = 10  # 363,630 references staged: three of DuckDB's row groups and more
_ROW_GROUP = 122_880  # DuckDB's rows per row group


def _scanned_rows(profile: Path, table: str) -> int:
    """Rows the profiled statement's scans of ``table`` read (DuckDB's JSON profile)."""

    def scans(node: Any) -> Iterator[dict[str, Any]]:
        if isinstance(node, dict):
            if node.get("type") == "TABLE_SCAN" and table in str(node.get("extra_info")):
                yield node
            for child in node.values():
                yield from scans(child)
        elif isinstance(node, list):
            for child in node:
                yield from scans(child)

    found = list(scans(json.loads(profile.read_text())))
    assert found, f"no scan of {table} in the profile"
    return sum(int(node["rows_scanned"]) for node in found)


def test_a_chunks_look_up_reads_its_own_references_not_the_batchs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chunk's look-up reads about as many staged rows as the chunk has references, not
    the whole batch's: the stage's time was the square of the batch's size when every chunk
    scanned the table. The references of a resource go with its newest version, wherever in
    the batch that version stands."""
    con = warehouse.connect(":memory:")
    # the batch's resources (keys in no order, as the vault's); every seventh also sent an
    # older version (a lower versionId) later in the batch, which is not the one released;
    # every eleventh replaced by a later batch (not the batch's to release)
    con.execute(
        """
        INSERT INTO phi_vault (resource_key, resource_type, patient_key, version_id,
            last_updated, content_mac, batch_id, file_index, position, ingest_seq, sealed, aad)
        SELECT md5(i::VARCHAR), 'Observation', 'p' || (i // 10), v::VARCHAR, NULL, 'c' || i,
            b, 0, seq, seq, ''::BLOB, ''::BLOB
        FROM (
            SELECT i, CASE WHEN i % 7 = 0 THEN 2 ELSE 1 END AS v, 'b1' AS b, i AS seq
            FROM range($n) t(i)
            UNION ALL SELECT i, 1, 'b1', $n + i FROM range($n) t(i) WHERE i % 7 = 0
            UNION ALL SELECT i, 3, 'b2', 3 * $n + i FROM range($n) t(i) WHERE i % 11 = 0)
        """,
        {"n": _RESOURCES},
    )
    con.execute(
        """
        INSERT INTO resource_references (batch_id, resource_key, content_mac, path, ref_mac,
            kind, target_type, target_key, resolved)
        SELECT 'b1', md5(i::VARCHAR), 'c' || i, 'Observation.hasMember[' || j || ']',
            'm' || i || '-' || j, 'urn', 'Observation', 't' || i || '-' || j, true
        FROM range($n) t(i), range($k) u(j)
        """,
        {"n": _RESOURCES, "k": _REFS_EACH},
    )
    monkeypatch.setattr(read, "VaultReader", _Unsealed)
    release._stage_reference_targets(con, "b1")
    (staged,) = con.execute(f"SELECT count(*) FROM {release._TARGETS_TABLE}").fetchone() or (0,)
    assert staged > 300_000

    profile = tmp_path / "profile.json"
    scanned: list[int] = []
    real = release._reference_targets

    def profiled(con: Any, *chunk: Any) -> Any:
        con.execute("SET enable_profiling = 'json'")
        con.execute(f"SET profiling_output = '{profile}'")
        try:
            return real(con, *chunk)
        finally:
            con.execute("RESET enable_profiling")
            scanned.append(_scanned_rows(profile, release._TARGETS_TABLE))

    monkeypatch.setattr(release, "_reference_targets", profiled)
    items = list(release._vault_items(con, None, "b1"))
    con.close()

    index = {hashlib.md5(str(i).encode()).hexdigest(): i for i in range(_RESOURCES)}
    assert len(items) == sum(1 for i in range(_RESOURCES) if i % 11)
    assert len(scanned) == -(-len(items) // release._DEID_CHUNK)  # one look-up a chunk
    # a chunk's own rows and at most a row group beside them, where scanning the whole table
    # read every staged row each time
    chunk_rows = release._DEID_CHUNK * _REFS_EACH
    assert all(rows <= chunk_rows + _ROW_GROUP for rows in scanned), (scanned, staged)
    for key, _, _, _, own in items:
        i = index[key]
        assert i % 11, "a resource another batch replaced is not the batch's"
        assert own == {f"m{i}-{j}": ("Observation", f"t{i}-{j}") for j in range(_REFS_EACH)}
