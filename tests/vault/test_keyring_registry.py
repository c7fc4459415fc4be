"""Retired KEKs kept wrapped, the keyring's warehouse registry, the audit key, the warehouse id,
its private creation and its rewrite, and the data keys an erasure destroyed for good."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import duckdb
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault import warehouse
from vault.errors import KeyDestroyedError, KeyMaterialError
from vault.keys import (
    EnvKeyProvider,
    FileKeyProvider,
    init_keyring,
    wrap_retired_kek,
    write_keyring,
)
from vault.sealing import DataKeyStore


def zero_nonce(n: int) -> bytes:
    return b"\x00" * n


def test_retired_kek_wrap_known_answer_and_binding() -> None:
    old, new = b"\x11" * 32, b"\x22" * 32
    entry = wrap_retired_kek("kek-old", old, "kek-new", new, random_bytes=zero_nonce)
    blob = base64.b64decode(entry["wrapped"])
    aad = b"ehr-retired-kek/1|kek-old|kek-new"
    assert entry["wrapped_by"] == "kek-new"
    assert blob == b"\x00" * 12 + AESGCM(new).encrypt(b"\x00" * 12, old, aad)
    assert len(blob) == 12 + 32 + 16


def _keyring_with_retired(tmp_path: Path) -> tuple[Path, dict[str, object], bytes]:
    path = tmp_path / "keyring.json"
    init_keyring(path)
    document = json.loads(path.read_text())
    active = document["active_kek"]
    new = base64.b64decode(document["keks"][active]["key"])
    old = b"\x33" * 32
    document["retired_keks"] = {
        "kek-old": {
            "created": None,
            "retired": None,
            **wrap_retired_kek("kek-old", old, active, new),
        }
    }
    write_keyring(path, document)
    return path, document, old


def test_a_retired_kek_still_unwraps_what_was_wrapped_under_it(tmp_path: Path) -> None:
    path, _, old = _keyring_with_retired(tmp_path)
    provider = FileKeyProvider.load(path)
    assert provider.retired_kek_ids() == ["kek-old"]
    assert provider.live_kek_ids == [provider.active_kek_id()]
    nonce = b"\x01" * 12
    aad = b"ehr-wrap/1|kek-old|ctx"
    from vault.keys import WrappedKey

    wrapped = WrappedKey("kek-old", nonce + AESGCM(old).encrypt(nonce, b"\x44" * 32, aad))
    assert provider.unwrap(wrapped, b"ctx") == b"\x44" * 32
    assert base64.b64encode(old).decode() not in path.read_text()  # never stored bare


def test_a_tampered_retired_kek_is_refused(tmp_path: Path) -> None:
    path, document, _ = _keyring_with_retired(tmp_path)
    entry = document["retired_keks"]["kek-old"]  # type: ignore[index]
    blob = bytearray(base64.b64decode(entry["wrapped"]))
    blob[-1] ^= 1
    entry["wrapped"] = base64.b64encode(bytes(blob)).decode()
    write_keyring(path, document)
    with pytest.raises(KeyMaterialError, match="does not unwrap"):
        FileKeyProvider.load(path)


def test_audit_keys_are_separate(tmp_path: Path) -> None:
    init_keyring(tmp_path / "k.json")
    provider = FileKeyProvider.load(tmp_path / "k.json")
    assert provider.audit_key() != provider.pseudonym_key() and not provider.legacy_audit
    env = {
        "EHR_KEK": base64.b64encode(b"k" * 32).decode(),
        "EHR_PSEUDONYM_KEY": base64.b64encode(b"p" * 32).decode(),
    }
    with pytest.raises(KeyMaterialError, match="EHR_AUDIT_KEY"):
        EnvKeyProvider.from_environ(env).audit_key()
    env["EHR_AUDIT_KEY"] = base64.b64encode(b"a" * 32).decode()
    assert EnvKeyProvider.from_environ(env).audit_key() == b"a" * 32
    env["EHR_AUDIT_KEY"] = env["EHR_PSEUDONYM_KEY"]
    with pytest.raises(KeyMaterialError, match="differ"):
        EnvKeyProvider.from_environ(env)


def test_a_warehouse_is_private_has_an_id_and_registers_on_first_key(tmp_path: Path) -> None:
    init_keyring(tmp_path / "k.json")
    provider = FileKeyProvider.load(tmp_path / "k.json")
    path = tmp_path / "w" / "warehouse.duckdb"
    con = warehouse.connect(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert warehouse.warehouse_id(con) is None
        keys = DataKeyStore(con, provider)
        keys.for_owner("a" * 32)
        keys.flush()
        wid = warehouse.warehouse_id(con)
        assert wid is not None and wid.startswith("wh-") and len(wid) == 35
        assert warehouse.ensure_warehouse_id(con) == wid  # stable
    finally:
        con.close()
    assert FileKeyProvider.load(tmp_path / "k.json").warehouses() == {wid: str(path.resolve())}


def test_a_destroyed_data_key_is_never_made_anew(tmp_path: Path) -> None:
    init_keyring(tmp_path / "k.json")
    provider = FileKeyProvider.load(tmp_path / "k.json")
    con = warehouse.connect(tmp_path / "warehouse.duckdb")
    try:
        keys = DataKeyStore(con, provider)
        keys.for_owner("a" * 32)
        keys.flush()
        con.execute("UPDATE data_keys SET wrapped = NULL, destroyed_at = now()")
        again = DataKeyStore(con, provider)
        assert again.destroyed_owners == {"a" * 32}
        with pytest.raises(KeyDestroyedError, match="none is made anew"):
            again.for_owner("a" * 32)
    finally:
        con.close()


def test_rewrite_leaves_no_deleted_bytes_and_keeps_everything_else(tmp_path: Path) -> None:
    path = tmp_path / "warehouse.duckdb"
    con = warehouse.connect(path)
    canary = b"\x9c\x01erased-canary-bytes\x02" * 4
    keep = b"\x9c\x01kept-bytes\x02" * 4
    try:
        wid = warehouse.ensure_warehouse_id(con)
        con.execute("CREATE TABLE t (b BLOB)")
        con.execute("INSERT INTO t VALUES (?), (?)", [canary, keep])
        con.execute("CHECKPOINT")
        con.execute("DELETE FROM t WHERE b = ?", [canary])
        con.execute("CHECKPOINT")
    finally:
        con.close()
    assert canary in path.read_bytes()  # DuckDB keeps the freed page as it was
    warehouse.rewrite(path)
    data = path.read_bytes()
    assert canary not in data and keep in data
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".warehouse-*"))
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert warehouse.warehouse_id(con) == wid
        assert con.execute("SELECT b FROM t").fetchall() == [(keep,)]
        # the view over the vault survives the copy
        assert con.execute("SELECT count(*) FROM phi_vault_current").fetchall() == [(0,)]
    finally:
        con.close()


def test_a_copied_warehouse_gets_an_id_of_its_own(tmp_path: Path) -> None:
    init_keyring(tmp_path / "k.json")
    provider = FileKeyProvider.load(tmp_path / "k.json")
    original = tmp_path / "a" / "warehouse.duckdb"
    con = warehouse.connect(original)
    try:
        DataKeyStore(con, provider).for_owner("a" * 32)
        keys = DataKeyStore(con, provider)
        keys.for_owner("b" * 32)
        keys.flush()
        first = warehouse.warehouse_id(con)
    finally:
        con.close()
    copy = tmp_path / "b" / "warehouse.duckdb"
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())  # cp -r of a work directory
    con = warehouse.connect(copy)
    try:
        DataKeyStore(con, FileKeyProvider.load(tmp_path / "k.json"))
        second = warehouse.warehouse_id(con)
    finally:
        con.close()
    assert second is not None and first is not None and second != first
    assert FileKeyProvider.load(tmp_path / "k.json").warehouses() == {
        first: str(original.resolve()),
        second: str(copy.resolve()),
    }
    # a moved warehouse keeps its id and its registry entry follows it
    moved = tmp_path / "c" / "warehouse.duckdb"
    moved.parent.mkdir()
    original.rename(moved)
    con = warehouse.connect(moved)
    try:
        DataKeyStore(con, FileKeyProvider.load(tmp_path / "k.json"))
        assert warehouse.warehouse_id(con) == first
    finally:
        con.close()
    assert FileKeyProvider.load(tmp_path / "k.json").warehouses()[first] == str(moved.resolve())


def test_prefetched_keys_equal_the_keys_read_one_by_one(tmp_path: Path) -> None:
    init_keyring(tmp_path / "k.json")
    provider = FileKeyProvider.load(tmp_path / "k.json")
    con = warehouse.connect(tmp_path / "warehouse.duckdb")
    try:
        keys = DataKeyStore(con, provider)
        ids = [keys.for_owner(f"{i:032x}").key_id for i in range(6)]
        keys.flush()
        con.execute(
            "UPDATE data_keys SET wrapped = NULL, destroyed_at = now() WHERE key_id = ?", [ids[0]]
        )
        one_by_one = DataKeyStore(con, provider)
        expected = {k: one_by_one.by_id(k).key for k in ids[1:]}
        prefetched = DataKeyStore(con, provider)
        prefetched.prefetch([*ids, b"\x00" * len(ids[0])])  # a destroyed and an unknown id too
        # every live key unwrapped in the one lookup (by_id then finds it cached, no query)
        con.execute("DELETE FROM data_keys WHERE key_id <> ?", [ids[0]])
        assert {k: prefetched.by_id(k).key for k in ids[1:]} == expected
        # the destroyed key was not unwrapped: reading it still says why
        with pytest.raises(KeyDestroyedError, match="was destroyed"):
            prefetched.by_id(ids[0])
    finally:
        con.close()
