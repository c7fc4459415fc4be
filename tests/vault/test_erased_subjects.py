"""Tombstones: after an erasure, nothing that resolves to the erased patient is stored again,
however it arrives."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vault import warehouse
from vault.audit import AuditLog
from vault.ingest import ERASED_SUBJECT, IngestReport, ingest_batch, reconcile_batch
from vault.keys import FileKeyProvider
from vault.lifecycle import forget_in_warehouse
from vault.pseudonym import Pseudonymizer
from vault.read import iter_every_version

PATIENT = {
    "resourceType": "Patient",
    "id": "p1",
    "identifier": [{"system": "urn:mrn", "value": "MRN-1"}],
    "name": [{"family": "Fennimore"}],
}


def _write(folder: Path, resources: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "data.ndjson").write_text("".join(json.dumps(r) + "\n" for r in resources))
    return folder


@pytest.fixture
def erased(tmp_path: Path, key_provider: FileKeyProvider) -> Path:
    wh = tmp_path / "warehouse.duckdb"
    ingest_batch(wh, "b0", _write(tmp_path / "b0", [PATIENT]), key_provider, workers=1)
    pseudonym = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "p1")
    audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
    report = forget_in_warehouse(wh, pseudonym, audit, "erasure request")
    assert report.found and report.data_keys_destroyed == 1
    return wh


def test_every_way_back_is_quarantined_unstored(
    erased: Path, tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    later = [
        PATIENT,  # the same Patient again
        {**PATIENT, "id": "p1-new"},  # another id, an identifier of the erased Patient
        {  # in its compartment
            "resourceType": "Condition",
            "id": "c1",
            "subject": {"reference": "Patient/p1"},
            "code": {"text": "gout"},
        },
        {  # conditionally, with the Patient nowhere in this batch
            "resourceType": "Condition",
            "id": "c2",
            "subject": {"reference": "Patient?identifier=urn:mrn|MRN-1"},
            "code": {"text": "gout"},
        },
        {  # invalid (an empty array), naming the erased patient
            "resourceType": "Condition",
            "id": "c3",
            "subject": {"reference": "Patient/p1"},
            "category": [],
        },
        {  # invalid, naming the erased patient only conditionally
            "resourceType": "Condition",
            "id": "c4",
            "subject": {"reference": "Patient?identifier=urn:mrn|MRN-1"},
            "category": [],
        },
        {  # by a logical reference (the identifier alone)
            "resourceType": "Condition",
            "id": "c5",
            "subject": {"identifier": {"system": "urn:mrn", "value": "MRN-1"}},
            "code": {"text": "gout"},
        },
        {  # invalid, by a logical reference with the identifier written differently
            "resourceType": "Condition",
            "id": "c6",
            "subject": {"identifier": {"system": "urn:mrn", "value": "mrn 1"}},
            "category": [],
        },
        {"resourceType": "Patient", "id": "p2", "name": [{"family": "Other"}]},
    ]
    report = ingest_batch(erased, "b1", _write(tmp_path / "b1", later), key_provider, workers=1)
    assert report.quarantine_reasons == {ERASED_SUBJECT: 8}
    assert report.accepted == 1
    con = warehouse.connect(erased, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
        rows = con.execute(
            "SELECT resource_type, patient_key, sealed, aad, message FROM quarantine "
            "WHERE batch_id = 'b1' ORDER BY position"
        ).fetchall()
        assert [r[0] for r in rows] == ["Patient"] * 2 + ["Condition"] * 6
        assert all(r[1] is None and r[2] == b"" and r[3] == b"" for r in rows)
        assert all("Fennimore" not in r[4] and "MRN-1" not in r[4] for r in rows)
        assert con.execute("SELECT count(*) FROM phi_vault").fetchall() == [(1,)]
        # no data key was made for the erased patient
        assert con.execute(
            "SELECT count(*) FROM data_keys WHERE destroyed_at IS NULL AND owner <> ?",
            [Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "p2")],
        ).fetchall() == [(0,)]
    finally:
        con.close()


def _linked(pid: str, other: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "link": [{"other": other, "type": "seealso"}]}


def test_a_patient_linked_to_her_by_an_identifier_alone_is_refused(
    erased: Path, tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """``Patient.link`` may name the other record by its identifier alone (a logical
    reference), or by a conditional reference with the identifier written differently: each
    says this is her under a new record, as a link by id does."""
    later = [
        _linked("q1", {"identifier": {"system": "urn:mrn", "value": "MRN-1"}}),
        _linked("q2", {"type": "Patient", "identifier": {"system": "urn:mrn", "value": "mrn 1"}}),
        _linked("q3", {"reference": "Patient?identifier=urn:mrn|mrn-1"}),
        _linked("q4", {"identifier": {"system": "urn:other", "value": "MRN-1"}}),  # not hers
    ]
    report = ingest_batch(erased, "b1", _write(tmp_path / "b1", later), key_provider, workers=1)
    assert report.quarantine_reasons == {ERASED_SUBJECT: 3}
    assert report.accepted == 1
    pseudo = Pseudonymizer(key_provider.pseudonym_key())
    con = warehouse.connect(erased, read_only=True)
    try:
        stored = con.execute("SELECT resource_key FROM phi_vault").fetchall()
    finally:
        con.close()
    assert stored == [(pseudo.resource_key("Patient", "q4"),)]


def test_a_patient_linked_by_an_identifier_alone_is_erased_with_her(
    tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    wh = tmp_path / "warehouse.duckdb"
    merged = _linked("q1", {"identifier": {"system": "urn:mrn", "value": "MRN-1"}})
    ingest_batch(wh, "b0", _write(tmp_path / "b0", [PATIENT, merged]), key_provider, workers=1)
    pseudo = Pseudonymizer(key_provider.pseudonym_key())
    audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
    report = forget_in_warehouse(wh, pseudo.resource_key("Patient", "p1"), audit, "request 7")
    assert report.same_person == [pseudo.resource_key("Patient", "q1")]
    assert report.data_keys_destroyed == 2


def test_the_key_of_a_compartment_refused_as_hers_never_reaches_the_file(
    erased: Path, tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Patient under a new id with her identifier, after records of its compartment (a Bulk
    Data export writes Patient.ndjson after Condition.ndjson): those records are staged under a
    data key made for the new id before the Patient shows who it is. That key is never written:
    were it, a checkpoint during the batch (DuckDB makes one whenever its log grows past
    ``checkpoint_threshold``) would put it into the file, where the erasure of the compartment
    leaves it in a freed page that the keyring unwraps, with her records' ciphertexts beside."""
    wrapped = _recording_wraps(key_provider, monkeypatch)
    connect = warehouse.connect

    def checkpointing(*args: Any, **kwargs: Any) -> Any:
        opened = connect(*args, **kwargs)
        opened.execute("SET checkpoint_threshold = '1B'")  # a checkpoint at every commit
        return opened

    monkeypatch.setattr(warehouse, "connect", checkpointing)
    condition = {
        "resourceType": "Condition",
        "id": "c-before",
        "subject": {"reference": "Patient/p1-new"},
        "code": {"text": "gout"},
    }
    other = {"resourceType": "Patient", "id": "p2", "name": [{"family": "Other"}]}
    batch = _write(tmp_path / "b1", [condition, other, {**PATIENT, "id": "p1-new"}])
    report = ingest_batch(erased, "b1", batch, key_provider, workers=1)
    assert (report.accepted, report.quarantine_reasons) == (1, {ERASED_SUBJECT: 2})

    owner = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "p1-new")
    hers = _wrapped_for(wrapped, owner)
    assert hers, "a data key was made for the compartment before its Patient was read"
    assert not _in_files(erased, hers)
    con = warehouse.connect(erased, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
        assert con.execute(
            "SELECT count(*) FROM data_keys WHERE owner = ? AND wrapped IS NOT NULL", [owner]
        ).fetchall() == [(0,)]
    finally:
        con.close()


def test_records_an_earlier_batch_stored_for_her_new_id_leave_with_their_key(
    erased: Path, tmp_path: Path, key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery split in two (a Bulk Data export's Condition.ndjson in one landing folder,
    its Patient.ndjson in the next): the first batch stores records naming a new Patient id,
    which nothing yet tells is hers, under a data key made for that id; the second brings
    the Patient under that id with her identifier, and is refused. Those earlier records are
    hers: they leave the vault (and the release, at the next de-identification) with the key
    they were sealed under, and the file is rewritten so that no freed page keeps the key,
    which the keyring would unwrap and which opens them."""
    other = {"resourceType": "Patient", "id": "p2", "name": [{"family": "Other"}]}
    hers, first = _early_records(erased, tmp_path, key_provider, monkeypatch, also=[other])
    assert (first.accepted, first.quarantined) == (2, 0)  # nothing tells whose p1-new is yet
    batch = _write(tmp_path / "b2", [{**PATIENT, "id": "p1-new"}])
    second = ingest_batch(erased, "b2", batch, key_provider, workers=1)
    assert second.quarantine_reasons == {ERASED_SUBJECT: 1}

    pseudo = Pseudonymizer(key_provider.pseudonym_key())
    assert not _in_files(erased, hers)
    con = warehouse.connect(erased, read_only=True)
    try:
        assert con.execute(
            "SELECT resource_type FROM phi_vault WHERE batch_id = 'b1'"
        ).fetchall() == [("Patient",)]  # p2 stays
        condition_key = pseudo.resource_key("Condition", "c-early")
        assert con.execute(
            "SELECT kind FROM erased_subjects WHERE subject_key = ?", [condition_key]
        ).fetchall() == [("resource",)]
        for table in ("resource_references", "identifier_index"):
            assert con.execute(
                f"SELECT count(*) FROM {table} WHERE resource_key = ?", [condition_key]
            ).fetchall() == [(0,)]
        b1 = reconcile_batch(con, "b1")
        assert b1.passed and b1.erased == 1
        assert reconcile_batch(con, "b2").passed
    finally:
        con.close()
    assert second.erased_from_earlier_batches == 1


# the refusing batch ingested in another process, killed (SIGKILL) as its rewrite starts: the
# key destruction is committed, the file not yet rewritten
_INGEST_KILLED_AT_REWRITE = """
import os, signal, sys
from pathlib import Path
from vault import warehouse
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

wh, folder, key_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
warehouse.rewrite = killed
ingest_batch(wh, "b2", folder, FileKeyProvider.load(key_file), workers=1)
"""


def _killed_refusal(erased: Path, tmp_path: Path, key_file: Path) -> Path:
    batch = _write(tmp_path / "b2", [{**PATIENT, "id": "p1-new"}])
    killed = subprocess.run(
        [sys.executable, "-c", _INGEST_KILLED_AT_REWRITE, str(erased), str(batch), str(key_file)],
        capture_output=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return batch


def _early_records(
    erased: Path,
    tmp_path: Path,
    key_provider: FileKeyProvider,
    monkeypatch: pytest.MonkeyPatch,
    also: list[dict[str, Any]] | None = None,
) -> tuple[list[bytes], IngestReport]:
    """Batch b1: a Condition naming Patient/p1-new alone (and the resources ``also``); the
    wrapped data keys made for p1-new while it was ingested, and the batch's report."""
    wrapped = _recording_wraps(key_provider, monkeypatch)
    condition = {
        "resourceType": "Condition",
        "id": "c-early",
        "subject": {"reference": "Patient/p1-new"},
        "code": {"text": "gout"},
    }
    resources = [condition, *(also or [])]
    report = ingest_batch(erased, "b1", _write(tmp_path / "b1", resources), key_provider, workers=1)
    owner = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "p1-new")
    hers = _wrapped_for(wrapped, owner)
    assert hers, "the first batch wrote a data key for p1-new"
    return hers, report


def _recording_wraps(
    key_provider: FileKeyProvider, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[bytes, bytes]]:
    """Every data key the provider wraps from now on: (its wrap context, the wrapped blob)."""
    wrapped: list[tuple[bytes, bytes]] = []
    wrap = key_provider.wrap

    def recording(data_key: bytes, context: bytes) -> Any:
        found = wrap(data_key, context)
        wrapped.append((context, found.blob))
        return found

    monkeypatch.setattr(key_provider, "wrap", recording)
    return wrapped


def _wrapped_for(wrapped: list[tuple[bytes, bytes]], owner: str) -> list[bytes]:
    """The wrapped data keys of ``owner`` (a patient pseudonym, bound into the wrap context)."""
    return [blob for context, blob in wrapped if owner.encode() in context]


def _in_files(wh: Path, blobs: list[bytes]) -> list[bytes]:
    files = [path for path in wh.parent.glob(wh.name + "*") if path.is_file()]
    raw = b"".join(path.read_bytes() for path in files)
    return [blob for blob in blobs if blob in raw]


@pytest.mark.parametrize("then", ["same batch again", "another batch", "an erasure"])
def test_a_refusal_killed_before_its_rewrite_is_rewritten_by_the_next_writer(
    erased: Path,
    tmp_path: Path,
    key_file: Path,
    key_provider: FileKeyProvider,
    monkeypatch: pytest.MonkeyPatch,
    then: str,
) -> None:
    """The process ingesting the refusing batch dies between the commit that destroyed the
    data key and the rewrite: the destroyed wrapped key stays in a freed page. The warehouse
    records that it owes a rewrite, and the next writer performs it: the batch run again
    (which finds nothing left to destroy), another batch, or an erasure of someone else."""
    hers, _ = _early_records(erased, tmp_path, key_provider, monkeypatch)
    batch = _killed_refusal(erased, tmp_path, key_file)
    assert _in_files(erased, hers), "the killed run left the destroyed key in the file"
    if then == "same batch again":
        ingest_batch(erased, "b2", batch, key_provider, workers=1)
    elif then == "another batch":
        other = {"resourceType": "Patient", "id": "p3", "name": [{"family": "Third"}]}
        ingest_batch(erased, "b3", _write(tmp_path / "b3", [other]), key_provider, workers=1)
    else:
        audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
        someone = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "nobody")
        forget_in_warehouse(erased, someone, audit, "erasure request 2")
    assert not _in_files(erased, hers)
    con = warehouse.connect(erased, read_only=True)
    try:
        assert not warehouse.rewrite_owed(con)
    finally:
        con.close()


