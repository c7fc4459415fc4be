from __future__ import annotations

import errno
import gc
import hashlib
import hmac
import json
import multiprocessing
import os
import shutil
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vault.audit import GENESIS, AuditLog, audit_key, default_actor
from vault.errors import AuditLogError, VaultError
from vault.keys import FileKeyProvider, migrate_audit_key, write_keyring

KEY = b"a" * 32


class FixedClock:
    """2026-01-01T00:00:00Z, one second later on every call."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        current = self.now
        self.now += timedelta(seconds=1)
        return current


def make_log(folder: Path, key: bytes = KEY) -> AuditLog:
    return AuditLog(folder / "audit.log", key, clock=FixedClock())


def filled(folder: Path, n: int = 4) -> AuditLog:
    audit = make_log(folder)
    for i in range(n):
        audit.append(
            "reidentify", f"{i:032x}", f"ticket {i}", {"found": True, "n": i}, actor="officer"
        )
    return audit


def lines(audit: AuditLog) -> list[str]:
    return audit.path.read_text(encoding="utf-8").splitlines()


def rewrite(audit: AuditLog, new_lines: list[str]) -> None:
    audit.path.write_text("".join(line + "\n" for line in new_lines), encoding="utf-8")


def test_entries_chain_and_are_deterministic(tmp_path: Path) -> None:
    audit = filled(tmp_path / "one")
    result = audit.verify()
    assert (result.ok, result.entries, result.problems) == (True, 4, [])
    entries = audit.entries()
    assert [e["seq"] for e in entries] == [0, 1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["mac"] for a, b in pairwise(entries))
    assert entries[0]["at"] == "2026-01-01T00:00:00+00:00"
    assert entries[3]["at"] == "2026-01-01T00:00:03+00:00"
    assert set(entries[0]) == {
        "seq", "at", "actor", "action", "subject", "reason", "details", "prev", "mac"
    }  # fmt: skip
    assert (entries[2]["actor"], entries[2]["reason"], entries[2]["details"]) == (
        "officer",
        "ticket 2",
        {"found": True, "n": 2},
    )
    # same key, clock and inputs: byte-identical logs and anchors
    other = filled(tmp_path / "two")
    assert lines(audit) == lines(other)
    assert audit.head_path.read_text() == other.head_path.read_text()
    head = json.loads(audit.head_path.read_text())
    assert (head["seq"], head["mac"]) == (3, entries[3]["mac"])


def test_log_and_anchor_are_private_files(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    for path in (audit.path, audit.head_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def _edit_reason(ls: list[str]) -> list[str]:
    return [ls[0], ls[1].replace("ticket 1", "ticket 9"), *ls[2:]]


def _edit_details(ls: list[str]) -> list[str]:
    entry = json.loads(ls[2])
    entry["details"]["found"] = False
    return [*ls[:2], json.dumps(entry), ls[3]]


def _delete_middle(ls: list[str]) -> list[str]:
    return [ls[0], *ls[2:]]


def _swap(ls: list[str]) -> list[str]:
    return [ls[1], ls[0], *ls[2:]]


def _swap_middle(ls: list[str]) -> list[str]:
    return [ls[0], ls[2], ls[1], ls[3]]


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_edit_reason, ["entry 1: mac mismatch (edited)"]),
        (_edit_details, ["entry 2: mac mismatch (edited)"]),
        (
            _delete_middle,
            [
                "entry 1: seq 2 out of order (removed or reordered)",
                "entry 1: chain broken, prev does not match the entry before "
                "(removed or reordered)",
                "entry 2: seq 3 out of order (removed or reordered)",
            ],
        ),
        (_swap, ["entry 0: seq 1 out of order (removed or reordered)"]),
        (_swap_middle, ["entry 1: seq 2 out of order (removed or reordered)"]),
        (
            lambda ls: ls[:-1],
            ["head anchor: log ends at seq 2, anchor says 3 (truncated)"],
        ),
        (
            lambda ls: ls[:-2],
            ["head anchor: log ends at seq 1, anchor says 3 (truncated)"],
        ),
        (lambda ls: [], ["head anchor: log is empty, anchor says 3 (truncated)"]),
    ],
    ids=[
        "edit-reason",
        "edit-details",
        "delete-middle",
        "swap-first",
        "swap-middle",
        "truncate-1",
        "truncate-2",
        "empty",
    ],
)
def test_tampering_is_detected(
    tmp_path: Path, tamper: Callable[[list[str]], list[str]], expected: list[str]
) -> None:
    audit = filled(tmp_path)
    rewrite(audit, tamper(lines(audit)))
    result = audit.verify()
    assert not result.ok
    for problem in expected:
        assert problem in result.problems, result.problems


def test_truncation_is_only_visible_through_the_anchor(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    rewrite(audit, lines(audit)[:-1])
    result = audit.verify()
    # the remaining chain is intact: the side file is what reveals the cut
    assert result.problems == ["head anchor: log ends at seq 2, anchor says 3 (truncated)"]
    assert result.entries == 3


def test_anchor_tampering_and_removal_are_detected(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    head = json.loads(audit.head_path.read_text())
    entries = audit.entries()
    # rewinding the anchor to an earlier entry needs the key for its own MAC
    rewrite(audit, lines(audit)[:-1])
    audit.head_path.write_text(json.dumps({**head, "seq": 2, "mac": entries[2]["mac"]}))
    result = audit.verify()
    assert result.problems == [
        "head anchor: does not verify under this key (edited, a different key, or "
        "another warehouse's)"
    ]
    audit.head_path.unlink()
    assert audit.verify().problems == ["head anchor: missing (log replaced, or anchor deleted)"]
    audit.head_path.write_text("{not json")
    assert audit.verify().problems == ["head anchor: audit head anchor is not JSON"]


def test_wrong_key_fails_every_mac(tmp_path: Path) -> None:
    filled(tmp_path)
    result = make_log(tmp_path, b"b" * 32).verify()
    assert not result.ok
    assert [p for p in result.problems if "mac mismatch" in p] == [
        f"entry {i}: mac mismatch (edited)" for i in range(4)
    ]
    assert (
        "head anchor: does not verify under this key (edited, a different key, or "
        "another warehouse's)"
    ) in (result.problems)


def test_a_damaged_log_is_not_appended_to(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    original = lines(audit)
    rewrite(audit, original[:-1])  # truncated: appending would re-anchor and hide it
    with pytest.raises(AuditLogError, match="anchor says 3"):
        audit.append("forget", "f" * 32, "x")
    with pytest.raises(AuditLogError):
        audit.check_appendable()
    rewrite(audit, [*original[:3], original[3].replace("ticket 3", "ticket 7")])
    with pytest.raises(AuditLogError, match="does not verify under this key"):
        audit.append("forget", "f" * 32, "x")
    rewrite(audit, original)
    with pytest.raises(AuditLogError, match="does not verify under this key"):
        make_log(tmp_path, b"c" * 32).append("forget", "f" * 32, "x")  # a different key
    audit.path.write_text("".join(line + "\n" for line in original) + '{"seq": 4')
    with pytest.raises(AuditLogError, match="incomplete line"):
        audit.append("forget", "f" * 32, "x")
    assert len(lines(audit)) == 5 and not audit.verify().ok
    audit.head_path.unlink()
    rewrite(audit, [])
    assert audit.append("forget", "f" * 32, "x")["seq"] == 0  # a brand-new log


def test_an_interrupted_append_is_reported_then_repaired(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    anchor = audit.head_path.read_text()
    audit.append("forget", "f" * 32, "request 1", {"rows": 3}, actor="dpo")
    audit.head_path.write_text(anchor)  # as if the process died before the anchor write
    assert audit.verify().problems == [
        "head anchor: log ends at seq 4, anchor says 3 "
        "(anchor not updated: interrupted append, or an old anchor restored)"
    ]
    audit.append("forget", "e" * 32, "request 2", actor="dpo")
    assert audit.verify().ok and audit.verify().entries == 6


def test_interrupted_first_append(tmp_path: Path) -> None:
    audit = make_log(tmp_path)
    audit.append("rotate_keys", "kek-1", "rotation")
    audit.head_path.unlink()
    assert not audit.verify().ok
    audit.append("rotate_keys", "kek-2", "rotation")
    assert audit.verify().ok


def test_corrupted_line_is_reported_by_position(tmp_path: Path) -> None:
    audit = filled(tmp_path)
    ls = lines(audit)
    rewrite(audit, [ls[0], "garbage", *ls[2:]])
    result = audit.verify()
    assert "entry 1: not a JSON object (corrupted)" in result.problems
    with pytest.raises(AuditLogError, match="entry 1 is not JSON"):
        audit.entries()


def _append_many(path: str, writer: int, count: int) -> None:
    audit = AuditLog(Path(path), KEY)
    for i in range(count):
        audit.append("reidentify", f"{writer:016x}{i:016x}", "load", {"w": writer}, actor="w")


def test_concurrent_writers_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    ctx = multiprocessing.get_context("fork")
    # a forked child inherits the garbage the test process has not collected yet; a DuckDB
    # connection in a reference cycle (left by an earlier test), collected in the child, kills
    # it with SIGSEGV (its database's threads were not forked); collected here, it cannot
    gc.collect()
    workers = [ctx.Process(target=_append_many, args=(str(path), w, 15)) for w in range(4)]
    for proc in workers:
        proc.start()
    for proc in workers:
        proc.join(60)
        assert proc.exitcode == 0
    result = AuditLog(path, KEY).verify()
    assert (result.ok, result.entries) == (True, 60), result.problems
    subjects = {e["subject"] for e in AuditLog(path, KEY).entries()}
    assert len(subjects) == 60


def test_audit_key_comes_from_the_keyring_not_the_pseudonym_key(
    key_provider: FileKeyProvider,
) -> None:
    pkey = key_provider.pseudonym_key()
    derived = HKDF(hashes.SHA256(), 32, salt=None, info=b"ehr-audit-log/1").derive(pkey)
    assert audit_key(pkey) == derived != pkey  # the legacy derivation, kept for old keyrings
    log = AuditLog.for_provider(Path("unused.log"), key_provider)
    assert log._key == key_provider.audit_key()
    assert log._key not in (derived, pkey) and log._legacy_key is None
    with pytest.raises(ValueError, match="at least 32 bytes"):
        audit_key(b"short")


def test_an_old_keyring_migrates_to_an_audit_key_and_old_entries_still_verify(
    key_file: Path, tmp_path: Path
) -> None:
    document = json.loads(key_file.read_text())
    del document["audit_key"]
    write_keyring(key_file, document)
    old = FileKeyProvider.load(key_file)
    assert old.legacy_audit and old.audit_key() == audit_key(old.pseudonym_key())
    log_path = tmp_path / "w" / "audit.log"
    AuditLog.for_provider(log_path, old).append("reidentify", "a" * 32, "before", actor="o")
    assert migrate_audit_key(key_file) is True and migrate_audit_key(key_file) is False
    new = FileKeyProvider.load(key_file)
    assert not new.legacy_audit and new.accepts_legacy_audit
    log = AuditLog.for_provider(log_path, new)
    log.append("reidentify", "b" * 32, "after", actor="o")
    assert log.verify().ok
    # the legacy key cannot write after the migration: its entry does not verify
    forged = AuditLog(log_path, audit_key(new.pseudonym_key()))
    with pytest.raises(AuditLogError, match="does not verify"):
        forged.append("reidentify", "c" * 32, "forged", actor="o")


def anchored(folder: Path, anchors: Path, warehouse: str = "wh-test") -> AuditLog:
    return AuditLog(
        folder / "audit.log",
        KEY,
        clock=FixedClock(),
        anchor=anchors / f"{warehouse}.json",
        warehouse_id=warehouse,
    )


def _head_mac_by_hand(document: dict[str, object]) -> str:
    """A head's MAC computed here from its definition: HMAC-SHA256 under the audit key of the
    canonical JSON (sorted keys, no spaces) of every field but ``anchor_mac``."""
    body = {k: v for k, v in document.items() if k != "anchor_mac"}
    message = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(KEY, message.encode(), hashlib.sha256).hexdigest()


def test_a_head_names_its_warehouse_and_its_outside_anchor(tmp_path: Path) -> None:
    audit = anchored(tmp_path / "work", tmp_path / "anchors")
    entry = audit.append("forget", "a" * 32, "r1", actor="o")
    for path in (audit.head_path, tmp_path / "anchors" / "wh-test.json"):
        document = json.loads(path.read_text())
        assert document == {
            "format": "ehr-audit-head/2",
            "seq": 0,
            "mac": entry["mac"],
            "warehouse": "wh-test",
            "outside": True,
            "anchor_mac": _head_mac_by_hand(document),
        }


def test_an_outside_anchor_deleted_after_the_log_was_anchored_is_not_adopted(
    tmp_path: Path,
) -> None:
    """The log and its side file rolled back to an older copy, the outside anchor deleted: the
    next append re-created the anchor from the side file and verify then passed, the entries
    after the copy gone. The side file says an outside anchor was written beside it."""
    work, anchors = tmp_path / "work", tmp_path / "anchors"
    audit = anchored(work, anchors)
    audit.append("forget", "a" * 32, "r1", actor="o")
    saved_log, saved_head = audit.path.read_bytes(), audit.head_path.read_bytes()
    audit.append("reidentify", "b" * 32, "r2", actor="o")
    audit.path.write_bytes(saved_log)
    audit.head_path.write_bytes(saved_head)
    (anchors / "wh-test.json").unlink()
    with pytest.raises(AuditLogError, match="outside anchor is missing"):
        anchored(work, anchors).append("forget", "c" * 32, "after the attack", actor="o")
    assert not (anchors / "wh-test.json").exists()
    assert not anchored(work, anchors).verify().ok


def test_another_warehouses_log_head_and_anchor_copied_in_do_not_verify(tmp_path: Path) -> None:
    other = anchored(tmp_path / "other", tmp_path / "anchors", "wh-other")
    other.append("forget", "a" * 32, "r1", actor="o")
    audit = anchored(tmp_path / "work", tmp_path / "anchors")
    audit.append("reidentify", "b" * 32, "r2", actor="o")
    audit.append("reidentify", "c" * 32, "r3", actor="o")
    for source, target in (
        (other.path, audit.path),
        (other.head_path, audit.head_path),
        (tmp_path / "anchors" / "wh-other.json", tmp_path / "anchors" / "wh-test.json"),
    ):
        target.write_bytes(source.read_bytes())
    result = anchored(tmp_path / "work", tmp_path / "anchors").verify()
    assert not result.ok
    assert {p.split(":")[0] for p in result.problems} == {"outside anchor"}
    with pytest.raises(AuditLogError, match="names another warehouse"):
        anchored(tmp_path / "work", tmp_path / "anchors").append("forget", "d" * 32, "x")


def test_a_head_of_the_first_format_still_verifies_and_is_adopted(tmp_path: Path) -> None:
    """Heads written before they named their warehouse: verified as they are, a missing
    outside anchor adopted from such a side file, and the next append writes both anew."""
    audit = anchored(tmp_path / "work", tmp_path / "anchors")
    entry = audit.append("forget", "a" * 32, "r1", actor="o")
    first = {"format": "ehr-audit-head/1", "seq": 0, "mac": entry["mac"]}
    audit.head_path.write_text(json.dumps({**first, "anchor_mac": _head_mac_by_hand(first)}))
    (tmp_path / "anchors" / "wh-test.json").unlink()
    audit.append("reidentify", "b" * 32, "r2", actor="o")
    assert audit.verify().ok
    assert json.loads(audit.head_path.read_text())["format"] == "ehr-audit-head/2"


@pytest.mark.parametrize("attack", ["delete", "rollback", "truncate", "edit"])
def test_the_outside_anchor_detects_deletion_and_rollback(tmp_path: Path, attack: str) -> None:
    work, anchors = tmp_path / "work", tmp_path / "anchors"
    audit = anchored(work, anchors)
    audit.append("forget", "a" * 32, "r1", actor="o")
    saved_log, saved_head = audit.path.read_bytes(), audit.head_path.read_bytes()
    audit.append("reidentify", "b" * 32, "r2", actor="o")
    audit.append("reidentify", "c" * 32, "r3", actor="o")
    assert (anchors / "wh-test.json").exists() and audit.verify().ok
    if attack == "delete":  # the log and its side file both removed from the workdir
        audit.path.unlink()
        audit.head_path.unlink()
    elif attack == "rollback":  # an older copy of both restored
        audit.path.write_bytes(saved_log)
        audit.head_path.write_bytes(saved_head)
    elif attack == "truncate":
        rewrite(audit, lines(audit)[:-1])
        audit.head_path.write_bytes(saved_head)
    else:
        edited = lines(audit)
        edited[1] = edited[1].replace("r2", "r9")
        rewrite(audit, edited)
    result = anchored(work, anchors).verify()
    assert not result.ok
    if attack != "edit":
        assert any(p.startswith("outside anchor:") for p in result.problems), result.problems
        with pytest.raises(AuditLogError):  # fails closed
            anchored(work, anchors).append("forget", "d" * 32, "after the attack", actor="o")
    else:
        assert result.problems[0] == "entry 1: mac mismatch (edited)"


def test_intents_without_completion_are_listed_until_a_rerun_completes(tmp_path: Path) -> None:
    audit = make_log(tmp_path)
    first = audit.intend("forget", "a" * 32, "request 1", actor="o")
    assert first["details"] == {"phase": "intent"}
    assert audit.verify().ok
    assert audit.verify().incomplete == [
        "entry 0: forget of " + "a" * 32 + " was announced but never completed; run it again"
    ]
    second = audit.intend("forget", "a" * 32, "request 1", actor="o")
    done = audit.complete(second, {"found": True})
    assert done["details"] == {"found": True, "phase": "done", "intent_seq": 1}
    assert audit.verify().incomplete == []


def test_default_actor_and_missing_log(tmp_path: Path) -> None:
    audit = make_log(tmp_path)
    assert audit.verify() == audit.verify() and audit.verify().ok
    assert audit.verify().entries == 0 and audit.entries() == []
    assert not audit.path.exists()  # reading never creates the log
    entry = audit.append("forget", "f" * 32, "request")
    assert entry["actor"] == default_actor() and entry["details"] == {}


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        AuditLog(tmp_path / "a.log", b"short")
    audit = make_log(tmp_path)
    with pytest.raises(ValueError, match="action"):
        audit.append("", "x")
    with pytest.raises(ValueError, match="subject"):
        audit.append("forget", " ")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        audit.append("forget", "f" * 32, details={"when": datetime.now(UTC)})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        audit.append("forget", "f" * 32, details={"x": float("nan")})
    naive = AuditLog(tmp_path / "b.log", KEY, clock=lambda: datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        naive.append("forget", "f" * 32)
    assert not audit.path.exists() or audit.entries() == []
    assert issubclass(AuditLogError, VaultError)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_a_reason_holding_a_unicode_line_separator_is_one_entry(
    tmp_path: Path, separator: str
) -> None:
    # json.dumps(ensure_ascii=False) writes these raw; str.splitlines split the entry in two
    audit = make_log(tmp_path)
    audit.append("forget", "a" * 32, f"ticket{separator}7", actor="officer")
    audit.append("forget", "a" * 32, "ticket 8", actor="officer")
    result = audit.verify()
    assert (result.ok, result.entries, result.problems) == (True, 2, [])
    assert [entry["reason"] for entry in audit.entries()] == [f"ticket{separator}7", "ticket 8"]


def _migrated_log(key_file: Path, log_path: Path) -> tuple[AuditLog, FileKeyProvider]:
    """A log with one entry under the legacy key (a keyring from before the audit key), then
    the keyring migrated: the log and the provider as they are after the migration."""
    document = json.loads(key_file.read_text())
    del document["audit_key"]
    write_keyring(key_file, document)
    old = FileKeyProvider.load(key_file)
    AuditLog.for_provider(log_path, old).append("reidentify", "a" * 32, "before", actor="o")
    migrate_audit_key(key_file)
    new = FileKeyProvider.load(key_file)
    return AuditLog.for_provider(log_path, new), new


def _legacy_mac(provider: FileKeyProvider, body: dict[str, Any]) -> str:
    """A MAC under the legacy audit key (derived from the pseudonym key), computed here."""
    message = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    legacy = audit_key(provider.pseudonym_key())
    return hmac.new(legacy, message.encode("utf-8"), hashlib.sha256).hexdigest()


def test_after_the_migration_an_entry_under_the_legacy_key_is_refused(
    key_file: Path, tmp_path: Path
) -> None:
    # a pipeline process holds the pseudonym key, hence the legacy key: its forged entry
    # appended after the migration was taken for an interrupted append and anchored over
    log, new = _migrated_log(key_file, tmp_path / "w" / "audit.log")
    last = log.append("reidentify", "b" * 32, "after", actor="o")
    body = {**last, "seq": last["seq"] + 1, "reason": "forged", "prev": last["mac"]}
    del body["mac"]
    mac = _legacy_mac(new, body)
    with log.path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({**body, "mac": mac}) + "\n")
    result = log.verify()
    assert not result.ok
    assert result.problems[0] == (
        "entry 2: under the legacy audit key after entries under the audit key "
        "(written with the pseudonym key)"
    )
    with pytest.raises(AuditLogError, match="under the legacy audit key"):
        log.append("reidentify", "c" * 32, "next", actor="o")


def test_an_append_cut_between_its_two_heads_is_repaired_by_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outside anchor is written first: a crash before the side file leaves the side
    file one entry behind, which the next append accepts (its entry chains on) and repairs."""
    from vault import audit as audit_module

    audit = anchored(tmp_path / "work", tmp_path / "anchors")
    audit.append("forget", "a" * 32, "r1", actor="o")
    real = audit_module.replace_private_file

    def crash_at_the_side_file(path: Path, text: str) -> None:
        if path == audit.head_path:
            raise OSError("killed")
        real(path, text)

    monkeypatch.setattr(audit_module, "replace_private_file", crash_at_the_side_file)
    with pytest.raises(AuditLogError, match="written, its head anchors not: OSError"):
        audit.append("reidentify", "b" * 32, "r2", actor="o")
    monkeypatch.setattr(audit_module, "replace_private_file", real)
    assert json.loads((tmp_path / "anchors" / "wh-test.json").read_text())["seq"] == 1
    audit.append("reidentify", "c" * 32, "r3", actor="o")
    assert anchored(tmp_path / "work", tmp_path / "anchors").verify().ok


