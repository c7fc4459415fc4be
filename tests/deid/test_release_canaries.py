"""The release canaries are decrypted once per vault state, and loaded afresh when it changes."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest

from deid.leakscan import CanarySet
from deid.release import ReleaseCanaryCache, release_canaries, vault_state
from fhirlake.synthetic import generate
from tests.sealed_blobs import flip_a_sealed_byte
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


def _contents(canaries: CanarySet) -> tuple[object, ...]:
    """Everything a set holds, compared whole: each text canary with the kind and length each
    pass keeps for it, each digit canary with its kind, the patients' birth dates (in the
    order their versions gave them) and the source ids."""
    store = canaries._store
    return (
        sorted(store.text.items()),
        sorted(store.digits.items()),
        canaries._births,
        sorted(canaries._ids),
    )


def _fresh(wh: Path, provider: KeyProvider) -> CanarySet:
    con = warehouse.connect(wh)
    try:
        return release_canaries(con, provider)
    finally:
        con.close()


@pytest.fixture
def vault_with_batch(tmp_path: Path, key_provider: FileKeyProvider) -> Path:
    generate(tmp_path / "b1", 4, seed=31)
    wh = tmp_path / "w.duckdb"
    ingest_batch(wh, "b1", tmp_path / "b1", key_provider, workers=1)
    return wh


def _canaries(
    cache: ReleaseCanaryCache, wh: Path, provider: KeyProvider, sealed: bool = True
) -> CanarySet:
    con = warehouse.connect(wh)  # a connection of its own, as each asset opens one
    try:
        return cache.get(con, provider, sealed=sealed)
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
    """A new vault state gets a set of its own: the sealed set of the state before, with the
    new batch's canaries added (not decrypted from the whole vault again)."""
    load = CountingLoad()
    cache = ReleaseCanaryCache(load)
    before = _canaries(cache, vault_with_batch, key_provider)
    generate(tmp_path / "b2", 3, seed=32)
    ingest_batch(vault_with_batch, "b2", tmp_path / "b2", key_provider, workers=1)
    after = _canaries(cache, vault_with_batch, key_provider)
    assert load.calls == 1 and after is not before and len(after) > len(before)
    assert _canaries(cache, vault_with_batch, key_provider) is after and load.calls == 1
    assert _contents(after) == _contents(_fresh(vault_with_batch, key_provider))


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
        after = cache.get(con, key_provider, "run-3")  # the set before, extended
        assert after is not first and load.calls == 1 and len(after) > len(first)
        cache.clear()  # as a new run process: the set sealed for this state is taken
        again = cache.get(con, key_provider, "run-3")
        assert again is not after and load.calls == 1 and len(again) == len(after)
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


def _generated_patients(folder: Path) -> dict[str, tuple[str, str]]:
    """Each generated Patient's id: its family name and the text of its own file, read from
    the batch's files themselves (not through the vault)."""
    patients: dict[str, tuple[str, str]] = {}
    for path in sorted(folder.glob("0*.json")):
        text = path.read_text()
        for entry in json.loads(text)["entry"]:
            resource = entry["resource"]
            if resource["resourceType"] == "Patient":
                patients[resource["id"]] = (resource["name"][0]["family"], text)
    return patients


_ADMITTED = "seen by the night team: {} was admitted overnight"


