"""Erasure that sticks and shreds, keys that cannot strand a warehouse, and acts that survive a
SIGKILL: ingest → de-identification → views on a small hand-made landing folder, then
``forget``, a re-run of the same files, raw-byte scans of every file, two warehouses on one
keyring, and processes killed at random points of ``forget`` and ``rotate``."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from dagster import DagsterInstance

from deid.leakscan import CanarySet
from deid.policy import Policy
from deid.release import deidentify_batch
from pipelines.assets.deid import RELEASE_INPUT
from pipelines.cli import main
from pipelines.cli.privacy import audit_log_for, forget
from pipelines.views.refresh import refresh_view
from pipelines.views.tables import load_views
from pipelines.workdir import Workdir
from vault import warehouse
from vault.errors import KeyRotationError
from vault.ingest import ERASED_SUBJECT, ingest_batch, reconcile_batch
from vault.keys import FileKeyProvider
from vault.lifecycle import forget_in_warehouse, purge_retired_keks, rotate_kek
from vault.pseudonym import Pseudonymizer
from vault.read import iter_current_resources

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
MRN = "urn:mrn|MRN-4471"
CANARIES = ("Quillfeather", "Marisol", "MRN-4471", "1948-02-29", "Lantern Row")
FILE_NAME = "Quillfeather_Marisol_export.json"  # exporters put patient names in file names
P1 = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"family": "Quillfeather", "given": ["Marisol"]}],
    "identifier": [{"system": "urn:mrn", "value": "MRN-4471"}],
    "birthDate": "1948-02-29",
    "address": [{"line": ["12 Lantern Row"], "city": "Harrowgate"}],
}
P2 = {"resourceType": "Patient", "id": "p2", "name": [{"family": "Oddsock"}], "gender": "male"}


def _obs(oid: str, subject: str, performer: str | None = None) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": subject},
        "effectiveDateTime": "2020-05-01T10:00:00Z",
        "valueQuantity": {"value": 72, "unit": "/min"},
    }
    if performer:
        obs["performer"] = [{"reference": performer}]
    return obs


def _landing(folder: Path) -> Path:
    """p1 in a Bundle under a file name holding its name; an Observation naming p1 only by a
    conditional reference, in a file read before p1's; p2 with an Observation whose performer
    is p1 (conditionally)."""
    folder.mkdir(parents=True)
    p1_entries = [
        P1,
        {
            "resourceType": "Condition",
            "id": "c-p1",
            "subject": {"reference": "Patient/p1"},
            "code": {"text": "asthma"},
        },
    ]
    (folder / FILE_NAME).write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": r} for r in p1_entries],
            }
        )
    )
    (folder / "0_conditional.ndjson").write_text(
        json.dumps(_obs("o-cond", f"Patient?identifier={MRN}")) + "\n"
    )
    (folder / "p2.ndjson").write_text(
        json.dumps(P2) + "\n" + json.dumps(_obs("o-p2", "Patient/p2", f"Patient?identifier={MRN}"))
    )
    return folder


def _release(workdir: Workdir, provider: FileKeyProvider, batches: list[str]) -> None:
    con = warehouse.connect(workdir.warehouse)
    try:
        policy = Policy.shipped("research")
        for batch in batches:
            deidentify_batch(con, provider, batch, policy, workers=1)
        for view in load_views():
            if view.name in ("patient", "observation", "condition"):
                # as the views asset does: bookkeeping of what each view was built from
                refresh_view(con, view, workdir.root, CanarySet())
        con.execute("CHECKPOINT")
    finally:
        con.close()


@pytest.fixture
def world(tmp_path: Path, key_file: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.delenv("EHR_AUDIT_ANCHOR", raising=False)
    provider = FileKeyProvider.load(key_file)
    landing = _landing(tmp_path / "landing" / "b1")
    workdir = Workdir(tmp_path / "work")
    report = ingest_batch(workdir.warehouse, "b1", landing, provider, workers=1)
    assert (report.accepted, report.quarantined) == (5, 0)
    _release(workdir, provider, ["b1"])
    p1 = Pseudonymizer(provider.pseudonym_key()).resource_key("Patient", "p1")
    return {"provider": provider, "landing": landing, "workdir": workdir, "p1": p1}


def _scalar(con: duckdb.DuckDBPyConnection, sql: str, params: Any = None) -> Any:
    return con.execute(sql, params or []).fetchall()[0][0]


def _forget_cli(workdir: Workdir, key_file: Path, patient: str) -> dict[str, Any]:
    common = ["--workdir", str(workdir.root), "--key-file", str(key_file)]
    result = CliRunner().invoke(forget, [patient, "--reason", "erasure request", *common])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_conditional_references_and_file_names(world: dict[str, Any]) -> None:
    con = warehouse.connect(world["workdir"].warehouse, read_only=True)
    try:
        owner = _scalar(
            con,
            "SELECT patient_key FROM phi_vault WHERE resource_type = 'Observation' "
            "AND resource_key = ?",
            [
                Pseudonymizer(world["provider"].pseudonym_key()).resource_key(
                    "Observation", "o-cond"
                )
            ],
        )
        assert owner == world["p1"]  # settled at the end of the batch, sealed under p1's key
        assert _scalar(con, "SELECT count(*) FROM pending_patient_refs") == 0
        columns = {r[0] for r in con.execute("DESCRIBE source_files").fetchall()}
        assert "name_sealed" not in columns
        # released with p1's patient_id and shifted by p1's date shift
        effective, birth = con.execute(
            "SELECT (SELECT resource->>'effectiveDateTime' FROM deid_resources "
            "        WHERE resource_type = 'Observation' AND patient_id = $p), "
            "       (SELECT resource->>'birthDate' FROM deid_resources "
            "        WHERE resource_type = 'Patient' AND patient_id = $p)",
            {"p": world["p1"]},
        ).fetchall()[0]
        obs_shift = date.fromisoformat(effective[:10]) - date(2020, 5, 1)
        assert obs_shift == date.fromisoformat(birth) - date(1948, 2, 29)
    finally:
        con.close()
    assert FILE_NAME.encode() not in world["workdir"].warehouse.read_bytes()


def test_forget_then_rerun_keeps_the_patient_out(world: dict[str, Any], key_file: Path) -> None:
    workdir, provider, p1 = world["workdir"], world["provider"], world["p1"]
    state = "SELECT count(*) FROM release_state.view_sources WHERE patient_id = ?"
    con = warehouse.connect(workdir.warehouse, read_only=True)
    try:
        assert _scalar(con, state, [p1]) > 0
    finally:
        con.close()
    report = _forget_cli(workdir, key_file, "p1")
    assert report["found"] and report["data_keys_destroyed"] == 1
    assert report["rows_deleted"]["phi_vault"] == 3  # Patient, Condition, conditional Obs
    # the research profile releases no performer: nothing to remove here (see test_erasure)
    assert report["places"]["released_references"] == 0
    # the Dagster instance of the workdir learns that the release input changed
    with DagsterInstance.local_temp(str(workdir.dagster_home.resolve())) as instance:
        event = instance.get_latest_materialization_event(RELEASE_INPUT)
        assert event is not None and event.asset_materialization is not None
        assert event.asset_materialization.description == "a patient was erased"

    # the same files again, as the same batch and as a new one
    shutil.copytree(world["landing"], world["landing"].parent / "b2")
    for batch in ("b1", "b2"):
        again = ingest_batch(workdir.warehouse, batch, world["landing"], provider, workers=1)
        assert again.quarantine_reasons == {ERASED_SUBJECT: 3}, batch
        assert again.accepted == 2  # p2 and its Observation
    _release(workdir, FileKeyProvider.load(key_file), ["b1", "b2"])

    con = warehouse.connect(workdir.warehouse, read_only=True)
    try:
        for batch in ("b1", "b2"):
            assert reconcile_batch(con, batch).passed
        assert (
            _scalar(
                con,
                "SELECT count(*) FROM phi_vault WHERE patient_key = ? OR resource_key = ?",
                [p1, p1],
            )
            == 0
        )
        assert (
            _scalar(
                con, "SELECT count(*) FROM data_keys WHERE owner = ? AND wrapped IS NOT NULL", [p1]
            )
            == 0
        )
        erased = con.execute(
            "SELECT sealed, aad, patient_key FROM quarantine WHERE reason_code = ?",
            [ERASED_SUBJECT],
        ).fetchall()
        assert len(erased) == 6 and all(r == (b"", b"", None) for r in erased)  # not stored
        assert (
            _scalar(
                con,
                "SELECT count(*) FROM deid_resources WHERE contains(resource::VARCHAR, ?) "
                "OR patient_id = ?",
                [p1, p1],
            )
            == 0
        )
        for (table,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE schema_name = 'views'"
        ).fetchall():
            rows = con.execute(f'SELECT * FROM views."{table}"').fetchall()
            assert p1 not in json.dumps(rows, default=str), table
        assert len(list(iter_current_resources(con, FileKeyProvider.load(key_file)))) == 2
        # the views' bookkeeping (release_state) is erased like the views
        assert _scalar(con, state, [p1]) == 0
    finally:
        con.close()
    for parquet in workdir.views.glob("*.parquet"):
        assert p1.encode() not in parquet.read_bytes(), parquet.name


def _unwraps_anywhere(data: bytes, keks: list[bytes], aad: bytes) -> bool:
    """Try every 60-byte window (nonce, wrapped 32-byte key, tag) under every KEK."""
    for offset in range(len(data) - 59):
        window = data[offset : offset + 60]
        for kek in keks:
            try:
                AESGCM(kek).decrypt(window[:12], window[12:], aad)
            except InvalidTag:
                continue
            return True
    return False


def test_after_forget_no_byte_of_the_patient_decrypts(
    world: dict[str, Any], key_file: Path, tmp_path: Path
) -> None:
    workdir, p1 = world["workdir"], world["p1"]
    con = warehouse.connect(workdir.warehouse, read_only=True)
    try:
        key_id, kek_id, wrapped = con.execute(
            "SELECT key_id, kek_id, wrapped FROM data_keys WHERE owner = ?", [p1]
        ).fetchall()[0]
        sealed = [
            bytes(b)
            for (b,) in con.execute(
                "SELECT sealed FROM phi_vault WHERE patient_key = ?", [p1]
            ).fetchall()
        ]
    finally:
        con.close()
    key_id, wrapped = bytes(key_id), bytes(wrapped)
    document = json.loads(key_file.read_text())
    import base64

    keks = [base64.b64decode(e["key"]) for e in document["keks"].values()]
    aad = b"ehr-wrap/1|" + kek_id.encode() + b"|" + b"ehr-dek/1|" + p1.encode() + b"|" + key_id
    before = workdir.warehouse.read_bytes()
    # the scan sees what it looks for while it is there
    assert wrapped in before and all(blob[:48] in before for blob in sealed)
    assert _unwraps_anywhere(before, keks, aad)

    forget_in_warehouse(
        workdir.warehouse,
        p1,
        audit_log_for(workdir, world["provider"]),
        "erasure request",
        plan=workdir.erasure_plan(),
    )
    # the work directory and everything held with the keys (the landing folder is the input)
    files = [p for d in (workdir.root, key_file.parent) for p in d.rglob("*") if p.is_file()]
    assert workdir.warehouse in files and key_file in files
    assert not list(workdir.root.glob(".warehouse-*"))  # no leftover copy
    for path in files:
        data = path.read_bytes()
        assert wrapped not in data, path
        assert not any(blob[:48] in data for blob in sealed), path
        if path == workdir.warehouse:
            assert not _unwraps_anywhere(data, keks, aad)
        if path.suffix in (".duckdb", ".parquet", ".db", ".log", ".json"):
            for canary in CANARIES:
                assert canary.encode() not in data, (path, canary)
    assert os.stat(workdir.warehouse).st_mode & 0o077 == 0


def _second_warehouse(tmp_path: Path, provider: FileKeyProvider) -> Workdir:
    other = Workdir(tmp_path / "other")
    landing = tmp_path / "landing2" / "x"
    landing.mkdir(parents=True)
    (landing / "p3.ndjson").write_text(
        json.dumps({"resourceType": "Patient", "id": "p3", "name": [{"family": "Umber"}]}) + "\n"
    )
    ingest_batch(other.warehouse, "x", landing, provider, workers=1)
    return other


def _wrapped_keys(path: Path) -> list[bytes]:
    c = warehouse.connect(path, read_only=True)
    try:
        return [bytes(w) for (w,) in c.execute("SELECT wrapped FROM data_keys").fetchall()]
    finally:
        c.close()


def test_two_warehouses_on_one_keyring_rotate_together(
    world: dict[str, Any], key_file: Path, tmp_path: Path
) -> None:
    workdir, provider = world["workdir"], world["provider"]
    other = _second_warehouse(tmp_path, provider)
    registry = FileKeyProvider.load(key_file).warehouses()
    assert sorted(registry.values()) == sorted(str(w.warehouse.resolve()) for w in (workdir, other))
    old_kek = provider.active_kek_id()
    old_wrapped = {w.warehouse: _wrapped_keys(w.warehouse) for w in (workdir, other)}
    con = warehouse.connect(workdir.warehouse)
    try:
        report = rotate_kek(
            key_file, con, audit_log_for(workdir, provider, warehouse.warehouse_id(con))
        )
        assert warehouse.rewrite_owed(con)  # its own: the caller rewrites it once closed
    finally:
        con.close()
    assert warehouse.rewrite_if_owed(workdir.warehouse)
    for path, wrapped in old_wrapped.items():  # no key wrapped under the retired KEK is left
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*") if p.is_file())
        assert wrapped and sum(blob in raw for blob in wrapped) == 0, path
    assert sorted(report.warehouses) == sorted(registry)
    rotated = FileKeyProvider.load(key_file)
    for w in (workdir, other):
        c = warehouse.connect(w.warehouse, read_only=True)
        try:
            kek_ids = {k for (k,) in c.execute("SELECT DISTINCT kek_id FROM data_keys").fetchall()}
            assert kek_ids == {report.new_kek_id}
            assert list(iter_current_resources(c, rotated))
        finally:
            c.close()
    audit = audit_log_for(workdir, rotated)
    assert purge_retired_keks(key_file, audit) == [old_kek]
    purged = FileKeyProvider.load(key_file)
    assert purged.kek_ids() == [report.new_kek_id]
    c = warehouse.connect(other.warehouse, read_only=True)
    try:
        assert [r["id"] for r in iter_current_resources(c, purged)] == ["p3"]
    finally:
        c.close()


def test_rotation_refuses_when_a_registered_warehouse_is_unreachable(
    world: dict[str, Any], key_file: Path, tmp_path: Path
) -> None:
    workdir, provider = world["workdir"], world["provider"]
    other = _second_warehouse(tmp_path, provider)
    other.warehouse.rename(other.root / "moved.duckdb")
    before = key_file.read_text()
    con = warehouse.connect(workdir.warehouse)
    try:
        audit = audit_log_for(workdir, provider, warehouse.warehouse_id(con))
        with pytest.raises(KeyRotationError, match="cannot reach every warehouse") as info:
            rotate_kek(key_file, con, audit)
    finally:
        con.close()
    assert str(other.warehouse.resolve()) in str(info.value)
    assert key_file.read_text() == before  # nothing changed
    assert "Umber" not in str(info.value)


def test_a_deleted_warehouse_is_forgotten_by_the_command_rotation_names(
    world: dict[str, Any], key_file: Path, tmp_path: Path
) -> None:
    """Rotation refuses while a registered warehouse is gone and says to run `ehr keys
    forget-warehouse`: that command exists, refuses a warehouse that still exists, and once
    the deleted one is removed the rotation goes through."""
    workdir, provider = world["workdir"], world["provider"]
    other = _second_warehouse(tmp_path, provider)
    con = warehouse.connect(other.warehouse, read_only=True)
    try:
        other_id = warehouse.warehouse_id(con)
    finally:
        con.close()
    assert other_id is not None
    forget = ["keys", "forget-warehouse", other_id, "--key-file", str(key_file)]
    kept = CliRunner().invoke(main, forget)
    assert kept.exit_code != 0 and "still exists" in kept.output
    assert other_id in json.loads(key_file.read_text())["warehouses"]
    other.warehouse.unlink()
    con = warehouse.connect(workdir.warehouse)
    try:
        own_id = warehouse.warehouse_id(con)
        audit = audit_log_for(workdir, provider, own_id)
        with pytest.raises(KeyRotationError, match="`ehr keys forget-warehouse ID`"):
            rotate_kek(key_file, con, audit)
        removed = CliRunner().invoke(main, forget)
        assert removed.exit_code == 0, removed.output
        assert other_id not in json.loads(key_file.read_text())["warehouses"]
        report = rotate_kek(key_file, con, audit)
    finally:
        con.close()
    assert report.warehouses == [own_id]


def test_a_deleted_audit_log_is_detected_after_the_warehouse_id_was_changed(
    world: dict[str, Any], key_file: Path
) -> None:
    """The outside anchor is found by the warehouse's id, which the warehouse file holds and
    whoever can write the work directory can change: the log and its head deleted and a new
    id written into the warehouse verified as a new, empty log. The keyring's registry (kept
    with the keys) still holds the old id at this path, and its anchor says the log went
    further."""
    workdir, provider = world["workdir"], world["provider"]
    con = warehouse.connect(workdir.warehouse, read_only=True)
    try:
        old_id = warehouse.warehouse_id(con)
    finally:
        con.close()
    audit = audit_log_for(workdir, provider, old_id)
    for n in range(3):
        audit.append("reidentify", world["p1"], f"ticket {n}")
    verify = ["audit", "verify", "--workdir", str(workdir.root), "--key-file", str(key_file)]
    assert CliRunner().invoke(main, verify).exit_code == 0
    workdir.audit_log.unlink()
    workdir.audit_log.with_name(workdir.audit_log.name + ".head").unlink()
    con = warehouse.connect(workdir.warehouse)
    try:
        con.execute(
            "UPDATE warehouse_meta SET value = 'wh-0123456789abcdef0123456789abcdef' "
            "WHERE key = 'warehouse_id'"
        )
    finally:
        con.close()
    result = CliRunner().invoke(main, verify)
    assert result.exit_code == 1, result.output
    assert "anchor says 2" in result.stderr and old_id in result.stderr


# -- SIGKILL at random points ------------------------------------------------------------------

_CHILD = """
import sys
from pathlib import Path
from pipelines.cli.privacy import audit_log_for
from pipelines.workdir import Workdir
from vault import warehouse
from vault.keys import FileKeyProvider
from vault.lifecycle import forget_in_warehouse, rotate_kek

