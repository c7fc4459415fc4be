from __future__ import annotations

import base64
import json
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.vault.processes import hold_open
from vault import lifecycle, warehouse
from vault.audit import AuditLog
from vault.errors import (
    AuditLogError,
    ErasureIncompleteError,
    KeyDestroyedError,
    KeyMaterialError,
    KeyRotationError,
    PatientNotFoundError,
    PseudonymKeyMismatchError,
    VaultError,
)
from vault.ingest import ingest_batch
from vault.keys import FileKeyProvider, key_fingerprint
from vault.lifecycle import (
    ErasurePlan,
    ReleasedTables,
    forget_patient,
    forget_pseudonym,
    reidentify,
    rotate_kek,
)
from vault.pseudonym import Pseudonymizer
from vault.read import iter_current_resources, read_resource
from vault.sealing import DataKeyStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

PATIENTS = {
    "p1": {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"family": "Quillfeather", "given": ["Marisol"]}],
        "identifier": [{"system": "urn:mrn", "value": "MRN-4471"}],
        "birthDate": "1948-02-29",
        "telecom": [{"system": "phone", "value": "555-0134-77"}],
        "address": [{"line": ["12 Lantern Row"], "city": "Harrowgate", "postalCode": "02139"}],
    },
    "p2": {
        "resourceType": "Patient",
        "id": "p2",
        "name": [{"family": "Oddsock", "given": ["Bertram"]}],
        "identifier": [{"system": "urn:mrn", "value": "MRN-9902"}],
        "birthDate": "1971-07-04",
    },
}
ORGANIZATION = {"resourceType": "Organization", "id": "org1", "name": "Lantern Clinic"}


def _bundle(pid: str) -> dict[str, Any]:
    resources: list[dict[str, Any]] = [
        PATIENTS[pid],
        {
            "resourceType": "Condition",
            "id": f"c-{pid}",
            "subject": {"reference": f"Patient/{pid}"},
            "code": {"text": "asthma"},
        },
        {
            "resourceType": "Encounter",
            "id": f"e-{pid}",
            "status": "finished",
            "class": {"code": "AMB"},
            "subject": {"reference": f"Patient/{pid}"},
            "serviceProvider": {"reference": "Organization/org1"},
        },
        {  # an empty array is a schema violation: quarantined under the patient's key
            "resourceType": "Observation",
            "id": f"o-{pid}",
            "status": "final",
            "code": {"text": "x"},
            "category": [],
            "subject": {"reference": f"Patient/{pid}"},
        },
    ]
    entries = [{"resource": r} for r in resources]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


@dataclass
class World:
    wh: Path
    key_file: Path
    provider: FileKeyProvider
    audit: AuditLog
    p1: str
    p2: str

    def connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        return warehouse.connect(self.wh, read_only=read_only)


@pytest.fixture
def world(tmp_path: Path, key_file: Path, key_provider: FileKeyProvider) -> Iterator[World]:
    land = tmp_path / "land"
    land.mkdir()
    for pid in PATIENTS:
        (land / f"{pid}.json").write_text(json.dumps(_bundle(pid)))
    (land / "org.json").write_text(json.dumps(ORGANIZATION))
    wh = tmp_path / "w.duckdb"
    report = ingest_batch(wh, "b1", land, key_provider, workers=1)
    assert report.accepted == 7 and report.quarantined == 2
    pseudo = Pseudonymizer(key_provider.pseudonym_key())
    audit = AuditLog.for_provider(tmp_path / "audit" / "audit.log", key_provider, clock=lambda: T0)
    yield World(
        wh,
        key_file,
        key_provider,
        audit,
        pseudo.resource_key("Patient", "p1"),
        pseudo.resource_key("Patient", "p2"),
    )


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> int:
    return int(con.execute(sql, params or []).fetchall()[0][0])


def _all_readable(con: duckdb.DuckDBPyConnection, provider: FileKeyProvider) -> None:
    resources = list(iter_current_resources(con, provider))
    assert len(resources) == 7
    for resource in resources:
        assert read_resource(con, provider, resource["resourceType"], resource["id"]) == resource
    keys = DataKeyStore(con, provider)
    for sealed, aad in con.execute("SELECT sealed, aad FROM quarantine").fetchall():
        assert keys.open(bytes(sealed), bytes(aad))


def _counter_bytes(start: int = 0) -> Any:
    state = {"n": start}

    def random_bytes(n: int) -> bytes:
        state["n"] += 1
        return bytes([state["n"] % 256]) * n

    return random_bytes


# -- rotation ---------------------------------------------------------------------------------