# Her records naming her by identifier alone come before her Patient in the batch; the pass is
# killed (SIGKILL) once they are written (one flush per record), before it reads the Patient.
HER_MRN = "MRN-7731"
HERS = {
    "resourceType": "Patient",
    "id": "p7",
    "identifier": [{"system": "urn:mrn", "value": HER_MRN}],
    "name": [{"family": "Quarrington"}],
}
BY_IDENTIFIER = [
    {  # a logical reference: the identifier alone
        "resourceType": "Condition",
        "id": "c-logical",
        "subject": {"identifier": {"system": "urn:mrn", "value": HER_MRN}},
        "code": {"text": "gout"},
    },
    {  # its conditional form
        "resourceType": "Condition",
        "id": "c-conditional",
        "subject": {"reference": f"Patient?identifier=urn:mrn|{HER_MRN}"},
        "code": {"text": "gout"},
    },
]
_INGEST_KILLED_BEFORE_HER_PATIENT = """
import os, signal, sys
from pathlib import Path
from vault import ingest
from vault.keys import FileKeyProvider

ingest.FLUSH_ROWS = 1
flush = ingest.BatchIngestor.flush

def killed(self):
    flush(self)
    if self.report.records_in == int(sys.argv[4]):
        os.kill(os.getpid(), signal.SIGKILL)

ingest.BatchIngestor.flush = killed
wh, folder, key_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
ingest.ingest_batch(wh, "b1", folder, FileKeyProvider.load(key_file), workers=1)
"""