def test_a_new_run_process_takes_the_sealed_canaries_without_decrypting_the_vault(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """The batch's run loads and seals the canaries; the release's run, a new process with a
    cache of its own, takes them sealed, and they find what a set made from the vault finds."""
    made, taken = CountingLoad(), CountingLoad()
    _canaries(ReleaseCanaryCache(made), vault_with_batch, key_provider)
    canaries = _canaries(ReleaseCanaryCache(taken), vault_with_batch, key_provider)
    assert (made.calls, taken.calls) == (1, 0)
    families = [family for family, _ in _generated_patients(tmp_path / "b1").values()]
    assert len(families) == 4
    con = warehouse.connect(vault_with_batch)
    try:
        fresh = release_canaries(con, key_provider)
    finally:
        con.close()
    texts = [_ADMITTED.format(family) for family in families] + [_ADMITTED.format("someone")]
    assert [canaries.find(t) for t in texts] == [fresh.find(t) for t in texts]
    assert all("name" in canaries.find(t) for t in texts[:-1]) and not canaries.find(texts[-1])
    assert len(canaries) == len(fresh)


def test_the_sealed_canaries_follow_the_vault_and_the_code(
    tmp_path: Path,
    vault_with_batch: Path,
    key_provider: FileKeyProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import deid.release

    _canaries(ReleaseCanaryCache(CountingLoad()), vault_with_batch, key_provider)
    generate(tmp_path / "b2", 2, seed=34)
    ingest_batch(vault_with_batch, "b2", tmp_path / "b2", key_provider, workers=1)
    after_batch = CountingLoad()
    canaries = _canaries(ReleaseCanaryCache(after_batch), vault_with_batch, key_provider)
    # another vault state: the set sealed before extended with the new batch, sealed for it
    assert after_batch.calls == 0
    for family, _ in _generated_patients(tmp_path / "b2").values():
        assert "name" in canaries.find(_ADMITTED.format(family)), family
    monkeypatch.setattr(deid.release, "_canary_code", lambda: b"the code of another version")
    other_code = CountingLoad()
    _canaries(ReleaseCanaryCache(other_code), vault_with_batch, key_provider)
    assert other_code.calls == 1


def test_sealed_canaries_that_fail_authentication_are_made_again(
    tmp_path: Path,
    vault_with_batch: Path,
    key_provider: FileKeyProvider,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _canaries(ReleaseCanaryCache(CountingLoad()), vault_with_batch, key_provider)
    con = warehouse.connect(vault_with_batch)
    try:
        flip_a_sealed_byte(con, share=1 / 3)
    finally:
        con.close()
    load = CountingLoad()
    with caplog.at_level(logging.WARNING, logger="deid.release"):
        _canaries(ReleaseCanaryCache(load), vault_with_batch, key_provider)
    assert load.calls == 1 and "failed authentication" in caplog.text
    con = warehouse.connect(vault_with_batch)
    try:  # a blob naming a data key the warehouse does not hold (its format byte, a key id)
        ((blob,),) = con.execute("SELECT sealed FROM sealed_cache").fetchall()
        unknown = b"\x01" + bytes(16) + bytes(blob)[17:]
        con.execute("UPDATE sealed_cache SET sealed = ?", [unknown])
    finally:
        con.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deid.release"):
        _canaries(ReleaseCanaryCache(load), vault_with_batch, key_provider)
    assert load.calls == 2 and "failed authentication" in caplog.text
    for family, _ in _generated_patients(tmp_path / "b1").values():
        assert family.casefold() not in caplog.text.casefold()
    sealed_anew = CountingLoad()
    _canaries(ReleaseCanaryCache(sealed_anew), vault_with_batch, key_provider)
    assert sealed_anew.calls == 0


def test_canaries_not_sealed_are_not_kept(
    vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    load = CountingLoad()
    _canaries(ReleaseCanaryCache(load), vault_with_batch, key_provider, sealed=False)
    _canaries(ReleaseCanaryCache(load), vault_with_batch, key_provider, sealed=False)
    con = warehouse.connect(vault_with_batch)
    try:
        assert con.execute("SELECT count(*) FROM sealed_cache").fetchone() == (0,)
    finally:
        con.close()
    assert load.calls == 2


def test_after_an_erasure_no_sealed_canary_names_the_patient(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """The canaries sealed before an erasure name the patient; the erasure deletes them, and
    the set made afterwards from the vault names the others only."""
    from vault.audit import AuditLog
    from vault.lifecycle import forget_in_warehouse
    from vault.pseudonym import Pseudonymizer

    before = _canaries(ReleaseCanaryCache(CountingLoad()), vault_with_batch, key_provider)
    patients = _generated_patients(tmp_path / "b1")
    # the erased patient's family name, when no other patient's file holds it
    erased, (family, _) = next(
        (pid, (family, text))
        for pid, (family, text) in patients.items()
        if not any(family in other for p, (_, other) in patients.items() if p != pid)
    )
    assert "name" in before.find(_ADMITTED.format(family))
    audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
    pseudonym = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", erased)
    report = forget_in_warehouse(vault_with_batch, pseudonym, audit, "erasure request")
    assert report.rows_deleted["sealed_cache"] == 1
    load = CountingLoad()
    after = _canaries(ReleaseCanaryCache(load), vault_with_batch, key_provider)
    assert load.calls == 1
    assert not after.find(_ADMITTED.format(family))
    for pid, (other, _) in patients.items():
        if pid != erased:
            assert "name" in after.find(_ADMITTED.format(other)), other


def _a_patient_of(folder: Path) -> dict[str, object]:
    """The first Patient resource of a generated batch, read from its files."""
    for path in sorted(folder.glob("0*.json")):
        for entry in json.loads(path.read_text())["entry"]:
            if entry["resource"]["resourceType"] == "Patient":
                return dict(entry["resource"])
    raise AssertionError("no Patient in the batch")


def test_the_set_extended_after_a_batch_is_the_set_the_whole_vault_gives(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """The batch run after a new batch takes the set sealed before it and adds the records
    written since: new patients, and a new version of a patient already there (a new family
    name, and a mother named for the first time). What it holds is what a set read from every
    version in the vault holds, canary for canary; the vault is not decrypted whole."""
    made = CountingLoad()
    before = _canaries(ReleaseCanaryCache(made), vault_with_batch, key_provider)
    renamed = _a_patient_of(tmp_path / "b1")
    old_family = renamed["name"][0]["family"]  # type: ignore[index]
    renamed["name"] = [{"family": "Quillfeather", "given": ["Ysolde"]}]
    renamed["contact"] = [{"name": {"family": "Marrowdean", "given": ["Edith"]}}]
    generate(tmp_path / "b2", 3, seed=32)
    (tmp_path / "b2" / "renamed.json").write_text(json.dumps(renamed))
    ingest_batch(vault_with_batch, "b2", tmp_path / "b2", key_provider, workers=1)

    extended = CountingLoad()
    after = _canaries(ReleaseCanaryCache(extended), vault_with_batch, key_provider)
    assert (made.calls, extended.calls) == (1, 0)
    fresh = _fresh(vault_with_batch, key_provider)
    assert _contents(after) == _contents(fresh) and _contents(after) != _contents(before)
    new_families = [family for family, _ in _generated_patients(tmp_path / "b2").values()]
    for family in (*new_families, old_family, "Quillfeather", "Marrowdean"):
        assert "name" in after.find(_ADMITTED.format(family)), family
    assert before.find(_ADMITTED.format("Quillfeather")) == []
    # the set sealed for this state is the extended one: a new process takes it as it is
    taken = CountingLoad()
    again = _canaries(ReleaseCanaryCache(taken), vault_with_batch, key_provider)
    assert taken.calls == 0 and _contents(again) == _contents(fresh)


def _delete_a_patient(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(
        "DELETE FROM phi_vault WHERE resource_key = "
        "(SELECT min(resource_key) FROM phi_vault WHERE resource_type = 'Patient')"
    )


def _refused_patient(folder: Path) -> None:
    refused = {
        "resourceType": "Patient",
        "id": "pq",
        "birthDate": "23/07/1961",
        "name": [{"given": ["Ottoline"], "family": "Vexbridge"}],
    }
    (folder / "pq.json").write_text(json.dumps(refused))


@pytest.mark.parametrize(
    "change",
    ["a patient's rows deleted", "a patient refused by validation", "a tampered sealed set"],
)
def test_a_vault_changed_other_than_by_new_rows_is_read_whole(
    tmp_path: Path,
    vault_with_batch: Path,
    key_provider: FileKeyProvider,
    change: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The set sealed before is extended only when the vault kept every row it held then and
    only rows were added: rows deleted (as an erasure or a batch taken back), a quarantined
    Patient (quarantined records are read whole), or a sealed set that fails authentication,
    each beside a new batch, read every patient again, and the set is the whole vault's."""
    _canaries(ReleaseCanaryCache(CountingLoad()), vault_with_batch, key_provider)
    con = warehouse.connect(vault_with_batch)
    try:
        if change == "a patient's rows deleted":
            _delete_a_patient(con)
        elif change == "a tampered sealed set":
            flip_a_sealed_byte(con, share=2 / 3)
    finally:
        con.close()
    generate(tmp_path / "b2", 2, seed=35)
    if change == "a patient refused by validation":
        _refused_patient(tmp_path / "b2")
    ingest_batch(vault_with_batch, "b2", tmp_path / "b2", key_provider, workers=1)
    load = CountingLoad()
    with caplog.at_level(logging.WARNING, logger="deid.release"):
        after = _canaries(ReleaseCanaryCache(load), vault_with_batch, key_provider)
    assert load.calls == 1
    assert _contents(after) == _contents(_fresh(vault_with_batch, key_provider))
    assert ("failed authentication" in caplog.text) == (change == "a tampered sealed set")


# Patients validation refused for their shape: an element where FHIR has a list given as an
# object, a string or a number, an object given as a string. Each still names its patient.
MISSHAPEN_PATIENTS: list[dict[str, Any]] = [
    {"identifier": [{"type": "MRN-TQ-55190", "value": "MRN-TQ-55190"}]},
    {"identifier": {"value": "MRN-TQ-55191", "type": {"coding": {"code": "MR"}}}},
    {"identifier": 5519377, "name": "Ottoline Vexbridge"},
    {"name": [{"given": "Ottoline", "family": "Vexbridge"}], "contact": 7},
    {"address": [{"line": "42 Quillfeather Lane"}], "telecom": {"value": "555-867-5309"}},
    {"address": "9 Brackenholt Row", "telecom": 5, "extension": "x"},
]


def test_a_patient_refused_for_its_shape_is_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """The canaries are read from the records the quarantine holds, refused by validation, so
    of any shape: a Patient whose identifier's type is a string once stopped the canaries'
    load with an AttributeError, and with it the de-identification of every batch and the
    release (and ``ehr forget`` of that patient). Each record's identifiers still count."""
    batch = tmp_path / "b2"
    batch.mkdir()
    lines = [
        json.dumps({"resourceType": "Patient", "id": f"pm{i}", **shape})
        for i, shape in enumerate(MISSHAPEN_PATIENTS)
    ]
    (batch / "refused.ndjson").write_text("\n".join(lines) + "\n")
    report = ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    assert report.quarantine_reasons == {"schema_violation": len(MISSHAPEN_PATIENTS)}
    canaries = _fresh(vault_with_batch, key_provider)
    assert canaries.find("MRN-TQ-55190") == ["identifier"]
    assert canaries.find("MRN-TQ-55191") == ["identifier"]
    assert sorted(canaries.find("Ottoline Vexbridge")) == ["full_name", "name", "name"]
    assert canaries.find("42 Quillfeather Lane") == ["address"]
    assert canaries.find("9 Brackenholt Row") == ["address"]
    assert canaries.find("5558675309") == ["phone"]


def test_a_canary_of_a_megabyte_is_found_and_freed_safely() -> None:
    """A name of a megabyte (an export's padding, in one NDJSON line: a valid Patient, or a
    refused one) is kept beside the automatons, whose tries are freed one C frame per
    character: held in one, it overflowed the stack when the set was freed, killing the run's
    process. It is still found whole, and only whole."""
    padded = "Vexbridge" + "e" * 1_000_000
    canaries = CanarySet()
    canaries.add("name", padded)
    canaries.add("identifier", "1" * 1_000_000)
    canaries.add("address", "42 Quillfeather Lane")
    assert canaries.find(f"seen: {padded.upper()}.") == ["name"]
    assert canaries.find(padded + "x") == [] and canaries.find("vexbridge") == []
    assert canaries.find("1" * 1_000_000) == ["identifier"]
    assert canaries.find("42 Quillfeather Lane") == ["address"]
    del canaries  # freed here: a C stack overflow, before


_CP1252_ONLY = "O\u2019Quarrigan \u0152lund"  # a typographic apostrophe and an OE ligature


def _latin1(line: str) -> bytes:
    return line.encode("latin-1")


def _with_nan(line: str) -> bytes:
    return (line[:-1] + ', "multipleBirthInteger": NaN}').encode()


def _bom_first(line: str) -> bytes:
    # the export's second line: files joined end to end, each opening with a byte-order mark
    return b"\n\xef\xbb\xbf" + line.encode()


def _cut_short(line: str) -> bytes:
    # the exporter's copy cut off inside the address: the postal code is the last whole value
    return line[: line.index('"01984"') + len('"01984"')].encode()


def _nested_too_deep(line: str) -> bytes:
    deep: dict[str, Any] = {"url": "http://example.org/x", "valueString": "x"}
    for _ in range(120):
        deep = {"url": "http://example.org/x", "extension": [deep]}
    return (line[:-1] + ', "_gender": {"extension": [' + json.dumps(deep) + "]}}").encode()


@pytest.mark.parametrize(
    ("written", "reason"),
    [
        (_latin1, "invalid_json"),
        (_with_nan, "invalid_json"),
        (_bom_first, "invalid_json"),
        (_cut_short, "invalid_json"),
        (_nested_too_deep, "schema_violation"),
    ],
)
def test_a_patient_refused_before_it_reads_as_fhir_is_read_for_canaries(
    tmp_path: Path,
    vault_with_batch: Path,
    key_provider: FileKeyProvider,
    written: Callable[[str], bytes],
    reason: str,
) -> None:
    """A Patient the quarantine holds under no patient, refused before it could be read as
    FHIR (an export in Latin-1, whose Patient has a letter outside ASCII; a ``NaN``, as
    Python's json module writes one; a line cut short; elements nested too deep), while its
    Observation is accepted and released under it: the Patient gave no canary, and a local
    code holding its surname, its MRN or its street reached ``deid_resources``. Its
    identifiers are canaries now, its birth date in its own rows, and a batch that brings only
    such a record loads the canaries afresh."""
    from vault.pseudonym import Pseudonymizer

    load = CountingLoad()
    cache = ReleaseCanaryCache(load)
    before = _canaries(cache, vault_with_batch, key_provider)
    patient = {
        "resourceType": "Patient",
        "id": "pl1",
        "name": [{"family": "Brontëwald", "given": ["Renée"]}],
        "identifier": [{"system": "http://hospital.example.org/mrn", "value": "66120934"}],
        "birthDate": "1961-07-23",
        "address": [{"line": ["9 Quimby Row"], "city": "Dunmere", "postalCode": "01984"}],
    }
    observation = {
        "resourceType": "Observation",
        "id": "ol1",
        "status": "final",
        "code": {"coding": [{"system": "http://hospital.example/lab", "code": "BRONTEWALD"}]},
        "subject": {"reference": "Patient/pl1"},
    }
    batch = tmp_path / "b2"
    batch.mkdir()
    line = written(json.dumps(patient, ensure_ascii=False))
    (batch / "export.ndjson").write_bytes(line + b"\n" + json.dumps(observation).encode() + b"\n")
    report = ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    assert (report.accepted, report.quarantine_reasons) == (1, {reason: 1})
    after = _canaries(cache, vault_with_batch, key_provider)
    assert load.calls == 2 and after is not before
    assert before.find("BRONTEWALD") == []
    assert after.find("BRONTEWALD") == ["name"] and after.find("MRN66120934") == ["identifier"]
    assert after.find("9-Quimby-Row") == ["address"]
    owner = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "pl1")
    row = {"code": {"coding": [{"code": "DOB19610723"}]}}
    assert after.scan_value(row, owner) == ["birth_date"] and after.scan_value(row, "p2") == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"name": "Brontëwald"}'.encode("cp1252"), {"name": "Brontëwald"}),
        # a letter Windows-1252 has where Latin-1 has a control character
        (f'{{"name": "{_CP1252_ONLY}"}}'.encode("cp1252"), {"name": _CP1252_ONLY}),
        (b'{"name": "x\x81"}', {"name": "x\x81"}),  # no Windows-1252 character: Latin-1
        (b'{"n": NaN, "m": -Infinity}', {"n": math.nan, "m": -math.inf}),
        (b'{"name": "Renee"', {"name": "Renee"}),  # cut short: its whole values
        (
            b'{"id": "p1", "name": [{"family": "Quimby", "given": ["Ren',
            {"id": "p1", "name": [{"family": "Quimby", "given": []}]},
        ),
        (b'{"id": "p1", "n": NaN, "name": [{"family"', {"id": "p1", "n": math.nan, "name": [{}]}),
        (b'{"id": "p1"} and more', {"id": "p1"}),
        (b"not json at all", None),
        (b"\xff\xfe{not json", None),
        (b'\xef\xbb\xbf{"name": "Renee"}', {"name": "Renee"}),  # a mark first
        (b'\xef\xbb\xbf\xef\xbb\xbf{"name": "Ren\xe9e"}', {"name": "Renée"}),
        ('{"name": "Brontëwald"}'.encode("utf-16"), {"name": "Brontëwald"}),
        ('{"name": "Brontëwald"}'.encode("utf-32"), {"name": "Brontëwald"}),
        # a UTF-16 file whose last character was cut short
        ('{"name": "Brontëwald"}\n'.encode("utf-16") + b"\n", {"name": "Brontëwald"}),
    ],
)
def test_a_quarantined_record_is_read_as_its_exporter_wrote_it(raw: bytes, expected: Any) -> None:
    from vault.read import quarantined_json

    got = quarantined_json(raw)
    if isinstance(expected, dict) and math.nan in expected.values():
        assert math.isnan(got["n"])
        assert {k: v for k, v in got.items() if k != "n"} == {
            k: v for k, v in expected.items() if k != "n"
        }
    else:
        assert got == expected


def test_a_record_nested_deeper_than_orjson_reads_is_read_to_a_depth() -> None:
    """Its values deeper than a hundred levels are left out: built whole, a line of 64 MB of
    ``[`` took over 20 GB while the canaries were loaded."""
    from vault.read import quarantined_json

    deep = b"[" * 200_000 + b"]" * 200_000
    got = quarantined_json(b'{"name": "Renee", "x": ' + deep + b', "id": ["a", {"b": 1}]}')
    assert (got["name"], got["id"]) == ("Renee", ["a", {"b": 1}])
    depth, node = 1, got["x"]
    while node:
        depth, node = depth + 1, node[0]
    assert depth == 99  # the object and 99 arrays in it: a hundred levels


def _patient(i: int, family: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": f"pw{i}",
        "name": [{"family": family, "given": ["Renée"]}],
        "identifier": [{"system": "http://hospital.example.org/mrn", "value": f"7712{i:04d}"}],
    }


def test_patients_of_a_whole_file_or_bundle_refused_are_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """Patients the quarantine holds under no patient inside one record: an NDJSON file in
    UTF-16 (as PowerShell's Out-File writes it), which the reader refuses whole; a Bundle line,
    and a Bundle document, in Windows-1252; a Patient nested deeper than orjson reads; one
    whose type is written `` patient`` (refused as no resource type). Their Observations, in
    another file, are accepted and released under them: each Patient gave no canary."""
    families = {1: "Quorvexa", 2: "Pellowynd", 3: "Brontëfell", 4: "Zoëmarch", 5: "Tarrowick"}
    families[6] = "Ulvenbrook"
    batch = tmp_path / "b2"
    batch.mkdir()
    wide = "".join(json.dumps(_patient(i, families[i])) + "\n" for i in (1, 2))
    (batch / "patients.ndjson").write_bytes(wide.encode("utf-16"))
    for i, name in ((3, "line.ndjson"), (4, "doc.json")):
        bundle = {"resourceType": "Bundle", "type": "collection"}
        bundle["entry"] = [{"resource": _patient(i, families[i])}]
        (batch / name).write_bytes(json.dumps(bundle, ensure_ascii=False).encode("cp1252"))
    deep = '{"extension": [' * 1100 + '{"url": "http://e.org/x"}' + "]}" * 1100
    deep_line = json.dumps(_patient(5, families[5]))[:-1] + f', "_gender": {deep}}}'
    (batch / "deep.ndjson").write_text(deep_line + "\n")
    lower = _patient(6, families[6]) | {"resourceType": " patient"}
    (batch / "lower.ndjson").write_text(json.dumps(lower) + "\n")
    observations = [
        {"resourceType": "Observation", "id": f"ow{i}", "status": "final"}
        | {"code": {"text": "x"}, "subject": {"reference": f"Patient/pw{i}"}}
        for i in families
    ]
    (batch / "obs.ndjson").write_text("".join(json.dumps(o) + "\n" for o in observations))
    report = ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    reasons = {"invalid_json": 4, "unknown_resource_type": 1}
    assert (report.accepted, report.quarantine_reasons) == (6, reasons)
    canaries = _fresh(vault_with_batch, key_provider)
    for i, family in families.items():
        assert canaries.find(f"LAB-{family.upper()}") == ["name"], family
        assert canaries.find(f"MRN7712{i:04d}") == ["identifier"], family


def test_a_document_of_many_lines_cut_short_is_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """A Bundle written indented (as Synthea writes one) and cut off after its Patient, which
    the reader refuses whole as one record of no patient: each of its lines was read alone, no
    line of it is a resource, and its Patient gave no canary while its Observation, in another
    file, was released."""
    batch = tmp_path / "b2"
    batch.mkdir()
    entries = [{"resource": _patient(1, "Pellowynd")}, {"resource": {"resourceType": "Basic"}}]
    document = json.dumps(
        {"resourceType": "Bundle", "type": "collection", "entry": entries}, indent=2
    )
    (batch / "doc.json").write_text(document[: document.index('"Basic"') + 4])
    observation = {"resourceType": "Observation", "id": "ow1", "status": "final"}
    observation |= {"code": {"text": "x"}, "subject": {"reference": "Patient/pw1"}}
    (batch / "obs.ndjson").write_text(json.dumps(observation) + "\n")
    report = ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    assert (report.accepted, report.quarantine_reasons) == (1, {"invalid_json": 1})
    canaries = _fresh(vault_with_batch, key_provider)
    assert canaries.find("LAB-PELLOWYND") == ["name"]
    assert canaries.find("MRN77120001") == ["identifier"]


def test_a_document_cut_short_and_ending_in_zero_bytes_is_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """A file cut off by a crash, or copied while it was written, ends in zero bytes where its
    blocks were allocated and never written: an indented Bundle cut after its Patient so
    ending read as no JSON rather than cut short, and its Patient gave no canary while her
    Observation, in another file, was released."""
    batch = tmp_path / "b2"
    batch.mkdir()
    entries = [{"resource": _patient(1, "Pellowynd")}, {"resource": {"resourceType": "Basic"}}]
    document = json.dumps(
        {"resourceType": "Bundle", "type": "collection", "entry": entries}, indent=2
    )
    cut = document[: document.index('"Basic"') + 4]
    (batch / "doc.json").write_bytes(cut.encode() + b"\0" * 4096)
    observation = {"resourceType": "Observation", "id": "ow1", "status": "final"}
    observation |= {"code": {"text": "x"}, "subject": {"reference": "Patient/pw1"}}
    (batch / "obs.ndjson").write_text(json.dumps(observation) + "\n")
    ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    canaries = _fresh(vault_with_batch, key_provider)
    assert canaries.find("LAB-PELLOWYND") == ["name"]
    assert canaries.find("MRN77120001") == ["identifier"]


def test_a_bundle_whose_type_is_written_in_another_case_is_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """A Bundle written ``bundle`` is refused whole as no resource type, one record of no
    patient: its entries were not read, and its Patient gave no canary while her Observation,
    in another file, was released."""
    batch = tmp_path / "b2"
    batch.mkdir()
    bundle = {"resourceType": "bundle", "type": "collection"}
    bundle["entry"] = [{"resource": _patient(1, "Zanderlee")}]
    (batch / "doc.json").write_text(json.dumps(bundle))
    observation = {"resourceType": "Observation", "id": "ow1", "status": "final"}
    observation |= {"code": {"text": "x"}, "subject": {"reference": "Patient/pw1"}}
    (batch / "obs.ndjson").write_text(json.dumps(observation) + "\n")
    report = ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    assert (report.accepted, report.quarantine_reasons) == (1, {"unknown_resource_type": 1})
    canaries = _fresh(vault_with_batch, key_provider)
    assert canaries.find("LAB-ZANDERLEE") == ["name"]
    assert canaries.find("MRN77120001") == ["identifier"]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_a_file_in_utf16_or_utf32_without_a_byte_order_mark_is_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider, codec: str
) -> None:
    """An NDJSON file in UTF-16 or UTF-32 written without a byte-order mark (``bcp -w``,
    ``iconv -t UTF-16LE``): the reader splits it at each line feed's first byte, one record
    of no patient a line, read as UTF-8; its Patient gave no canary while her Observation, in
    another file, was released."""
    batch = tmp_path / "b2"
    batch.mkdir()
    other = {"resourceType": "Basic", "id": "bw1", "code": {"text": "x"}}
    lines = [json.dumps(other), json.dumps(_patient(1, "Ulvenbröok"), ensure_ascii=False)]
    (batch / "wide.ndjson").write_bytes(("\n".join(lines) + "\n").encode(codec))
    observation = {"resourceType": "Observation", "id": "ow1", "status": "final"}
    observation |= {"code": {"text": "x"}, "subject": {"reference": "Patient/pw1"}}
    (batch / "obs.ndjson").write_text(json.dumps(observation) + "\n")
    ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    canaries = _fresh(vault_with_batch, key_provider)
    assert canaries.find("LAB-ULVENBROOK") == ["name"]
    assert canaries.find("MRN77120001") == ["identifier"]


def test_patients_in_joined_documents_or_carried_inside_a_refused_record_give_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """Indented documents joined in one ``.json`` file (refused whole as no JSON), and a
    Bundle written ``bundle`` whose one entry is an object holding a Parameters with a
    Patient contained in its value: records of no patient, each read as no Patient, so
    neither Patient gave a canary while their Observations, in another file, were
    released."""
    batch = tmp_path / "b2"
    batch.mkdir()
    other = {"resourceType": "Basic", "id": "bw1", "code": {"text": "x"}}
    joined = json.dumps(other, indent=2) + "\n" + json.dumps(_patient(1, "Quillmarsh"), indent=2)
    (batch / "joined.json").write_text(joined)
    carrier = {"resourceType": "Basic", "id": "bw2", "contained": [_patient(2, "Vantrelle")]}
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "x", "resource": carrier}]}
    bundle = {"resourceType": "bundle", "entry": {"resource": parameters}}
    (batch / "bundle.json").write_text(json.dumps(bundle))
    observations = [
        {
            "resourceType": "Observation",
            "id": f"ow{i}",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": f"Patient/pw{i}"},
        }
        for i in (1, 2)
    ]
    (batch / "obs.ndjson").write_text("".join(json.dumps(o) + "\n" for o in observations))
    report = ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    assert report.accepted == 2 and sum(report.quarantine_reasons.values()) == 2
    canaries = _fresh(vault_with_batch, key_provider)
    for family, mrn in (("QUILLMARSH", "MRN77120001"), ("VANTRELLE", "MRN77120002")):
        assert canaries.find(f"LAB-{family}") == ["name"], family
        assert canaries.find(mrn) == ["identifier"], mrn


