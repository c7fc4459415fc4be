"""A warehouse keeps its keys: another pseudonym key (a regenerated ``EHR_PSEUDONYM_KEY``,
another site's keyring) is refused before it reads or writes anything, and an ingest under a KEK
that cannot unwrap the warehouse's data keys (another ``EHR_KEK``) before it adds a key.

Without the first, an ingest under a second pseudonym key wrote a re-sent patient again under
unrelated pseudonyms, neither key verified the other's rows (every later release failed, under
either key), and an erasure by the key in hand found nobody and left a tombstone that kept no
one out. Without the second, a batch of new patients under another KEK was accepted, and the
vault was then readable under neither KEK.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import duckdb
import pytest

from vault import warehouse
from vault.audit import AuditLog
from vault.errors import KeyMaterialError, PseudonymKeyMismatchError
from vault.ingest import ingest_batch
from vault.keys import EnvKeyProvider, FileKeyProvider
from vault.lifecycle import forget_patient
from vault.read import iter_current_resources, read_resource

KEK = bytes(range(32))
OTHER_KEK = bytes(range(96, 128))
KEY_A = bytes(range(32, 64))
KEY_B = bytes(range(64, 96))
PATIENT = {
    "resourceType": "Patient",
    "id": "pt-larkspur",
    "name": [{"family": "Larkspur", "given": ["Odalys"]}],
    "birthDate": "1961-07-04",
}
CONDITION = {
    "resourceType": "Condition",
    "id": "cond-1",
    "subject": {"reference": "Patient/pt-larkspur"},
    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "195967001"}]},
}
# every table an ingest writes to, and the record of the key
WRITTEN = (
    "batches",
    "source_files",
    "record_ledger",
    "phi_vault",
    "quarantine",
    "data_keys",
    "warehouse_meta",
)


def provider(pseudonym_key: bytes, kek: bytes = KEK) -> EnvKeyProvider:
    """Environment keys, as an operator sets them."""
    env = {
        "EHR_KEK": base64.b64encode(kek).decode(),
        "EHR_PSEUDONYM_KEY": base64.b64encode(pseudonym_key).decode(),
    }
    return EnvKeyProvider.from_environ(env)


def key_id(key: bytes) -> str:
    """The key's id, computed here as the keyring format defines it (truncated SHA-256 of
    ``ehr-key-id|`` and the key)."""
    return hashlib.sha256(b"ehr-key-id|" + key).hexdigest()[:16]


@pytest.fixture
def landing(tmp_path: Path) -> Path:
    folder = tmp_path / "landing"
    folder.mkdir()
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in (PATIENT, CONDITION)],
    }
    (folder / "larkspur.json").write_text(json.dumps(bundle))
    return folder


@pytest.fixture
def wh(tmp_path: Path, landing: Path) -> Path:
    """A warehouse with one batch ingested under key A."""
    path = tmp_path / "w.duckdb"
    assert ingest_batch(path, "b1", landing, provider(KEY_A), workers=1).accepted == 2
    return path


def contents(path: Path) -> dict[str, list[tuple[object, ...]]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: sorted(map(tuple, con.execute(f"FROM {t}").fetchall())) for t in WRITTEN}
    finally:
        con.close()


def assert_names_keys_not_material(exc: PseudonymKeyMismatchError, given: bytes) -> None:
    text = str(exc)
    assert key_id(given) in text
    for key in (KEY_A, KEY_B):
        assert base64.b64encode(key).decode() not in text and key.hex() not in text
    assert "Larkspur" not in text and "pt-larkspur" not in text


def test_the_first_ingest_records_its_key_id(wh: Path) -> None:
    con = duckdb.connect(str(wh), read_only=True)
    try:
        rows = con.execute("SELECT key, value FROM warehouse_meta").fetchall()
    finally:
        con.close()
    assert ("pseudonym_key_id", key_id(KEY_A)) in rows


def test_an_ingest_under_another_key_is_refused_before_it_writes(wh: Path, landing: Path) -> None:
    before = contents(wh)
    with pytest.raises(PseudonymKeyMismatchError) as caught:
        ingest_batch(wh, "b2", landing, provider(KEY_B), workers=1)
    assert_names_keys_not_material(caught.value, KEY_B)
    assert key_id(KEY_A) in str(caught.value)  # the key the warehouse wants
    assert contents(wh) == before


def test_the_warehouse_key_goes_on_after_a_refusal(wh: Path, landing: Path) -> None:
    """Nothing is stranded: the same files re-sent under the right key are the same resources
    (one current version each), and they read back as they came in."""
    with pytest.raises(PseudonymKeyMismatchError):
        ingest_batch(wh, "b2", landing, provider(KEY_B), workers=1)
    report = ingest_batch(wh, "b2", landing, provider(KEY_A), workers=1)
    assert report.accepted == 2
    con = warehouse.connect(wh)
    try:
        resources = list(iter_current_resources(con, provider(KEY_A)))
    finally:
        con.close()
    assert sorted(r["id"] for r in resources) == ["cond-1", "pt-larkspur"]


def test_reads_look_ups_and_erasure_under_another_key_are_refused(wh: Path) -> None:
    """An erasure under another key would find nobody and leave a tombstone that matches no
    one: it is refused, and writes nothing."""
    con = warehouse.connect(wh)
    try:
        with pytest.raises(PseudonymKeyMismatchError):
            list(iter_current_resources(con, provider(KEY_B)))
        with pytest.raises(PseudonymKeyMismatchError):
            read_resource(con, provider(KEY_B), "Patient", "pt-larkspur")
        audit = AuditLog(wh.parent / "audit.jsonl", KEY_A)
        with pytest.raises(PseudonymKeyMismatchError):
            forget_patient(con, provider(KEY_B), "pt-larkspur", audit, "request")
        assert con.execute("SELECT count(*) FROM erased_subjects").fetchall() == [(0,)]
        found = read_resource(con, provider(KEY_A), "Patient", "pt-larkspur")
        assert found is not None and found["name"] == PATIENT["name"]
    finally:
        con.close()


def test_a_warehouse_from_before_the_record_is_checked_against_its_vault(
    wh: Path, landing: Path
) -> None:
    """A warehouse written before it recorded its key: the first vault row must hold the
    resource its row names under the key given; the key is recorded once it does."""
    con = warehouse.connect(wh)
    try:
        con.execute("DELETE FROM warehouse_meta WHERE key = 'pseudonym_key_id'")
    finally:
        con.close()
    before = contents(wh)
    with pytest.raises(PseudonymKeyMismatchError, match="does not verify") as caught:
        ingest_batch(wh, "b2", landing, provider(KEY_B), workers=1)
    assert_names_keys_not_material(caught.value, KEY_B)
    assert contents(wh) == before
    ingest_batch(wh, "b2", landing, provider(KEY_A), workers=1)
    assert ("pseudonym_key_id", key_id(KEY_A)) in contents(wh)["warehouse_meta"]


def test_an_ingest_under_another_kek_is_refused_before_it_writes(wh: Path, tmp_path: Path) -> None:
    """A batch of a new patient only (no data key of the warehouse needed to seal it) under
    another KEK: refused, naming the KEK ids; the warehouse's own KEK still reads everything and
    then ingests the batch."""
    newcomer = tmp_path / "newcomer"
    newcomer.mkdir()
    patient = {"resourceType": "Patient", "id": "pt-quince", "name": [{"family": "Quince"}]}
    (newcomer / "quince.json").write_text(json.dumps(patient))
    before = contents(wh)
    with pytest.raises(KeyMaterialError, match="cannot unwrap") as caught:
        ingest_batch(wh, "b2", newcomer, provider(KEY_A, OTHER_KEK), workers=1)
    text = str(caught.value)
    assert f"env-{key_id(KEK)}" in text and f"env-{key_id(OTHER_KEK)}" in text
    for key in (KEK, OTHER_KEK, KEY_A):
        assert base64.b64encode(key).decode() not in text
    assert contents(wh) == before
    ingest_batch(wh, "b2", newcomer, provider(KEY_A), workers=1)
    con = warehouse.connect(wh, read_only=True)
    try:
        ids = sorted(r["id"] for r in iter_current_resources(con, provider(KEY_A)))
    finally:
        con.close()
    assert ids == ["cond-1", "pt-larkspur", "pt-quince"]


def test_the_keyrings_kek_given_as_ehr_kek_is_refused_saying_it_is_the_same_key(
    tmp_path: Path, landing: Path, key_file: Path
) -> None:
    """A warehouse written with a keyring, then its KEK and pseudonym key given as environment
    variables: the id of a KEK given as EHR_KEK is env-…, bound into no key of the warehouse,
    so it is refused; the message says the two ids name one key given two ways."""
    document = json.loads(key_file.read_text())
    kek = base64.b64decode(document["keks"][document["active_kek"]]["key"])
    pseudonym_key = base64.b64decode(document["pseudonym_key"])
    wh = tmp_path / "kr.duckdb"
    ingest_batch(wh, "b1", landing, FileKeyProvider.load(key_file), workers=1)
    newcomer = tmp_path / "newcomer"
    newcomer.mkdir()
    (newcomer / "p.json").write_text(json.dumps({"resourceType": "Patient", "id": "pt-new"}))
    with pytest.raises(KeyMaterialError, match="name the same key given another way") as caught:
        ingest_batch(wh, "b2", newcomer, provider(pseudonym_key, kek), workers=1)
    text = str(caught.value)
    assert f"kek-{key_id(kek)}" in text and f"env-{key_id(kek)}" in text
    assert base64.b64encode(kek).decode() not in text