def _sealed(wh: Path) -> list[bytes]:
    con = warehouse.connect(wh, read_only=True)
    try:
        return [bytes(s) for (s,) in con.execute("SELECT sealed FROM phi_vault").fetchall()]
    finally:
        con.close()


def _readable_naming(wh: Path, key_provider: FileKeyProvider, value: str) -> list[str]:
    """The ids of the vault's versions, decrypted with the keys, that hold ``value``."""
    con = warehouse.connect(wh, read_only=True)
    try:
        return [
            str(record.resource["id"])
            for record in iter_every_version(con, key_provider)
            if value in json.dumps(record.resource)
        ]
    finally:
        con.close()


def test_records_naming_her_by_identifier_before_her_patient_leave_with_it(
    tmp_path: Path, key_file: Path, key_provider: FileKeyProvider
) -> None:
    """A pass killed after her records naming her by identifier alone (sealed under the shared
    key until the end of the batch resolves them) and before her Patient: she is erased then,
    by id, and the vault holds nothing that says which identifiers are hers, so the erasure
    finds nothing. Her Patient, read by the batch's next pass, is refused as hers, and so are
    those records: not stored, her identifiers tombstoned (a later record naming her by one
    is refused too), and the file rewritten, since the shared key that sealed them lives and
    the killed pass's ciphertexts were in the file."""
    wh = tmp_path / "warehouse.duckdb"
    batch = _write(tmp_path / "b1", [*BY_IDENTIFIER, HERS])
    script = _INGEST_KILLED_BEFORE_HER_PATIENT
    killed = subprocess.run(
        [sys.executable, "-c", script, str(wh), str(batch), str(key_file), str(len(BY_IDENTIFIER))],
        capture_output=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    staged = _sealed(wh)
    assert len(staged) == len(BY_IDENTIFIER)
    assert _readable_naming(wh, key_provider, HER_MRN) == ["c-logical", "c-conditional"]

    pseudonym = Pseudonymizer(key_provider.pseudonym_key()).resource_key("Patient", "p7")
    audit = AuditLog.for_provider(tmp_path / "audit.log", key_provider)
    assert not forget_in_warehouse(wh, pseudonym, audit, "erasure request").found

    again = ingest_batch(wh, "b1", batch, key_provider, workers=1)
    assert again.quarantine_reasons == {ERASED_SUBJECT: len(BY_IDENTIFIER) + 1}
    assert again.accepted == again.no_longer_in_batch == 0
    assert _readable_naming(wh, key_provider, HER_MRN) == []
    assert _sealed(wh) == []
    assert _in_files(wh, staged) == []
    con = warehouse.connect(wh, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
        assert not warehouse.rewrite_owed(con)
    finally:
        con.close()

    later = _write(tmp_path / "b2", [{**BY_IDENTIFIER[0], "id": "c-later"}])
    report = ingest_batch(wh, "b2", later, key_provider, workers=1)
    assert report.quarantine_reasons == {ERASED_SUBJECT: 1}
    assert _readable_naming(wh, key_provider, HER_MRN) == []


def test_a_refused_record_holding_her_patient_is_quarantined_unstored(
    erased: Path, tmp_path: Path, key_provider: FileKeyProvider
) -> None:
    """An export sent again after her erasure, in which her Patient is inside a record that
    validation or the reader refuses: a Patient under a new id with a birth date written day
    first, the same inside Parameters, a lab result holding her contained, a Bundle whose
    ``entry`` is one object, and two indented documents in one file. Each was sealed in the
    quarantine under the shared key (or the new id's key), which no erasure destroys: her name
    and MRN back in the warehouse, readable."""
    hers = {**PATIENT, "id": "p1-new", "birthDate": "13/02/1970"}
    parameters = {"resourceType": "Parameters", "parameter": [{"name": "p", "resource": hers}]}
    lab = {"resourceType": "Observation", "id": "o1", "status": "final", "code": {"text": "x"}}
    lab |= {"subject": {"reference": "#c"}, "effectiveDateTime": "2024-13-01"}
    lab["contained"] = [{**PATIENT, "id": "c"}]
    entry = {"resourceType": "Bundle", "type": "collection", "entry": {"resource": PATIENT}}
    folder = _write(tmp_path / "b1", [hers, parameters, lab])
    (folder / "entry.json").write_text(json.dumps(entry))
    other = {"resourceType": "Basic", "id": "x", "code": {"text": "x"}}
    two = json.dumps({**PATIENT, "id": "p1-again"}, indent=2) + "\n" + json.dumps(other, indent=2)
    (folder / "two.json").write_text(two)
    report = ingest_batch(erased, "b1", folder, key_provider, workers=1)
    assert report.quarantine_reasons == {ERASED_SUBJECT: 5}
    con = warehouse.connect(erased, read_only=True)
    try:
        assert reconcile_batch(con, "b1").passed
        sealed = con.execute("SELECT sealed FROM quarantine WHERE batch_id = 'b1'").fetchall()
        assert sealed == [(b"",)] * 5
    finally:
        con.close()
