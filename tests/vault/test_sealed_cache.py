"""The sealed cache: a known answer computed with the cipher directly, its binding to a name,
a state and the shared key, and its deletion by an erasure down to the file's bytes."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.sealed_blobs import flip_a_sealed_byte
from vault import warehouse
from vault.audit import AuditLog
from vault.errors import InvalidCiphertext
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider
from vault.lifecycle import forget_in_warehouse
from vault.pseudonym import Pseudonymizer
from vault.sealed_cache import (
    PART_BYTES,
    SEALED_CACHE_TABLE,
    drop_entries,
    read_entry,
    write_entry,
)
from vault.sealing import DataKeyStore, seal

VALUE = b"canaries of every patient \x00\xff" * 40


def _counting_bytes() -> tuple[list[bytes], Callable[[int], bytes]]:
    """Deterministic 'randomness' that records what it handed out."""
    given: list[bytes] = []
    counter = itertools.count(1)

    def random_bytes(n: int) -> bytes:
        out = bytes([next(counter) % 256]) * n
        given.append(out)
        return out

    return given, random_bytes


@pytest.fixture
def wh(tmp_path: Path, key_provider: FileKeyProvider) -> Path:
    folder = tmp_path / "b1"
    folder.mkdir()
    patients = [
        {"resourceType": "Patient", "id": f"p{i}", "name": [{"family": f"Quillfeather{i}"}]}
        for i in (1, 2)
    ]
    (folder / "Patient.ndjson").write_text("".join(json.dumps(p) + "\n" for p in patients))
    path = tmp_path / "w.duckdb"
    ingest_batch(path, "b1", folder, key_provider, workers=1)
    return path


def test_a_known_answer_computed_with_the_cipher_itself(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A warehouse without a shared key yet: the key and the nonce come from the injected
    randomness, so the blob is what AES-256-GCM gives for them over the documented layout
    (format byte, key id, nonce, ciphertext and tag; the associated data after the header)."""
    given, random_bytes = _counting_bytes()
    con = warehouse.connect(tmp_path / "w.duckdb")
    try:
        write_entry(con, key_provider, "things", "state-1", VALUE, random_bytes=random_bytes)
        ((stored_state, blob),) = con.execute(
            f"SELECT state, sealed FROM {SEALED_CACHE_TABLE} WHERE name = 'things'"
        ).fetchall()
    finally:
        con.close()
    # the shared data key's id and bytes, then the blob's nonce (then the warehouse's new id)
    key_id, key, nonce = given[:3]
    header = b"\x01" + key_id
    aad = header + b"ehr-sealed-cache/1|things|state-1"
    assert stored_state == "state-1"
    assert bytes(blob) == header + nonce + AESGCM(key).encrypt(nonce, VALUE, aad)
    assert VALUE[:20] not in bytes(blob)


def test_an_entry_is_read_only_in_its_own_state(wh: Path, key_provider: FileKeyProvider) -> None:
    con = warehouse.connect(wh)
    try:
        assert read_entry(con, key_provider, "things", "s1") is None  # none written yet
        write_entry(con, key_provider, "things", "s1", VALUE)
        assert read_entry(con, key_provider, "things", "s1") == VALUE
        assert read_entry(con, key_provider, "things", "s2") is None  # made in another state
        assert read_entry(con, key_provider, "other", "s1") is None
        write_entry(con, key_provider, "things", "s2", b"newer")  # replaces the entry
        assert read_entry(con, key_provider, "things", "s1") is None
        assert read_entry(con, key_provider, "things", "s2") == b"newer"
        assert con.execute(f"SELECT count(*) FROM {SEALED_CACHE_TABLE}").fetchone() == (1,)
    finally:
        con.close()


def test_a_warehouse_from_before_the_table_reads_nothing_and_writes_it(
    wh: Path, key_provider: FileKeyProvider
) -> None:
    con = warehouse.connect(wh)
    try:
        con.execute(f"DROP TABLE {SEALED_CACHE_TABLE}")
        assert read_entry(con, key_provider, "things", "s1") is None
        assert drop_entries(con) == 0
        write_entry(con, key_provider, "things", "s1", VALUE)
        assert read_entry(con, key_provider, "things", "s1") == VALUE
    finally:
        con.close()


