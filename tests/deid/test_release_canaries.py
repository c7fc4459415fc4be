"""The release canaries are decrypted once per vault state, and loaded afresh when it changes."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from deid.leakscan import CanarySet
from deid.release import ReleaseCanaryCache, release_canaries, vault_state
from fhirlake.synthetic import generate
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider, KeyProvider, init_keyring


class CountingLoad:
    """release_canaries, counting how often the vault is decrypted for them."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> CanarySet:
        self.calls += 1
        return release_canaries(con, provider)


@pytest.fixture
def vault_with_batch(tmp_path: Path, key_provider: FileKeyProvider) -> Path:
    generate(tmp_path / "b1", 4, seed=31)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b1", tmp_path / "b1", key_provider, workers=1)
    return wh


def _canaries(cache: ReleaseCanaryCache, wh: Path, provider: KeyProvider) -> CanarySet:
    con = warehouse.connect(wh)  # a connection of its own, as each asset opens one
    try:
        return cache.get(con, provider)
    finally:
        con.close()


def test_same_vault_state_decrypts_once(
    vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    load = CountingLoad()
    cache = ReleaseCanaryCache(load)
    first = _canaries(cache, vault_with_batch, key_provider)
    second = _canaries(cache, vault_with_batch, key_provider)
    assert load.calls == 1 and second is first and len(first) > 0


def test_a_new_batch_invalidates_the_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    load = CountingLoad()
    cache = ReleaseCanaryCache(load)
    before = _canaries(cache, vault_with_batch, key_provider)
    generate(tmp_path / "b2", 3, seed=32)
    ingest_batch(vault_with_batch, "b2", tmp_path / "b2", key_provider, workers=1)
    after = _canaries(cache, vault_with_batch, key_provider)
    assert load.calls == 2 and after is not before and len(after) > len(before)
    assert _canaries(cache, vault_with_batch, key_provider) is after and load.calls == 2


def test_removed_vault_rows_and_other_keys_invalidate_the_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    load = CountingLoad()
    cache = ReleaseCanaryCache(load)
    _canaries(cache, vault_with_batch, key_provider)
    con = warehouse.connect(vault_with_batch)
    try:
        before = vault_state(con, key_provider)
        # as an erasure does: the rows go, the highest ingest position may stay
        con.execute(
            "DELETE FROM phi_vault WHERE resource_key = "
            "(SELECT min(resource_key) FROM phi_vault WHERE resource_type = 'Patient')"
        )
        assert vault_state(con, key_provider) != before
    finally:
        con.close()
    _canaries(cache, vault_with_batch, key_provider)
    assert load.calls == 2
    con = warehouse.connect(vault_with_batch)
    try:
        other = tmp_path / "other.json"
        init_keyring(other)
        assert vault_state(con, FileKeyProvider.load(other)) != vault_state(con, key_provider)
    finally:
        con.close()


def test_an_in_memory_warehouse_is_never_cached(key_provider: FileKeyProvider) -> None:
    load = CountingLoad()
    cache = ReleaseCanaryCache(load)
    con = warehouse.connect(":memory:")
    try:
        cache.get(con, key_provider)
        cache.get(con, key_provider)
    finally:
        con.close()
    assert load.calls == 2


def test_one_run_reads_the_vault_state_once(
    tmp_path: Path,
    vault_with_batch: Path,
    key_provider: FileKeyProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Later steps of the run that loaded the canaries take them without reading the vault's
    state; another run (or a caller without a run) reads it, and sees a batch ingested since."""
    import deid.release

    reads: list[object] = []

    def counted_state(con: duckdb.DuckDBPyConnection, provider: KeyProvider) -> object:
        reads.append(None)
        return vault_state(con, provider)

    monkeypatch.setattr(deid.release, "vault_state", counted_state)
    load = CountingLoad()
    cache = ReleaseCanaryCache(load)
    con = warehouse.connect(vault_with_batch)
    try:
        first = cache.get(con, key_provider, "run-1")
        assert cache.get(con, key_provider, "run-1") is first
        assert (len(reads), load.calls) == (1, 1)
        assert cache.get(con, key_provider, "run-2") is first  # same state: no decryption
        assert (len(reads), load.calls) == (2, 1)
    finally:
        con.close()
    generate(tmp_path / "b2", 2, seed=33)
    ingest_batch(vault_with_batch, "b2", tmp_path / "b2", key_provider, workers=1)
    con = warehouse.connect(vault_with_batch)
    try:
        after = cache.get(con, key_provider, "run-3")
        assert after is not first and load.calls == 2 and len(after) > len(first)
        cache.clear()
        assert cache.get(con, key_provider, "run-3") is not after and load.calls == 3
    finally:
        con.close()


def test_the_canaries_hold_what_every_version_said(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A patient renamed after marriage, with a new phone, and her mother's RelatedPerson
    renamed too: the names and phone of the earlier versions still name them, in the release's
    canaries and in those of the batch that sent the new versions (which also read its
    landing folder's name)."""
    from deid.release import batch_canaries, batch_key_hits

    patient = {
        "resourceType": "Patient",
        "id": "p7",
        "meta": {"versionId": "1"},
        "name": [{"family": "Zedwick", "given": ["Ola"]}],
        "telecom": [{"system": "phone", "value": "555-201-4477"}],
    }
    mother = {
        "resourceType": "RelatedPerson",
        "id": "r7",
        "meta": {"versionId": "1"},
        "patient": {"reference": "Patient/p7"},
        "name": [{"family": "Quenby", "given": ["Maud"]}],
    }
    later = [
        {
            "resourceType": "Patient",
            "id": "p7",
            "meta": {"versionId": "2"},
            "name": [{"family": "Brightwater"}],
        },
        {**mother, "meta": {"versionId": "2"}, "name": [{"family": "Ashdown"}]},
    ]
    wh = tmp_path / "w.duckdb"
    for batch, resources in (("b1", [patient, mother]), ("b2", later)):
        (tmp_path / batch).mkdir()
        for resource in resources:
            path = tmp_path / batch / f"{resource['id']}.json"
            path.write_text(json.dumps(resource))
        assert ingest_batch(wh, batch, tmp_path / batch, key_provider, workers=1).accepted == 2

    con = warehouse.connect(wh)
    try:
        for canaries in (
            release_canaries(con, key_provider),
            batch_canaries(con, key_provider, "b2"),
        ):
            for text, kind in (
                ("zedwick", "name"),  # the name before
                ("brightwater", "name"),  # the name now
                ("call 555 201 4477", "phone"),  # the phone before
                ("quenby", "name"),  # the mother's name before
                ("ashdown", "name"),
            ):
                assert kind in canaries.find(text), text
        assert batch_key_hits(batch_canaries(con, key_provider, "b2"), "zedwick_2024") == ["name"]
    finally:
        con.close()


def test_a_patient_refused_by_validation_is_a_canary_and_changes_the_vault_state(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """A Patient the quarantine holds (a birth date written day first) names its patient, whose
    other records can be released: its names are release canaries, and a batch that brings
    only such a record loads the canaries afresh."""
    load = CountingLoad()
    cache = ReleaseCanaryCache(load)
    before = _canaries(cache, vault_with_batch, key_provider)
    refused = {
        "resourceType": "Patient",
        "id": "pq",
        "birthDate": "23/07/1961",
        "name": [{"given": ["Ottoline"], "family": "Vexbridge"}],
    }
    (tmp_path / "b2").mkdir()
    (tmp_path / "b2" / "pq.json").write_text(json.dumps(refused))
    report = ingest_batch(vault_with_batch, "b2", tmp_path / "b2", key_provider, workers=1)
    assert (report.accepted, sum(report.quarantine_reasons.values())) == (0, 1)
    after = _canaries(cache, vault_with_batch, key_provider)
    assert load.calls == 2 and after is not before
    assert before.find("vexbridge") == []
    assert after.find("VEXBRIDGE") == ["name"] and after.find("OttolineVexbridge") == ["full_name"]


def test_the_vault_state_of_a_vault_without_a_quarantine_table(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """A warehouse file set up outside the platform's schema, with a vault and no quarantine
    table: its state is read (no quarantined record), not an error."""
    con = duckdb.connect(str(tmp_path / "bare.duckdb"))
    try:
        con.execute(
            "CREATE TABLE phi_vault (resource_key VARCHAR, ingest_seq BIGINT, content_mac BLOB)"
        )
        state = vault_state(con, key_provider)
        assert state is not None and state[1:6] == (0, None, None, 0, None)
    finally:
        con.close()
