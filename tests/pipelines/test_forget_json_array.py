"""A file written as a JSON array of resources is refused whole (``not_a_resource``), one record
of no patient: its resources are read for canaries and searched by ``ehr forget`` as those of a
Bundle are."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pipelines.cli.privacy import forget
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.read import iter_unattributed_quarantined_records
from vault.sealing import SHARED_OWNER, DataKeyStore

HER = {"resourceType": "Patient", "id": "p4", "name": [{"family": "Brontëwald"}]}


def _quarantined_texts(work: Path, key_file: Path) -> list[str]:
    """Every quarantined record of no patient still sealed, decrypted here (the shared key)."""
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        store = DataKeyStore(con, FileKeyProvider.load(key_file))
        rows = con.execute(
            "SELECT sealed, aad FROM quarantine "
            "WHERE patient_key IS NULL AND octet_length(sealed) > 0"
        ).fetchall()
        return [store.open_owned(bytes(s), bytes(a), SHARED_OWNER).decode() for s, a in rows]
    finally:
        con.close()


def _array(*resources: dict[str, object]) -> bytes:
    """A JSON array file, its letters outside ASCII escaped (``\\u00eb``) as json.dumps does."""
    return json.dumps(list(resources)).encode()


def test_a_patient_in_a_json_array_file_is_read_for_canaries(
    tmp_path: Path, key_file: Path
) -> None:
    land = tmp_path / "land"
    land.mkdir()
    (land / "all.json").write_bytes(_array(HER, {"resourceType": "Basic", "id": "x"}))
    provider = FileKeyProvider.load(key_file)
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b", land, provider, workers=1)
    assert (report.accepted, report.quarantine_reasons) == (0, {"not_a_resource": 1})
    con = warehouse.connect(wh, read_only=True)
    try:
        found = list(iter_unattributed_quarantined_records(con, provider, ["Patient"]))
    finally:
        con.close()
    assert found == [HER]


def test_forget_erases_a_json_array_file_that_names_her_escaped(
    tmp_path: Path, key_file: Path
) -> None:
    land = tmp_path / "land"
    land.mkdir()
    (land / "p4.json").write_text(json.dumps(HER, ensure_ascii=False), encoding="utf-8")
    naming = _array({"resourceType": "Flag", "code": {"text": "Brontëwald, Mrs"}})
    other = _array({"resourceType": "Flag", "code": {"text": "Quillon, Mr"}})
    assert b"\\u00eb" in naming and "Brontëwald".encode() not in naming
    (land / "flags-1.json").write_bytes(naming)
    (land / "flags-2.json").write_bytes(other)
    work = tmp_path / "work"
    report = ingest_batch(
        work / "warehouse.duckdb", "b", land, FileKeyProvider.load(key_file), workers=1
    )
    assert (report.accepted, report.quarantine_reasons) == (1, {"not_a_resource": 2})

    common = ["--workdir", str(work), "--key-file", str(key_file), "--no-release"]
    forgot = CliRunner().invoke(forget, ["p4", "--reason", "ticket 4714", *common])
    assert forgot.exit_code == 0, forgot.output
    assert json.loads(forgot.stdout)["rows_deleted"]["quarantine_unattributed"] == 1
    assert _quarantined_texts(work, key_file) == [other.decode()]