def test_rotation_rewraps_every_key_and_drops_the_old_kek(world: World) -> None:
    old_id = world.provider.active_kek_id()
    old_entry = json.loads(world.key_file.read_text())["keks"][old_id]
    con = world.connect()
    try:
        report = rotate_kek(
            world.key_file, con, world.audit, random_bytes=_counter_bytes(), clock=lambda: T0
        )
        assert report.new_kek_id == "kek-" + key_fingerprint(b"\x01" * 32)  # injected randomness
        assert report.retired_kek_ids == [old_id] and report.kept_kek_ids == []
        assert (report.rewrapped, report.destroyed_keys_skipped) == (3, 0)  # p1, p2, _shared

        rotated = FileKeyProvider.load(world.key_file)
        assert rotated.live_kek_ids == [report.new_kek_id] == [rotated.active_kek_id()]
        assert rotated.retired_kek_ids() == [old_id]  # kept, wrapped, until purge-retired
        kek_ids = con.execute("SELECT DISTINCT kek_id FROM data_keys").fetchall()
        assert kek_ids == [(report.new_kek_id,)]
        _all_readable(con, rotated)
        # the old provider, holding only the old KEK, can no longer unwrap anything
        with pytest.raises(KeyMaterialError, match="not available"):
            list(iter_current_resources(con, world.provider))
    finally:
        con.close()

    text = world.key_file.read_text()
    document = json.loads(text)
    assert old_entry["key"] not in text  # the retired KEK is kept only wrapped
    retired = document["retired_keks"][old_id]
    assert (retired["created"], retired["retired"]) == (old_entry["created"], T0.isoformat())
    assert retired["wrapped_by"] == report.new_kek_id and retired["wrapped"]
    assert document["pseudonym_key"] and document["date_shift_key"]  # the rest is untouched
    assert list(document["warehouses"]) == report.warehouses  # registered on first use
    assert stat.S_IMODE(world.key_file.stat().st_mode) == 0o600
    intent, entry = world.audit.entries()
    assert (intent["action"], intent["details"]["phase"]) == ("rotate_keys", "intent")
    assert (entry["action"], entry["subject"]) == ("rotate_keys", report.new_kek_id)
    assert entry["details"]["retired_kek_ids"] == [old_id]
    assert entry["details"]["rewrapped"] == 3
    assert world.audit.verify().ok and world.audit.verify().incomplete == []

    # purge-retired drops the old material once every registered warehouse is re-wrapped
    assert lifecycle.purge_retired_keks(world.key_file, world.audit) == [old_id]
    purged = FileKeyProvider.load(world.key_file)
    assert purged.kek_ids() == [report.new_kek_id]
    assert "wrapped" not in json.loads(world.key_file.read_text())["retired_keks"][old_id]
    con = world.connect()
    try:
        _all_readable(con, purged)
    finally:
        con.close()


def test_rotating_twice_and_after_an_erasure(world: World) -> None:
    con = world.connect()
    try:
        first = rotate_kek(world.key_file, con, world.audit)
        forget_pseudonym(con, world.p1, world.audit, "erasure request")
        second = rotate_kek(world.key_file, con, world.audit)
        assert second.retired_kek_ids == [first.new_kek_id]
        assert (second.rewrapped, second.destroyed_keys_skipped) == (2, 1)
        rotated = FileKeyProvider.load(world.key_file)
        assert rotated.live_kek_ids == [second.new_kek_id]
        assert read_resource(con, rotated, "Patient", "p2") == PATIENTS["p2"]
        assert read_resource(con, rotated, "Organization", "org1") == ORGANIZATION
    finally:
        con.close()
    retired = json.loads(world.key_file.read_text())["retired_keks"]
    assert set(retired) == {world.provider.active_kek_id(), first.new_kek_id}
    assert [e["action"] for e in world.audit.entries()] == [
        "rotate_keys", "rotate_keys", "forget", "forget", "rotate_keys", "rotate_keys"
    ]  # fmt: skip


def test_a_failed_rewrap_leaves_a_keyring_that_reads_everything(world: World) -> None:
    """Crash-safe order: the new KEK is in the keyring before any data key moves to it, and
    the old one stays until the re-wrap has committed."""
    old_id = world.provider.active_kek_id()
    con = world.connect()
    try:
        con.execute(  # under the keyring's KEK, but not a key it wrapped
            "INSERT INTO data_keys VALUES (?, 'someone', ?, ?, now(), NULL)",
            [b"\x07" * 16, old_id, b"\x00" * 60],
        )
        before = con.execute("SELECT key_id, kek_id, wrapped FROM data_keys ORDER BY 1").fetchall()
        with pytest.raises(KeyRotationError, match="cannot be unwrapped"):
            rotate_kek(world.key_file, con, world.audit)
        after = con.execute("SELECT key_id, kek_id, wrapped FROM data_keys ORDER BY 1").fetchall()
        assert after == before  # rolled back
        interim = FileKeyProvider.load(world.key_file)
        assert old_id in interim.live_kek_ids and len(interim.live_kek_ids) == 2
        assert interim.active_kek_id() != old_id
        _all_readable(con, interim)
        assert len(world.audit.verify().incomplete) == 1  # announced, not completed

        con.execute("DELETE FROM data_keys WHERE owner = 'someone'")
        report = rotate_kek(world.key_file, con, world.audit)  # running again completes it
        assert report.new_kek_id == interim.active_kek_id()  # the same rotation, resumed
        assert report.retired_kek_ids == [old_id]
        final = FileKeyProvider.load(world.key_file)
        assert final.live_kek_ids == [report.new_kek_id]
        _all_readable(con, final)
        assert world.audit.verify().incomplete == []
    finally:
        con.close()