def test_a_copied_work_directory_under_a_new_id_anchors_its_log_anew(tmp_path: Path) -> None:
    """``cp -r`` of a work directory: its first writer gives it an id of its own
    (vault.warehouse.claim_id), and its log, whose side file names the original, is anchored
    under the new id at its next entry; the original's log and anchor are untouched."""
    original = anchored(tmp_path / "work", tmp_path / "anchors")
    original.append("forget", "a" * 32, "r1", actor="o")
    shutil.copytree(tmp_path / "work", tmp_path / "copy")
    copy = anchored(tmp_path / "copy", tmp_path / "anchors", "wh-copy")
    copy.append("reidentify", "b" * 32, "r2", actor="o")
    assert copy.verify().ok and json.loads(copy.head_path.read_text())["warehouse"] == "wh-copy"
    assert anchored(tmp_path / "work", tmp_path / "anchors").verify().ok


def test_a_line_that_could_not_be_written_is_cut_back_and_said_precisely(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk in the middle of a line: the log is cut back to its last entry (a partial
    line refused every later append until cut by hand), and the error is an audit error that
    names the log and the reason, not a traceback."""
    from vault import audit as audit_module

    audit = anchored(tmp_path / "work", tmp_path / "anchors")
    audit.append("forget", "a" * 32, "r1", actor="o")
    before = audit.path.read_bytes()
    real_write = os.write

    def disk_full_after_ten_bytes(fd: int, data: bytes) -> int:
        if len(data) > 10:
            return real_write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_module.os, "write", disk_full_after_ten_bytes)
    with pytest.raises(AuditLogError, match="could not be written: No space left on device"):
        audit.append("reidentify", "b" * 32, "r2", actor="o")
    monkeypatch.setattr(audit_module.os, "write", real_write)
    assert audit.path.read_bytes() == before
    audit.append("reidentify", "c" * 32, "r3", actor="o")
    assert audit.verify().ok and [e["reason"] for e in audit.entries()] == ["r1", "r3"]


def test_a_folder_in_place_of_the_log_is_an_audit_error(tmp_path: Path) -> None:
    audit = make_log(tmp_path)
    audit.path.mkdir(parents=True)
    with pytest.raises(AuditLogError, match="cannot be opened"):
        audit.append("forget", "a" * 32, "r1", actor="o")


def test_after_the_migration_a_head_under_the_legacy_key_cannot_anchor_a_cut_log(
    key_file: Path, tmp_path: Path
) -> None:
    """Someone holding only the pseudonym key (so the legacy key) cuts the log's last entry off
    and writes a head naming the entry before it, MACed under the legacy key: before, both
    anchors verified and the cut went unseen. A legacy head may only name a legacy entry."""
    log, new = _migrated_log(key_file, tmp_path / "w" / "audit.log")
    kept = log.append("reidentify", "b" * 32, "after", actor="o")
    log.append("forget", "c" * 32, "to be cut", actor="o")
    rewrite(log, lines(log)[:-1])
    body = {"format": "ehr-audit-head/2", "seq": kept["seq"], "mac": kept["mac"]}
    body |= {"warehouse": "", "outside": False}
    forged = _legacy_mac(new, body)
    log.head_path.write_text(json.dumps({**body, "anchor_mac": forged}) + "\n")
    result = log.verify()
    assert not result.ok and any("under the legacy audit key" in p for p in result.problems)
    with pytest.raises(AuditLogError, match="under the legacy audit key"):
        log.append("reidentify", "d" * 32, "next", actor="o")
    # a head written before the migration, naming a legacy entry, still verifies
    pre = AuditLog(tmp_path / "x" / "audit.log", audit_key(new.pseudonym_key()))
    pre.append("reidentify", "e" * 32, "before", actor="o")
    assert AuditLog.for_provider(pre.path, new).verify().ok
