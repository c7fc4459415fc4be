from __future__ import annotations

import base64
import json
import stat
import time
from datetime import date
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from pipelines.cli import quarantine_list
from pipelines.cli.privacy import (
    ERASED_SUBJECT_REASON,
    REFUSED_REASON,
    audit,
    audit_log_for,
    forget,
    keys_rotate,
    reidentify,
)
from tests.vault.processes import hold_open
from vault import warehouse
from vault.ingest import ingest_batch, quarantine_counts, reconcile_batch
from vault.keys import EnvKeyProvider, FileKeyProvider
from vault.pseudonym import Pseudonymizer
from vault.read import read_resource

PATIENTS = [
    {"resourceType": "Patient", "id": "p7", "name": [{"family": "Zedwick", "given": ["Ola"]}]},
    {"resourceType": "Patient", "id": "p8", "name": [{"family": "Yarrow"}]},
    {"resourceType": "Patient", "id": "p9", "name": [{"family": "Xanthe"}]},
]


@pytest.fixture
def work(tmp_path: Path, key_file: Path) -> Path:
    land = tmp_path / "land"
    land.mkdir()
    for patient in PATIENTS:
        (land / f"{patient['id']}.json").write_text(json.dumps(patient))
    workdir = tmp_path / "work"
    ingest_batch(workdir / "warehouse.duckdb", "b", land, FileKeyProvider.load(key_file), workers=1)
    return workdir


def _pseudonym(key_file: Path, pid: str) -> str:
    provider = FileKeyProvider.load(key_file)
    return Pseudonymizer(provider.pseudonym_key()).resource_key("Patient", pid)


def test_privacy_commands_end_to_end(work: Path, key_file: Path) -> None:
    runner = CliRunner()
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p7, p8 = _pseudonym(key_file, "p7"), _pseudonym(key_file, "p8")

    found = runner.invoke(reidentify, [p7, "--reason", "ticket 1", *common])
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["name"][0]["family"] == "Zedwick"
    assert json.loads(found.stdout)["id"] == "p7"

    rotated = runner.invoke(keys_rotate, common)
    assert rotated.exit_code == 0, rotated.output
    assert "3 data keys re-wrapped in 1 warehouse(s)" in rotated.stdout  # three patients
    assert len(FileKeyProvider.load(key_file).live_kek_ids) == 1

    forgot = runner.invoke(forget, ["p7", "--reason", "erasure request", *common])
    assert forgot.exit_code == 0, forgot.output
    report = json.loads(forgot.stdout)
    assert report["pseudonym"] == p7 and report["data_keys_destroyed"] == 1
    assert report["rows_deleted"]["phi_vault"] == 1

    by_pseudonym = runner.invoke(
        forget, [p8, "--pseudonym", "--reason", "erasure request", *common]
    )
    assert by_pseudonym.exit_code == 0, by_pseudonym.output
    assert json.loads(by_pseudonym.stdout)["data_keys_destroyed"] == 1

    again = runner.invoke(reidentify, [p7, "--reason", "ticket 2", *common])
    assert again.exit_code == 1 and "erased" in again.output
    assert "Zedwick" not in again.output

    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        provider = FileKeyProvider.load(key_file)
        assert read_resource(con, provider, "Patient", "p7") is None
        assert read_resource(con, provider, "Patient", "p8") is None
        assert read_resource(con, provider, "Patient", "p9") == PATIENTS[2]
    finally:
        con.close()

    ok = runner.invoke(audit, ["verify", *common])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip() == "audit log ok: 10 entries"  # an intent and a completion each

    shown = runner.invoke(audit, ["show", *common])
    assert shown.exit_code == 0, shown.output
    entries = [json.loads(line) for line in shown.stdout.splitlines()]
    assert [e["action"] for e in entries][::2] == [
        "reidentify",
        "rotate_keys",
        "forget",
        "forget",
        "reidentify",
    ]
    assert [e["details"]["phase"] for e in entries] == ["intent", "done"] * 5
    for name in ("Zedwick", "Yarrow", '"p7"', '"p8"'):
        assert name not in shown.stdout  # pseudonyms, key ids and counts only

    log = work / "audit" / "audit.log"
    log.write_text(log.read_text().replace("ticket 1", "ticket 0"))
    bad = runner.invoke(audit, ["verify", *common])
    assert bad.exit_code == 1
    assert "entry 0: mac mismatch (edited)" in bad.output
    assert "audit log ok" not in bad.output


def test_truncating_the_log_fails_verification(work: Path, key_file: Path) -> None:
    runner = CliRunner()
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    for pid in ("p7", "p8"):
        result = runner.invoke(
            reidentify, [_pseudonym(key_file, pid), "--reason", "audit drill", *common]
        )
        assert result.exit_code == 0, result.output
    log = work / "audit" / "audit.log"
    log.write_text(log.read_text().splitlines(keepends=True)[0])
    bad = runner.invoke(audit, ["verify", *common])
    assert bad.exit_code == 1
    # intent and completion of two re-identifications: 4 entries, cut to the first
    assert "head anchor: log ends at seq 0, anchor says 3 (truncated)" in bad.output
    assert "outside anchor: log ends at seq 0, anchor says 3 (truncated)" in bad.output


