from __future__ import annotations

import base64
from pathlib import Path

import duckdb
import pytest

from vault.errors import InvalidCiphertext, KeyDestroyedError
from vault.keys import EnvKeyProvider
from vault.sealing import DataKey, DataKeyStore, open_sealed, seal, sealed_key_id

KEY = DataKey(bytes(range(16)), bytes(range(32)))


def zero_nonce(n: int) -> bytes:
    return b"\x00" * n


def provider() -> EnvKeyProvider:
    return EnvKeyProvider.from_environ(
        {
            "EHR_KEK": base64.b64encode(b"K" * 32).decode(),
            "EHR_PSEUDONYM_KEY": base64.b64encode(b"P" * 32).decode(),
        }
    )


def test_known_answer_vector() -> None:
    # AES-256-GCM, key 00..1f, nonce 0^12, AAD = header || "aad". The ciphertext+tag half is
    # checked against the primitive used directly, and the whole blob is pinned so that any
    # change of layout, header or AAD construction shows up here.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    blob = seal(KEY, b"hello", b"aad", random_bytes=zero_nonce)
    header = b"\x01" + KEY.key_id
    assert blob[len(header) + 12 :] == AESGCM(KEY.key).encrypt(
        b"\x00" * 12, b"hello", header + b"aad"
    )
    assert blob.hex() == (
        "01" + bytes(range(16)).hex() + "00" * 12 + "66d9d9b2da7e1e30647a8810d39e5a23fa63610c2f"
    )
    assert open_sealed(KEY, blob, b"aad") == b"hello"
    assert sealed_key_id(blob) == KEY.key_id


def test_round_trip_with_random_nonces() -> None:
    a, b = seal(KEY, b"same", b"x"), seal(KEY, b"same", b"x")
    assert a != b
    assert open_sealed(KEY, a, b"x") == open_sealed(KEY, b, b"x") == b"same"


@pytest.mark.parametrize("index", [0, 1, 17, 20, 29, -1])
def test_any_flipped_byte_is_detected(index: int) -> None:
    blob = bytearray(seal(KEY, b"patient resource", b"ctx"))
    blob[index] ^= 0x01
    with pytest.raises(InvalidCiphertext):
        open_sealed(KEY, bytes(blob), b"ctx")


def test_wrong_associated_data_and_wrong_key() -> None:
    blob = seal(KEY, b"payload", b"Patient/1")
    with pytest.raises(InvalidCiphertext):
        open_sealed(KEY, blob, b"Patient/2")
    other = DataKey(KEY.key_id, bytes(32))
    with pytest.raises(InvalidCiphertext):
        open_sealed(other, blob, b"Patient/1")


def test_data_key_repr_hides_the_key() -> None:
    assert bytes(range(32)).hex() not in repr(KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        DataKey(bytes(16), b"short")


def test_data_key_store_persists_wrapped_keys(tmp_path: Path) -> None:
    db = tmp_path / "w.duckdb"
    con = duckdb.connect(str(db))
    store = DataKeyStore(con, provider())
    key_a = store.for_owner("patient-a")
    assert store.for_owner("patient-a") == key_a
    key_b = store.for_owner("patient-b")
    assert key_a.key != key_b.key
    assert store.flush() == 2
    blob = seal(key_a, b"secret", b"r1")
    raw = con.execute("SELECT wrapped FROM data_keys").fetchall()
    assert all(key_a.key not in bytes(w) for (w,) in raw)
    con.close()

    con = duckdb.connect(str(db))
    reloaded = DataKeyStore(con, provider())
    assert reloaded.open(blob, b"r1") == b"secret"
    assert reloaded.for_owner("patient-a").key_id == key_a.key_id
    con.execute("UPDATE data_keys SET wrapped = NULL, destroyed_at = now()")
    with pytest.raises(KeyDestroyedError):
        DataKeyStore(con, provider()).open(blob, b"r1")