act, root, key_file, pseudonym = sys.argv[1:5]
workdir = Workdir(Path(root))
provider = FileKeyProvider.load(Path(key_file))
audit = audit_log_for(workdir, provider)
print("go", flush=True)
if act == "forget":
    forget_in_warehouse(workdir.warehouse, pseudonym, audit, "erasure request",
                        plan=workdir.erasure_plan())
else:
    con = warehouse.connect(workdir.warehouse)
    try:
        rotate_kek(Path(key_file), con, audit)
    finally:
        con.close()
print("done", flush=True)
"""


def _copy_world(src: Path, dst: Path, key_file: Path) -> tuple[Workdir, Path]:
    """A copy of the work directory and keyring folder, the registry pointing at the copy."""
    shutil.copytree(src, dst / "work")
    shutil.copytree(key_file.parent, dst / "keys")
    copied_key = dst / "keys" / key_file.name
    document = json.loads(copied_key.read_text())
    for entry in document["warehouses"].values():
        entry["path"] = str((dst / "work" / "warehouse.duckdb").resolve())
    copied_key.write_text(json.dumps(document))
    return Workdir(dst / "work"), copied_key


def _run_child(
    act: str, workdir: Workdir, key: Path, p1: str, kill_after: float | None
) -> tuple[bool, float]:
    """Run the act in a subprocess; SIGKILL it ``kill_after`` seconds after it starts the act.
    Returns whether the act ran to its end, and the seconds from its start to the exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "EHR_KEY_FILE": str(key)}
    env.pop("EHR_KEK", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, act, str(workdir.root), str(key), p1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "go"
    started = time.perf_counter()
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
    return "done" in out, time.perf_counter() - started


def _state(workdir: Workdir, key: Path) -> list[tuple[str, str]]:
    provider = FileKeyProvider.load(key)
    con = warehouse.connect(workdir.warehouse, read_only=True)
    try:
        return sorted(
            (r["resourceType"], json.dumps(r, sort_keys=True))
            for r in iter_current_resources(con, provider)
        )
    finally:
        con.close()


@pytest.mark.parametrize("act", ["forget", "rotate"])
def test_sigkill_at_random_points_then_rerun_recovers_exactly(
    world: dict[str, Any], key_file: Path, tmp_path: Path, act: str
) -> None:
    p1, src = world["p1"], world["workdir"].root
    # reference: the act run to its end without interruption
    ref_work, ref_key = _copy_world(src, tmp_path / "ref", key_file)
    completed, duration = _run_child(act, ref_work, ref_key, p1, None)
    assert completed
    expected = _state(ref_work, ref_key)
    rng = random.Random(20261130)
    interrupted = 0
    for attempt in range(6):
        work, key = _copy_world(src, tmp_path / f"kill{attempt}", key_file)
        completed, _ = _run_child(act, work, key, p1, rng.uniform(0, duration))
        interrupted += not completed
        if not completed:
            # the interrupted act is in the log as announced (unless killed before that)
            pending = audit_log_for(work, FileKeyProvider.load(key)).verify().incomplete
            assert len(pending) <= 1
        assert _run_child(act, work, key, p1, None)[0]  # the operator runs it again
        assert _state(work, key) == expected
        provider = FileKeyProvider.load(key)
        result = audit_log_for(work, provider).verify()
        assert result.ok, result.problems
        assert result.incomplete == []
        assert "rotation" not in json.loads(key.read_text())
        assert len(provider.live_kek_ids) == 1
        if act == "forget":
            assert not list(work.root.glob(".warehouse-*"))
            assert all('"id": "p1"' not in resource for _, resource in expected)
    assert interrupted >= 1  # at least one kill landed inside the act