def test_arguments_and_refusals(
    work: Path, key_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p9 = _pseudonym(key_file, "p9")

    no_reason = runner.invoke(reidentify, [p9, *common])
    assert no_reason.exit_code == 2 and "--reason" in no_reason.output
    blank = runner.invoke(reidentify, [p9, "--reason", " ", *common])
    assert blank.exit_code == 1 and "reason" in blank.output
    not_pseudonym = runner.invoke(forget, ["p9", "--pseudonym", "--reason", "x", *common])
    assert not_pseudonym.exit_code == 1 and "lowercase hex" in not_pseudonym.output
    missing = runner.invoke(reidentify, [p9, "--reason", "x", "--workdir", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "no warehouse" in missing.output
    assert not (tmp_path / "none" / "warehouse.duckdb").exists()
    unknown = runner.invoke(forget, ["nobody", "--reason", "request", *common])
    assert unknown.exit_code == 0 and "nothing of this patient was found" in unknown.output

    monkeypatch.setenv("EHR_KEK", base64.b64encode(b"k" * 32).decode())
    monkeypatch.setenv("EHR_PSEUDONYM_KEY", base64.b64encode(b"p" * 32).decode())
    env_rotation = runner.invoke(keys_rotate, common)
    assert env_rotation.exit_code == 1 and "rotated by its owner" in env_rotation.output

    # nothing above disclosed anything, and every act that happened is in the log
    provider = FileKeyProvider.load(key_file)
    entries = audit_log_for(work, provider).entries()
    assert [(e["action"], e["details"].get("found")) for e in entries] == [
        ("forget", None),
        ("forget", False),
    ]


def test_deleting_or_rolling_back_the_log_is_detected_by_the_outside_anchor(
    work: Path, key_file: Path
) -> None:
    runner = CliRunner()
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p7 = _pseudonym(key_file, "p7")
    assert runner.invoke(reidentify, [p7, "--reason", "ticket 1", *common]).exit_code == 0
    audit_dir = work / "audit"
    saved = {p.name: p.read_bytes() for p in audit_dir.iterdir()}
    assert runner.invoke(reidentify, [p7, "--reason", "ticket 2", *common]).exit_code == 0
    anchors = list((key_file.parent / "audit-anchors").glob("wh-*.json"))
    assert len(anchors) == 1  # held with the keys, named by the warehouse id

    for name, data in saved.items():  # an older copy of the log and its head restored
        (audit_dir / name).write_bytes(data)
    rolled_back = runner.invoke(audit, ["verify", *common])
    assert rolled_back.exit_code == 1
    assert "outside anchor: log ends at seq 1, anchor says 3 (truncated)" in rolled_back.output

    for path in audit_dir.iterdir():  # the log and its head deleted
        path.unlink()
    deleted = runner.invoke(audit, ["verify", *common])
    assert deleted.exit_code == 1
    assert "first problem: outside anchor: log is empty, anchor says 3" in deleted.output
    refused = runner.invoke(reidentify, [p7, "--reason", "ticket 3", *common])
    assert refused.exit_code == 1 and "Zedwick" not in refused.output


def _file_bytes(work: Path) -> bytes:
    return b"".join(p.read_bytes() for p in work.glob("warehouse.duckdb*") if p.is_file())


def test_no_data_key_wrapped_under_the_retired_kek_stays_in_the_file(
    work: Path, key_file: Path
) -> None:
    """A rotation re-wraps the data keys in place: DuckDB keeps the freed pages, which held
    every key wrapped under the KEK it retired, in the file. Whoever holds that KEK (the reason
    to rotate it) unwrapped them there, and with them every record, even after `ehr keys
    purge-retired`. The file is now rewritten after the re-wrap."""
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        old = [bytes(w) for (w,) in con.execute("SELECT wrapped FROM data_keys").fetchall()]
    finally:
        con.close()
    assert len(old) == 3 and all(blob in _file_bytes(work) for blob in old)
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    rotated = CliRunner().invoke(keys_rotate, common)
    assert rotated.exit_code == 0, rotated.output
    raw = _file_bytes(work)
    assert sum(blob in raw for blob in old) == 0  # (counted: a failure names no blob)
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        assert not warehouse.rewrite_owed(con)
    finally:
        con.close()
    provider = FileKeyProvider.load(key_file)  # every record still opens, under the new KEK
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        assert read_resource(con, provider, "Patient", "p9")["name"][0]["family"] == "Xanthe"
    finally:
        con.close()


def test_with_environment_keys_the_log_is_anchored_in_ehr_audit_anchor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warehouse written with environment keys gets its id too, so its audit log is
    anchored in ``EHR_AUDIT_ANCHOR``: before, it had no id (ids were given only on
    registering with a keyring), no anchor was written anywhere, and the log and its side
    file deleted verified as a log with no entry."""
    keys = {name: base64.b64encode(bytes([i + 1]) * 32).decode() for i, name in enumerate(
        ("EHR_KEK", "EHR_PSEUDONYM_KEY", "EHR_AUDIT_KEY"))}  # fmt: skip
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("EHR_KEY_FILE", raising=False)
    monkeypatch.setenv("EHR_AUDIT_ANCHOR", str(tmp_path / "anchors"))
    land = tmp_path / "land"
    land.mkdir()
    (land / "p7.json").write_text(json.dumps(PATIENTS[0]))
    work = tmp_path / "work"
    ingest_batch(work / "warehouse.duckdb", "b", land, EnvKeyProvider.from_environ(), workers=1)
    p7 = Pseudonymizer(base64.b64decode(keys["EHR_PSEUDONYM_KEY"])).resource_key("Patient", "p7")
    runner = CliRunner()
    for ticket in ("ticket 1", "ticket 2"):
        done = runner.invoke(reidentify, [p7, "--reason", ticket, "--workdir", str(work)])
        assert done.exit_code == 0, done.output
    assert len(list((tmp_path / "anchors").glob("wh-*.json"))) == 1
    for path in (work / "audit").iterdir():  # the log and its head deleted
        path.unlink()
    deleted = runner.invoke(audit, ["verify", "--workdir", str(work)])
    assert deleted.exit_code == 1, deleted.output
    assert "outside anchor: log is empty, anchor says 3" in deleted.output


def test_an_interrupted_act_is_reported_until_it_is_run_again(work: Path, key_file: Path) -> None:
    runner = CliRunner()
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p8 = _pseudonym(key_file, "p8")
    provider = FileKeyProvider.load(key_file)
    audit_log_for(work, provider).intend("forget", p8, "erasure request")  # then a crash
    pending = runner.invoke(audit, ["verify", *common])
    assert pending.exit_code == 2
    assert f"forget of {p8} was announced but never completed" in pending.output
    again = runner.invoke(forget, [p8, "--pseudonym", "--reason", "erasure request", *common])
    assert again.exit_code == 0, again.output
    ok = runner.invoke(audit, ["verify", *common])
    assert ok.exit_code == 0 and "audit log ok: 3 entries" in ok.stdout


def test_a_warehouse_in_use_is_refused_with_a_clear_message(
    work: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held open by another process for longer than an erasure waits (shortened here)."""
    import subprocess
    import sys

    monkeypatch.setattr(warehouse, "BUSY_WAIT_SECONDS", 0.5)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
            "print('ok', flush=True); time.sleep(60)",
            str(work / "warehouse.duckdb"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        common = ["--workdir", str(work), "--key-file", str(key_file)]
        result = CliRunner().invoke(forget, ["p7", "--reason", "erasure request", *common])
        assert result.exit_code == 1
        assert "in use by another process" in result.output
    finally:
        holder.kill()
        holder.wait()


def test_forget_under_another_pseudonym_key_is_refused(
    work: Path, key_file: Path, tmp_path: Path
) -> None:
    """Under another pseudonym key the id would name nobody: the erasure would report nothing
    found and leave a tombstone that keeps no one out. The command refuses and writes nothing."""
    document = json.loads(key_file.read_text())
    document["pseudonym_key"] = base64.b64encode(bytes(32)).decode()
    other = tmp_path / "other-keyring.json"
    other.write_text(json.dumps(document))
    other.chmod(0o600)
    refused = CliRunner().invoke(
        forget, ["p9", "--reason", "request", "--workdir", str(work), "--key-file", str(other)]
    )
    assert refused.exit_code == 1, refused.output
    assert "is not the one this warehouse was built with" in refused.output
    assert document["pseudonym_key"] not in refused.output
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM erased_subjects").fetchall() == [(0,)]
        assert read_resource(con, FileKeyProvider.load(key_file), "Patient", "p9") == PATIENTS[2]
    finally:
        con.close()


@pytest.mark.parametrize(
    ("command", "reason", "kinds"),
    [
        ("forget-by-id", "request from Ola Zedwick", "full_name, name"),
        ("forget-by-id", "p7 asked by mail", "id"),  # the id typed on the command line
        ("forget-by-pseudonym", "zedwick asked", "name"),
        ("reidentify", "check Zedwick's record", "name"),
        ("reidentify", "p7", "id"),  # the Patient's own id, read from the vault
    ],
)
def test_a_reason_naming_the_patient_is_refused_and_the_refusal_audited_without_it(
    work: Path, key_file: Path, command: str, reason: str, kinds: str
) -> None:
    """The audit log keeps every reason as written, for good: an erased patient's name in it
    would outlive the erasure. Nothing is shown or erased, and the reason is not kept: the
    refusal is audited by the kinds it found; a reference is accepted."""
    runner = CliRunner()
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p7 = _pseudonym(key_file, "p7")
    args = {
        "forget-by-id": (forget, ["p7"]),
        "forget-by-pseudonym": (forget, [p7, "--pseudonym"]),
        "reidentify": (reidentify, [p7]),
    }
    cmd, target = args[command]
    log = work / "audit" / "audit.log"
    before = log.read_bytes() if log.exists() else b""

    refused = runner.invoke(cmd, [*target, "--reason", reason, *common])
    assert refused.exit_code == 1
    assert f"the reason names the patient ({kinds})" in refused.output
    for phi in ("Zedwick", "Ola", '"p7"'):
        assert phi not in refused.output
    written = log.read_bytes()
    assert written.startswith(before) and reason.encode() not in written
    (entry,) = audit_log_for(work, FileKeyProvider.load(key_file)).entries()
    assert (entry["subject"], entry["reason"]) == (p7, REFUSED_REASON)
    assert entry["details"] == {"outcome": "reason_refused", "names": kinds.split(", ")}
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        assert read_resource(con, FileKeyProvider.load(key_file), "Patient", "p7") == PATIENTS[0]
    finally:
        con.close()

    accepted = runner.invoke(cmd, [*target, "--reason", "ticket 4711", *common])
    assert accepted.exit_code == 0, accepted.output
    reasons = [e["reason"] for e in audit_log_for(work, FileKeyProvider.load(key_file)).entries()]
    assert reasons[0] == REFUSED_REASON and set(reasons[1:]) == {"ticket 4711"}


@pytest.mark.parametrize("command", ["reidentify", "forget-by-pseudonym", "forget-by-id"])
def test_a_reason_about_an_erased_patient_is_withheld_from_the_audit_log(
    work: Path, key_file: Path, command: str
) -> None:
    """Once erased, nothing in the warehouse names the patient (their Patient versions went
    with their data key), so a reason can no longer be checked against them: a look-up of the
    erased pseudonym, or an erasure run again (to finish a rewrite), is audited with the reason
    withheld, whatever it says, where it wrote a reason holding their full name beside their
    pseudonym, for good. The erasure's own entries keep the reason it was given."""
    runner = CliRunner()
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p7 = _pseudonym(key_file, "p7")
    erased = runner.invoke(forget, ["p7", "--reason", "ticket 1", "--no-release", *common])
    assert erased.exit_code == 0, erased.output
    cmd, target = {
        "reidentify": (reidentify, [p7]),
        "forget-by-pseudonym": (forget, [p7, "--pseudonym", "--no-release"]),
        "forget-by-id": (forget, ["p7", "--no-release"]),
    }[command]
    log = work / "audit" / "audit.log"
    before = len(audit_log_for(work, FileKeyProvider.load(key_file)).entries())

    for reason in ("request from Ola Zedwick", "ticket 4712"):
        done = runner.invoke(cmd, [*target, "--reason", reason, *common])
        assert "the patient is erased" in done.output
        # a look-up is audited, then refused: the key that opened the patient's rows is gone
        if command == "reidentify":
            assert done.exit_code == 1 and "was erased" in done.output
        else:
            assert done.exit_code == 0, done.output

    assert b"Zedwick" not in log.read_bytes() and b"4712" not in log.read_bytes()
    entries = audit_log_for(work, FileKeyProvider.load(key_file)).entries()
    assert {e["reason"] for e in entries[:before]} == {"ticket 1"}
    later = entries[before:]
    assert later and {e["subject"] for e in later} == {p7}
    assert {e["reason"] for e in later} == {ERASED_SUBJECT_REASON}


def test_a_reason_is_not_checked_against_the_patient_when_the_log_cannot_be_written(
    work: Path, key_file: Path
) -> None:
    """Refused or not, the answer is the audit log's error: before, a log made unwritable (a
    byte without its newline, removed afterwards) turned the reason check into a look-up that
    left no entry (`the reason names the patient (full_name, name)` confirmed a guessed name),
    one guess or many at a time."""
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p7 = _pseudonym(key_file, "p7")
    runner = CliRunner()
    assert runner.invoke(reidentify, [p7, "--reason", "ticket 1", *common]).exit_code == 0
    log = work / "audit" / "audit.log"
    with log.open("a", encoding="utf-8") as handle:
        handle.write("x")
    answers = set()
    for cmd, target in ((reidentify, [p7]), (forget, ["p7"])):
        for guess in ("Ola Zedwick", "Ann Smith"):
            result = runner.invoke(cmd, [*target, "--reason", guess, *common])
            assert result.exit_code == 1
            answers.add(result.output)
    assert answers == {
        "Error: audit log ends with an incomplete line; run `ehr audit verify` before writing\n"
    }


def _quarantined_texts(work: Path, key_file: Path) -> list[str]:
    """Every quarantined record of no patient, decrypted here (the shared key)."""
    from vault.sealing import SHARED_OWNER, DataKeyStore

    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        store = DataKeyStore(con, FileKeyProvider.load(key_file))
        rows = con.execute(
            "SELECT sealed, aad FROM quarantine WHERE patient_key IS NULL "
            "AND octet_length(sealed) > 0"  # an erased subject's records: nothing sealed
        )
        return [
            store.open_owned(bytes(s), bytes(a), SHARED_OWNER).decode() for s, a in rows.fetchall()
        ]
    finally:
        con.close()


def test_forget_erases_the_unreadable_records_that_name_the_patient(
    work: Path, key_file: Path, tmp_path: Path
) -> None:
    """A record cut short is no resource: it is quarantined under the shared key, which no
    erasure destroys. One naming the patient is erased with them; another patient's stays."""
    land = tmp_path / "land2"
    land.mkdir()
    cut_short = [
        '{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p7"},"note":',
        '{"resourceType":"Communication","payload":[{"contentString":"Ola Zedwick called',
        '{"resourceType":"Observation","id":"o9","subject":{"reference":"Patient/p9"},"note":',
    ]
    (land / "cut.ndjson").write_text("\n".join(cut_short) + "\n")
    ingest_batch(work / "warehouse.duckdb", "b2", land, FileKeyProvider.load(key_file), workers=1)
    before = _quarantined_texts(work, key_file)
    assert len(before) == 3 and sum("p7" in t or "Zedwick" in t for t in before) == 2

    common = ["--workdir", str(work), "--key-file", str(key_file)]
    forgot = CliRunner().invoke(forget, ["p7", "--reason", "ticket 4711", *common])
    assert forgot.exit_code == 0, forgot.output
    after = _quarantined_texts(work, key_file)
    assert after == [cut_short[2]]  # p9's record, untouched
    assert json.loads(forgot.stdout)["rows_deleted"]["quarantine_unattributed"] == 2
    assert "Zedwick" not in forgot.output

    # p7 sent again: its records are quarantined as an erased subject's, with no patient and
    # nothing sealed; the next erasure reads past them and finds p9's own record
    ingest_batch(
        work / "warehouse.duckdb",
        "b3",
        land.parent / "land",
        FileKeyProvider.load(key_file),
        workers=1,
    )
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        erased = con.execute(
            "SELECT count(*) FROM quarantine WHERE reason_code = 'erased_subject' "
            "AND patient_key IS NULL AND octet_length(sealed) = 0"
        ).fetchall()
    finally:
        con.close()
    assert erased == [(1,)]
    next_one = CliRunner().invoke(forget, ["p9", "--reason", "ticket 4712", *common])
    assert next_one.exit_code == 0, next_one.output
    assert json.loads(next_one.stdout)["rows_deleted"]["quarantine_unattributed"] == 1
    assert _quarantined_texts(work, key_file) == []


def test_forget_erases_an_unreadable_record_in_utf16_that_names_the_patient(
    work: Path, key_file: Path, tmp_path: Path
) -> None:
    """A file in UTF-16 (as PowerShell's Out-File writes it) is refused whole, one record of no
    patient: read as UTF-8, its text held no identifier of the patient, and the record naming
    them stayed after the erasure."""
    land = tmp_path / "land2"
    land.mkdir()
    line = '{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p7"}}\n'
    (land / "wide.ndjson").write_bytes(line.encode("utf-16"))
    ingest_batch(work / "warehouse.duckdb", "b2", land, FileKeyProvider.load(key_file), workers=1)
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    forgot = CliRunner().invoke(forget, ["p7", "--reason", "ticket 4711", *common])
    assert forgot.exit_code == 0, forgot.output
    assert json.loads(forgot.stdout)["rows_deleted"]["quarantine_unattributed"] == 1


def test_a_name_the_patient_had_before_still_names_them(
    work: Path, key_file: Path, tmp_path: Path
) -> None:
    """p7 married: a later export sends her Patient resource with a new name. The name she had
    is in the vault's earlier version, in a record cut short, and in an operator's reason: it
    is refused in the reason and erased with her."""
    land = tmp_path / "land2"
    land.mkdir()
    married = {**PATIENTS[0], "meta": {"versionId": "2"}}
    married["name"] = [{"family": "Brightwater", "given": ["Ola"]}]
    (land / "p7.json").write_text(json.dumps(married))
    cut_short = '{"resourceType":"Communication","payload":[{"contentString":"Mrs Zedwick rang'
    (land / "cut.ndjson").write_text(cut_short + "\n")
    provider = FileKeyProvider.load(key_file)
    ingest_batch(work / "warehouse.duckdb", "b2", land, provider, workers=1)
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:  # the current version is the married name: the old one is only in the earlier version
        assert read_resource(con, provider, "Patient", "p7") == married
    finally:
        con.close()
    assert _quarantined_texts(work, key_file) == [cut_short]

    common = ["--workdir", str(work), "--key-file", str(key_file)]
    refused = CliRunner().invoke(forget, ["p7", "--reason", "from Ola Zedwick", *common])
    assert refused.exit_code == 1
    assert "the reason names the patient (full_name, name)" in refused.output
    forgot = CliRunner().invoke(forget, ["p7", "--reason", "ticket 4711", *common])
    assert forgot.exit_code == 0, forgot.output
    assert json.loads(forgot.stdout)["rows_deleted"]["quarantine_unattributed"] == 1
    assert _quarantined_texts(work, key_file) == []


def test_a_reason_holding_the_birth_date_written_day_first_or_with_a_short_year_is_refused(
    tmp_path: Path, key_file: Path
) -> None:
    """The birth date (7 March 1946: day and month both under 13) written here by strftime day
    first, year first with dots, and with a two-digit year: each is refused by `ehr reidentify`
    before anything is written; the same day and month of another year are a date, not hers."""
    born = date(1946, 3, 7)
    land = tmp_path / "land"
    land.mkdir()
    patient = {"resourceType": "Patient", "id": "p5", "birthDate": born.isoformat()}
    (land / "p5.json").write_text(json.dumps(patient))
    work = tmp_path / "work"
    ingest_batch(work / "warehouse.duckdb", "b", land, FileKeyProvider.load(key_file), workers=1)
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p5 = _pseudonym(key_file, "p5")
    runner = CliRunner()
    log = work / "audit" / "audit.log"
    for form in (
        born.strftime("%d/%m/%Y"),
        born.strftime("%d-%m-%Y"),
        born.strftime("%d.%m.%Y"),
        born.strftime("%Y.%m.%d"),
        f"{born.day}/{born.month}/{born:%Y}",  # 7/3/1946
        f"{born.month}/{born.day}/{born:%y}",  # 3/7/46
        born.strftime("%m/%d/%y"),
        born.strftime("%d/%m/%y"),
    ):
        refused = runner.invoke(reidentify, [p5, "--reason", f"REQ-40 {form}", *common])
        assert refused.exit_code == 1, form
        assert "the reason names the patient (birth_date)" in refused.output, form
    for reason in ("REQ-2024-0317", f"ticket 4471 of {born.replace(year=1947):%d/%m/%Y}"):
        accepted = runner.invoke(reidentify, [p5, "--reason", reason, *common])
        assert accepted.exit_code == 0, accepted.output
    reasons = [e["reason"] for e in audit_log_for(work, FileKeyProvider.load(key_file)).entries()]
    assert set(reasons) == {REFUSED_REASON, "REQ-2024-0317", "ticket 4471 of 07/03/1947"}
    written = log.read_text(encoding="utf-8")  # reasons as written
    assert "REQ-2024-0317" in written and "REQ-40" not in written


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o660], ids=lambda m: f"{m:04o}")
def test_a_keyring_others_may_read_is_refused_and_nothing_is_written(
    work: Path, key_file: Path, mode: int
) -> None:
    """`ehr reidentify`, `ehr forget` and `ehr keys rotate` with a keyring its group or others
    may read: refused, naming the path, its mode and the chmod; the warehouse, the audit log
    and the keyring are left as they were. After `chmod 600` the same command runs."""
    runner = CliRunner()
    common = ["--workdir", str(work), "--key-file", str(key_file)]
    p7 = _pseudonym(key_file, "p7")
    key_file.chmod(mode)
    files = [work / "warehouse.duckdb", work / "audit" / "audit.log", key_file]
    before = {path: path.read_bytes() if path.exists() else None for path in files}
    for cmd, args in (
        (reidentify, [p7, "--reason", "ticket 1"]),
        (forget, [p7, "--pseudonym", "--reason", "ticket 2"]),
        (keys_rotate, []),
    ):
        refused = runner.invoke(cmd, [*args, *common])
        assert refused.exit_code == 1, refused.output
        assert f"key file {key_file} has mode {mode:04o}" in refused.output
        assert f"chmod 600 {key_file}" in refused.output
        assert "Zedwick" not in refused.output
    assert {path: path.read_bytes() if path.exists() else None for path in files} == before
    assert stat.S_IMODE(key_file.stat().st_mode) == mode
    key_file.chmod(0o600)
    found = runner.invoke(reidentify, [p7, "--reason", "ticket 3", *common])
    assert found.exit_code == 0, found.output


def test_an_erasure_waits_while_another_process_has_the_warehouse_open(
    work: Path, key_file: Path
) -> None:
    """A run (or another erasure) holding the warehouse for a moment: the erasure waits for it,
    then erases, rather than refusing."""
    holder = hold_open(work / "warehouse.duckdb", 2)
    try:
        common = ["--workdir", str(work), "--key-file", str(key_file)]
        started = time.monotonic()
        result = CliRunner().invoke(
            forget, ["p7", "--reason", "erasure request", "--no-release", *common]
        )
        assert result.exit_code == 0, result.output
        assert time.monotonic() - started >= 1.0
        assert json.loads(result.stdout)["data_keys_destroyed"] >= 1
    finally:
        holder.wait(timeout=30)


def test_the_identifiers_of_a_patient_only_quarantined_keep_them_out_once_erased(
    work: Path, key_file: Path, tmp_path: Path
) -> None:
    """A Patient refused for a schema violation is quarantined under its own key and is in no
    vault row: its identifiers are still the person's, so the erasure tombstones them, and the
    corrected Patient sent again under a new id with the same MRN is refused as hers."""
    mrn = [{"system": "urn:mrn", "value": "Q-77"}]
    invalid = {"resourceType": "Patient", "id": "pq", "identifier": mrn, "telecom": []}
    first, again = tmp_path / "land-q", tmp_path / "land-q2"
    first.mkdir()
    again.mkdir()
    (first / "pq.json").write_text(json.dumps(invalid))
    corrected = {"resourceType": "Patient", "id": "pq-new", "identifier": mrn}
    (again / "pq.json").write_text(json.dumps(corrected))
    provider = FileKeyProvider.load(key_file)
    report = ingest_batch(work / "warehouse.duckdb", "bq", first, provider, workers=1)
    assert report.quarantine_reasons == {"schema_violation": 1}

    common = ["--workdir", str(work), "--key-file", str(key_file), "--no-release"]
    forgot = CliRunner().invoke(forget, ["pq", "--reason", "ticket 4720", *common])
    assert forgot.exit_code == 0, forgot.output
    assert json.loads(forgot.stdout)["rows_deleted"]["quarantine"] == 1
    report = ingest_batch(work / "warehouse.duckdb", "bq2", again, provider, workers=1)
    assert (report.accepted, report.quarantine_reasons) == (0, {"erased_subject": 1})


def test_quarantine_list_says_how_many_it_does_not_show(tmp_path: Path, key_file: Path) -> None:
    """``ehr quarantine list`` showed its first 50 records and nothing more, with no word that
    there were others; the records themselves stay one JSON object a line on standard output."""
    land = tmp_path / "land"
    land.mkdir()
    bad = [b"not json", b'{"resourceType": "Nothing"}', b'{"resourceType": "Patient", "id": 7}']
    (land / "bad.ndjson").write_bytes(b"\n".join(bad) + b"\n")
    work = tmp_path / "work"
    ingest_batch(work / "warehouse.duckdb", "b", land, FileKeyProvider.load(key_file), workers=1)
    runner = CliRunner()
    some = runner.invoke(quarantine_list, ["--workdir", str(work), "--limit", "2"])
    assert some.exit_code == 0, some.output
    assert [json.loads(line)["position"] for line in some.stdout.splitlines()] == [1, 2]
    assert some.stderr.strip() == "2 of 3 quarantined records shown; --limit 3 shows them all"
    every = runner.invoke(quarantine_list, ["--workdir", str(work)])
    assert len(every.stdout.splitlines()) == 3 and every.stderr == ""


@pytest.mark.parametrize(
    ("command", "args", "hint"),
    [
        (reidentify, [], "ehr features entities lists the released patients' pseudonyms"),
        (forget, ["--pseudonym", "--no-release"], "without --pseudonym, PATIENT is an original"),
    ],
)
def test_a_malformed_pseudonym_is_named_in_the_commands_terms(
    work: Path, key_file: Path, command: click.Command, args: list[str], hint: str
) -> None:
    """A value that is no pseudonym was refused with a hint to call forget_patient, a Python
    function, from either command (and ``ehr reidentify`` takes no original id at all); the
    value itself is never repeated."""
    common = ["--workdir", str(work), "--key-file", str(key_file), "--reason", "ticket 5"]
    result = CliRunner().invoke(command, ["Zedwick-p7", *args, *common])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "a patient pseudonym is 32 lowercase hex characters" in result.output
    assert hint in result.output
    assert "forget_patient" not in result.output and "Zedwick" not in result.output


@pytest.mark.parametrize("inside", ["build/keys", "pipelines"])
def test_keys_init_refuses_a_key_file_inside_the_repository(inside: str) -> None:
    """The check compared the key file with the ``pipelines`` package's folder, so a keyring
    made in the repository's ``data/`` or ``build/`` (beside the code, and copied with it) was
    created; any folder of the repository is refused, before anything is written."""
    from pipelines.cli import keys_init

    root = Path(__file__).resolve().parents[2]
    target = root / inside / "refused-keyring.json"
    made = [folder for folder in target.parents if not folder.exists()]
    try:
        result = CliRunner().invoke(keys_init, ["--key-file", str(target)])
        assert result.exit_code == 2, result.output
        assert "key material must live outside the repository" in result.output
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)
        target.with_name(target.name + ".lock").unlink(missing_ok=True)
        for folder in made:  # deepest first
            if folder.exists():
                folder.rmdir()


def test_quarantine_list_refuses_a_negative_limit(tmp_path: Path, key_file: Path) -> None:
    """``--limit -1`` reached DuckDB and ended in its traceback (LIMIT cannot be negative)."""
    land = tmp_path / "land"
    land.mkdir()
    (land / "bad.ndjson").write_bytes(b"not json\n")
    work = tmp_path / "work"
    ingest_batch(work / "warehouse.duckdb", "b", land, FileKeyProvider.load(key_file), workers=1)
    result = CliRunner().invoke(quarantine_list, ["--workdir", str(work), "--limit", "-1"])
    assert result.exit_code == 2, result.output  # click's usage error, naming the option
    assert "Invalid value for '--limit'" in result.output


def test_quarantine_list_names_a_missing_warehouse(tmp_path: Path) -> None:
    """A work directory with no warehouse (a mistyped --workdir) ended in DuckDB's traceback;
    it is named, as the other commands that read the warehouse name it, and nothing is
    created there."""
    result = CliRunner().invoke(quarantine_list, ["--workdir", str(tmp_path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert f"no warehouse at {tmp_path / 'warehouse.duckdb'}" in result.output
    assert not (tmp_path / "warehouse.duckdb").exists()


def test_quarantine_list_says_when_the_warehouse_is_in_use(tmp_path: Path, key_file: Path) -> None:
    land = tmp_path / "land"
    land.mkdir()
    (land / "bad.ndjson").write_bytes(b"not json\n")
    work = tmp_path / "work"
    ingest_batch(work / "warehouse.duckdb", "b", land, FileKeyProvider.load(key_file), workers=1)
    holder = hold_open(work / "warehouse.duckdb", 60)
    try:
        result = CliRunner().invoke(quarantine_list, ["--workdir", str(work)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "in use by another process" in result.output


def test_an_erasure_keeps_a_batchs_quarantined_records_in_its_quarantine_rate(
    work: Path, key_file: Path, tmp_path: Path
) -> None:
    """The quarantine rate check warns while a batch rejected too many records; erasing the
    patient of a rejected record took it out of the count (its ledger row became 'erased'),
    which lowered the rate and could clear the warning with the batch still as it was."""
    land = tmp_path / "land-r"
    land.mkdir()
    valid = {"resourceType": "Patient", "id": "p-ok", "gender": "male"}
    invalid = {"resourceType": "Patient", "id": "pq", "telecom": []}  # empty array: refused
    (land / "p.ndjson").write_text(f"{json.dumps(valid)}\n{json.dumps(invalid)}\n")
    provider = FileKeyProvider.load(key_file)
    report = ingest_batch(work / "warehouse.duckdb", "br", land, provider, workers=1)
    assert (report.accepted, report.quarantine_reasons) == (1, {"schema_violation": 1})
    with warehouse.connect(work / "warehouse.duckdb") as con:
        assert quarantine_counts(con)["br"] == (2, 1)

    common = ["--workdir", str(work), "--key-file", str(key_file), "--no-release"]
    forgot = CliRunner().invoke(forget, ["pq", "--reason", "ticket 4721", *common])
    assert forgot.exit_code == 0, forgot.output
    with warehouse.connect(work / "warehouse.duckdb") as con:
        # two records read, one of them rejected: as many as before the erasure
        assert quarantine_counts(con)["br"] == (2, 1)
        statuses = con.execute(
            "SELECT status, count(*) FROM record_ledger WHERE batch_id = 'br' GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert statuses == [("accepted", 1), ("erased", 1)]  # the erased record holds nothing
        assert reconcile_batch(con, "br").passed


def test_a_batch_key_naming_the_erased_person_is_still_flagged_after_the_erasure(
    tmp_path: Path, key_file: Path
) -> None:
    """A landing folder named after the patient gives her name as its batch key, which the
    warehouse's batch tables, run_summary.json and Dagster keep. Once she is erased nothing in
    the vault names her, so no release could find the key any more: the erasure, the last
    step that knows her names, says which keys hold them and records it for every release's
    batch key check."""
    from deid.leakscan import CanarySet
    from deid.policy import Policy
    from deid.release import release_batch_key_hits
    from deid.staging import publish_batch

    land = tmp_path / "land"
    land.mkdir()
    for patient in PATIENTS:
        (land / f"{patient['id']}.json").write_text(json.dumps(patient))
    work = tmp_path / "work"
    provider = FileKeyProvider.load(key_file)
    key = "Ola-Zedwick-5f0c2a91d3"  # the key of a folder named "Ola Zedwick"
    ingest_batch(work / "warehouse.duckdb", key, land, provider, workers=1)
    ingest_batch(work / "warehouse.duckdb", "2024-05-01", land, provider, workers=1)
    common = ["--workdir", str(work), "--key-file", str(key_file)]

    forgot = CliRunner().invoke(forget, ["p7", "--reason", "ticket 12", "--no-release", *common])

    assert forgot.exit_code == 0, forgot.output
    assert key in forgot.stderr and "full_name" in forgot.stderr
    assert "2024-05-01" not in forgot.stderr
    assert json.loads(forgot.stdout)["batch_keys_naming_the_person"] == 1
    con = warehouse.connect(work / "warehouse.duckdb", read_only=True)
    try:
        # an empty canary set: the vault no longer names her, the record does
        flagged = release_batch_key_hits(con, CanarySet())
    finally:
        con.close()
    assert list(flagged) == [key] and "full_name" in flagged[key]

    # the batch's own check, when it is de-identified again, says so too
    con = warehouse.connect(work / "warehouse.duckdb")
    try:
        released = publish_batch(con, provider, key, Policy.shipped("research"))
        other = publish_batch(con, provider, "2024-05-01", Policy.shipped("research"))
    finally:
        con.close()
    assert "full_name" in released.batch_key_hits and other.batch_key_hits == ()


def test_records_of_no_patient_naming_her_as_their_exporter_wrote_them_are_erased(
    tmp_path: Path, key_file: Path
) -> None:
    """Her surname has a letter outside ASCII. Lines that name her reach the quarantine under
    no patient: one from an export in Windows-1252 (no UTF-8), one in UTF-8 with her name
    escaped as JSON writes it (``\\u00eb``) and cut short. Searched as UTF-8 with replacement
    characters and as raw text, neither named her, and both stayed after her erasure; a line
    naming someone else stays."""
    land = tmp_path / "land"
    land.mkdir()
    patient = {"resourceType": "Patient", "id": "p4", "name": [{"family": "Brontëwald"}]}
    (land / "p4.json").write_text(json.dumps(patient, ensure_ascii=False), encoding="utf-8")
    legacy = '{"resourceType":"Communication","payload":[{"contentString":"Mrs Brontëwald rang"'
    escaped = json.dumps({"resourceType": "Flag", "code": {"text": "Brontëwald, Mrs"}})[:-1]
    other = '{"resourceType":"Communication","payload":[{"contentString":"Mr Quillon rang"'
    (land / "cut.ndjson").write_bytes(
        b"\n".join([legacy.encode("cp1252"), escaped.encode(), other.encode()]) + b"\n"
    )
    assert "\\u00eb" in escaped
    work = tmp_path / "work"
    provider = FileKeyProvider.load(key_file)
    report = ingest_batch(work / "warehouse.duckdb", "b", land, provider, workers=1)
    assert (report.accepted, sum(report.quarantine_reasons.values())) == (1, 3)

    common = ["--workdir", str(work), "--key-file", str(key_file)]
    forgot = CliRunner().invoke(forget, ["p4", "--reason", "ticket 4713", *common])
    assert forgot.exit_code == 0, forgot.output
    assert json.loads(forgot.stdout)["rows_deleted"]["quarantine_unattributed"] == 2
    assert _quarantined_texts(work, key_file) == [other]