def _observation_of(i: int) -> dict[str, Any]:
    observation = {"resourceType": "Observation", "id": f"ow{i}", "status": "final"}
    return observation | {"code": {"text": "x"}, "subject": {"reference": f"Patient/pw{i}"}}


def test_persons_held_inside_other_records_are_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """A person written inside another record rather than as a Patient of their own, while
    their Observations, in another file, are accepted and released: two indented Patients in
    one ``.json`` (refused as invalid JSON), a Patient sent as ``Parameters`` (refused for its
    birth date, or accepted), a Bundle whose ``entry`` is one object (refused), a Patient
    contained in a refused lab result (quarantined under its subject's key), a Bundle inside a
    Bundle's entry (accepted as one resource) and a Person (accepted). Each gave no canary,
    and a local code holding her surname or MRN was released."""
    families = dict(enumerate(("Quorvexa", "Pellowynd", "Tarrowick", "Ulvenbrook"), 1))
    families |= dict(enumerate(("Zanderlee", "Morvaine", "Kestovar", "Brastemund"), 5))
    batch = tmp_path / "b2"
    batch.mkdir()
    two = [json.dumps(_patient(i, families[i]), indent=2) for i in (1, 2)]
    (batch / "two.json").write_text("\n".join(two) + "\n")
    refused = _patient(3, families[3]) | {"birthDate": "13/02/1970"}
    for name, patient in (("refused.json", refused), ("accepted.json", _patient(4, families[4]))):
        parameters = {"resourceType": "Parameters", "parameter": [{"name": "patient"}]}
        parameters["parameter"][0]["part"] = [{"name": "p", "resource": patient}]
        (batch / name).write_text(json.dumps(parameters))
    entry = {"resource": _patient(5, families[5])}
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": entry}
    (batch / "entry.json").write_text(json.dumps(bundle))
    lab = _observation_of(6) | {"status": "final", "effectiveDateTime": "2024-13-01"}
    lab["contained"] = [_patient(6, families[6]) | {"id": "c1"}]
    inner = {"resourceType": "Bundle", "type": "collection"}
    inner["entry"] = [{"resource": _patient(7, families[7])}]
    outer = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    person = _patient(8, families[8]) | {"resourceType": "Person", "id": "per8"}
    (batch / "more.ndjson").write_text("".join(json.dumps(r) + "\n" for r in (lab, outer, person)))
    observations = [_observation_of(i) for i in families if i != 6]
    (batch / "obs.ndjson").write_text("".join(json.dumps(o) + "\n" for o in observations))
    report = ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    assert report.quarantined == 4
    canaries = _fresh(vault_with_batch, key_provider)
    for i, family in families.items():
        assert canaries.find(f"LAB-{family.upper()}") == ["name"], family
        assert canaries.find(f"MRN7712{i:04d}") == ["identifier"], family