def test_a_crash_before_the_old_kek_is_dropped_is_harmless(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[Path] = []
    real_write = lifecycle.write_keyring

    def crash_on_second_write(path: Path, document: dict[str, Any]) -> None:
        writes.append(path)
        if len(writes) == 2:
            raise OSError("power cut")
        real_write(path, document)

    monkeypatch.setattr(lifecycle, "write_keyring", crash_on_second_write)
    con = world.connect()
    try:
        with pytest.raises(OSError, match="power cut"):
            rotate_kek(world.key_file, con, world.audit)
        interim = FileKeyProvider.load(world.key_file)  # both KEKs, data under the new one
        assert len(interim.live_kek_ids) == 2
        assert con.execute("SELECT DISTINCT kek_id FROM data_keys").fetchall() == [
            (interim.active_kek_id(),)
        ]
        _all_readable(con, interim)
        monkeypatch.setattr(lifecycle, "write_keyring", real_write)
        report = rotate_kek(world.key_file, con, world.audit)
        assert report.new_kek_id == interim.active_kek_id()
        assert FileKeyProvider.load(world.key_file).live_kek_ids == [report.new_kek_id]
    finally:
        con.close()


# a rotation in another process, killed (SIGKILL) as it renames its first keyring write into
# place: the temporary file it leaves is a whole keyring, the KEK about to retire in the clear
_ROTATE_KILLED_AT_RENAME = """
import os, signal, sys
from pathlib import Path
import duckdb
from vault import keys
from vault.audit import AuditLog
from vault.keys import FileKeyProvider
from vault.lifecycle import rotate_kek

def killed(src, dst):
    os.kill(os.getpid(), signal.SIGKILL)

key_file, wh, log = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
keys.os.replace = killed
audit = AuditLog.for_provider(log, FileKeyProvider.load(key_file))
rotate_kek(key_file, duckdb.connect(wh), audit)
"""


def test_a_rotation_killed_at_its_keyring_write_leaves_no_retired_kek_behind_a_purge(
    world: World,
) -> None:
    """An erased patient's data key in a backup from before the erasure stays unreadable after
    a rotation and a purge, even when a rotation was killed while writing the keyring."""
    old_id = world.provider.active_kek_id()
    old_b64 = json.loads(world.key_file.read_text())["keks"][old_id]["key"]
    arguments = [str(world.key_file), str(world.wh), str(world.audit.path)]
    killed = subprocess.run(
        [sys.executable, "-c", _ROTATE_KILLED_AT_RENAME, *arguments],
        capture_output=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = [p for p in world.key_file.parent.iterdir() if p.suffix == ".tmp"]
    assert left and old_b64 in left[0].read_text()  # what the killed write left
    con = world.connect()
    try:
        report = rotate_kek(world.key_file, con, world.audit)
    finally:
        con.close()
    assert report.retired_kek_ids == [old_id]
    assert lifecycle.purge_retired_keks(world.key_file, world.audit) == [old_id]
    old_kek = base64.b64decode(old_b64)
    for path in world.key_file.parent.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert old_b64.encode() not in data and old_kek not in data, path
            assert old_kek.hex().encode() not in data, path
    assert [p.name for p in world.key_file.parent.iterdir() if p.suffix == ".tmp"] == []


def test_a_keyring_reached_through_a_symlink_is_rotated_and_purged_where_it_lies(
    world: World,
) -> None:
    """A key file given as a link (a secret store's mount) is written where it points: the
    link stays a link, and the retired KEK is gone from the file itself after a purge."""
    old_id = world.provider.active_kek_id()
    old_b64 = json.loads(world.key_file.read_text())["keks"][old_id]["key"]
    link = world.key_file.parent.parent / "linked" / "keyring.json"
    link.parent.mkdir(mode=0o700)
    link.symlink_to(world.key_file)
    con = world.connect()
    try:
        report = rotate_kek(link, con, world.audit)
    finally:
        con.close()
    assert lifecycle.purge_retired_keks(link, world.audit) == [old_id]
    assert link.is_symlink() and link.resolve() == world.key_file.resolve()
    assert FileKeyProvider.load(world.key_file).kek_ids() == [report.new_kek_id]
    for path in [*world.key_file.parent.iterdir(), *link.parent.iterdir()]:
        assert old_b64 not in path.read_text(), path
    assert [p.name for p in link.parent.iterdir()] == ["keyring.json"]  # no lock of its own


def test_a_purge_killed_before_its_completion_is_closed_by_running_it_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keyring written, the process killed before the completion entry: `ehr audit
    verify` says to run the purge again, and running it again writes the completion (it
    found no material left to purge and wrote nothing, so the act stayed announced)."""
    con = world.connect()
    try:
        report = rotate_kek(world.key_file, con, world.audit)
    finally:
        con.close()
    old_id = report.retired_kek_ids[0]

    def killed(self: AuditLog, intent: dict[str, Any], details: dict[str, Any]) -> None:
        raise KeyboardInterrupt  # the process ends here, as under SIGKILL

    real_complete = AuditLog.complete
    monkeypatch.setattr(AuditLog, "complete", killed)
    with pytest.raises(KeyboardInterrupt):
        lifecycle.purge_retired_keks(world.key_file, world.audit)
    monkeypatch.setattr(AuditLog, "complete", real_complete)
    assert FileKeyProvider.load(world.key_file).retired_kek_ids() == []  # purged
    assert len(world.audit.verify().incomplete) == 1
    assert lifecycle.purge_retired_keks(world.key_file, world.audit) == [old_id]
    verified = world.audit.verify()
    assert verified.ok and verified.incomplete == []
    last = world.audit.entries()[-1]
    assert last["details"]["recorded_after_interruption"] is True
    assert lifecycle.purge_retired_keks(world.key_file, world.audit) == []  # nothing more


def test_environment_keys_are_not_rotated_here(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EHR_KEK", base64.b64encode(b"k" * 32).decode())
    before = world.key_file.read_text()
    con = world.connect()
    try:
        with pytest.raises(KeyRotationError, match="rotated by its owner") as info:
            rotate_kek(world.key_file, con, world.audit)
    finally:
        con.close()
    assert isinstance(info.value, VaultError)
    assert world.key_file.read_text() == before


def test_rotation_refuses_to_run_unaudited(world: World) -> None:
    world.audit.append("reidentify", world.p2, "ticket")
    world.audit.path.write_text("")  # the log was emptied: its anchor says otherwise
    before = world.key_file.read_text()
    con = world.connect()
    try:
        with pytest.raises(AuditLogError):
            rotate_kek(world.key_file, con, world.audit)
    finally:
        con.close()
    assert world.key_file.read_text() == before


def test_a_keyring_whose_pseudonym_key_changed_is_neither_rotated_nor_purged(
    world: World,
) -> None:
    """Rotation and purge write the keyring again: with a pseudonym key that is not the one
    the warehouse records (a damaged keyring, or another's), they would make it the one kept.
    Both refuse before writing anything, naming key ids only; the right keyring still rotates."""
    con = world.connect()
    try:
        rotate_kek(world.key_file, con, world.audit)  # a retired KEK for the purge to drop
    finally:
        con.close()
    good = world.key_file.read_bytes()
    document = json.loads(good)
    right_key = base64.b64decode(document["pseudonym_key"])
    other_key = bytes([right_key[0] ^ 0x01]) + right_key[1:]  # one bit changed
    document["pseudonym_key"] = base64.b64encode(other_key).decode()
    world.key_file.write_text(json.dumps(document))
    damaged = world.key_file.read_bytes()
    entries = len(world.audit.entries())
    con = world.connect()
    try:
        kek_ids = con.execute("SELECT DISTINCT kek_id FROM data_keys").fetchall()
        with pytest.raises(PseudonymKeyMismatchError, match="nothing was rotated") as rotated:
            rotate_kek(world.key_file, con, world.audit)
        assert con.execute("SELECT DISTINCT kek_id FROM data_keys").fetchall() == kek_ids
    finally:
        con.close()
    with pytest.raises(PseudonymKeyMismatchError, match="nothing was purged") as purged:
        lifecycle.purge_retired_keks(world.key_file, world.audit)
    for refused in (rotated, purged):
        message = str(refused.value)
        assert key_fingerprint(other_key) in message and key_fingerprint(right_key) in message
        assert document["pseudonym_key"] not in message
    assert world.key_file.read_bytes() == damaged and len(world.audit.entries()) == entries

    world.key_file.write_bytes(good)  # the keyring restored from its backup
    con = world.connect()
    try:
        assert rotate_kek(world.key_file, con, world.audit).rewrapped == 3
    finally:
        con.close()
    assert len(lifecycle.purge_retired_keks(world.key_file, world.audit)) == 2


def test_a_purge_refuses_a_registered_path_that_holds_another_warehouse(world: World) -> None:
    """Rotation refused such a path; the purge read the KEK ids in use there as the registered
    warehouse's, and dropped a retired KEK the registered one (moved elsewhere) could need."""
    con = world.connect()
    try:
        rotate_kek(world.key_file, con, world.audit)  # a retired KEK for the purge to drop
    finally:
        con.close()
    moved = world.wh.with_name("moved.duckdb")
    world.wh.rename(moved)
    other = warehouse.connect(world.wh)  # another warehouse, made at the registered path
    try:
        warehouse.ensure_warehouse_id(other)
    finally:
        other.close()
    before = world.key_file.read_bytes()
    with pytest.raises(KeyRotationError, match="holds another warehouse now; nothing was purged"):
        lifecycle.purge_retired_keks(world.key_file, world.audit)
    assert world.key_file.read_bytes() == before
    world.wh.unlink()
    moved.rename(world.wh)  # back where it is registered: purged
    assert len(lifecycle.purge_retired_keks(world.key_file, world.audit)) == 1


def test_an_older_keyring_restored_after_a_rotation_is_neither_rotated_nor_purged(
    world: World,
) -> None:
    """A keyring backup from before a rotation lacks the KEK the data keys are under now. A
    rotation gave it a new KEK (and an intent never completed) before the re-wrap failed, so
    the older copy was written again as the one kept. Both refuse before writing anything,
    naming the file and KEK ids only; the newer keyring still rotates and purges."""
    con = world.connect()
    try:
        rotate_kek(world.key_file, con, world.audit)
        older = world.key_file.read_bytes()  # a backup, with a retired KEK for a purge to drop
        current = rotate_kek(world.key_file, con, world.audit).new_kek_id
    finally:
        con.close()
    newer = world.key_file.read_bytes()
    world.key_file.write_bytes(older)  # the backup restored over it
    entries = len(world.audit.entries())
    con = world.connect()
    try:
        with pytest.raises(KeyRotationError, match="nothing was rotated") as rotated:
            rotate_kek(world.key_file, con, world.audit)
    finally:
        con.close()
    with pytest.raises(KeyRotationError, match="nothing was purged") as purged:
        lifecycle.purge_retired_keks(world.key_file, world.audit)
    for refused in (rotated, purged):
        message = str(refused.value)
        assert str(world.key_file) in message and repr(current) in message
        for key in json.loads(newer)["keks"].values():
            assert key["key"] not in message
    assert world.key_file.read_bytes() == older
    assert len(world.audit.entries()) == entries
    world.key_file.write_bytes(newer)
    con = world.connect()
    try:
        assert rotate_kek(world.key_file, con, world.audit).rewrapped == 3
        _all_readable(con, FileKeyProvider.load(world.key_file))
    finally:
        con.close()
    assert len(lifecycle.purge_retired_keks(world.key_file, world.audit)) == 3
    assert world.audit.verify().incomplete == []


def test_a_kek_the_keyring_does_not_hold_is_named_with_the_key_file_and_why(
    world: World,
) -> None:
    """Reading with a keyring read before a rotation, or with an older copy of the keyring
    restored after it, said only that a KEK 'is not available to this provider': not which
    file, nor what to do. Key ids and the path only, never a key."""
    older = world.key_file.read_bytes()
    stale = FileKeyProvider.load(world.key_file)
    con = world.connect()
    try:
        rotate_kek(world.key_file, con, world.audit)
        with pytest.raises(KeyMaterialError, match="not available") as rotated:
            read_resource(con, stale, "Patient", "p1")
        world.key_file.write_bytes(older)  # a backup restored over it
        with pytest.raises(KeyMaterialError, match="not available") as restored:
            read_resource(con, FileKeyProvider.load(world.key_file), "Patient", "p1")
    finally:
        con.close()
    assert "rotated after this process read it; run again" in str(rotated.value)
    assert "does not hold it (a copy older than the warehouse" in str(restored.value)
    for refused in (rotated, restored):
        assert f"key file {world.key_file}: KEK " in str(refused.value)
        for entry in json.loads(older)["keks"].values():
            assert entry["key"] not in str(refused.value)


def test_a_data_key_is_not_stored_under_a_kek_a_rotation_retired_after_it_was_read(
    world: World, tmp_path: Path
) -> None:
    """A writer that read the keyring before a rotation and a purge, in a warehouse neither
    knew of yet (its first ingest), stored its data keys under the purged KEK: readable by no
    keyring once the process ended. It is refused before storing any, and runs again."""
    stale = FileKeyProvider.load(world.key_file)  # a run step read the keyring here
    con = world.connect()
    try:
        retired = rotate_kek(world.key_file, con, world.audit).retired_kek_ids
    finally:
        con.close()
    assert lifecycle.purge_retired_keks(world.key_file, world.audit) == retired
    land = tmp_path / "land2"
    land.mkdir()
    (land / "p2.json").write_text(json.dumps(_bundle("p2")))
    new_wh = tmp_path / "new" / "w.duckdb"
    with pytest.raises(KeyMaterialError, match="was rotated after this process read it") as info:
        ingest_batch(new_wh, "b1", land, stale, workers=1)
    assert json.loads(world.key_file.read_text())["pseudonym_key"] not in str(info.value)
    fresh = FileKeyProvider.load(world.key_file)
    con = warehouse.connect(new_wh, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM data_keys").fetchall() == [(0,)]
    finally:
        con.close()
    assert ingest_batch(new_wh, "b1", land, fresh, workers=1).accepted == 3
    con = warehouse.connect(new_wh, read_only=True)
    try:
        assert read_resource(con, fresh, "Patient", "p2") == PATIENTS["p2"]
    finally:
        con.close()


# -- erasure ----------------------------------------------------------------------------------


@dataclass
class _Place:
    name: str
    removed: int = 0
    fails: bool = False
    called: list[str] = field(default_factory=list)

    def purge(self, pseudonym: str) -> int:
        self.called.append(pseudonym)
        if self.fails:
            raise RuntimeError("store offline")
        return self.removed


def test_forget_shreds_one_patient_everywhere(world: World) -> None:
    online_store = _Place("online_store", removed=5)
    plan = ErasurePlan(
        tables=(ReleasedTables("main", ("deid_patient", "unbuilt")), ReleasedTables("features")),
        places=(online_store,),
    )
    con = world.connect()
    try:
        con.execute("CREATE TABLE deid_patient (patient_id VARCHAR, x INT)")
        con.execute("INSERT INTO deid_patient VALUES (?, 1), (?, 2)", [world.p1, world.p2])
        con.execute("CREATE SCHEMA features")
        con.execute("CREATE TABLE features.daily (Patient_Id VARCHAR, v DOUBLE)")
        con.execute("INSERT INTO features.daily VALUES (?, 1.0), (?, 2.0)", [world.p1, world.p2])
        con.execute("CREATE TABLE features.codes (code VARCHAR)")  # no patient rows: skipped
        con.execute("CREATE TABLE coded (patient_id VARCHAR)")  # not in the plan: left alone
        con.execute("INSERT INTO coded VALUES (?)", [world.p1])
        con.execute("CREATE VIEW deid_patient_view AS SELECT * FROM deid_patient")
        p1_blobs = con.execute(
            "SELECT sealed, aad FROM phi_vault WHERE patient_key = ?", [world.p1]
        ).fetchall()
        p1_resources = con.execute(
            "SELECT resource_key FROM phi_vault WHERE patient_key = ?", [world.p1]
        ).fetchall()

        report = forget_patient(
            con,
            world.provider,
            "p1",
            world.audit,
            "erasure request 42",
            plan=plan,
            clock=lambda: T0,
        )

        assert report.pseudonym == world.p1 and report.found
        assert (report.data_keys_destroyed, report.data_keys_already_destroyed) == (1, 0)
        assert report.rows_deleted == {
            "resource_references": 3,  # Condition.subject, Encounter.subject + serviceProvider
            "resource_references_to_erased": 0,  # no other patient's record points at p1's
            "identifier_index": 2,  # the Patient's MRN, exact and loose (vault.ingest)
            "phi_vault": 3,  # Patient, Condition, Encounter
            "phi_vault_clustered": 1,  # the Patient's copy (vault.clustered)
            "quarantine": 1,  # the Observation
            "sealed_cache": 0,  # no value derived from the vault was kept (vault.sealed_cache)
            "deid_patient": 1,
            "features.daily": 1,
        }
        assert report.places == {"online_store": 5}
        assert report.ledger_rows_erased == 4  # their ledger rows stay, as erased
        assert online_store.called == [world.p1]

        # the key is gone: nothing of p1 can be decrypted, even from a copy of its rows
        assert con.execute(
            "SELECT wrapped, destroyed_at FROM data_keys WHERE owner = ?", [world.p1]
        ).fetchall() == [(None, T0)]
        keys = DataKeyStore(con, world.provider)
        for sealed, aad in p1_blobs:
            with pytest.raises(KeyDestroyedError):
                keys.open(bytes(sealed), bytes(aad))
        # ... and nothing of p1 can be found
        assert read_resource(con, world.provider, "Patient", "p1") is None
        assert read_resource(con, world.provider, "Condition", "c-p1") is None
        for table, column in (
            ("phi_vault", "patient_key"),
            ("phi_vault_clustered", "patient_key"),
            ("quarantine", "patient_key"),
            ("deid_patient", "patient_id"),
            ("features.daily", "patient_id"),
        ):
            assert _count(con, f"SELECT count(*) FROM {table} WHERE {column} = ?", [world.p1]) == 0
        for (rk,) in p1_resources:
            for table in ("resource_references", "identifier_index"):
                assert (
                    _count(con, f"SELECT count(*) FROM {table} WHERE resource_key = ?", [rk]) == 0
                )

        # the other patient and the shared resources are untouched and readable
        assert read_resource(con, world.provider, "Patient", "p2") == PATIENTS["p2"]
        assert read_resource(con, world.provider, "Organization", "org1") == ORGANIZATION
        assert len(list(iter_current_resources(con, world.provider))) == 4
        assert con.execute("SELECT patient_id, x FROM deid_patient").fetchall() == [(world.p2, 2)]
        assert con.execute("SELECT patient_id FROM deid_patient_view").fetchall() == [(world.p2,)]
        assert _count(con, "SELECT count(*) FROM quarantine WHERE patient_key = ?", [world.p2]) == 1
        assert _count(con, "SELECT count(*) FROM coded") == 1

        with pytest.raises(KeyDestroyedError, match="erased"):
            reidentify(con, world.provider, world.p1, world.audit, "follow-up")
    finally:
        con.close()

    _, forget_entry, _, reid_entry = world.audit.entries()
    assert (forget_entry["action"], forget_entry["subject"]) == ("forget", world.p1)
    assert forget_entry["reason"] == "erasure request 42"
    assert forget_entry["details"]["rows_deleted"]["phi_vault"] == 3
    assert reid_entry["details"] == {
        "found": False,
        "outcome": "erased",
        "error": "KeyDestroyedError",
        "phase": "done",
        "intent_seq": 2,
    }
    text = world.audit.path.read_text()
    for phi in ("p1", "Quillfeather", "MRN-4471", "1948-02-29", "Lantern Row"):
        assert f'"{phi}' not in text and phi not in text.replace(world.p1, "")


def test_forget_by_pseudonym_is_idempotent_and_reports_unknown_patients(world: World) -> None:
    con = world.connect()
    try:
        first = forget_pseudonym(con, world.p2, world.audit, "request")
        again = forget_pseudonym(con, world.p2, world.audit, "request, second run")
        unknown = forget_pseudonym(con, "0" * 32, world.audit, "request for someone")
    finally:
        con.close()
    assert first.found and first.data_keys_destroyed == 1
    assert again.found and (again.data_keys_destroyed, again.data_keys_already_destroyed) == (0, 1)
    assert not any(again.rows_deleted.values())
    assert not unknown.found and unknown.data_keys_destroyed == 0
    subjects = [world.p2] * 4 + ["0" * 32] * 2  # an intent and a completion each
    assert [e["subject"] for e in world.audit.entries()] == subjects
    assert world.audit.verify().ok


def test_a_failing_place_is_audited_and_reported(world: World) -> None:
    plan = ErasurePlan(places=(_Place("broken", fails=True), _Place("fine", removed=1)))
    con = world.connect()
    try:
        with pytest.raises(ErasureIncompleteError, match="run the erasure again"):
            forget_pseudonym(con, world.p1, world.audit, "request", plan=plan)
        # the warehouse part is committed regardless
        assert read_resource(con, world.provider, "Patient", "p1") is None
    finally:
        con.close()
    (entry,) = world.audit.entries()  # announced; completed only by a successful re-run
    assert entry["details"] == {"phase": "intent"}
    assert len(world.audit.verify().incomplete) == 1
    con = world.connect()
    try:
        forget_pseudonym(con, world.p1, world.audit, "request", plan=ErasurePlan())
    finally:
        con.close()
    assert world.audit.verify().incomplete == []


def test_a_listed_table_without_patient_id_is_refused(world: World) -> None:
    con = world.connect()
    try:
        con.execute("CREATE TABLE released (person VARCHAR)")
        plan = ErasurePlan(tables=(ReleasedTables("main", ("released",)),))
        with pytest.raises(VaultError, match="no patient_id"):
            forget_pseudonym(con, world.p1, world.audit, "request", plan=plan)
        # refused before anything was committed: the patient is still there
        assert read_resource(con, world.provider, "Patient", "p1") is not None
    finally:
        con.close()


def test_a_failed_erasure_rolls_back_entirely(world: World) -> None:
    con = world.connect()
    try:
        con.execute("CREATE TABLE cohort (patient_id VARCHAR PRIMARY KEY)")
        con.execute("CREATE TABLE cohort_member (member VARCHAR REFERENCES cohort (patient_id))")
        con.execute("INSERT INTO cohort VALUES (?)", [world.p1])
        con.execute("INSERT INTO cohort_member VALUES (?)", [world.p1])
        plan = ErasurePlan(tables=(ReleasedTables("main", ("cohort",)),))
        with pytest.raises(duckdb.ConstraintException, match="still referenced"):
            forget_pseudonym(con, world.p1, world.audit, "request", plan=plan)
        assert con.execute(
            "SELECT wrapped IS NOT NULL, destroyed_at FROM data_keys WHERE owner = ?", [world.p1]
        ).fetchall() == [(True, None)]
        assert read_resource(con, world.provider, "Patient", "p1") == PATIENTS["p1"]
    finally:
        con.close()
    assert [e["details"] for e in world.audit.entries()] == [{"phase": "intent"}]


def test_forget_arguments(world: World) -> None:
    con = world.connect()
    try:
        with pytest.raises(ValueError, match="reason"):
            forget_patient(con, world.provider, "p1", world.audit, "  ")
        with pytest.raises(ValueError, match="lowercase hex") as info:
            forget_pseudonym(con, "p1", world.audit, "request")  # an original id, not a pseudonym
        assert "p1" not in str(info.value).replace("forget_patient", "")
        with pytest.raises(ValueError, match="lowercase hex"):
            forget_pseudonym(con, "_shared", world.audit, "request")
        with pytest.raises(ValueError, match="patient_id"):
            forget_patient(con, world.provider, "", world.audit, "request")
        assert read_resource(con, world.provider, "Patient", "p1") is not None
    finally:
        con.close()
    assert world.audit.entries() == []


# -- re-identification ------------------------------------------------------------------------


def test_reidentify_returns_the_identifiers_and_is_audited(world: World) -> None:
    con = world.connect(read_only=True)
    try:
        found = reidentify(con, world.provider, world.p1, world.audit, "adverse event", actor="dpo")
    finally:
        con.close()
    p1 = PATIENTS["p1"]
    assert found == {
        "id": "p1",
        "name": p1["name"],
        "identifier": [{"system": "urn:mrn", "value": "MRN-4471"}],
        "birthDate": "1948-02-29",
        "address": p1["address"],
        "telecom": p1["telecom"],
    }
    intent, entry = world.audit.entries()
    assert intent["details"] == {"phase": "intent"}
    assert (entry["action"], entry["subject"], entry["actor"], entry["reason"]) == (
        "reidentify",
        world.p1,
        "dpo",
        "adverse event",
    )
    assert entry["details"] == {"found": True, "outcome": "found", "phase": "done", "intent_seq": 0}
    assert "Quillfeather" not in world.audit.path.read_text()


def test_reidentify_needs_a_reason_and_audits_failures(world: World) -> None:
    con = world.connect(read_only=True)
    try:
        with pytest.raises(ValueError, match="reason"):
            reidentify(con, world.provider, world.p1, world.audit, "")
        assert world.audit.entries() == []
        with pytest.raises(PatientNotFoundError):
            reidentify(con, world.provider, "a" * 32, world.audit, "typo check")
        with pytest.raises(ValueError, match="lowercase hex"):
            reidentify(con, world.provider, "Quillfeather", world.audit, "wrong input")
    finally:
        con.close()
    _, entry = world.audit.entries()
    assert entry["subject"] == "a" * 32
    assert entry["details"] == {
        "found": False,
        "outcome": "not_found",
        "error": "PatientNotFoundError",
        "phase": "done",
        "intent_seq": 0,
    }


def test_nothing_is_returned_when_the_audit_entry_cannot_be_written(world: World) -> None:
    world.audit.append("rotate_keys", "kek-x", "test")
    world.audit.append("rotate_keys", "kek-y", "test")
    world.audit.head_path.unlink()  # a damaged log refuses appends
    con = world.connect(read_only=True)
    try:
        with pytest.raises(AuditLogError):
            reidentify(con, world.provider, world.p1, world.audit, "adverse event")
    finally:
        con.close()


def test_a_crash_after_the_rotation_before_its_completion_is_recorded_again(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the old KEKs were retired, before the completion reached the log: running
    the rotation again writes that completion and rotates nothing more (a second rotation would
    leave the first announced and never completed, for good)."""
    real_complete = world.audit.complete

    def killed(intent: dict[str, Any], details: dict[str, Any] | None = None) -> Any:
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(world.audit, "complete", killed)
    con = world.connect()
    try:
        with pytest.raises(KeyboardInterrupt):
            rotate_kek(world.key_file, con, world.audit)
        rotated = FileKeyProvider.load(world.key_file)
        assert len(rotated.live_kek_ids) == 1  # the rotation itself ended
        assert len(world.audit.verify().incomplete) == 1
        monkeypatch.setattr(world.audit, "complete", real_complete)
        report = rotate_kek(world.key_file, con, world.audit)
        assert report.new_kek_id == rotated.active_kek_id()
        assert FileKeyProvider.load(world.key_file).live_kek_ids == [report.new_kek_id]
        assert world.audit.verify().incomplete == []
        _all_readable(con, FileKeyProvider.load(world.key_file))
        # and a rotation after it is a new one
        assert rotate_kek(world.key_file, con, world.audit).new_kek_id != report.new_kek_id
        assert world.audit.verify().incomplete == []
    finally:
        con.close()


def _erased_bytes(con: duckdb.DuckDBPyConnection, pseudonym: str) -> list[bytes]:
    """The patient's wrapped data key and the first 64 bytes of each of their ciphertexts."""
    wrapped = con.execute("SELECT wrapped FROM data_keys WHERE owner = ?", [pseudonym]).fetchall()
    sealed = con.execute(
        "SELECT sealed FROM phi_vault WHERE patient_key = ?", [pseudonym]
    ).fetchall()
    return [bytes(w) for (w,) in wrapped] + [bytes(s)[:64] for (s,) in sealed]


def test_an_erasure_whose_rewrite_cannot_wait_longer_says_it_is_committed(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process opens the warehouse between the erasure's commit and its rewrite (a
    second erasure, a run): the rewrite waits, and when it can wait no longer the error says
    the erasure is committed and the file not yet rewritten; the intent stays open, and the
    same erasure run again rewrites the file, leaving none of the patient's bytes in it."""
    con = world.connect(read_only=True)
    try:
        hers = _erased_bytes(con, world.p1)
    finally:
        con.close()
    assert hers and all(b in world.wh.read_bytes() for b in hers)
    holders = []
    purge_places = lifecycle._purge_places

    def purge_then_opened_elsewhere(*args: Any) -> None:
        purge_places(*args)
        holders.append(hold_open(world.wh, 30))

    monkeypatch.setattr(lifecycle, "_purge_places", purge_then_opened_elsewhere)
    monkeypatch.setattr(warehouse, "BUSY_WAIT_SECONDS", 0.5)
    try:
        with pytest.raises(
            ErasureIncompleteError, match="committed in the warehouse, but the file"
        ):
            lifecycle.forget_in_warehouse(world.wh, world.p1, world.audit, "request")
    finally:
        for holder in holders:
            holder.kill()
            holder.wait(timeout=30)
    assert len(world.audit.verify().incomplete) == 1
    monkeypatch.setattr(lifecycle, "_purge_places", purge_places)
    lifecycle.forget_in_warehouse(world.wh, world.p1, world.audit, "request")
    assert world.audit.verify().incomplete == []
    raw = world.wh.read_bytes()
    assert not any(b in raw for b in hers)


def test_the_ledger_keeps_no_content_mac_of_an_erased_record(world: World) -> None:
    """The content MAC of a record is a keyed digest of the record: an erasure leaves its
    ledger row counted, without it; rows an older erasure emptied with it lose it too."""
    con = world.connect()
    try:
        macs = {
            str(mac)
            for (mac,) in con.execute(
                "SELECT content_mac FROM phi_vault WHERE patient_key IN (?, ?)",
                [world.p1, world.p2],
            ).fetchall()
        }
        assert len(macs) == 3 + 3
        held = "SELECT count(*) FROM record_ledger WHERE content_mac IN (SELECT unnest(?))"
        assert _count(con, held, [sorted(macs)]) == 6
        forget_pseudonym(con, world.p1, world.audit, "request 1")
        assert _count(con, held, [sorted(macs)]) == 3  # p2's records only
        # an erasure from before this rule left the MACs of the rows it emptied
        con.execute("UPDATE record_ledger SET content_mac = 'left' WHERE status = 'erased'")
        forget_pseudonym(con, world.p2, world.audit, "request 2")
        assert _count(con, held, [sorted(macs)]) == 0
        erased = con.execute(
            "SELECT count(*), count(content_mac) FROM record_ledger WHERE status = 'erased'"
        ).fetchall()
    finally:
        con.close()
    assert erased == [(8, 0)]  # both patients' records, still counted