@pytest.mark.parametrize(
    ("tamper", "asked"),
    [
        (flip_a_sealed_byte, ("things", "s1")),
        # a blob of one state relabelled as another's: the state is authenticated
        (lambda con: con.execute("UPDATE sealed_cache SET state = 's2'"), ("things", "s2")),
        # a blob of one name under another
        (lambda con: con.execute("UPDATE sealed_cache SET name = 'other'"), ("other", "s1")),
    ],
    ids=["a byte of the ciphertext", "the state", "the name"],
)
def test_a_changed_entry_is_refused(
    wh: Path,
    key_provider: FileKeyProvider,
    tamper: Callable[[duckdb.DuckDBPyConnection], object],
    asked: tuple[str, str],
) -> None:
    con = warehouse.connect(wh)
    try:
        write_entry(con, key_provider, "things", "s1", VALUE)
        tamper(con)
        with pytest.raises(InvalidCiphertext):
            read_entry(con, key_provider, *asked)
    finally:
        con.close()


def test_an_entry_sealed_under_a_patients_key_is_refused(
    wh: Path, key_provider: FileKeyProvider
) -> None:
    """Only the shared key opens an entry: a blob sealed under a patient's key (whose owner is
    bound into the key when it is wrapped) with the right associated data is refused."""
    con = warehouse.connect(wh)
    try:
        write_entry(con, key_provider, "things", "s1", VALUE)
        store = DataKeyStore(con, key_provider)
        patient = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "p1")
        forged = seal(store.for_owner(patient), VALUE, b"ehr-sealed-cache/1|things|s1")
        con.execute("UPDATE sealed_cache SET sealed = ?", [forged])
        with pytest.raises(InvalidCiphertext):
            read_entry(con, key_provider, "things", "s1")
    finally:
        con.close()


def test_an_erasure_deletes_every_entry_down_to_the_files_bytes(
    wh: Path, tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """The shared key survives an erasure, so the entry itself must go: deleted in the
    erasure's transaction, and no run of its ciphertext left in the rewritten file."""
    con = warehouse.connect(wh)
    try:
        write_entry(con, key_provider, "things", "s1", VALUE * 20)
        ((blob,),) = con.execute("SELECT sealed FROM sealed_cache").fetchall()
        con.execute("CHECKPOINT")
    finally:
        con.close()
    middle = bytes(blob)[len(blob) // 2 : len(blob) // 2 + 64]
    assert middle in wh.read_bytes()  # where the search below looks for it
    audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
    pseudonym = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "p1")
    report = forget_in_warehouse(wh, pseudonym, audit, "erasure request")
    assert report.rows_deleted["sealed_cache"] == 1
    assert middle not in wh.read_bytes()
    con = warehouse.connect(wh)
    try:
        assert con.execute("SELECT count(*) FROM sealed_cache").fetchone() == (0,)
    finally:
        con.close()


def test_an_entry_larger_than_the_warehouses_memory_allows_in_one_value(
    wh: Path, key_provider: FileKeyProvider
) -> None:
    """The canaries of 3,000 patients are 36 MB: inserted as one value, DuckDB ran out of the
    warehouse's memory limit (256 MB). Stored in parts, 80 MB is written and read back whole,
    and a part missing or moved is refused."""
    value = bytes(range(256)) * (80 * 4096)  # 80 MiB
    con = warehouse.connect(wh)
    try:
        write_entry(con, key_provider, "things", "s1", value)
        ((parts,),) = con.execute("SELECT count(*) FROM sealed_cache").fetchall()
        assert parts == len(value) // PART_BYTES + 1  # the blob is a little longer
        assert read_entry(con, key_provider, "things", "s1") == value
        con.execute("UPDATE sealed_cache SET part = 1000 WHERE part = 3")  # moved to the end
        with pytest.raises(InvalidCiphertext):
            read_entry(con, key_provider, "things", "s1")
        con.execute("DELETE FROM sealed_cache WHERE part = 1000")  # missing
        with pytest.raises(InvalidCiphertext):
            read_entry(con, key_provider, "things", "s1")
    finally:
        con.close()


def test_a_table_of_one_blob_a_row_is_made_again_in_parts(
    wh: Path, key_provider: FileKeyProvider
) -> None:
    """The table as it was first made (no parts) reads as no entry, and the next write makes
    it again: it is a cache."""
    con = warehouse.connect(wh)
    try:
        con.execute(f"DROP TABLE {SEALED_CACHE_TABLE}")
        con.execute(
            f"CREATE TABLE {SEALED_CACHE_TABLE} "
            "(name VARCHAR PRIMARY KEY, state VARCHAR NOT NULL, sealed BLOB NOT NULL)"
        )
        con.execute(f"INSERT INTO {SEALED_CACHE_TABLE} VALUES ('things', 's1', 'x'::BLOB)")
        assert read_entry(con, key_provider, "things", "s1") is None
        write_entry(con, key_provider, "things", "s1", VALUE)
        assert read_entry(con, key_provider, "things", "s1") == VALUE
    finally:
        con.close()
