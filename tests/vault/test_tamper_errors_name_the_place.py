"""A changed byte at rest fails closed with an error that says where: the keyring's KEK that no
longer matches its id, the data key whose wrapped form was changed, the vault row or the
quarantine row whose blob does not open. Never the content, never key material."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import duckdb
import pytest

from vault import warehouse
from vault.audit import AuditLog
from vault.errors import InvalidCiphertext, KeyDestroyedError, KeyMaterialError
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider, write_keyring
from vault.lifecycle import reidentify
from vault.pseudonym import Pseudonymizer
from vault.read import iter_current_records, iter_quarantined_records, read_current
from vault.read import iter_unattributed_quarantined_records as unattributed

PATIENT = {"resourceType": "Patient", "id": "pt-wren", "name": [{"family": "Wrenfeather"}]}
# refused by validation (gender is no code of its binding), sealed under the patient's key
BAD_OBSERVATION = {
    "resourceType": "Patient",
    "id": "pt-wren-2",
    "gender": {"not": "a code"},
    "name": [{"family": "Wrenfeather"}],
}
CONTENT = ("Wrenfeather", "pt-wren")


@pytest.fixture
def wh(tmp_path: Path, key_provider: FileKeyProvider) -> Path:
    land = tmp_path / "land"
    land.mkdir()
    (land / "wren.json").write_text(json.dumps(PATIENT))
    # a line that is no JSON: quarantined under the shared key, with no patient
    (land / "lines.ndjson").write_text('{"resourceType": "Patient", "id": "cut-sho\n')
    (land / "bad.json").write_text(json.dumps(BAD_OBSERVATION))
    path = tmp_path / "w.duckdb"
    report = ingest_batch(path, "b1", land, key_provider, workers=1)
    assert report.accepted == 1
    return path


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 1]) + blob[at + 1 :]


def _no_content(message: str, key_file: Path) -> None:
    assert not any(text in message for text in CONTENT), message
    document = json.loads(key_file.read_text())
    keys = [e["key"] for e in document["keks"].values()] + [document["pseudonym_key"]]
    for key in keys:
        raw = base64.b64decode(key)
        for form in (key, key[:16], raw.hex(), raw.hex()[:16]):
            assert form not in message, message


def test_a_changed_kek_in_the_keyring_is_refused_at_load(key_file: Path) -> None:
    """A KEK whose material no longer matches its id is named with the key file when the
    keyring is loaded: left to the first unwrap, every data key under it failed as if its
    wrapped form had been changed, and the key file went unnamed."""
    document = json.loads(key_file.read_text())
    active = document["active_kek"]
    raw = bytearray(base64.b64decode(document["keks"][active]["key"]))
    raw[7] ^= 0x10
    document["keks"][active]["key"] = base64.b64encode(bytes(raw)).decode()
    write_keyring(key_file, document)
    with pytest.raises(KeyMaterialError) as caught:
        FileKeyProvider.load(key_file)
    message = str(caught.value)
    assert f"KEK '{active}' does not match its id" in message
    assert str(key_file) in message
    _no_content(message, key_file)


def test_a_changed_wrapped_data_key_names_the_key_and_the_row(
    wh: Path, key_provider: FileKeyProvider, key_file: Path
) -> None:
    key = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "pt-wren")
    con = warehouse.connect(wh)
    try:
        key_id, wrapped = con.execute(
            "SELECT key_id, wrapped FROM data_keys WHERE owner = ?", [key]
        ).fetchall()[0]
        con.execute(
            "UPDATE data_keys SET wrapped = ? WHERE key_id = ?", [_flip(bytes(wrapped), 20), key_id]
        )
        for read in (
            lambda: read_current(con, key_provider, key),
            lambda: list(iter_current_records(con, key_provider)),
        ):
            with pytest.raises(InvalidCiphertext) as caught:
                read()
            message = str(caught.value)
            assert f"vault row {key}" in message and f"data key {bytes(key_id).hex()}" in message
            _no_content(message, key_file)
    finally:
        con.close()


def test_a_blob_naming_no_data_key_names_its_row(
    wh: Path, key_provider: FileKeyProvider, key_file: Path, tmp_path: Path
) -> None:
    """A vault row whose blob names a data key the warehouse never held was changed: before,
    it read as an erased patient's (KeyDestroyedError), and `ehr reidentify` audited it so."""
    key = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "pt-wren")
    con = warehouse.connect(wh)
    try:
        for table in ("phi_vault", "phi_vault_clustered"):
            for (sealed,) in con.execute(
                f"SELECT sealed FROM {table} WHERE resource_key = ?", [key]
            ).fetchall():
                con.execute(
                    f"UPDATE {table} SET sealed = ? WHERE resource_key = ?",
                    [_flip(bytes(sealed), 3), key],
                )
        with pytest.raises(InvalidCiphertext) as caught:
            read_current(con, key_provider, key)
        assert not isinstance(caught.value, KeyDestroyedError)  # not an erased patient
        assert f"vault row {key}" in str(caught.value) and "does not exist" in str(caught.value)
        _no_content(str(caught.value), key_file)
        audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
        with pytest.raises(InvalidCiphertext):
            reidentify(con, key_provider, key, audit, "ticket 12")
        # audited as a row that does not open, not as an erasure
        assert audit.entries()[-1]["details"]["outcome"] == "unreadable"
    finally:
        con.close()


@pytest.mark.parametrize("owned", [False, True], ids=["shared", "a patient's"])
def test_a_changed_quarantined_blob_names_its_row(
    wh: Path, key_provider: FileKeyProvider, key_file: Path, owned: bool
) -> None:
    """A quarantined record that does not open is named by its batch, file and position: the
    message said 'authentication failed' alone, and a release or an erasure stopped by it
    left no way to find the row."""
    owner = "IS NOT NULL" if owned else "IS NULL"
    con = warehouse.connect(wh)
    try:
        rows = con.execute(
            "SELECT file_index, position, sealed FROM quarantine "
            f"WHERE patient_key {owner} AND octet_length(sealed) > 0"
        ).fetchall()
        assert len(rows) == 1, rows
        file_index, position, sealed = rows[0]
        con.execute(
            "UPDATE quarantine SET sealed = ? WHERE file_index = ? AND position = ?",
            [_flip(bytes(sealed), 40), file_index, position],
        )
        with pytest.raises(InvalidCiphertext) as caught:
            if owned:
                list(iter_quarantined_records(con, key_provider, ["Patient"]))
            else:
                list(unattributed(con, key_provider, ["Patient"]))
        message = str(caught.value)
        assert f"quarantine row of batch 'b1', file {file_index}, position {position}" in message
        _no_content(message, key_file)
    finally:
        con.close()


def test_an_untouched_warehouse_reads(wh: Path, key_provider: FileKeyProvider) -> None:
    con = duckdb.connect(str(wh), read_only=True)
    try:
        assert [r.resource["id"] for r in iter_current_records(con, key_provider)] == ["pt-wren"]
        # cut short inside its id: read as far as its last whole value
        assert list(unattributed(con, key_provider, ["Patient"])) == [{"resourceType": "Patient"}]
        assert [r["id"] for _, r in iter_quarantined_records(con, key_provider, ["Patient"])] == [
            "pt-wren-2"
        ]
    finally:
        con.close()