def test_a_patient_contained_in_an_accepted_record_is_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider
) -> None:
    """A lab result holding its patient as a contained resource (subject ``#c``), and a visit
    holding a relative, both accepted: the release withholds such a record when its own
    released values name the person, but her surname or MRN as a local code in another record
    was released, since the canaries are read from the vault's Patients and identifying
    records only. Ingest now marks such records, and the canaries read them, first loaded and
    extended after a batch alike."""
    batch = tmp_path / "b2"
    batch.mkdir()
    lab = _observation_of(1) | {"subject": {"reference": "#c"}}
    lab["contained"] = [_patient(1, "Quorvexa") | {"id": "c"}]
    visit = {"resourceType": "Encounter", "id": "e2", "status": "finished"}
    visit |= {"class": {"code": "AMB"}, "subject": {"reference": "Patient/pw2"}}
    relative = {"resourceType": "RelatedPerson", "id": "r", "patient": {"reference": "#p"}}
    relative["name"] = [{"family": "Pellowynd"}]
    visit["contained"] = [relative, {"resourceType": "Patient", "id": "p"}]
    (batch / "more.ndjson").write_text(json.dumps(lab) + "\n" + json.dumps(visit) + "\n")
    made = CountingLoad()
    _canaries(ReleaseCanaryCache(made), vault_with_batch, key_provider)
    report = ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    assert report.accepted == 2
    extended = CountingLoad()
    after = _canaries(ReleaseCanaryCache(extended), vault_with_batch, key_provider)
    assert (made.calls, extended.calls) == (1, 0)
    for canaries in (_fresh(vault_with_batch, key_provider), after):
        assert canaries.find("LAB-QUORVEXA") == ["name"]
        assert canaries.find("MRN77120001") == ["identifier"]
        assert canaries.find("LAB-PELLOWYND") == ["name"]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le"])
def test_a_name_past_latin1_in_a_file_without_a_byte_order_mark_is_read_for_canaries(
    tmp_path: Path, vault_with_batch: Path, key_provider: FileKeyProvider, codec: str
) -> None:
    """Patients after the first line of an NDJSON file in UTF-16 or UTF-32 without a
    byte-order mark, named with letters past U+00FF: cut at each 0x0a byte, a later line read
    a byte off gave ``Ōta`` as ``LŴa`` (right only below U+0100), and a name holding U+040A
    (``Њ``, a 0x0a byte in UTF-16) was cut in two; neither gave its canary."""
    batch = tmp_path / "b2"
    batch.mkdir()
    other = {"resourceType": "Basic", "id": "bw1", "code": {"text": "x"}}
    patients = [_patient(1, "Łukowiak"), _patient(2, "Његошевић")]
    lines = [json.dumps(other), *(json.dumps(p, ensure_ascii=False) for p in patients)]
    (batch / "wide.ndjson").write_bytes(("\n".join(lines) + "\n").encode(codec))
    ingest_batch(vault_with_batch, "b2", batch, key_provider, workers=1)
    canaries = _fresh(vault_with_batch, key_provider)
    assert canaries.find("LAB ŁUKOWIAK") == ["name"]
    assert canaries.find("LAB ЊЕГОШЕВИЋ") == ["name"]
    assert canaries.find("MRN77120002") == ["identifier"]
